"""Host input pipeline throughput: images/s of ``protomask_jax.data.pipeline`` per worker count.

    python -m benchmarks.input_pipeline                       # prints the JSON path
    python -m benchmarks.input_pipeline --workers 0,1,2,4 --image_size 512

The records are a synthetic parts world (``configs`` parts-world settings, ``gt`` masks)
written by ``segmentation.export`` into ``--records_dir`` once and reused by later runs. The
images are PNGs of ``--image_size`` squared pixels, fitted into a 448 canvas with K = 11 views,
the CUB training shape, so each image is decoded, resized and padded as in training.

Per worker count (``input.num_workers``; 0 = decode in the main process with grain's two
read threads) it reports the time to the first batch and the steady images/s over
``--batches`` batches of the training stream. Decoding is the bulk of the work, so the JSON
also records PIL's decode time of the same images as PNG and as JPEG (quality 90), since
CUB, Stanford Dogs and Cars ship JPEGs. If a GPU ``train_step_cub_*.json`` is committed, it
adds how many workers keep that step fed.

Needs grain and segmentation's dependencies (the CPU build machine has them; the GPU
machine does not).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

CANVAS_SIZE = 448
NUM_VIEWS = 11
BATCH_SIZE = 16


def records_config(records_dir: Path, image_size: int, images_per_class: int) -> Any:
    """A parts-world config writing ``gt``-mask records to ``records_dir``."""
    config = common.parts_world_config(records_dir, image_size, images_per_class)
    config.dataset.records_dir = str(records_dir / "records")
    config.segmentation.method = "gt"
    config.segmentation.max_masks = NUM_VIEWS
    config.segmentation.shards = dict(train=4, test=1)
    config.input.canvas_size = CANVAS_SIZE
    config.input.num_views = NUM_VIEWS
    config.input.batch_size = BATCH_SIZE
    return config


def decode_times(record_set: Any, count: int) -> dict[str, float]:
    """Mean PIL decode seconds per image of ``count`` training images, PNG vs JPEG q90."""
    from PIL import Image

    from protomask_jax.data import records as records_lib

    png_seconds, jpeg_seconds = [], []
    for index in range(min(count, len(record_set))):
        record = records_lib.ImageRecord.from_bytes(record_set.reader[index])
        start = time.perf_counter()
        image = records_lib.decode_image(record.image_bytes, "benchmark")
        png_seconds.append(time.perf_counter() - start)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        jpeg_bytes = buffer.getvalue()
        start = time.perf_counter()
        records_lib.decode_image(jpeg_bytes, "benchmark")
        jpeg_seconds.append(time.perf_counter() - start)
    return {
        "png_decode_s_per_image": float(np.mean(png_seconds)),
        "jpeg_q90_decode_s_per_image": float(np.mean(jpeg_seconds)),
    }


def measure_stream(
    record_set: Any,
    spec: Any,
    num_workers: int,
    num_batches: int,
    seed: int,
    batch_size: int = BATCH_SIZE,
) -> dict[str, Any]:
    """Time to the first batch, then steady images/s and CPU use (this process and its
    grain workers, sampled while they are alive) of the training stream."""
    from protomask_jax.data import pipeline

    indices = np.arange(len(record_set))
    start = time.perf_counter()
    stream = pipeline.train_stream(
        record_set, indices, spec, global_batch=batch_size, seed=seed, num_workers=num_workers
    )
    try:
        next(stream)
        first_batch = time.perf_counter() - start
        before = common.cpu_sample()
        for _ in range(num_batches):
            batch = next(stream)
        after = common.cpu_sample()
    finally:
        stream.close()
    elapsed = after.wall_s - before.wall_s
    expected = (batch_size, spec.canvas_size, spec.canvas_size, 3)
    if batch["canvas"].shape != expected:
        raise RuntimeError(f"unexpected canvas batch {batch['canvas'].shape}, want {expected}")
    return {
        "num_workers": num_workers,
        "first_batch_s": first_batch,
        "batches": num_batches,
        "batch_size": batch_size,
        "steady_s": elapsed,
        "images_per_s": num_batches * batch_size / elapsed,
        "cpu": common.cpu_usage(before, after),
    }


def gpu_demand(results_dir: Path) -> dict[str, Any] | None:
    """Images/s the committed GPU CUB train step consumes (augmented JAX step), if any."""
    for path in sorted(results_dir.glob("train_step_cub_*.json")):
        payload = json.loads(path.read_text())
        variant = payload["variants"].get("jax_bf16_aug")
        if payload["device"]["platform"] == "gpu" and variant:
            return {"source": path.name, "images_per_s": variant["images_per_s"]}
    return None


def run(
    workers: list[int],
    *,
    image_size: int = 512,
    images_per_class: int = 32,
    batches: int = 24,
    records_dir: Path | None = None,
    out_dir: Path = common.RESULTS_DIR,
    seed: int = 0,
) -> Path:
    """Exports the records (once), measures every worker count, writes the JSON."""
    started = common.cpu_sample()
    from protomask_jax.data import pipeline
    from segmentation import export

    if records_dir is None:
        records_dir = Path(tempfile.gettempdir()) / f"protomask_bench_records_{image_size}"
    config = records_config(records_dir, image_size, images_per_class)
    with common.stopwatch() as export_time:
        export.export(config, progress=False)
    record_set = pipeline.RecordSet(config.dataset.records_dir, "train")
    spec = pipeline.PipelineSpec.from_config(config)
    print(
        f"input_pipeline: {len(record_set)} records of {image_size}^2 PNGs in "
        f"{config.dataset.records_dir} (export {export_time['seconds']:.1f} s)",
        flush=True,
    )
    rows = []
    for count in workers:
        row = measure_stream(record_set, spec, count, batches, seed)
        rows.append(row)
        print(f"  {count} worker(s): {row['images_per_s']:.0f} images/s", flush=True)
    demand = gpu_demand(common.RESULTS_DIR)
    if demand is not None:
        best = max(rows, key=lambda r: r["images_per_s"])
        per_worker = best["images_per_s"] / max(best["num_workers"], 1)
        demand["workers_needed_at_best_rate_per_worker"] = math.ceil(
            demand["images_per_s"] / per_worker
        )
    payload = {
        "benchmark": "input_pipeline",
        "host": {"cpu": common.device_facts()["host_cpu"], **common.host_facts(started)},
        "versions": common.versions(with_torch=False),
        "git": common.git_revision(),
        "records": {
            "dataset": "parts_world (gt masks)",
            "images": len(record_set),
            "image_size": image_size,
            "format": "png",
            "canvas_size": CANVAS_SIZE,
            "num_views": NUM_VIEWS,
            "batch_size": BATCH_SIZE,
            "export_s": export_time["seconds"],
        },
        "decode": decode_times(record_set, 32),
        "streams": rows,
        "gpu_demand": demand,
        "notes": (
            "grain workers are processes; on a machine with few cores the worker count "
            "beyond the core count cannot help. Every image is decoded, fitted into the "
            "canvas and its boxes padded to K; crops and augmentation happen on the device."
        ),
    }
    slug = common.device_slug(f"{payload['host']['cpu_count']}cpu")
    return common.write_json(out_dir / f"input_pipeline_{slug}.json", payload)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workers",
        type=lambda value: [int(w) for w in value.split(",")],
        default=[0, 1, 2],
        help="comma-separated worker counts",
    )
    parser.add_argument("--image_size", type=int, default=512)
    parser.add_argument("--images_per_class", type=int, default=32, help="8 classes")
    parser.add_argument("--batches", type=int, default=24, help="timed batches of 16")
    parser.add_argument("--records_dir", type=Path, default=None)
    return run(**common.parse_flags(parser, argv, grain=True))


if __name__ == "__main__":
    main()
