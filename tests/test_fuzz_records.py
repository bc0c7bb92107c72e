"""Fuzzing the record reader and the start-up scan (``trainer.scan_records``).

Seeded damage to a copy of the tiny records: byte flips and truncations of shards and of
their offset indexes, garbage, flipped bytes and wrongly typed values in dataset_info.json,
and records re-framed with valid CRCs around a damaged payload. Each case must end in a
``UserError`` naming the damaged file, or be read exactly as before except for counted
skips (``input.skip_bad_records``); any other exception fails the test with its traceback.
A few of these faults also run through the CLI (``test_faults.py``).
"""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

from protomask_jax import base, trainer
from protomask_jax.data import records as records_lib
from tests._trained_run import tiny_config

NUM_CASES = 240
KINDS = (
    "shard_flip",
    "shard_truncate",
    "index_flip",
    "index_truncate",
    "info_garbage",
    "info_flip",
    "info_value",
    "reframed_payload",
)
# What training depends on in dataset_info.json; class and part names may change.
ESSENTIAL = ("schema_version", "num_classes", "multi_label")


def _configs(records_dir):
    strict = tiny_config(records_dir)
    skipping = tiny_config(records_dir)
    skipping.unlock()
    skipping.input.skip_bad_records = True
    skipping.lock()
    return strict, skipping


def _read(config) -> dict:
    """What the start-up scan hands to training: per split the (id, label) of every good
    record, the record count and the skip count; and the essential dataset_info."""
    info, *splits = trainer.scan_records(config)
    read = {
        "info": {key: info[key] for key in ESSENTIAL},
        "counts": {s: (c["num_images"], c["class_counts"]) for s, c in info["splits"].items()},
    }
    for record_set in splits:
        good = record_set.good
        ids, labels = record_set.image_ids[good].tolist(), record_set.labels[good].tolist()
        pairs = zip(ids, labels, strict=True)
        read[record_set.split] = (dict(pairs), len(record_set), len(record_set.skipped))
    return read


@pytest.fixture(scope="module")
def pristine(tiny_records, tmp_path_factory):
    records_dir = tmp_path_factory.mktemp("fuzz") / "records"
    shutil.copytree(tiny_records, records_dir)
    files = {p: p.read_bytes() for p in records_dir.iterdir() if p.is_file()}
    strict, _ = _configs(records_dir)
    return records_dir, files, _read(strict)


def _flip(data: bytes, rng, count: int) -> bytes:
    out = bytearray(data)
    for position in rng.choice(len(out), size=min(count, len(out)), replace=False):
        out[position] ^= int(rng.integers(1, 256))
    return bytes(out)


def _garbage_info(rng, text: str) -> bytes:
    choice = int(rng.integers(6))
    if choice == 0:
        return rng.integers(0, 256, int(rng.integers(1, 400)), dtype=np.uint8).tobytes()
    if choice == 1:
        return b"dataset info, but written by hand\n"
    if choice == 2:
        return text[: int(rng.integers(0, len(text)))].encode()
    return [b"null", b"[]", b"1.5"][choice - 3]


def _set_random_value(node, rng):
    """Replaces one randomly chosen value in a parsed JSON tree by a wrongly typed one."""
    path = []
    while isinstance(node, dict | list) and node:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = keys[int(rng.integers(len(keys)))]
        path.append((node, key))
        node = node[key]
        if rng.random() < 0.4:
            break
    values = [None, "x", -1, 1.5, [], {}, True, 10**20, "", ["a", "a"]]
    parent, key = path[-1]
    parent[key] = values[int(rng.integers(len(values)))]


def _reframe(shard, rng) -> bytes:
    """The shard with one record's payload damaged and framed again with valid CRCs."""
    reader = records_lib.ShardedRecords([shard])
    payloads = [reader[i] for i in range(len(reader))]
    reader.close()
    victim = int(rng.integers(len(payloads)))
    payloads[victim] = _flip(payloads[victim], rng, int(rng.integers(1, 6)))
    return b"".join(records_lib.frame_record(p) for p in payloads)


def _damage(kind: str, rng, records_dir, files) -> tuple:
    """Writes one damaged file; returns it and the new contents of the index (if any)."""
    shards = sorted(p for p in files if p.name.endswith(".tfrecord"))
    shard = shards[int(rng.integers(len(shards)))]
    index = shard.with_name(shard.name + records_lib.INDEX_SUFFIX)
    info_path = records_dir / records_lib.DATASET_INFO
    text = files[info_path].decode()
    if kind == "shard_flip":
        return shard, _flip(files[shard], rng, int(rng.integers(1, 4)))
    if kind == "shard_truncate":
        return shard, files[shard][: int(rng.integers(0, len(files[shard])))]
    if kind == "index_flip":
        return index, _flip(files[index], rng, int(rng.integers(1, 3)))
    if kind == "index_truncate":
        return index, files[index][: int(rng.integers(0, len(files[index])))]
    if kind == "info_garbage":
        return info_path, _garbage_info(rng, text)
    if kind == "info_flip":
        return info_path, _flip(files[info_path], rng, 1)
    if kind == "info_value":
        info = json.loads(text)
        _set_random_value(info, rng)
        return info_path, json.dumps(info).encode()
    return shard, _reframe(shard, rng)


def _outcome(config, damaged, expected, kind) -> str:
    """'refused' (a clear error naming the file), 'same' or 'skipped' (read as before, but
    for counted skips); anything else fails the test. A re-framed record passes the CRC
    checks by construction: it may differ (a changed image id or image) when every check
    accepts it, but no other record may."""
    try:
        read = _read(config)
    except base.UserError as error:
        names = {damaged.name, damaged.name.removesuffix(records_lib.INDEX_SUFFIX)}
        assert any(name in str(error) for name in names), (damaged.name, str(error))
        assert "\n" not in str(error)
        return "refused"
    assert read["info"] == expected["info"] and read["counts"] == expected["counts"]
    for split in ("train", "test"):
        pairs, count, skipped = read[split]
        expected_pairs, expected_count, _ = expected[split]
        assert count == expected_count and len(pairs) + skipped == count
        changed = sum(expected_pairs.get(i) != label for i, label in pairs.items())
        assert changed <= (kind == "reframed_payload"), (split, changed)
    return "skipped" if read["train"][2] + read["test"][2] else "same"


def test_damaged_records_are_refused_by_name_or_skipped_and_counted(pristine):
    records_dir, files, expected = pristine
    strict, skipping = _configs(records_dir)
    tally: dict[tuple[str, str], int] = {}
    for case in range(NUM_CASES):
        kind = KINDS[case % len(KINDS)]
        rng = np.random.default_rng(case)
        damaged, contents = _damage(kind, rng, records_dir, files)
        damaged.write_bytes(contents)
        try:
            for mode, config in (("strict", strict), ("skip", skipping)):
                outcome = _outcome(config, damaged, expected, kind)
                if kind in ("shard_flip", "shard_truncate", "index_flip", "index_truncate"):
                    # CRCs and the index check cover every byte: damage is never unseen.
                    assert outcome != "same", (case, kind, mode)
                    assert mode == "skip" or outcome == "refused", (case, kind)
                tally[kind, outcome] = tally.get((kind, outcome), 0) + 1
        finally:
            damaged.write_bytes(files[damaged])
    print(sorted(tally.items()))
    # The scan fuzzed both ways; the strict one refused every damaged shard and index.
    assert sum(tally.values()) == 2 * NUM_CASES
    assert tally.get(("shard_flip", "skipped"), 0) > 0
    assert tally.get(("info_garbage", "refused"), 0) == 2 * NUM_CASES // len(KINDS)


def test_reader_names_damage_it_cannot_survive(pristine, tmp_path):
    records_dir, files, _ = pristine
    shard = sorted(p for p in files if p.name.endswith(".tfrecord"))[0]
    copy = tmp_path / shard.name
    copy.write_bytes(files[shard])
    index = files[shard.with_name(shard.name + records_lib.INDEX_SUFFIX)]
    # An index entry claiming 2**60 bytes is refused before anything is read.
    entries = np.frombuffer(index, "<u8").reshape(-1, 2).copy()
    entries[-1, 1] = 1 << 60
    copy.with_name(copy.name + records_lib.INDEX_SUFFIX).write_bytes(entries.tobytes())
    with pytest.raises(records_lib.RecordError, match="offsets are not those of the shard"):
        records_lib.read_index(copy)
    # A payload that is no tf.train.Example, framed with valid CRCs.
    garbage = records_lib.frame_record(struct.pack("<I", 0xFFFFFFFF) * 4)
    with pytest.raises(records_lib.RecordError, match="record 0"):
        records_lib.ImageRecord.from_bytes(garbage[12:-4], "record 0")
