"""TFRecord files without TensorFlow: framing, CRCs, offset indexes and ``tf.train.Example``.

A record on disk is ``uint64 length | masked crc32c(length) | data | masked crc32c(data)``
(little endian), the framing TensorFlow's reader checks. Beside every shard an offset index
(``<shard>.index``: little-endian uint64 pairs ``(offset, length)``, one per record) lets the
grain pipeline read any record in O(1). One record is one :class:`ImageRecord` (schema:
``docs/design.md``). Nothing here imports jax or torch: both sides of the project use it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from google.protobuf.message import DecodeError
from tensorflow_datasets.proto import tf_example_pb2

from protomask_jax.base import UserError, as_path, is_remote, unique_tmp


def _size(path) -> int:
    stat = path.stat()
    return int(getattr(stat, "st_size", getattr(stat, "length", 0)))


def _open_for_reading(path: str):
    """``(read_at(offset, n) -> bytes, size, close)`` of a shard: ``os.pread`` on a local
    file (no shared position, so grain's reader threads can share the descriptor); a
    locked seek-and-read on a remote one."""
    if not is_remote(path):
        fd = os.open(path, os.O_RDONLY)
        return (
            (lambda offset, n: os.pread(fd, n, offset)),
            os.fstat(fd).st_size,
            (lambda: os.close(fd)),
        )
    import threading

    remote = as_path(path)
    handle = remote.open("rb")
    lock = threading.Lock()

    def read_at(offset: int, n: int) -> bytes:
        with lock:
            handle.seek(offset)
            return handle.read(n)

    return read_at, _size(remote), handle.close


SCHEMA_VERSION = 1
INDEX_SUFFIX = ".index"
DATASET_INFO = "dataset_info.json"

_HEADER = struct.Struct("<QI")  # length, masked crc of length
_FOOTER = struct.Struct("<I")  # masked crc of data
_MASK_DELTA = 0xA282EAD8


class RecordError(UserError):
    """A record file is missing, truncated, corrupt or does not follow the schema."""


def masked_crc32c(data: bytes) -> int:
    """The CRC32-C of ``data``, rotated and offset as TFRecord framing requires."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """``data`` framed as one TFRecord (header, payload, footer)."""
    length = struct.pack("<Q", len(data))
    return (
        length + struct.pack("<I", masked_crc32c(length)) + data + _FOOTER.pack(masked_crc32c(data))
    )


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def write_shard(path: str | os.PathLike, records: Iterable[bytes]) -> int:
    """Writes one shard and its offset index; returns the number of records.

    Both are written under temporary names (unique per process, ending in ``.tmp``) and the
    index is renamed into place before the shard, so a visible ``.tfrecord`` is complete and
    has its index."""
    path, index_path = Path(path), Path(f"{path}{INDEX_SUFFIX}")
    tmp_shard, tmp_index = unique_tmp(path), unique_tmp(index_path)
    offsets, offset = [], 0
    with open(tmp_shard, "wb") as f:
        for data in records:
            framed = frame_record(data)
            f.write(framed)
            offsets.append((offset, len(data)))
            offset += len(framed)
        f.flush()
        os.fsync(f.fileno())
    with open(tmp_index, "wb") as f:
        f.write(np.asarray(offsets, dtype="<u8").reshape(-1, 2).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_index, index_path)
    os.replace(tmp_shard, path)
    return len(offsets)


def build_index(path: str | os.PathLike) -> np.ndarray:
    """The ``[N, 2]`` index of a shard (e.g. one written by TensorFlow), by scanning it."""
    path = as_path(path)
    offsets = []
    size = _size(path)
    with path.open("rb") as f:
        offset = 0
        while offset < size:
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                raise RecordError(f"{path}: truncated record header at byte offset {offset}.")
            length, length_crc = _HEADER.unpack(header)
            if masked_crc32c(header[:8]) != length_crc:
                raise RecordError(f"{path}: bad length CRC at byte offset {offset}.")
            if offset + _HEADER.size + length + _FOOTER.size > size:
                raise RecordError(
                    f"{path}: record at byte offset {offset} claims {length} bytes but the "
                    "file ends first (truncated shard; re-run the export to rewrite it)."
                )
            offsets.append((offset, length))
            offset += _HEADER.size + length + _FOOTER.size
            f.seek(offset)
    return np.asarray(offsets, dtype=np.uint64).reshape(-1, 2)


def read_index(path: str | os.PathLike) -> np.ndarray:
    """Reads ``<shard>.index`` as a ``[N, 2]`` uint64 array of (offset, length)."""
    index_path = as_path(str(path) + INDEX_SUFFIX)
    if not index_path.exists():
        raise RecordError(
            f"{index_path}: offset index missing for shard {path}. Rebuild it with "
            "`python -m protomask_jax.data.records --reindex <shard>` or re-run the export."
        )
    raw = index_path.read_bytes()
    rebuild = f"rebuild it: python -m protomask_jax.data.records --reindex {path}"
    if len(raw) % 16:
        raise RecordError(f"{index_path}: size {len(raw)} is not a multiple of 16 bytes; {rebuild}")
    index = np.frombuffer(raw, dtype="<u8").reshape(-1, 2)
    # Records lie back to back from offset 0 and the index covers the whole shard; a shard
    # shorter than its index is left to the reader (truncated records, skippable one by one).
    lengths = index[:, 1].astype(np.int64) if np.all(index[:, 1] < 1 << 40) else None
    ends = None if lengths is None else np.cumsum(lengths + _HEADER.size + _FOOTER.size)
    if ends is None or not np.array_equal(index[:, 0], np.concatenate([[0], ends])[:-1]):
        raise RecordError(f"{index_path}: the offsets are not those of the shard; {rebuild}")
    size = _size(as_path(path))
    if (int(ends[-1]) if len(ends) else 0) < size:
        raise RecordError(f"{index_path} does not cover all of {path} ({size} bytes); {rebuild}")
    return index


class ShardedRecords(Sequence):
    """Random access, through the offset indexes, to the records of several shards in the
    given order; both CRCs are checked. Files are opened lazily per process, so an instance
    can be pickled into grain workers."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        verify_crc: bool = True,
        indexes: Sequence[np.ndarray] | None = None,
    ):
        self.paths = [str(p) for p in paths]
        self.verify_crc = verify_crc
        if indexes is None:
            indexes = [read_index(p) for p in self.paths]
        self._counts = np.array([len(ix) for ix in indexes], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._counts)])
        self._index = (np.concatenate(indexes) if indexes else np.zeros((0, 2), np.uint64)).astype(
            np.int64
        )
        self._files: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, i: int) -> tuple[str, int]:
        """(shard path, byte offset) of record ``i``, for messages."""
        shard = int(np.searchsorted(self._starts, i, side="right") - 1)
        return self.paths[shard], int(self._index[i, 0])

    def __getitem__(self, i: int) -> bytes:  # type: ignore[override]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range for {n} records")
        i %= n
        shard = int(np.searchsorted(self._starts, i, side="right") - 1)
        offset, length = (int(v) for v in self._index[i])
        if shard not in self._files:
            self._files[shard] = _open_for_reading(self.paths[shard])
        read_at, size, _ = self._files[shard]
        where = f"{self.paths[shard]} at byte offset {offset} (record {i - self._starts[shard]})"
        total = _HEADER.size + length + _FOOTER.size
        raw = read_at(offset, total) if offset + total <= size else b""
        if len(raw) != total:
            raise RecordError(f"{where}: truncated record; re-run the export for this shard.")
        stored_length, length_crc = _HEADER.unpack_from(raw)
        data = raw[_HEADER.size : _HEADER.size + length]
        if stored_length != length:
            raise RecordError(
                f"{where}: length {stored_length} does not match the index ({length}); the "
                "shard and its .index disagree, re-run the export for this shard."
            )
        if self.verify_crc:
            (data_crc,) = _FOOTER.unpack_from(raw, _HEADER.size + length)
            if masked_crc32c(raw[:8]) != length_crc or masked_crc32c(data) != data_crc:
                raise RecordError(
                    f"{where}: CRC mismatch, the record is corrupt. Re-run the export for "
                    "this shard (complete shards are skipped), or set "
                    "input.skip_bad_records=True to skip it."
                )
        return data

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def close(self) -> None:
        for _, _, close in self._files.values():
            close()
        self._files.clear()


def iter_records(path: str | os.PathLike, verify_crc: bool = True) -> Iterable[bytes]:
    """Yields the payloads of a shard sequentially (no index needed)."""
    reader = ShardedRecords([path], verify_crc, indexes=[build_index(path)])
    try:
        for i in range(len(reader)):
            yield reader[i]
    finally:
        reader.close()


def encode_example(features: dict[str, Any]) -> bytes:
    """``bytes``/``str`` (or a list of them) -> bytes_list, integers -> int64_list, floats ->
    float_list; ``None`` and empty values are left out (absent optional features)."""
    example = tf_example_pb2.Example()
    for key, value in features.items():
        if value is None:
            continue
        feature = example.features.feature[key]
        if isinstance(value, (bytes, str)):
            value = [value]
        if isinstance(value, list) and value and isinstance(value[0], (bytes, str)):
            feature.bytes_list.value.extend(v.encode() if isinstance(v, str) else v for v in value)
            continue
        array = np.asarray(value)
        if array.size == 0:
            del example.features.feature[key]
            continue
        if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
            feature.int64_list.value.extend(array.astype(np.int64).ravel().tolist())
        elif np.issubdtype(array.dtype, np.floating):
            feature.float_list.value.extend(array.astype(np.float32).ravel().tolist())
        else:
            raise TypeError(f"feature {key!r}: unsupported value type {array.dtype}")
    # The feature map is a protobuf map; without `deterministic` upb serialises it in a
    # hash order seeded per process, so the same record would differ byte-wise between
    # runs (breaking resumable and sharded exports that must produce identical files).
    return example.SerializeToString(deterministic=True)


def parse_example(data: bytes) -> dict[str, Any]:
    """Parses ``tf.train.Example`` bytes into ``{key: list[bytes] | int64[] | float32[]}``."""
    example = tf_example_pb2.Example()
    example.ParseFromString(data)
    out: dict[str, Any] = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        if kind == "bytes_list":
            out[key] = list(feature.bytes_list.value)
        elif kind == "int64_list":
            out[key] = np.asarray(feature.int64_list.value, dtype=np.int64)
        elif kind == "float_list":
            out[key] = np.asarray(feature.float_list.value, dtype=np.float32)
        else:
            out[key] = []
    return out


@dataclasses.dataclass
class ImageRecord:
    """One image with its masks, as stored (schema version 1, ``docs/design.md``)."""

    image_id: int  # unique within the dataset
    image_bytes: bytes  # the encoded image file
    image_format: str  # "jpeg" or "png"
    height: int
    width: int
    filename: str  # relative to the dataset root
    label: int | np.ndarray  # class, or the sorted positive classes (multi-label)
    boxes: np.ndarray  # float32 [N, 4] normalised yxyx, half-open pixel edges, largest first
    areas: np.ndarray  # float32 [N] fractions of the image
    mask_pngs: list[bytes]  # N 1-bit PNGs at height x width
    # Optional ground truth: see segmentation.sources.GroundTruth.
    part_map_png: bytes | None = None
    decisive_parts: np.ndarray | None = None
    object_mask_png: bytes | None = None
    keypoints: np.ndarray | None = None
    object_boxes: np.ndarray | None = None

    @property
    def num_masks(self) -> int:
        return len(self.boxes)

    def to_bytes(self) -> bytes:
        return encode_example(
            {
                "image/encoded": self.image_bytes,
                "image/format": self.image_format,
                "image/height": self.height,
                "image/width": self.width,
                "image/id": self.image_id,
                "image/filename": self.filename,
                "image/label": np.atleast_1d(np.asarray(self.label, dtype=np.int64)),
                "masks/count": len(self.boxes),
                "masks/boxes": np.asarray(self.boxes, np.float32).reshape(-1),
                "masks/areas": np.asarray(self.areas, np.float32).reshape(-1),
                "masks/encoded": list(self.mask_pngs),
                "gt/part_map": self.part_map_png,
                "gt/decisive_parts": self.decisive_parts,
                "gt/object_mask": self.object_mask_png,
                "gt/keypoints": None if self.keypoints is None else self.keypoints.reshape(-1),
                "gt/object_boxes": (
                    None if self.object_boxes is None else np.asarray(self.object_boxes, np.float32)
                ),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "record") -> ImageRecord:
        """Parses and validates one record; ``where`` names it in error messages."""
        try:
            return cls._from_bytes(data, where)
        except RecordError:
            raise
        except (DecodeError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise RecordError(
                f"{where}: not a protomask record ({type(e).__name__}: {e}); re-export it or "
                "set input.skip_bad_records=True."
            ) from None

    @classmethod
    def _from_bytes(cls, data: bytes, where: str) -> ImageRecord:
        f = parse_example(data)
        required = ("image/encoded", "image/id", "image/label", "masks/count")
        missing = [k for k in required if k not in f]
        if missing:
            raise RecordError(f"{where}: missing feature(s) {missing}; not a protomask record.")
        count = int(f["masks/count"][0])
        image_id = int(f["image/id"][0])
        if count < 1:
            raise RecordError(
                f"{where} (image id {image_id}): zero masks; re-export the image (the export "
                "stores a full-image mask when segmentation finds none)."
            )
        boxes = f.get("masks/boxes", np.zeros(0, np.float32)).reshape(-1, 4)
        if len(boxes) != count:
            raise RecordError(
                f"{where} (image id {image_id}): masks/count={count} but {len(boxes)} boxes."
            )
        if not _boxes_in_unit_square(boxes, allow_empty=False):
            raise RecordError(
                f"{where} (image id {image_id}): a box lies outside the image or is empty "
                f"(boxes are normalised yxyx in [0, 1]): {boxes.tolist()}"
            )
        object_boxes = f.get("gt/object_boxes")
        if object_boxes is not None:
            object_boxes = object_boxes.reshape(-1, 4)
            if not _boxes_in_unit_square(object_boxes, allow_empty=True):
                raise RecordError(
                    f"{where} (image id {image_id}): gt/object_boxes must be normalised yxyx "
                    f"in [0, 1] with y0 <= y1 and x0 <= x1, got {object_boxes.tolist()}; "
                    "re-export the image."
                )
        label = f["image/label"]
        keypoints = f.get("gt/keypoints")
        return cls(
            image_id=image_id,
            image_bytes=f["image/encoded"][0],
            image_format=f.get("image/format", [b"jpeg"])[0].decode(),
            height=int(f["image/height"][0]) if "image/height" in f else 0,
            width=int(f["image/width"][0]) if "image/width" in f else 0,
            filename=f.get("image/filename", [b""])[0].decode(),
            label=int(label[0]) if len(label) == 1 else label,
            boxes=boxes,
            areas=f.get("masks/areas", np.zeros(count, np.float32)),
            mask_pngs=list(f.get("masks/encoded", [])),
            part_map_png=f["gt/part_map"][0] if f.get("gt/part_map") else None,
            decisive_parts=f.get("gt/decisive_parts"),
            object_mask_png=f["gt/object_mask"][0] if f.get("gt/object_mask") else None,
            keypoints=None if keypoints is None else keypoints.reshape(-1, 3),
            object_boxes=object_boxes,
        )


def _boxes_in_unit_square(boxes: np.ndarray, *, allow_empty: bool) -> bool:
    """``[N, 4]`` yxyx boxes are finite, inside [0, 1], not inverted and, unless
    ``allow_empty``, not empty."""
    extent = boxes[:, 2:] - boxes[:, :2]
    return bool(
        np.all(np.isfinite(boxes))
        and np.all(boxes >= 0.0)
        and np.all(boxes <= 1.0)
        and np.all(extent >= 0.0 if allow_empty else extent > 0.0)
    )


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_mask_png(mask: np.ndarray) -> bytes:
    """bool ``[H, W]`` -> a lossless 1-bit PNG."""
    return _png(np.asarray(mask, dtype=bool))


def decode_mask_png(data: bytes) -> np.ndarray:
    """A mask PNG -> bool ``[H, W]``."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L")) > 0


def encode_label_map_png(label_map: np.ndarray) -> bytes:
    """uint8 ``[H, W]`` label map -> a lossless greyscale PNG."""
    return _png(np.asarray(label_map, dtype=np.uint8))


def decode_label_map_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image, dtype=np.uint8)


def decode_image(data: bytes, where: str = "record") -> np.ndarray:
    """An image file -> ``uint8 [H, W, 3]`` RGB (grey and RGBA converted)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise RecordError(f"{where}: image bytes cannot be decoded ({e}).") from e


def list_shards(records_dir: str | os.PathLike, split: str) -> list:
    """The shards of ``split`` in ``records_dir``, sorted; all of them must be there."""
    records_dir = as_path(records_dir)
    shards = sorted(records_dir.glob(f"{split}-*-of-*.tfrecord"))
    if not shards:
        raise RecordError(
            f"{records_dir}: no '{split}' shards found. Run "
            "`python -m segmentation.export --config <config>` first (it writes to "
            "config.dataset.records_dir)."
        )
    count = int(shards[0].name.rsplit("-of-", 1)[1].split(".")[0])
    if len(shards) != count:
        present = {int(p.name.split("-")[-3]) for p in shards}
        missing = sorted(set(range(count)) - present)
        raise RecordError(
            f"{records_dir}: split '{split}' has {len(shards)} of {count} shards; missing "
            f"shard indices {missing[:10]}{'...' if len(missing) > 10 else ''}. Finish the "
            "export (re-running it skips complete shards)."
        )
    return shards


def load_dataset_info(records_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads ``dataset_info.json`` and checks its schema: version, types and counts."""
    path = as_path(records_dir) / DATASET_INFO
    if not path.exists():
        raise RecordError(
            f"{path} not found. Run `python -m segmentation.export --config <config>` first."
        )
    redo = "re-run the export (python -m segmentation.export --config <config>) to rewrite it"
    try:
        info = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RecordError(f"{path} is not valid JSON ({e}); {redo}.") from None
    if not isinstance(info, dict):
        raise RecordError(f"{path} holds {json.dumps(info)[:40]}, not a JSON object; {redo}.")
    if info.get("schema_version") != SCHEMA_VERSION:
        raise RecordError(
            f"{path}: schema version {info.get('schema_version')} but this code reads "
            f"version {SCHEMA_VERSION}; re-export the dataset."
        )
    problem = _dataset_info_problem(info)
    if problem:
        raise RecordError(f"{path}: {problem}; {redo}.")
    return info


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _dataset_info_problem(info: dict[str, Any]) -> str | None:
    """What is wrong with a parsed ``dataset_info.json`` (None if nothing)."""
    num_classes, names = info.get("num_classes"), info.get("class_names")
    if not _is_count(num_classes) or num_classes < 1:
        return f"num_classes must be a positive integer, got {num_classes!r}"
    if (
        not (isinstance(names, list) and all(isinstance(n, str) and n for n in names))
        or len(set(names)) != len(names)
        or len(names) != num_classes
    ):
        return f"class_names must be {num_classes} distinct non-empty strings, got {names!r:.200}"
    if not isinstance(info.get("multi_label"), bool) or not isinstance(info.get("dataset"), str):
        return "multi_label must be true or false and dataset a string"
    parts = info.get("part_names", [])
    if not (isinstance(parts, list) and all(isinstance(n, str) for n in parts)):
        return f"part_names must be a list of strings, got {parts!r:.200}"
    splits = info.get("splits")
    if not isinstance(splits, dict) or not splits:
        return f"splits must map each split to its counts, got {splits!r:.200}"
    for split, counts in splits.items():
        if not isinstance(counts, dict):
            return f"splits.{split} must be an object, got {counts!r:.200}"
        bad = [k for k in ("num_images", "num_masks", "num_shards") if not _is_count(counts.get(k))]
        per_class = counts.get("class_counts")
        if not (isinstance(per_class, list) and len(per_class) == num_classes):
            bad.append(f"class_counts (need {num_classes} counts)")
        elif not all(_is_count(c) for c in per_class):
            bad.append("class_counts")
        if bad:
            return f"splits.{split}: {', '.join(bad)} must be non-negative integers"
        images = counts["num_images"]
        if counts["num_shards"] < 1 or counts["num_masks"] < images:
            return f"splits.{split}: needs num_shards >= 1 and num_masks >= num_images"
        if not info["multi_label"] and sum(per_class) != images:
            return f"splits.{split}: class_counts sum to {sum(per_class)}, not num_images={images}"
    return None


def _main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Inspect or re-index TFRecord shards.")
    parser.add_argument("--reindex", nargs="+", help="shards whose .index to rebuild")
    parser.add_argument("--verify", nargs="+", help="shards whose records to CRC-check")
    args = parser.parse_args(argv)
    for shard in args.reindex or []:
        index = build_index(shard)
        Path(shard + INDEX_SUFFIX).write_bytes(index.astype("<u8").tobytes())
        print(f"{shard}: {len(index)} records indexed")
    for shard in args.verify or []:
        reader = ShardedRecords([shard])
        for i in range(len(reader)):
            reader[i]
        print(f"{shard}: {len(reader)} records, CRCs ok")


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
