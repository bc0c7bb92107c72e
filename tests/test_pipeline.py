"""The host pipeline: canvas fitting, cyclic padding, epoch coverage, resumption, slicing."""

import io

import numpy as np
import pytest
from PIL import Image

from protomask_jax.base import UserError
from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_records(directory, num_images=10, num_classes=3, height=20, width=30, shards=2):
    """Images whose pixels encode their id; image i has (i % 3) + 1 masks."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(num_images):
        image = np.full((height, width, 3), i, np.uint8)
        n = i % 3 + 1
        boxes = []
        masks = []
        for k in range(n):
            mask = np.zeros((height, width), bool)
            r0, c0 = k * 2, k * 3
            mask[r0 : r0 + 5 + k, c0 : c0 + 6 + k] = True
            masks.append(records_lib.encode_mask_png(mask))
            boxes.append([r0 / height, c0 / width, (r0 + 5 + k) / height, (c0 + 6 + k) / width])
        items.append(
            records_lib.ImageRecord(
                image_id=100 + i,
                image_bytes=_png(image),
                image_format="png",
                height=height,
                width=width,
                filename=f"img{i}.png",
                label=int(rng.integers(num_classes)) if i >= num_classes else i,
                boxes=np.asarray(boxes, np.float32),
                areas=np.ones(n, np.float32),
                mask_pngs=masks,
            )
        )
    per_shard = -(-num_images // shards)
    for s in range(shards):
        chunk = items[s * per_shard : (s + 1) * per_shard]
        records_lib.write_shard(
            directory / records_lib.shard_name("train", s, shards), [r.to_bytes() for r in chunk]
        )
    return items


@pytest.fixture()
def record_set(tmp_path):
    items = write_records(tmp_path)
    return pipeline.RecordSet(tmp_path, "train"), items


SPEC = pipeline.PipelineSpec(canvas_size=32, num_views=4)


def test_fit_record_pads_views_cyclically_and_maps_boxes(record_set):
    records, items = record_set
    record = records_lib.ImageRecord.from_bytes(records.reader[1])  # image 1: 2 masks
    example = pipeline.fit_record(record, SPEC, "test")
    assert example["canvas"].shape == (32, 32, 3)
    # 30 px wide image fitted to 32: scale 32/30, height 20 -> 21 rows (round half up)
    assert (example["canvas"][:21, :32] == 1).all() and (example["canvas"][21:] == 0).all()
    np.testing.assert_array_equal(example["valid"], [True, True, False, False])
    # slots 2, 3 repeat masks 0, 1
    np.testing.assert_allclose(example["boxes"][2], example["boxes"][0])
    np.testing.assert_allclose(example["boxes"][3], example["boxes"][1])
    expected = items[1].boxes[1] * np.array([21 / 32, 1, 21 / 32, 1])
    np.testing.assert_allclose(example["boxes"][1], expected, rtol=1e-6)
    assert example["num_masks"] == 2 and example["image_id"] == 101


def test_stratified_validation_split_is_deterministic():
    labels = np.array([0] * 10 + [1] * 10 + [2] * 3)
    train, val = pipeline.split_train_validation(labels, 0.2, seed=3)
    train2, val2 = pipeline.split_train_validation(labels, 0.2, seed=3)
    np.testing.assert_array_equal(val, val2)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    # 2 of each 10-image class, at least 1 of the 3-image class
    assert [int(np.sum(labels[val] == c)) for c in range(3)] == [2, 2, 1]


def test_train_stream_epochs_are_single_passes_without_a_straddling_batch(record_set):
    records, _ = record_set
    indices = np.arange(len(records))
    # 10 images, batches of 4: an epoch is 2 batches; the 2 images its permutation puts
    # last sit that epoch out.
    stream = pipeline.train_stream(records, indices, SPEC, global_batch=4, seed=7)
    ids = np.stack([next(stream)["image_id"] for _ in range(6)]).reshape(3, 8)
    stream.close()
    for epoch in range(3):
        order = np.random.default_rng((7, epoch)).permutation(10)
        np.testing.assert_array_equal(ids[epoch], 100 + order[:8])
        assert len(set(ids[epoch].tolist())) == 8
    assert len({tuple(sorted(e)) for e in ids.tolist()}) > 1  # a different few sit out
    # 8 images in batches of 4: every image exactly once per epoch.
    stream = pipeline.train_stream(records, indices[:8], SPEC, global_batch=4, seed=3)
    ids = np.stack([next(stream)["image_id"] for _ in range(6)]).reshape(3, 8)
    stream.close()
    for epoch in range(3):
        assert sorted(ids[epoch].tolist()) == list(range(100, 108))
    with pytest.raises(UserError, match="batch_size=16 is larger than the 10"):
        pipeline.train_stream(records, indices, SPEC, global_batch=16, seed=3)


def test_train_stream_resumes_with_the_same_batches(record_set):
    records, _ = record_set
    indices = np.arange(len(records))
    full = pipeline.train_stream(records, indices, SPEC, global_batch=4, seed=1)
    batches = [next(full) for _ in range(6)]
    state = full.get_state()
    full.close()
    assert state == {"batches_consumed": 6}
    # batch 3 is the middle of epoch 1 (2 batches per epoch)
    resumed = pipeline.train_stream(records, indices, SPEC, global_batch=4, seed=1, start_batch=3)
    for expected in batches[3:]:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    resumed.close()


def test_process_slices_partition_each_global_batch(record_set):
    records, _ = record_set
    indices = np.arange(len(records))
    whole = pipeline.train_stream(records, indices, SPEC, global_batch=4, seed=2)
    parts = [
        pipeline.train_stream(
            records, indices, SPEC, global_batch=4, seed=2, process_index=p, process_count=2
        )
        for p in range(2)
    ]
    for _ in range(3):
        expected = next(whole)["image_id"]
        got = np.concatenate([next(part)["image_id"] for part in parts])
        np.testing.assert_array_equal(got, expected)


def test_eval_stream_pads_the_last_batch_with_zero_weight(record_set):
    records, _ = record_set
    stream = pipeline.eval_stream(records, np.arange(10), SPEC, global_batch=4)
    batches = list(stream)
    assert len(batches) == 3
    ids = np.concatenate([b["image_id"] for b in batches])
    weights = np.concatenate([b["weight"] for b in batches])
    assert list(ids[:10]) == list(range(100, 110))
    assert list(weights) == [1.0] * 10 + [0.0] * 2


def test_corrupt_record_names_file_and_offset(tmp_path):
    write_records(tmp_path, num_images=4, shards=1)
    shard = tmp_path / records_lib.shard_name("train", 0, 1)
    data = bytearray(shard.read_bytes())
    index = records_lib.read_index(shard)
    second = int(index[1, 0])
    data[second + 20] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(records_lib.RecordError, match=rf"{shard.name} at byte offset {second}"):
        pipeline.RecordSet(tmp_path, "train")


def test_class_weights_match_the_reference_formula():
    labels = np.array([0, 0, 0, 1])
    np.testing.assert_allclose(pipeline.class_weights(labels, 3), [4 / 9, 4 / 3, 0.0])


def test_reader_is_safe_to_share_between_threads(tmp_path):
    # grain decodes with several threads sharing one reader: reads must not race on a shared
    # file position (a seek+read reader failed here with "length does not match the index").
    from concurrent.futures import ThreadPoolExecutor

    items = write_records(tmp_path, num_images=12, shards=1)
    reader = pipeline.RecordSet(tmp_path, "train").reader
    order = np.random.default_rng(0).integers(0, 12, 600)
    with ThreadPoolExecutor(max_workers=6) as pool:
        payloads = list(pool.map(lambda i: reader[int(i)], order))
    for i, payload in zip(order, payloads, strict=True):
        assert payload == items[i].to_bytes()


def test_worker_processes_yield_the_same_batches(record_set):
    records, _ = record_set
    indices = np.arange(len(records))
    in_process = pipeline.train_stream(records, indices, SPEC, global_batch=4, seed=5)
    expected = [next(in_process) for _ in range(3)]
    in_process.close()
    workers = pipeline.train_stream(records, indices, SPEC, global_batch=4, seed=5, num_workers=2)
    try:
        for batch in expected:
            got = next(workers)
            for key in batch:
                np.testing.assert_array_equal(got[key], batch[key])
    finally:
        workers.close()
