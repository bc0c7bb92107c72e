"""The record format: framing, CRCs, offset index, ImageRecord round trip, corruption."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from protomask_jax.data import records


def _full_record(image_id: int) -> records.ImageRecord:
    """A record with every field set, optional ground truth included."""
    rng = np.random.default_rng(image_id)
    height, width = 12, 10
    masks = rng.random((3, height, width)) > 0.5
    part_map = rng.integers(0, 5, (height, width)).astype(np.uint8)
    return records.ImageRecord(
        image_id=image_id,
        image_bytes=bytes(rng.integers(0, 256, 57, dtype=np.uint8)),
        image_format="png",
        height=height,
        width=width,
        filename=f"images/{image_id:05d}.png",
        label=image_id % 7,
        boxes=np.array(
            [[0.0, 0.0, 1.0, 1.0], [0.25, 0.1, 0.5, 0.9], [0.5, 0.5, 0.75, 0.6]], np.float32
        ),
        areas=np.array([0.75, 0.5, 0.125], np.float32),
        mask_pngs=[records.encode_mask_png(m) for m in masks],
        part_map_png=records.encode_label_map_png(part_map),
        decisive_parts=np.array([1, 3], np.int64),
        object_mask_png=records.encode_mask_png(masks[0]),
        keypoints=np.array([[0.5, 0.25, 1.0], [0.0, 0.0, 0.0]], np.float32),
        object_boxes=np.array([[0.1, 0.2, 0.9, 0.7], [0.0, 0.5, 0.25, 1.0]], np.float32),
    )


def _assert_records_equal(a: records.ImageRecord, b: records.ImageRecord) -> None:
    for field in (
        "image_id",
        "image_bytes",
        "image_format",
        "height",
        "width",
        "filename",
        "label",
        "mask_pngs",
        "part_map_png",
        "object_mask_png",
    ):
        assert getattr(a, field) == getattr(b, field), field
    for field in ("boxes", "areas", "decisive_parts", "keypoints", "object_boxes"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def test_masked_crc_matches_the_published_check_value():
    # CRC-32C("123456789") = 0xE3069283 (RFC 3720 check value); TFRecord masks it as
    # rotate-right-15 plus 0xA282EAD8.
    crc = 0xE3069283
    expected = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert records.masked_crc32c(b"123456789") == expected


def test_framing_layout():
    payload = b"hello"
    framed = records.frame_record(payload)
    assert len(framed) == 8 + 4 + len(payload) + 4
    assert struct.unpack("<Q", framed[:8])[0] == len(payload)
    assert struct.unpack("<I", framed[8:12])[0] == records.masked_crc32c(framed[:8])
    assert framed[12:17] == payload
    assert struct.unpack("<I", framed[17:])[0] == records.masked_crc32c(payload)


def test_round_trip_every_field(tmp_path: Path):
    originals = [_full_record(i) for i in (4, 9, 11)]
    shard = tmp_path / records.shard_name("train", 0, 1)
    assert records.write_shard(shard, [r.to_bytes() for r in originals]) == 3
    reader = records.ShardedRecords([shard])
    assert len(reader) == 3
    for i, original in enumerate(originals):
        _assert_records_equal(original, records.ImageRecord.from_bytes(reader[i]))
    # The index written beside the shard equals one rebuilt by scanning the file.
    np.testing.assert_array_equal(records.read_index(shard), records.build_index(shard))
    # Mask payloads decode back to the masks they were made from.
    rng = np.random.default_rng(4)
    masks = rng.random((3, 12, 10)) > 0.5
    decoded = records.ImageRecord.from_bytes(reader[0])
    np.testing.assert_array_equal(records.decode_mask_png(decoded.mask_pngs[1]), masks[1])
    part_map = rng.integers(0, 5, (12, 10)).astype(np.uint8)
    np.testing.assert_array_equal(records.decode_label_map_png(decoded.part_map_png), part_map)
    assert not list(tmp_path.glob("*.tmp"))


def test_optional_fields_absent_round_trip_as_none(tmp_path: Path):
    full = _full_record(2)
    bare = records.ImageRecord(
        image_id=2,
        image_bytes=full.image_bytes,
        image_format="jpeg",
        height=12,
        width=10,
        filename="a.jpg",
        label=0,
        boxes=full.boxes[:1],
        areas=full.areas[:1],
        mask_pngs=full.mask_pngs[:1],
    )
    parsed = records.ImageRecord.from_bytes(bare.to_bytes())
    assert parsed.part_map_png is None and parsed.object_mask_png is None
    assert parsed.decisive_parts is None and parsed.keypoints is None
    assert parsed.object_boxes is None
    assert parsed.image_format == "jpeg" and parsed.label == 0
    # an empty box list is stored as absent
    bare.object_boxes = np.zeros((0, 4), np.float32)
    assert records.ImageRecord.from_bytes(bare.to_bytes()).object_boxes is None


def test_object_boxes_outside_the_image_are_refused_naming_the_record():
    record = _full_record(3)
    record.object_boxes = np.array([[0.5, 0.2, 0.4, 0.7]], np.float32)  # y1 < y0
    with pytest.raises(records.RecordError, match=r"shard-x \(image id 3\): gt/object_boxes"):
        records.ImageRecord.from_bytes(record.to_bytes(), "shard-x")


def test_flipped_byte_is_reported_with_file_and_offset(tmp_path: Path):
    shard = tmp_path / records.shard_name("test", 0, 1)
    records.write_shard(shard, [_full_record(i).to_bytes() for i in range(3)])
    index = records.read_index(shard)
    record_offset = int(index[1, 0])
    raw = bytearray(shard.read_bytes())
    raw[record_offset + 12 + 20] ^= 0x01  # one bit inside record 1's payload
    shard.write_bytes(bytes(raw))
    reader = records.ShardedRecords([shard])
    reader[0]  # untouched records still read
    with pytest.raises(records.RecordError) as error:
        reader[1]
    message = str(error.value)
    assert str(shard) in message
    assert f"byte offset {record_offset}" in message
    assert "CRC" in message


def test_truncated_shard_is_detected(tmp_path: Path):
    shard = tmp_path / records.shard_name("train", 0, 1)
    records.write_shard(shard, [_full_record(i).to_bytes() for i in range(2)])
    index = records.read_index(shard)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 7)
    reader = records.ShardedRecords([shard])
    with pytest.raises(records.RecordError, match="truncated"):
        reader[1]
    with pytest.raises(records.RecordError, match=f"byte offset {int(index[1, 0])}"):
        records.build_index(shard)


def test_serialization_is_identical_across_processes():
    # protobuf maps serialise in a per-process hash order unless asked to be deterministic;
    # a resumed or sharded export must produce the same bytes in every process.
    code = (
        "import hashlib, sys; sys.path.insert(0, '.');"
        "from tests.test_records import _full_record;"
        "print(hashlib.sha256(_full_record(5).to_bytes()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parents[1],
            check=True,
        ).stdout.strip()
        for _ in range(3)
    }
    assert len(digests) == 1


def test_list_shards_names_missing_shards(tmp_path: Path):
    for j in (0, 2):
        records.write_shard(tmp_path / records.shard_name("train", j, 3), [b"x"])
    with pytest.raises(records.RecordError, match=r"missing shard indices \[1\]"):
        records.list_shards(tmp_path, "train")
    records.write_shard(tmp_path / records.shard_name("train", 1, 3), [b"y"])
    assert [p.name for p in records.list_shards(tmp_path, "train")] == [
        records.shard_name("train", j, 3) for j in range(3)
    ]


def test_records_in_a_bucket_are_read_through_epath(tiny_records):
    """``gs://`` records: every file operation goes through etils.epath (mocked here onto
    the local export), and the records read are the local ones, byte for byte."""
    from etils.epath import testing as epath_testing

    from protomask_jax.data import pipeline

    bucket, local = "gs://protomask-test", str(tiny_records.parent)
    seen = []

    def to_local(path):
        seen.append(str(path))
        return str(path).replace(bucket, local)

    def mapped(original, path, *args, **kwargs):
        return original(to_local(path), *args, **kwargs)

    def glob(original, pattern):
        return [p.replace(local, bucket) for p in original(to_local(pattern))]

    remote_dir = f"{bucket}/{tiny_records.name}"
    with epath_testing.mock_epath(open=mapped, exists=mapped, stat=mapped, glob=glob):
        remote = pipeline.RecordSet(remote_dir, "test")
        remote_records = [remote.reader[i] for i in range(len(remote.reader))]
        info = records.load_dataset_info(remote_dir)
        remote.reader.close()
    here = pipeline.RecordSet(tiny_records, "test")
    assert remote_records == [here.reader[i] for i in range(len(here.reader))]
    np.testing.assert_array_equal(remote.image_ids, here.image_ids)
    assert info == records.load_dataset_info(tiny_records)
    assert all(p.startswith("gs://") for p in remote.reader.paths)
    assert any(p.endswith(".tfrecord") for p in seen)  # the shard itself, not only its index
    assert any(p.endswith(".tfrecord.index") for p in seen)


def test_a_bucket_export_target_is_refused_saying_what_to_do():
    from configs import demo
    from protomask_jax import base
    from segmentation import export

    config = demo.get_config()
    config.dataset.records_dir = "gs://protomask-test/records"
    with pytest.raises(base.UserError, match="gsutil -m cp -r"):
        export.export(config, progress=False)
