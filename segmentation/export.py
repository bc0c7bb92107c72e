"""Export a dataset's images with their masks and boxes to sharded TFRecords.

    python -m segmentation.export --config configs/cub.py --shard_index 0 --num_shards 4 \\
        --config.segmentation.sam.checkpoint=/path/to/sam_vit_h_4b8939.pth

writes ``config.dataset.records_dir/{split}-{j:05d}-of-{n:05d}.tfrecord`` (+ ``.index``),
``n = config.segmentation.shards[split]``; shard ``j`` holds the images ``[j N // n,
(j + 1) N // n)`` of the split sorted by id, written by process ``j % num_shards``. A shard
is written under a temporary name, renamed when complete and described by a ``.stats.json``
sidecar holding its fingerprint (settings, image list and ground truth inputs, e.g. which
bird mask files exist); a re-run skips complete shards, exports again those whose ground
truth inputs changed and refuses those of other settings. Whichever process finds every
shard complete writes ``dataset_info.json`` (``docs/design.md``)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from protomask_jax import base
from protomask_jax.base import UserError
from protomask_jax.data import images, records
from segmentation import (
    datasets,  # noqa: F401  (registers the built-in datasets)
    postprocess,
    segmenters,
    sources,
)

STATS_SUFFIX = ".stats.json"
GROUND_TRUTH = "ground_truth"  # the fingerprint's key for Source.ground_truth_inputs


class ExportError(UserError):
    """The export cannot run as configured or an input cannot be read."""


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """One shard of one split: the images it holds and where it goes."""

    split: str
    index: int
    count: int
    entries: tuple[sources.SourceEntry, ...]
    path: Path

    @property
    def stats_path(self) -> Path:
        return self.path.with_name(self.path.name + STATS_SUFFIX)

    def is_complete(self) -> bool:
        return self.path.exists()


@dataclasses.dataclass
class ExportResult:
    records_dir: Path
    shards_written: list[str]
    shards_redone: list[str]  # written again, among shards_written: their ground truth changed
    shards_skipped: list[str]
    shards_missing: list[str]  # owned by other processes and not complete yet
    images_written: int
    seconds: float
    dataset_info: dict[str, Any] | None  # None until every shard of every split is complete


def plan_shards(
    entries: Sequence[sources.SourceEntry], split: str, count: int, records_dir: Path
) -> list[ShardPlan]:
    """Splits ``entries`` (sorted by id) into ``count`` contiguous shards."""
    total = len(entries)
    return [
        ShardPlan(
            split,
            j,
            count,
            tuple(entries[j * total // count : (j + 1) * total // count]),
            records_dir / records.shard_name(split, j, count),
        )
        for j in range(count)
    ]


def _fingerprint(
    config: ml_collections.ConfigDict, source: sources.Source, plan: ShardPlan
) -> dict[str, Any]:
    """What determines a shard's bytes; a complete shard must match it to be reused."""
    listing = "".join(f"{e.image_id}\t{e.filename}\t{e.label}\n" for e in plan.entries)
    fingerprint = dict(
        schema_version=records.SCHEMA_VERSION,
        dataset=source.name,
        num_classes=len(source.class_names),
        segmenter=segmenters.segmenter_description(config),
        postprocess=_postprocess_params(config),
        images_sha256=hashlib.sha256(listing.encode()).hexdigest(),
    )
    ground_truth = source.ground_truth_inputs(plan.entries)
    if ground_truth is not None:  # absent, not null: other sources' shards keep theirs
        fingerprint[GROUND_TRUTH] = ground_truth
    return fingerprint


def _ground_truth_changed(plan: ShardPlan, fingerprint: dict[str, Any]) -> bool:
    """A complete shard written with these settings whose ground truth inputs have changed
    since (masks unpacked, replaced or removed): it is exported again."""
    if not plan.stats_path.exists():
        return False
    written = json.loads(plan.stats_path.read_text()).get("export") or {}

    def settings(f: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in f.items() if key != GROUND_TRUTH}

    return written != fingerprint and settings(written) == settings(fingerprint)


def _postprocess_params(config: ml_collections.ConfigDict) -> dict[str, int]:
    seg = config.segmentation
    return dict(
        max_masks=seg.max_masks, skip_background=seg.skip_background, min_box_px=seg.min_box_px
    )


def _decode(item: sources.SourceItem, root: Path) -> tuple[np.ndarray, bytes, str]:
    """(RGB uint8 [H, W, 3], the bytes to store, their format). The image is read as
    ``predict`` reads a file (upright by EXIF, 16-bit to 8, alpha over white; full size); the
    source's own JPEG or PNG bytes are stored when they decode to exactly that."""
    from PIL import Image

    try:
        loaded = images.load_image(io.BytesIO(item.image_bytes), full_size=True)
    except images.ImageError as e:
        raise ExportError(
            f"{root / item.filename}: cannot decode image (id {item.image_id}): "
            f"{e.__cause__ or e}. Replace or remove the file and re-run (complete shards "
            "are skipped)."
        ) from e
    rgb = loaded.rgb
    if not loaded.notes and item.image_bytes.startswith(b"\x89PNG\r\n\x1a\n"):
        return rgb, item.image_bytes, "png"
    if not loaded.notes and item.image_bytes.startswith(b"\xff\xd8\xff"):
        return rgb, item.image_bytes, "jpeg"
    # Rotated, 16-bit, transparent or CMYK, or BMP, GIF, WebP, TIFF (the pipeline decodes
    # JPEG and PNG only): a lossless PNG of what the segmenter sees.
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return rgb, buffer.getvalue(), "png"


def build_record(
    item: sources.SourceItem,
    segmenter: segmenters.Segmenter,
    config: ml_collections.ConfigDict,
    root: Path,
) -> tuple[records.ImageRecord, bool]:
    """Segments and post-processes one image; also says whether it fell back to a single
    full-image mask."""
    rgb, image_bytes, image_format = _decode(item, root)
    height, width = rgb.shape[:2]
    masks = np.asarray(segmenter.segment(rgb, item), dtype=bool)
    if masks.ndim != 3 or masks.shape[1:] != (height, width):
        raise ExportError(
            f"{root / item.filename}: segmenter {segmenter.method!r} returned "
            f"masks of shape {masks.shape}, expected [N, {height}, {width}]."
        )
    seg = config.segmentation
    processed = postprocess.postprocess(masks, seg.max_masks, seg.skip_background, seg.min_box_px)
    if processed.used_fallback:
        logging.warning(
            "%s: no mask survived post-processing (%d from %s); storing one full-image mask.",
            item.filename,
            len(masks),
            segmenter.method,
        )
    gt = item.gt
    label = item.label
    record = records.ImageRecord(
        image_id=item.image_id,
        image_bytes=image_bytes,
        image_format=image_format,
        height=height,
        width=width,
        filename=item.filename,
        label=int(label) if np.ndim(label) == 0 else np.sort(np.asarray(label, np.int64)),
        boxes=processed.boxes,
        areas=processed.areas,
        mask_pngs=[records.encode_mask_png(m) for m in processed.masks],
        part_map_png=None if gt.part_map is None else records.encode_label_map_png(gt.part_map),
        decisive_parts=gt.decisive_parts,
        object_mask_png=None if gt.object_mask is None else records.encode_mask_png(gt.object_mask),
        keypoints=gt.keypoints,
        object_boxes=gt.object_boxes,
    )
    return record, processed.used_fallback


def _empty_stats(plan: ShardPlan, num_classes: int, fingerprint: dict[str, Any]) -> dict[str, Any]:
    return dict(
        split=plan.split,
        shard_index=plan.index,
        num_shards=plan.count,
        num_images=0,
        num_masks=0,
        num_fallbacks=0,
        num_object_masks=0,
        class_counts=[0] * num_classes,
        first_id=plan.entries[0].image_id if plan.entries else None,
        last_id=plan.entries[-1].image_id if plan.entries else None,
        export=fingerprint,
    )


def _count(stats: dict[str, Any], record: records.ImageRecord, fallback: bool) -> None:
    stats["num_images"] += 1
    stats["num_masks"] += record.num_masks
    stats["num_fallbacks"] += int(fallback)
    stats["num_object_masks"] += int(record.object_mask_png is not None)
    for c in np.atleast_1d(np.asarray(record.label)).tolist():
        stats["class_counts"][int(c)] += 1


def _write_shard(
    plan: ShardPlan,
    source: sources.Source,
    segmenter: segmenters.Segmenter,
    config: ml_collections.ConfigDict,
    fingerprint: dict[str, Any],
    on_image: Callable[[], None],
) -> None:
    stats = _empty_stats(plan, len(source.class_names), fingerprint)

    def serialized():
        for entry in plan.entries:
            record, fallback = build_record(source.load(entry), segmenter, config, source.root)
            _count(stats, record, fallback)
            yield record.to_bytes()
            on_image()

    records.write_shard(plan.path, serialized())
    base.write_json_atomic(plan.stats_path, stats)


def _load_stats(plan: ShardPlan, num_classes: int, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The sidecar of a complete shard, checked against the current settings.

    A missing sidecar (the process died between publishing the shard and writing it) is
    re-derived from the shard, a fallback being a lone full-image mask; call this only for
    shards this process owns or whose sidecar exists."""
    if not plan.stats_path.exists():
        stats = _empty_stats(plan, num_classes, fingerprint)
        for data in records.iter_records(plan.path):
            record = records.ImageRecord.from_bytes(data, where=str(plan.path))
            lone_full_mask = record.num_masks == 1 and record.areas[0] == 1.0
            _count(stats, record, lone_full_mask)
        base.write_json_atomic(plan.stats_path, stats)
        return stats
    stats = json.loads(plan.stats_path.read_text())
    if stats.get("export") != fingerprint:
        raise ExportError(
            f"{plan.path} was written by an export with other settings:\n  found:    "
            f"{json.dumps(stats.get('export'), sort_keys=True)}\n  expected: "
            f"{json.dumps(fingerprint, sort_keys=True)}\nDelete {plan.path.parent} (or "
            "point config.dataset.records_dir elsewhere) to export again."
        )
    return stats


def _dataset_info(
    config: ml_collections.ConfigDict,
    source: sources.Source,
    split_stats: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    splits = {}
    for split, shard_stats in split_stats.items():
        splits[split] = dict(
            num_images=sum(s["num_images"] for s in shard_stats),
            num_masks=sum(s["num_masks"] for s in shard_stats),
            num_shards=len(shard_stats),
            class_counts=np.sum(
                [s["class_counts"] for s in shard_stats], axis=0, dtype=np.int64
            ).tolist(),
            num_fallbacks=sum(s["num_fallbacks"] for s in shard_stats),
            num_object_masks=sum(s.get("num_object_masks", 0) for s in shard_stats),
        )
    return dict(
        schema_version=records.SCHEMA_VERSION,
        dataset=source.name,
        num_classes=len(source.class_names),
        class_names=list(source.class_names),
        multi_label=bool(source.multi_label),
        part_names=list(source.part_names),
        segmenter=segmenters.segmenter_description(config),
        postprocess=_postprocess_params(config),
        object_masks_looked_in=source.object_mask_location(),
        splits=splits,
    )


def _check_config(
    config: ml_collections.ConfigDict, source: sources.Source, splits: Sequence[str]
) -> None:
    found = len(source.class_names)
    if config.dataset.num_classes != found:
        raise ExportError(
            f"config.dataset.num_classes={config.dataset.num_classes} but the "
            f"{source.name} dataset at {source.root} has {found} classes; set "
            f"--config.dataset.num_classes={found}."
        )
    if bool(config.dataset.multi_label) != bool(source.multi_label):
        raise ExportError(
            f"config.dataset.multi_label={config.dataset.multi_label} but the "
            f"{source.name} source is {'' if source.multi_label else 'not '}multi-label."
        )
    shards = config.segmentation.shards
    for split in splits:
        if split not in shards:
            raise ExportError(
                f"the dataset has a '{split}' split but config.segmentation.shards has no "
                f"entry for it (has: {sorted(shards.keys())})."
            )
        if int(shards[split]) < 1:
            raise ExportError(f"config.segmentation.shards.{split} must be >= 1.")


def _plan(
    config: ml_collections.ConfigDict, source: sources.Source, records_dir: Path
) -> list[ShardPlan]:
    """Every shard of every split, after refusing shards of an export with other counts."""
    plans: list[ShardPlan] = []
    for split in source.splits():
        entries = source.entries(split)
        count = int(config.segmentation.shards[split])
        if len(entries) < count:  # more shards than images would leave empty shard files
            logging.warning(
                "split %s has %d images: writing %d shards, not segmentation.shards.%s=%d.",
                split, len(entries), max(1, len(entries)), split, count,
            )  # fmt: skip
            count = max(1, len(entries))
        foreign = sorted(
            p.name
            for p in records_dir.glob(f"{split}-*-of-*.tfrecord")
            if not p.name.endswith(f"-of-{count:05d}.tfrecord")
        )
        if foreign:
            raise ExportError(
                f"{records_dir} holds '{split}' shards of an export with a different shard "
                f"count ({foreign[:3]}...), but segmentation.shards.{split}={count}. Delete "
                "them or export to another config.dataset.records_dir."
            )
        plans += plan_shards(entries, split, count, records_dir)
    return plans


def export(
    config: ml_collections.ConfigDict,
    shard_index: int = 0,
    num_shards: int = 1,
    *,
    sam_model: Any = None,
    progress: bool = True,
) -> ExportResult:
    """Writes this process's shards (those ``j`` with ``j % num_shards == shard_index``).

    ``sam_model``: a prebuilt SAM module for ``segmentation.method == "sam"`` (tests);
    ``progress``: a progress bar (images/s) on stderr."""
    if not 0 <= shard_index < num_shards:
        raise ExportError(f"--shard_index={shard_index} must be in [0, --num_shards={num_shards}).")
    if not config.dataset.records_dir:
        raise ExportError(
            "config.dataset.records_dir is empty; set it to the folder the records are written to."
        )
    if base.is_remote(config.dataset.records_dir):
        raise ExportError(
            f"config.dataset.records_dir={config.dataset.records_dir}: the export writes to a "
            "local or mounted folder; export there, then copy the folder to the bucket "
            "(gsutil -m cp -r) and train with records_dir on gs://."
        )
    started = time.perf_counter()
    source = sources.get_source(config)
    _check_config(config, source, source.splits())
    records_dir = Path(config.dataset.records_dir)
    num_classes = len(source.class_names)
    plans = _plan(config, source, records_dir)
    fingerprints = {plan.path: _fingerprint(config, source, plan) for plan in plans}

    mine = [p for p in plans if p.index % num_shards == shard_index]
    changed = [
        p for p in mine if p.is_complete() and _ground_truth_changed(p, fingerprints[p.path])
    ]
    for plan in changed:
        logging.warning(
            "%s: the dataset's ground truth changed since it was written (%s, now %s); "
            "exporting it again.",
            plan.path.name,
            json.loads(plan.stats_path.read_text())["export"].get(GROUND_TRUTH),
            fingerprints[plan.path].get(GROUND_TRUTH),
        )
    todo = [p for p in mine if not p.is_complete() or p in changed]
    skipped = [p for p in mine if p not in todo]
    # The segmenter (and its weights) is checked before anything is written.
    segmenter = segmenters.get_segmenter(config, sam_model=sam_model) if todo else None
    records_dir.mkdir(parents=True, exist_ok=True)
    for plan in mine:  # what a killed run of this process left: no other process writes these
        for tmp in records_dir.glob(plan.path.name + ".*" + base.TMP_SUFFIX):
            tmp.unlink(missing_ok=True)
    for plan in skipped:
        _load_stats(plan, num_classes, fingerprints[plan.path])
    if todo:
        from tqdm import tqdm

        total = sum(len(p.entries) for p in todo)
        method = config.segmentation.method
        with tqdm(total=total, unit="img", disable=not progress, desc=f"export {method}") as bar:
            for plan in todo:
                fingerprint = fingerprints[plan.path]
                _write_shard(plan, source, segmenter, config, fingerprint, lambda: bar.update(1))

    # A shard counts once its sidecar exists too: another process publishes its shard a
    # moment before the sidecar.
    missing = [
        p
        for p in plans
        if not (p.is_complete() and p.stats_path.exists())
        or _ground_truth_changed(p, fingerprints[p.path])  # its process has yet to redo it
    ]
    dataset_info = None
    if not missing:
        split_stats = {split: [] for split in source.splits()}
        for p in plans:
            split_stats[p.split].append(_load_stats(p, num_classes, fingerprints[p.path]))
        dataset_info = _dataset_info(config, source, split_stats)
        base.write_json_atomic(records_dir / records.DATASET_INFO, dataset_info)
        # Another process may be writing its own copy now; one a minute old is a killed run's.
        for tmp in records_dir.glob(records.DATASET_INFO + ".*" + base.TMP_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                if time.time() - tmp.stat().st_mtime > 60:
                    tmp.unlink()
    return ExportResult(
        records_dir=records_dir,
        shards_written=[p.path.name for p in todo],
        shards_redone=[p.path.name for p in changed],
        shards_skipped=[p.path.name for p in skipped],
        shards_missing=[p.path.name for p in missing],
        images_written=sum(len(p.entries) for p in todo),
        seconds=time.perf_counter() - started,
        dataset_info=dataset_info,
    )


def summary(result: ExportResult) -> str:
    """A few lines saying what was written and where the records are."""
    count = len(result.shards_redone)
    redone = f" ({count} again: new ground truth)" if count else ""
    lines = [
        f"Wrote {len(result.shards_written)} shard(s){redone} ({result.images_written} images) "
        f"in {result.seconds:.1f} s; skipped {len(result.shards_skipped)} complete."
    ]
    info = result.dataset_info
    if info is None:
        lines.append(
            f"Waiting for {len(result.shards_missing)} shard(s) of other processes "
            f"({', '.join(result.shards_missing[:4])}...); dataset_info.json is written by the "
            "process that completes the last shard (or re-run any process)."
        )
        return "\n".join(lines)
    lines.append(
        f"Records in {result.records_dir} ({info['dataset']}, {info['segmenter']['method']} "
        f"masks, at most {info['postprocess']['max_masks']} per image):"
    )
    for split, s in info["splits"].items():
        lines.append(
            f"  {split:>5}: {s['num_images']} images, {s['num_masks']} masks "
            f"({s['num_masks'] / max(s['num_images'], 1):.1f} per image), "
            f"{s['num_shards']} shards, {s['num_fallbacks']} full-image fallbacks"
        )
    line = object_mask_line(info)
    return "\n".join(lines + ([line] if line else []))


def object_mask_line(info: dict[str, Any]) -> str | None:
    """Whether the records carry object masks (for the metrics that need them), or None for
    a dataset that has none to find."""
    looked_in = info.get("object_masks_looked_in")
    found = sum(s.get("num_object_masks", 0) for s in info["splits"].values())
    total = sum(s["num_images"] for s in info["splits"].values())
    if found:
        return f"object masks: found for {found}/{total} images" + (
            f" (in {looked_in})" if looked_in else ""
        )
    if looked_in:
        return f"object masks: none found under {looked_in}: records carry no object masks"
    return None


def main(argv: Sequence[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        raise ExportError(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    print(summary(export(FLAGS.config, FLAGS.shard_index, FLAGS.num_shards)))


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/demo.py.", lock_config=True
    )
    flags.DEFINE_integer("shard_index", 0, "Index of this process among --num_shards.")
    flags.DEFINE_integer("num_shards", 1, "Number of processes sharing the export.")
    flags.mark_flags_as_required(["config"])
    from protomask_jax import cli

    cli.run(main)
