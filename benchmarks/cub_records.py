"""CUB-shaped synthetic records: the parts world at CUB's image size, 11 masks per image.

CUB-200-2011 images are JPEGs of at most 500 px a side (most 500 x 375 or 375 x 500), and the
paper keeps K = 11 SAM masks per image. The records here have that shape without the data:

1. ``write_images``: parts-world creatures (``segmentation.parts_world.render_image``) drawn
   at 500 x 500 and cut to ``height x width`` (default 500 x 375, landscape), saved as JPEG
   (quality 90) in a class-per-folder tree ``root/{train,test}/c{label:03d}/{id:05d}.jpg``.
   The parts world has at most ``MAX_CLASSES`` distinct classes; folder ``c`` holds class
   ``c mod MAX_CLASSES``, so any class count (CUB's 200) has images. A ``images.json``
   written last marks a complete tree, which later runs reuse.
2. ``export_records``: ``segmentation.export`` of that tree (``dataset.name = "folder"``)
   with the ``grid`` segmenter, 3 x 4 cells of which the 11 largest are kept: 11 masks and
   boxes per image. Shards are written by several processes at once, each its own subset
   (``--shard_index``/``--num_shards`` of the export), and complete shards are reused.

Throughput does not depend on what the masks outline: training crops K boxes from the canvas
whatever they are, and the stored mask PNGs are read with the record but not decoded.

Nothing here imports jax, so worker processes start quickly.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

HEIGHT, WIDTH = 375, 500
JPEG_QUALITY = 90
NUM_MASKS = 11
GRID_ROWS, GRID_COLS = 3, 4
MARKER = "images.json"
# Fixed (not per host) so a record set exported on one machine is complete on any other;
# export processes share them out (process i writes shards j with j % processes == i).
TRAIN_SHARDS = 16
IMAGES_PER_SHARD_AT_LEAST = 64  # fewer shards for small sets: a process per shard costs ~1 s


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """What ``write_images`` draws: images per class and split, their size, the seed."""

    train_per_class: int
    test_per_class: int
    height: int = HEIGHT
    width: int = WIDTH
    seed: int = 0


def _image_plan(num_classes: int, train_per_class: int, test_per_class: int) -> list[tuple]:
    """``(image_id, split, label)`` for every image; ids are global, train first."""
    plan = []
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for index in range(per_class * num_classes):
            plan.append((len(plan), split, index % num_classes))
    return plan


def _render_jpegs(root: str, items: list[tuple], images: ImageSet) -> int:
    """Renders and writes the JPEGs of ``items`` (runs in a worker process)."""
    from PIL import Image

    from segmentation import parts_world

    specs = parts_world.class_specs(parts_world.MAX_CLASSES)
    height, width = images.height, images.width
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    for image_id, split, label in items:
        rng = np.random.default_rng((images.seed, image_id))
        rendered = parts_world.render_image(rng, specs[label % len(specs)], side)
        pixels = rendered.image[top : top + height, left : left + width]
        folder = Path(root) / split / f"c{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        (folder / f"{image_id:05d}.jpg").write_bytes(buffer.getvalue())
    return len(items)


def _pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    # spawn, not fork: the parent may already run threads (jax, grain) that fork would copy
    # in an undefined state.
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn")
    )


def write_images(
    root: Path, images: ImageSet, num_classes: int, *, workers: int = 1
) -> dict[str, Any]:
    """Writes the JPEG tree under ``root`` (or finds it complete) and returns its description
    (what ``images.json`` holds: the parameters, the image count and the mean JPEG size)."""
    params = {
        **dataclasses.asdict(images),
        "num_classes": num_classes,
        "jpeg_quality": JPEG_QUALITY,
    }
    marker = root / MARKER
    if marker.exists():
        found = json.loads(marker.read_text())
        if found["params"] == params:
            return found
    plan = _image_plan(num_classes, images.train_per_class, images.test_per_class)
    chunks = [plan[i : i + 32] for i in range(0, len(plan), 32)]
    workers = min(workers, len(chunks))
    with common.stopwatch() as elapsed:
        if workers <= 1:
            for chunk in chunks:
                _render_jpegs(str(root), chunk, images)
        else:
            with _pool(workers) as pool:
                jobs = [pool.submit(_render_jpegs, str(root), chunk, images) for chunk in chunks]
                for job in jobs:
                    job.result()
    sizes = [p.stat().st_size for p in root.glob("*/c*/*.jpg")]
    description = {
        "params": params,
        "images": len(plan),
        "mean_jpeg_bytes": float(np.mean(sizes)),
        "render_s": elapsed["seconds"],
        "render_workers": workers,
    }
    marker.write_text(json.dumps(description, indent=2) + "\n")
    return description


def configure_records(config: Any, data_dir: Path, *, train_images: int) -> Any:
    """Points ``config`` (in place; also returned) at the JPEG tree under ``data_dir/images``
    and its records in ``data_dir/records``: grid masks, 11 kept, ``TRAIN_SHARDS`` training
    shards (fewer for small sets). ``dataset.num_classes`` stays as set."""
    config.dataset.name = "folder"
    config.dataset.root = str(data_dir / "images")
    config.dataset.records_dir = str(data_dir / "records")
    config.segmentation.method = "grid"
    config.segmentation.grid.rows = GRID_ROWS
    config.segmentation.grid.cols = GRID_COLS
    config.segmentation.max_masks = NUM_MASKS
    shards = min(TRAIN_SHARDS, -(-train_images // IMAGES_PER_SHARD_AT_LEAST))
    config.segmentation.shards = dict(train=shards, test=1)
    return config


def _export_part(config_dict: dict[str, Any], shard_index: int, num_shards: int) -> int:
    """One export process's shards (runs in a worker process)."""
    import ml_collections

    from segmentation import export

    result = export.export(
        ml_collections.ConfigDict(config_dict), shard_index, num_shards, progress=False
    )
    return result.images_written


def export_records(config: Any, workers: int = 1) -> dict[str, Any]:
    """Exports (or completes) the records of ``config`` with up to ``workers`` processes;
    returns the records' ``dataset_info.json`` with the export's wall time."""
    from protomask_jax.data import records as records_lib
    from segmentation import export

    workers = min(workers, config.segmentation.shards.train)
    with common.stopwatch() as elapsed:
        if workers <= 1:
            export.export(config, progress=False)
        else:
            with _pool(workers) as pool:
                jobs = [
                    pool.submit(_export_part, config.to_dict(), index, workers)
                    for index in range(workers)
                ]
                for job in jobs:
                    job.result()
            # Whichever process finishes last writes dataset_info.json; one more (cheap:
            # every shard is complete) call makes sure it exists.
            export.export(config, progress=False)
    info = records_lib.load_dataset_info(config.dataset.records_dir)
    return {"dataset_info": info, "export_s": elapsed["seconds"], "export_workers": workers}
