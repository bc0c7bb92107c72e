"""The real dataset sources on tiny fixtures in their official layouts: ids, labels, splits,
class names, ground truth, boxes, error messages, and exports whose records match."""

from __future__ import annotations

import shutil
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from configs import cars, common, cub, dogs
from protomask_jax.data import records
from segmentation import datasets, export, sources
from tests import fixtures_datasets as fx

pytest.importorskip("scipy", reason="the Dogs and Cars fixtures write .mat files with scipy")

CONFIGS = {"cub200": cub, "dogs": dogs, "cars196": cars}


def _config(
    name: str,
    root: Path,
    records_dir: Path | None = None,
    num_classes: int = 3,
    method: str = "grid",
) -> ml_collections.ConfigDict:
    if name == "tfds":
        config = common.get_base_config()
        config.dataset.name = "tfds"
        config.dataset.tfds_data_dir = str(root)
    else:
        config = CONFIGS[name].get_config()
        config.dataset.root = str(root)
    config.dataset.records_dir = str(records_dir or root.parent / "records")
    config.dataset.num_classes = num_classes
    config.segmentation.update(method=method, max_masks=6, skip_background=0, min_box_px=2)
    config.segmentation.grid.update(rows=2, cols=2)
    config.segmentation.shards.update(train=2, test=1)
    return config


def _check_entries(source: sources.Source, expected: fx.ExpectedDataset) -> None:
    assert list(source.class_names) == expected.class_names
    assert source.splits() == ("train", "test")
    for split in ("train", "test"):
        entries = source.entries(split)
        assert [(e.image_id, e.filename, e.label) for e in entries] == [
            (x.image_id, x.filename, x.label) for x in expected.split(split)
        ]


def _check_loaded(source: sources.Source, expected: fx.ExpectedDataset) -> None:
    for split in ("train", "test"):
        for entry, want in zip(source.entries(split), expected.split(split), strict=True):
            item = source.load(entry)
            assert (item.image_id, item.filename, item.label) == (
                want.image_id,
                want.filename,
                want.label,
            )
            assert item.image_bytes == want.image_bytes
            np.testing.assert_allclose(source.object_boxes(entry), want.boxes, atol=1e-6)
            # ... and the loaded item carries them for the export (gt/object_boxes)
            np.testing.assert_allclose(item.gt.object_boxes, want.boxes, atol=1e-6)
            if want.keypoints is None:
                assert item.gt.keypoints is None
            else:
                assert item.gt.keypoints.dtype == np.float32
                np.testing.assert_allclose(item.gt.keypoints, want.keypoints, atol=1e-6)
            if want.object_mask is None:
                assert item.gt.object_mask is None
            else:
                np.testing.assert_array_equal(item.gt.object_mask, want.object_mask)


def _records(records_dir: Path, split: str) -> list[records.ImageRecord]:
    reader = records.ShardedRecords(records.list_shards(records_dir, split))
    return [records.ImageRecord.from_bytes(reader[i]) for i in range(len(reader))]


def _box_of(mask: np.ndarray) -> np.ndarray:
    """Normalised half-open yxyx box of a mask, from np.nonzero."""
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    return np.array(
        [ys.min() / height, xs.min() / width, (ys.max() + 1) / height, (xs.max() + 1) / width],
        np.float32,
    )


def _check_export(config: ml_collections.ConfigDict, expected: fx.ExpectedDataset) -> None:
    """Exports and checks every record against the fixture's values."""
    result = export.export(config, progress=False)
    info = result.dataset_info
    assert info["class_names"] == expected.class_names
    assert info["part_names"] == expected.part_names
    for split in ("train", "test"):
        stored = _records(Path(config.dataset.records_dir), split)
        wanted = expected.split(split)
        assert info["splits"][split]["num_images"] == len(wanted)
        assert [(r.image_id, r.filename, r.label) for r in stored] == [
            (w.image_id, w.filename, w.label) for w in wanted
        ]
        for record, want in zip(stored, wanted, strict=True):
            assert record.image_bytes == want.image_bytes
            assert (record.height, record.width) == (want.height, want.width)
            if len(want.boxes):
                np.testing.assert_allclose(record.object_boxes, want.boxes, atol=1e-6)
            else:
                assert record.object_boxes is None
            if want.keypoints is not None:
                np.testing.assert_allclose(record.keypoints, want.keypoints, atol=1e-6)
            if want.object_mask is not None:
                np.testing.assert_array_equal(
                    records.decode_mask_png(record.object_mask_png), want.object_mask
                )
            if config.segmentation.method == "gt":  # the object mask is the one mask
                assert record.num_masks == 1
                np.testing.assert_array_equal(
                    records.decode_mask_png(record.mask_pngs[0]), want.object_mask
                )
                np.testing.assert_allclose(record.boxes[0], _box_of(want.object_mask))
            else:  # a 2 x 2 grid
                assert record.num_masks == 4
                np.testing.assert_allclose(record.areas.sum(), 1.0, atol=1e-6)


# ------------------------------------------------------------------------------- CUB


@pytest.mark.parametrize("segmentations", ["inside", "beside"])
def test_cub_entries_keypoints_and_bird_masks(tmp_path, segmentations):
    expected = fx.make_cub(tmp_path, segmentations=segmentations)
    source = sources.get_source(_config("cub200", expected.root))
    assert isinstance(source, datasets.Cub200Source)
    _check_entries(source, expected)
    assert list(source.part_names) == fx.CUB_PART_NAMES
    want_dir = expected.root if segmentations == "inside" else tmp_path
    assert source.segmentations_dir == want_dir / "segmentations"
    _check_loaded(source, expected)
    # The fixture annotated one visible part right of the image: clipped to x = 1.
    first = source.load(source.entries("train")[0])
    assert first.gt.keypoints[0, 1] == 1.0 and first.gt.keypoints[0, 2] == 1.0


def test_cub_root_may_be_the_folder_holding_cub_200_2011(tmp_path):
    expected = fx.make_cub(tmp_path)
    source = sources.get_source(_config("cub200", tmp_path))
    assert source.root == expected.root
    _check_entries(source, expected)


def test_cub_without_segmentations_has_no_object_mask_and_refuses_gt(tmp_path):
    expected = fx.make_cub(tmp_path, segmentations=None)
    source = sources.get_source(_config("cub200", expected.root, method="grid"))
    _check_loaded(source, expected)  # keypoints present, object masks None
    with pytest.raises(sources.SourceError, match="segmentations.tgz") as error:
        sources.get_source(_config("cub200", expected.root, method="gt"))
    assert str(expected.root / "segmentations") in str(error.value)


@pytest.mark.parametrize(
    "missing",
    [
        "images.txt",
        "image_class_labels.txt",
        "train_test_split.txt",
        "classes.txt",
        "bounding_boxes.txt",
        "parts/parts.txt",
        "parts/part_locs.txt",
        "images",
    ],
)
def test_cub_missing_file_is_named_with_the_archive(tmp_path, missing):
    expected = fx.make_cub(tmp_path)
    target = expected.root / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(sources.SourceError) as error:
        sources.get_source(_config("cub200", expected.root))
    message = str(error.value)
    assert f"{target} not found" in message
    assert "CUB_200_2011.tgz" in message and "--config.dataset.root" in message


def test_cub_damaged_or_incomplete_files(tmp_path):
    expected = fx.make_cub(tmp_path)
    labels = expected.root / "image_class_labels.txt"
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join([lines[0], "4 two"] + lines[2:]) + "\n")
    with pytest.raises(sources.SourceError, match=r"image_class_labels.txt:2: cannot parse"):
        sources.get_source(_config("cub200", expected.root))
    labels.write_text("")
    with pytest.raises(sources.SourceError, match=r"image_class_labels.txt is empty"):
        sources.get_source(_config("cub200", expected.root))
    labels.write_text("\n".join(lines[1:]) + "\n")  # one image has no label
    dropped = lines[0].split()[0]
    with pytest.raises(
        sources.SourceError, match=rf"image_class_labels.txt: no line for image {dropped} "
    ):
        sources.get_source(_config("cub200", expected.root))


def test_cub_missing_bird_mask_is_named(tmp_path):
    expected = fx.make_cub(tmp_path)
    source = sources.get_source(_config("cub200", expected.root, method="gt"))
    entry = source.entries("test")[0]
    mask_path = (
        expected.root
        / "segmentations"
        / Path(entry.filename).relative_to("images").with_suffix(".png")
    )
    mask_path.unlink()
    with pytest.raises(sources.SourceError, match="unpack segmentations.tgz") as error:
        source.load(entry)
    assert str(mask_path) in str(error.value)


@pytest.mark.parametrize("method", ["gt", "grid"])
def test_cub_export_records_match(tmp_path, method):
    expected = fx.make_cub(tmp_path / "data")
    _check_export(_config("cub200", expected.root, tmp_path / "records", method=method), expected)


def test_cub_bird_masks_unpacked_after_an_export_reach_the_records(tmp_path):
    expected = fx.make_cub(tmp_path / "data", segmentations="beside")
    unpacked = tmp_path / "data" / "segmentations"
    unpacked.rename(tmp_path / "not_yet")
    config = _config("cub200", expected.root, tmp_path / "records")
    records_dir = Path(config.dataset.records_dir)
    before = export.export(config, progress=False)
    looked_in = f"{expected.root / 'segmentations'} or {unpacked}"
    assert export.summary(before).splitlines()[-1] == (
        f"object masks: none found under {looked_in}: records carry no object masks"
    )
    assert before.dataset_info["splits"]["train"]["num_object_masks"] == 0
    stored = _records(records_dir, "train") + _records(records_dir, "test")
    assert all(record.object_mask_png is None for record in stored)

    (tmp_path / "not_yet").rename(unpacked)
    after = export.export(config, progress=False)
    assert sorted(after.shards_redone) == sorted(before.shards_written)  # every shard again
    assert after.dataset_info != before.dataset_info
    assert after.dataset_info["splits"]["train"]["num_object_masks"] == 6
    assert (
        export.summary(after).splitlines()[-1]
        == f"object masks: found for 9/9 images (in {unpacked})"
    )
    for split in ("train", "test"):
        for record, want in zip(_records(records_dir, split), expected.split(split), strict=True):
            mask = records.decode_mask_png(record.object_mask_png)
            np.testing.assert_array_equal(mask, want.object_mask)
    # Nothing changed: every shard is skipped. One mask file replaced: its shard only.
    assert export.export(config, progress=False).shards_written == []
    test_image = expected.split("test")[0]
    mask_file = unpacked / Path(test_image.filename).relative_to("images").with_suffix(".png")
    mask_file.write_bytes(
        fx.png_bytes(np.full((test_image.height, test_image.width), 255, np.uint8))
    )
    again = export.export(config, progress=False)
    assert again.shards_redone == again.shards_written == ["test-00000-of-00001.tfrecord"]
    assert records.decode_mask_png(_records(records_dir, "test")[0].object_mask_png).all()


# ------------------------------------------------------------------------------ Dogs


@pytest.mark.parametrize("lists_in_subfolder", [True, False])
def test_dogs_entries_boxes_and_bytes(tmp_path, lists_in_subfolder):
    expected = fx.make_dogs(tmp_path / "dogs", lists_in_subfolder=lists_in_subfolder)
    source = sources.get_source(_config("dogs", expected.root))
    assert isinstance(source, datasets.StanfordDogsSource)
    _check_entries(source, expected)
    _check_loaded(source, expected)
    assert max(len(x.boxes) for x in expected.images) == 2  # some images have two dogs


def test_dogs_missing_files_are_named(tmp_path):
    expected = fx.make_dogs(tmp_path / "dogs")
    source = sources.get_source(_config("dogs", expected.root))
    shutil.rmtree(expected.root / "Annotation")
    with pytest.raises(sources.SourceError, match="unpack annotation.tar"):
        source.object_boxes(source.entries("train")[0])
    shutil.rmtree(expected.root / "Images" / expected.class_names[1])
    with pytest.raises(sources.SourceError, match="unpack images.tar") as error:
        sources.get_source(_config("dogs", expected.root))
    assert str(expected.root / "Images" / expected.class_names[1]) in str(error.value)
    (expected.root / "lists" / "test_list.mat").unlink()
    with pytest.raises(sources.SourceError, match="unpack lists.tar") as error:
        sources.get_source(_config("dogs", expected.root))
    assert f"{expected.root / 'lists' / 'test_list.mat'} not found" in str(error.value)


def test_dogs_export_records_match(tmp_path):
    expected = fx.make_dogs(tmp_path / "dogs")
    _check_export(_config("dogs", expected.root, tmp_path / "records"), expected)


# ------------------------------------------------------------------------------ Cars


@pytest.mark.parametrize("test_labels_in_devkit", [False, True])
def test_cars_entries_boxes_and_bytes(tmp_path, test_labels_in_devkit):
    expected = fx.make_cars(tmp_path / "cars", test_labels_in_devkit=test_labels_in_devkit)
    source = sources.get_source(_config("cars196", expected.root))
    assert isinstance(source, datasets.StanfordCarsSource)
    _check_entries(source, expected)
    _check_loaded(source, expected)


def test_cars_needs_the_labelled_test_annotations(tmp_path):
    import scipy.io

    expected = fx.make_cars(tmp_path / "cars")
    labelled = expected.root / "cars_test_annos_withlabels.mat"
    annotations = scipy.io.loadmat(labelled)["annotations"]
    labelled.unlink()
    with pytest.raises(
        sources.SourceError, match="download cars_test_annos_withlabels.mat into"
    ) as error:
        sources.get_source(_config("cars196", expected.root))
    assert f"{labelled} not found" in str(error.value)
    # The devkit's unlabelled test file under the labelled name: the missing field is named.
    unlabelled = np.zeros(
        annotations.shape, dtype=[(n, "O") for n in annotations.dtype.names if n != "class"]
    )
    for name in unlabelled.dtype.names:
        unlabelled[name] = annotations[name]
    scipy.io.savemat(labelled, {"annotations": unlabelled})
    with pytest.raises(sources.SourceError, match=r"lack the field\(s\) \['class'\]"):
        sources.get_source(_config("cars196", expected.root))


def test_cars_export_records_match(tmp_path):
    expected = fx.make_cars(tmp_path / "cars")
    _check_export(_config("cars196", expected.root, tmp_path / "records"), expected)


# ------------------------------------------------------------------------------ tfds


@pytest.mark.parametrize("name", ["caltech_birds2011", "stanford_dogs", "cars196"])
def test_tfds_entries_masks_and_boxes(tmp_path, name):
    expected = fx.make_tfds(tmp_path / "tfds", name)
    config = _config("tfds", tmp_path / "tfds", num_classes=len(expected.class_names))
    config.dataset.tfds_name = name
    source = sources.get_source(config)
    assert isinstance(source, datasets.TfdsSource)
    _check_entries(source, expected)
    _check_loaded(source, expected)


def test_tfds_export_with_bird_masks(tmp_path):
    expected = fx.make_tfds(tmp_path / "tfds", "caltech_birds2011")
    config = _config("tfds", tmp_path / "tfds", tmp_path / "records", num_classes=200, method="gt")
    config.dataset.tfds_name = "caltech_birds2011"
    _check_export(config, expected)


def test_tfds_refuses_unprepared_and_tfrecord_datasets(tmp_path):
    config = _config("tfds", tmp_path / "empty", num_classes=200)
    config.dataset.tfds_name = "caltech_birds2011"
    with pytest.raises(
        sources.SourceError, match="tfds build caltech_birds2011 .*--file_format=array_record"
    ):
        sources.get_source(config)
    fx.make_tfds(tmp_path / "tfrecord", "caltech_birds2011", file_format="tfrecord")
    config.dataset.tfds_data_dir = str(tmp_path / "tfrecord")
    source = sources.get_source(config)
    with pytest.raises(sources.SourceError, match="prepared as tfrecord.*convert_format"):
        source.entries("train")
    config.dataset.tfds_name = ""
    with pytest.raises(sources.SourceError, match="tfds_name is empty"):
        sources.get_source(config)
