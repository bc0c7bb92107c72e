"""The export: records equal what the segmenter produced; sharding, resume and errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import demo
from protomask_jax.data import records
from segmentation import export, parts_world, postprocess, segmenters, sources

REPO = Path(__file__).parents[1]


def _parts_world_config(
    tmp: Path,
    method: str = "gt",
    records_name: str = "records",
    train_per_class: int = 3,
    test_per_class: int = 1,
):
    """4 classes at 64 px; the dataset is shared between configs of one test."""
    config = demo.get_config()
    config.dataset.root = str(tmp / "dataset")
    config.dataset.records_dir = str(tmp / records_name)
    config.dataset.num_classes = 4
    config.dataset.synthetic.update(
        num_classes=4,
        image_size=64,
        train_per_class=train_per_class,
        test_per_class=test_per_class,
        seed=0,
    )
    config.segmentation.update(method=method, max_masks=6, skip_background=0, min_box_px=2)
    config.segmentation.shards.update(train=3, test=1)
    config.segmentation.slic.n_segments = 8
    config.segmentation.grid.update(rows=2, cols=3)
    return config


def _read_split(records_dir: Path, split: str) -> list[records.ImageRecord]:
    reader = records.ShardedRecords(records.list_shards(records_dir, split))
    return [records.ImageRecord.from_bytes(reader[i]) for i in range(len(reader))]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Normalised half-open yxyx boxes, computed with np.nonzero (independent of the code)."""
    height, width = masks.shape[1:]
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        boxes.append(
            [ys.min() / height, xs.min() / width, (ys.max() + 1) / height, (xs.max() + 1) / width]
        )
    return np.asarray(boxes, np.float32)


@pytest.mark.parametrize("method", ["gt", "slic", "grid"])
def test_records_hold_what_the_segmenter_produced(tmp_path, method):
    config = _parts_world_config(tmp_path, method)
    result = export.export(config, progress=False)
    source = sources.get_source(config)
    segmenter = segmenters.get_segmenter(config)
    info = records.load_dataset_info(config.dataset.records_dir)
    assert result.dataset_info == info
    assert info["segmenter"] == segmenters.segmenter_description(config)
    assert info["class_names"] == parts_world.load_metadata(config.dataset.root)["class_names"]
    for split in ("train", "test"):
        entries = source.entries(split)
        stored = _read_split(Path(config.dataset.records_dir), split)
        # Every image once, in id order across the shards.
        assert [r.image_id for r in stored] == [e.image_id for e in entries]
        for record, entry in zip(stored, entries, strict=True):
            item = source.load(entry)
            assert record.image_bytes == (Path(config.dataset.root) / entry.filename).read_bytes()
            assert (record.filename, record.label, record.image_format) == (
                entry.filename,
                entry.label,
                "png",
            )
            assert (record.height, record.width) == (64, 64)
            image = records.decode_image(record.image_bytes)
            expected = postprocess.postprocess(segmenter.segment(image, item), 6, 0, 2)
            masks = np.stack([records.decode_mask_png(m) for m in record.mask_pngs])
            np.testing.assert_array_equal(masks, expected.masks)
            np.testing.assert_array_equal(record.boxes, expected.boxes)
            np.testing.assert_array_equal(record.areas, expected.areas)
            np.testing.assert_allclose(record.boxes, _boxes_from_masks(masks), rtol=1e-6)
            np.testing.assert_allclose(record.areas, masks.mean(axis=(1, 2)), rtol=1e-6)
            assert (np.diff(record.areas) <= 0).all()
            # Ground truth travels with every record, whatever the segmenter.
            np.testing.assert_array_equal(
                records.decode_label_map_png(record.part_map_png), item.gt.part_map
            )
            np.testing.assert_array_equal(record.decisive_parts, item.gt.decisive_parts)
            if method == "gt":  # one mask per visible part
                parts = [v for v in np.unique(item.gt.part_map) if v > 0]
                assert {m.tobytes() for m in masks} == {
                    (item.gt.part_map == v).tobytes() for v in parts
                }
        split_info = info["splits"][split]
        assert split_info["num_images"] == len(stored)
        assert split_info["num_masks"] == sum(r.num_masks for r in stored)
        assert (
            split_info["class_counts"]
            == np.bincount([r.label for r in stored], minlength=4).tolist()
        )
        assert split_info["num_fallbacks"] == 0
        assert split_info["num_shards"] == config.segmentation.shards[split]


def test_tiny_records_fixture(tiny_records):
    info = records.load_dataset_info(tiny_records)
    assert info["num_classes"] == 4 and info["segmenter"]["method"] == "gt"
    assert info["splits"]["train"]["num_images"] == 24
    assert info["splits"]["test"]["num_images"] == 8
    assert info["splits"]["train"]["class_counts"] == [6, 6, 6, 6]
    assert len(records.list_shards(tiny_records, "train")) == 2
    test = _read_split(tiny_records, "test")
    assert [r.image_id for r in test] == list(range(24, 32))
    assert all(4 <= r.num_masks <= 6 and r.part_map_png for r in test)


def test_shards_are_contiguous_id_ranges(tmp_path):
    config = _parts_world_config(tmp_path, "grid", train_per_class=4)  # 16 train, 3 shards
    export.export(config, progress=False)
    shards = records.list_shards(config.dataset.records_dir, "train")
    ids = [
        [records.ImageRecord.from_bytes(b).image_id for b in records.iter_records(s)]
        for s in shards
    ]
    # Shard j holds images [j N // n, (j + 1) N // n) of the split: 16 // 3 = 5, 10, 16.
    assert ids == [list(range(0, 5)), list(range(5, 10)), list(range(10, 16))]
    stats = json.loads(Path(str(shards[1]) + export.STATS_SUFFIX).read_text())
    assert (stats["first_id"], stats["last_id"], stats["num_images"]) == (5, 9, 5)


def test_processes_split_the_shards_and_the_last_writes_dataset_info(tmp_path):
    config = _parts_world_config(tmp_path, "grid")
    records_dir = Path(config.dataset.records_dir)
    first = export.export(config, shard_index=1, num_shards=2, progress=False)
    # Process 1 of 2 writes the odd shards: train 1 (of 3); test has only shard 0.
    assert first.shards_written == ["train-00001-of-00003.tfrecord"]
    assert first.dataset_info is None
    assert not (records_dir / records.DATASET_INFO).exists()
    assert "Waiting for 3 shard(s)" in export.summary(first)
    second = export.export(config, shard_index=0, num_shards=2, progress=False)
    assert second.shards_written == [
        "train-00000-of-00003.tfrecord",
        "train-00002-of-00003.tfrecord",
        "test-00000-of-00001.tfrecord",
    ]
    assert second.dataset_info == records.load_dataset_info(records_dir)
    with pytest.raises(export.ExportError, match="shard_index=2"):
        export.export(config, shard_index=2, num_shards=2)


def test_resume_rewrites_only_missing_shards_identically(tmp_path):
    config = _parts_world_config(tmp_path, "slic")
    records_dir = Path(config.dataset.records_dir)
    export.export(config, progress=False)
    complete = _files(records_dir)
    victim = records_dir / "train-00001-of-00003.tfrecord"
    kept = records_dir / "train-00000-of-00003.tfrecord"
    kept_mtime = kept.stat().st_mtime_ns
    for path in (
        victim,
        Path(f"{victim}.index"),
        Path(f"{victim}{export.STATS_SUFFIX}"),
        records_dir / records.DATASET_INFO,
    ):
        path.unlink()
    # Temporaries killed processes left: a shard's, a complete shard's sidecar's, and a
    # dataset_info.json's (an old one; a fresh one may be another process's, kept).
    stale = [
        records_dir / f"{victim.name}.4242-1.tmp",
        records_dir / f"{kept.name}{export.STATS_SUFFIX}.4242-2.tmp",
        records_dir / f"{records.DATASET_INFO}.4242-3.tmp",
    ]
    for path in stale:
        path.write_bytes(b"partial")
    os.utime(stale[2], (time.time() - 120,) * 2)
    fresh = records_dir / f"{records.DATASET_INFO}.4243-1.tmp"
    fresh.write_bytes(b"being written")
    result = export.export(config, progress=False)
    assert fresh.exists() and not any(path.exists() for path in stale)
    fresh.unlink()
    assert result.shards_written == [victim.name]
    assert len(result.shards_skipped) == 3
    assert kept.stat().st_mtime_ns == kept_mtime
    assert _files(records_dir) == complete
    # A lost sidecar is re-derived from the shard itself.
    Path(f"{kept}{export.STATS_SUFFIX}").unlink()
    assert export.export(config, progress=False).shards_written == []
    assert _files(records_dir) == complete


def test_other_settings_or_shard_counts_are_refused(tmp_path):
    config = _parts_world_config(tmp_path, "gt")
    export.export(config, progress=False)
    config.segmentation.method = "grid"
    with pytest.raises(export.ExportError, match="other settings"):
        export.export(config, progress=False)
    config.segmentation.method = "gt"
    config.segmentation.shards.train = 2
    with pytest.raises(export.ExportError, match="different shard count"):
        export.export(config, progress=False)


def test_more_shards_than_images_writes_one_shard_per_image(tmp_path):
    config = _parts_world_config(tmp_path, "grid")  # 4 test images
    config.segmentation.shards.test = 9
    info = export.export(config, progress=False).dataset_info
    shards = records.list_shards(config.dataset.records_dir, "test")
    assert [s.name for s in shards] == [f"test-0000{j}-of-00004.tfrecord" for j in range(4)]
    assert [len(records.read_index(s)) for s in shards] == [1, 1, 1, 1]
    assert info["splits"]["test"]["num_shards"] == 4
    # the same config resumes onto the same (clamped) shards
    assert export.export(config, progress=False).shards_written == []


def test_config_and_dataset_errors(tmp_path):
    config = _parts_world_config(tmp_path)
    config.dataset.num_classes = 5
    with pytest.raises(export.ExportError, match="num_classes=5 .* has 4 classes"):
        export.export(config, progress=False)
    config = _parts_world_config(tmp_path)
    config.dataset.name = "folder"
    config.dataset.root = str(tmp_path / "nowhere")
    with pytest.raises(sources.SourceError, match="nowhere does not exist. Put the folder"):
        export.export(config, progress=False)
    config.dataset.name = "cub201"
    with pytest.raises(sources.SourceError, match="known: .*folder.*parts_world"):
        export.export(config, progress=False)


# --------------------------------------------------------------------- folder datasets


def _make_folder_dataset(tmp: Path) -> Path:
    """The tiny parts world copied as root/{train,test}/<class>/<id>.png."""
    generated = tmp / "generated"
    metadata = parts_world.generate(
        generated, num_classes=4, image_size=64, train_per_class=6, test_per_class=2, seed=1
    )
    root = tmp / "folder"
    for entry in metadata["images"]:
        target = root / entry["split"] / f"class_{entry['label']}" / f"{entry['id']:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(generated / entry["image"], target)
    return root


def _folder_config(root: Path, records_dir: Path):
    config = demo.get_config()
    config.dataset.update(
        name="folder", root=str(root), records_dir=str(records_dir), num_classes=4
    )
    config.segmentation.update(method="slic", max_masks=6)
    config.segmentation.slic.n_segments = 8
    config.segmentation.shards.update(train=4, test=2)
    return config


def test_folder_source_ids_labels_and_formats(tmp_path):
    root = _make_folder_dataset(tmp_path)
    bmp = root / "train" / "class_2" / "00002.png"
    with Image.open(bmp) as image:
        pixels = np.asarray(image.convert("RGB"))
        image.save(bmp.with_suffix(".bmp"))
    bmp.unlink()
    config = _folder_config(root, tmp_path / "records")
    source = sources.get_source(config)
    assert source.class_names == ["class_0", "class_1", "class_2", "class_3"]
    train, test = source.entries("train"), source.entries("test")
    # Ids follow the sorted relative paths of all splits: test/... sorts before train/....
    assert [e.image_id for e in test] == list(range(8))
    assert [e.image_id for e in train] == list(range(8, 32))
    assert train[0].filename == "train/class_0/00000.png" and train[0].label == 0
    export.export(config, progress=False)
    stored = {r.filename: r for r in _read_split(tmp_path / "records", "train")}
    record = stored["train/class_2/00002.bmp"]
    # Neither JPEG nor PNG: stored as a lossless PNG of the same pixels.
    assert record.image_format == "png" and record.label == 2
    np.testing.assert_array_equal(records.decode_image(record.image_bytes), pixels)


def test_photos_are_stored_as_predict_reads_them(tmp_path):
    """Upright by EXIF, 16-bit grey to 8 bits, transparency over white, computed here by
    hand; a plain JPEG keeps its bytes."""
    root = _make_folder_dataset(tmp_path)
    folder = root / "train" / "class_1"
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # a viewer turns the stored pixels 90 degrees clockwise
    Image.fromarray(photo).save(folder / "rotated.png", exif=exif)
    grey16 = rng.integers(0, 65536, (48, 48), dtype=np.uint16)
    Image.fromarray(grey16).save(folder / "grey16.png")
    rgba = np.dstack([photo, rng.integers(0, 256, (40, 64), dtype=np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    plain = folder / "plain.jpg"
    Image.fromarray(photo).save(plain, quality=90)
    export.export(_folder_config(root, tmp_path / "records"), progress=False)
    stored = {r.filename: r for r in _read_split(tmp_path / "records", "train")}

    def pixels(name: str) -> np.ndarray:
        record = stored[f"train/class_1/{name}"]
        image = records.decode_image(record.image_bytes)
        mask = records.decode_mask_png(record.mask_pngs[0])
        assert image.shape[:2] == mask.shape == (record.height, record.width)
        return image

    np.testing.assert_array_equal(pixels("rotated.png"), np.rot90(photo, k=-1))
    grey8 = (grey16 >> 8).astype(np.uint8)
    np.testing.assert_array_equal(pixels("grey16.png"), np.stack([grey8] * 3, axis=-1))
    alpha = rgba[..., 3:] / 255
    np.testing.assert_allclose(pixels("alpha.png"), photo * alpha + 255 * (1 - alpha), atol=1)
    assert stored["train/class_1/plain.jpg"].image_bytes == plain.read_bytes()


def test_unreadable_image_is_named(tmp_path):
    root = _make_folder_dataset(tmp_path)
    broken = root / "test" / "class_1" / "00029.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(export.ExportError, match=r"test/class_1/00029.png: cannot decode"):
        export.export(_folder_config(root, tmp_path / "records"), progress=False)


# ------------------------------------------------------------------------ sam, for real


@pytest.mark.torch
def test_export_with_a_tiny_sam(tmp_path, tiny_sam_model, torch_single_thread):
    from segment_anything import SamAutomaticMaskGenerator

    config = _parts_world_config(tmp_path, "sam", train_per_class=2, test_per_class=1)
    config.segmentation.sam.update(
        points_per_side=4, pred_iou_thresh=-100.0, stability_score_thresh=0.0, crop_n_layers=0
    )
    export.export(config, sam_model=tiny_sam_model, progress=False)
    generator = SamAutomaticMaskGenerator(
        tiny_sam_model,
        points_per_side=4,
        pred_iou_thresh=-100.0,
        stability_score_thresh=0.0,
        crop_n_layers=0,
    )
    stored = _read_split(Path(config.dataset.records_dir), "train")
    assert len(stored) == 8
    for record in stored:
        image = records.decode_image(record.image_bytes)
        raw = np.stack([m["segmentation"] for m in generator.generate(image)])
        expected = postprocess.postprocess(raw, 6, 0, 2)
        masks = np.stack([records.decode_mask_png(m) for m in record.mask_pngs])
        np.testing.assert_array_equal(masks, expected.masks)
        np.testing.assert_array_equal(record.boxes, expected.boxes)
    info = records.load_dataset_info(config.dataset.records_dir)
    assert info["segmenter"]["method"] == "sam"
    assert info["segmenter"]["params"]["pred_iou_thresh"] == -100.0

    # The reference's thresholds (and crop layers) reject every mask of a random SAM: each
    # image falls back to one full-image mask, and dataset_info counts them.
    config.dataset.records_dir = str(tmp_path / "records_fallback")
    config.segmentation.sam.update(
        points_per_side=2, pred_iou_thresh=0.86, stability_score_thresh=0.92, crop_n_layers=1
    )
    export.export(config, sam_model=tiny_sam_model, progress=False)
    info = records.load_dataset_info(config.dataset.records_dir)
    for split, count in (("train", 8), ("test", 4)):
        assert info["splits"][split]["num_fallbacks"] == count
        assert info["splits"][split]["num_masks"] == count
    record = _read_split(Path(config.dataset.records_dir), "test")[0]
    np.testing.assert_array_equal(record.boxes, [[0, 0, 1, 1]])
    assert records.decode_mask_png(record.mask_pngs[0]).all()


@pytest.mark.torch
def test_export_with_a_tiny_sam2(tmp_path, tiny_sam2_model, torch_single_thread):
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    config = _parts_world_config(tmp_path, "sam2", train_per_class=2, test_per_class=1)
    relaxed = dict(points_per_side=4, pred_iou_thresh=-100.0, stability_score_thresh=0.0)
    relaxed.update(crop_n_layers=0, min_mask_region_area=0, box_nms_thresh=1.0)
    config.segmentation.sam2.update(relaxed)
    export.export(config, sam_model=tiny_sam2_model, progress=False)
    generator = SAM2AutomaticMaskGenerator(tiny_sam2_model, **relaxed)
    generator.predictor._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]  # a 256 px model
    for split, count in (("train", 8), ("test", 4)):
        stored = _read_split(Path(config.dataset.records_dir), split)
        assert len(stored) == count
        for record in stored:
            image = records.decode_image(record.image_bytes)
            raw = np.stack([m["segmentation"] for m in generator.generate(np.array(image))])
            expected = postprocess.postprocess(raw, 6, 0, 2)
            masks = np.stack([records.decode_mask_png(m) for m in record.mask_pngs])
            np.testing.assert_array_equal(masks, expected.masks)
            np.testing.assert_array_equal(record.boxes, expected.boxes)
    info = records.load_dataset_info(config.dataset.records_dir)
    assert info["segmenter"]["method"] == "sam2"
    assert info["splits"]["train"]["num_masks"] == 8 * 6  # max_masks of many
    assert info["segmenter"]["params"]["pred_iou_thresh"] == -100.0


# ------------------------------------------------------------------ the CLI, for real


def _cli(root: Path, records_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "segmentation.export",
        "--config",
        "configs/demo.py",
        "--config.dataset.name=folder",
        f"--config.dataset.root={root}",
        f"--config.dataset.records_dir={records_dir}",
        "--config.dataset.num_classes=4",
        "--config.segmentation.method=slic",
        "--config.segmentation.slic.n_segments=8",
        "--config.segmentation.shards.train=4",
        "--config.segmentation.shards.test=2",
        *extra,
    ]


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory) -> tuple[Path, Path]:
    """A folder dataset and its records from one uninterrupted CLI run."""
    tmp = tmp_path_factory.mktemp("cli")
    root = _make_folder_dataset(tmp)
    out = subprocess.run(
        _cli(root, tmp / "reference"), cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert "train: 24 images" in out and "test: 8 images" in out
    return root, tmp / "reference"


def _all_ids(records_dir: Path) -> list[int]:
    return [r.image_id for split in ("train", "test") for r in _read_split(records_dir, split)]


def test_killed_export_resumes_to_identical_records(cli_reference, tmp_path):
    reference_root, reference = cli_reference
    root = tmp_path / "folder"
    shutil.copytree(reference_root, root)
    records_dir = tmp_path / "records"
    config = _folder_config(root, records_dir)
    train = sources.get_source(config).entries("train")
    # The third image of train shard 1 becomes a named pipe: reading it blocks, so the
    # process is reliably caught mid-shard, after shard 0 is complete.
    blocker = root / train[len(train) // 4 + 2].filename
    saved = blocker.read_bytes()
    blocker.unlink()
    os.mkfifo(blocker)
    process = subprocess.Popen(
        _cli(root, records_dir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    shard_0 = records_dir / "train-00000-of-00004.tfrecord"
    shard_1 = records_dir / "train-00001-of-00004.tfrecord"
    deadline = time.monotonic() + 120
    try:
        while not (shard_0.exists() and list(records_dir.glob(f"{shard_1.name}.*.tmp"))):
            assert process.poll() is None, "export ended before it was killed"
            assert time.monotonic() < deadline, "export made no progress"
            time.sleep(0.02)
        time.sleep(0.3)  # let it write shard 1's first records and block on the pipe
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    partial = list(records_dir.glob(f"{shard_1.name}.*.tmp"))
    assert partial and partial[0].stat().st_size > 0  # records of shard 1 were being written
    assert not shard_1.exists()
    with pytest.raises(records.RecordError, match="missing shard indices"):
        records.list_shards(records_dir, "train")  # the partial file is not taken as a shard
    shard_0_mtime = shard_0.stat().st_mtime_ns

    blocker.unlink()
    blocker.write_bytes(saved)
    subprocess.run(_cli(root, records_dir), cwd=REPO, capture_output=True, check=True)
    assert shard_0.stat().st_mtime_ns == shard_0_mtime  # complete shards were skipped
    assert not list(records_dir.glob("*.tmp"))
    assert _files(records_dir) == _files(reference)
    ids = _all_ids(records_dir)
    assert sorted(ids) == list(range(32)) and len(ids) == 32


def test_two_processes_write_what_one_writes(cli_reference, tmp_path):
    root, reference = cli_reference
    records_dir = tmp_path / "records"
    processes = [
        subprocess.Popen(
            _cli(root, records_dir, "--num_shards", "2", "--shard_index", str(i)),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in (0, 1)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr.decode()
    assert _files(records_dir) == _files(reference)
    assert sorted(_all_ids(records_dir)) == list(range(32))


def test_cli_bad_config_key_lists_the_valid_keys(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "segmentation.export",
            "--config",
            "configs/demo.py",
            "--config.segmentation.methd=gt",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0
    assert (
        "config.segmentation has no key 'methd'; valid keys: device, grid, max_masks, "
        "method, min_box_px, sam, sam2, shards, skip_background, slic."
    ) in run.stderr


def test_two_processes_on_a_fresh_parts_world(tmp_path):
    """Both processes generate the (missing) dataset at once, then split the export."""

    def cli(records_dir: Path, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "segmentation.export",
            "--config",
            "configs/demo.py",
            f"--config.dataset.root={tmp_path / 'dataset'}",
            f"--config.dataset.records_dir={records_dir}",
            "--config.dataset.num_classes=4",
            "--config.dataset.synthetic.num_classes=4",
            "--config.dataset.synthetic.image_size=64",
            "--config.dataset.synthetic.train_per_class=12",
            "--config.dataset.synthetic.test_per_class=2",
            *extra,
        ]

    processes = [
        subprocess.Popen(
            cli(tmp_path / "sharded", "--num_shards", "2", "--shard_index", str(i)),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in (0, 1)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr.decode()
    subprocess.run(cli(tmp_path / "single"), cwd=REPO, capture_output=True, check=True)
    assert _files(tmp_path / "sharded") == _files(tmp_path / "single")
    assert not list((tmp_path / "dataset").rglob("*.tmp"))
