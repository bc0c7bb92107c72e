"""Segmentation export throughput: images/s of ``segmentation.export`` per segmenter.

    python -m benchmarks.export                          # CPU: gt, grid, slic, a tiny SAM
    PYTHONUNBUFFERED=1 python -m benchmarks.export --sam_models vit_b,vit_h   # GPU

Each segmenter exports the same synthetic parts world (``--images`` images of
``--image_size`` squared pixels) to fresh TFRecords: read and decode the image, segment,
post-process (area sort, degenerate boxes, K_max), encode the masks as PNG, write the
shards. The figure is images/s over the whole export, the segmenter's construction
excluded.

SAM runs with random weights (no checkpoint can be downloaded here). The image encoder and
the prompt decoding cost the same with any weights, but random masks pass SAM's quality
filters differently, so the filtering, de-duplication and mask encoding after it differ
from a real checkpoint's. The CPU ``sam_tiny`` (a 2-layer, 64-wide ViT at 256 px, the real
``segment_anything`` generator) uses 8 x 8 points, no crop layers and relaxed
thresholds so that masks come out; ``vit_b``/``vit_h`` (GPU) use the config's SAM settings
(32 x 32 points, one crop layer) with thresholds relaxed the same way.

Needs segment_anything for SAM and ml_collections (the CPU build machine has both).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common
from segmentation.tiny_sam import tiny_sam

# Random SAM weights produce low predicted IoU and stability: keep every mask.
RELAXED_THRESHOLDS = dict(pred_iou_thresh=-100.0, stability_score_thresh=0.0)


def base_export_config(workdir: Path, image_size: int, images_per_class: int) -> Any:
    """Parts-world export config (8 classes, train only, one shard)."""
    config = common.parts_world_config(workdir, image_size, images_per_class)
    config.segmentation.max_masks = 16
    config.segmentation.shards = dict(train=1, test=1)
    return config


def measure(name: str, config: Any, records_dir: Path, sam_model: Any = None) -> dict[str, Any]:
    """Exports the train split with one segmenter into a fresh folder; returns the figures."""
    from segmentation import export

    shutil.rmtree(records_dir, ignore_errors=True)
    config.dataset.records_dir = str(records_dir)
    with common.stopwatch() as elapsed:
        result = export.export(config, sam_model=sam_model, progress=False)
    info = result.dataset_info or {}
    train = info.get("splits", {}).get("train", {})
    images = result.images_written
    return {
        "segmenter": name,
        "method": config.segmentation.method,
        "images": images,
        "seconds": elapsed["seconds"],
        "images_per_s": images / elapsed["seconds"],
        "masks_per_image": train.get("num_masks", 0) / max(train.get("num_images", 1), 1),
        "full_image_fallbacks": train.get("num_fallbacks"),
    }


def run(
    *,
    sam_models: list[str],
    image_size: int = 256,
    images_per_class: int = 4,
    out_dir: Path = common.RESULTS_DIR,
) -> Path:
    """Measures every segmenter and writes the JSON."""
    import importlib.util

    started = common.cpu_sample()
    workdir = Path(tempfile.mkdtemp(prefix="protomask_export_bench_"))
    config = base_export_config(workdir, image_size, images_per_class)
    from segmentation import sources

    sources.get_source(config)  # generates the parts world once, outside the timings
    rows = []
    try:
        for method in ("gt", "grid", "slic"):
            config.segmentation.method = method
            rows.append(measure(method, config, workdir / f"records_{method}"))
            print(f"  {method}: {rows[-1]['images_per_s']:.1f} images/s", flush=True)
        if importlib.util.find_spec("segment_anything") is None:
            print("segment_anything is not installed: no SAM rows", flush=True)
        else:
            rows += _measure_sam(config, workdir, sam_models)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    payload = {
        "benchmark": "export",
        "torch_device": device,
        "host_cpu_count": common.device_facts()["host_cpu_count"],
        "host": common.host_facts(started),
        "versions": common.versions(with_torch=True),
        "git": common.git_revision(),
        "images": {
            "dataset": "parts_world (train and test splits)",
            "count": rows[0]["images"],
            "image_size": image_size,
        },
        "segmenters": rows,
        "notes": (
            "SAM with random weights and relaxed quality thresholds (see the module "
            "docstring); images/s over the whole export (decode, segment, post-process, "
            "mask PNG encoding, shard writing)."
        ),
    }
    return common.write_json(out_dir / f"export_{common.device_slug(device)}.json", payload)


def _measure_sam(config: Any, workdir: Path, sam_models: list[str]) -> list[dict[str, Any]]:
    import torch
    from segment_anything import sam_model_registry

    config.segmentation.method = "sam"
    for key, value in RELAXED_THRESHOLDS.items():
        config.segmentation.sam[key] = value
    rows = []
    config.segmentation.sam.points_per_side = 8
    config.segmentation.sam.crop_n_layers = 0
    rows.append(measure("sam_tiny", config, workdir / "records_sam_tiny", sam_model=tiny_sam()))
    print(f"  sam_tiny: {rows[-1]['images_per_s']:.2f} images/s", flush=True)
    if not sam_models:
        return rows
    if not torch.cuda.is_available():
        print(f"no CUDA device: skipping {sam_models}", flush=True)
        return rows
    config.segmentation.sam.points_per_side = 32
    config.segmentation.sam.crop_n_layers = 1
    for model_type in sam_models:
        model = sam_model_registry[model_type]()  # random weights, no download
        rows.append(measure(f"sam_{model_type}", config, workdir / f"records_{model_type}", model))
        print(f"  sam_{model_type}: {rows[-1]['images_per_s']:.2f} images/s", flush=True)
        del model
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sam_models",
        type=lambda value: [m for m in value.split(",") if m],
        default=[],
        help="comma-separated SAM types for the GPU, e.g. vit_b,vit_h",
    )
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--images_per_class", type=int, default=4, help="8 classes")
    return run(**common.parse_flags(parser, argv, seed=False, grain=True))


if __name__ == "__main__":
    main()
