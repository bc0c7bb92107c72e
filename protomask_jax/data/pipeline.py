"""The host input pipeline: TFRecords -> fixed-shape numpy batches, with grain.

Each record is decoded once into an example: ``canvas uint8 [S, S, 3]`` (the image fitted
in), ``boxes float32 [K, 4]`` (mapped into the canvas, padded cyclically to K), ``valid
bool [K]``, ``num_masks``, ``label``, ``image_id``, ``weight`` (0 for filler) and, for
``input.fill_background == "mask"``, ``masks uint8 [K, M, M]``. Views are cut on the device.
``label`` is int32 ``[]``, or for ``dataset.multi_label`` the multi-hot int32 ``[C]`` of the
record's label set (``docs/design.md``, "Records").

The training stream draws one seeded permutation of the training images per epoch and cuts
its first ``floor(N / B) B`` positions into global batches: an epoch is exactly one pass, no
image appears twice in it, and the last ``N mod B`` images of each epoch's permutation (a
different few every epoch) sit that epoch out (the reference's DataLoader keeps a smaller
last batch instead; ours has a fixed shape and BatchNorm sees no filler rows).
Evaluation streams visit a split once in order, the last batch padded with zero-weight
filler. A stream is a pure function of ``(seed, position)``: its state is the number of
batches consumed, so a resumed run sees the batches an uninterrupted one would. Process
``p`` of ``P`` reads rows ``[p B/P, (p+1) B/P)`` of every global batch."""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import mmap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np
from grain.multiprocessing import SharedMemoryArray

from protomask_jax.base import UserError
from protomask_jax.data import records as records_lib
from protomask_jax.data import views as views_lib

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """Static shapes and options of the host pipeline (from ``config.input``)."""

    canvas_size: int
    num_views: int
    with_masks: bool = False
    mask_size: int = 112
    num_classes: int = 0  # C of the multi-hot labels, with multi_label
    multi_label: bool = False
    # (fitted image uint8 [h, w, 3], image id) -> same: evaluation's perturbed passes.
    image_transform: Callable[[np.ndarray, int], np.ndarray] | None = None

    @classmethod
    def from_config(cls, config) -> PipelineSpec:
        return cls(
            canvas_size=config.input.canvas_size,
            num_views=config.input.num_views,
            with_masks=config.input.fill_background == "mask",
            mask_size=config.input.mask_size,
            num_classes=config.dataset.num_classes,
            multi_label=bool(config.dataset.multi_label),
        )

    def encode_label(self, label) -> np.ndarray:
        """A record's label (a class, or the positive classes) as the batch holds it."""
        if not self.multi_label:
            return np.int32(label if np.ndim(label) == 0 else label[0])
        return multi_hot([np.atleast_1d(label)], self.num_classes)[0]


class RecordSet:
    """The records of one split, each read once at start-up: its CRCs, its schema
    (``ImageRecord.from_bytes``), its labels (in ``[0, num_classes)`` when that is given) and
    its image header. A bad record raises ``RecordError``
    naming file, offset and image id, or, with ``skip_bad_records``, is left out of ``good``
    and described in ``skipped``. ``labels`` (a multi-label record's smallest class, -1 for
    an empty set) and ``image_ids`` are -1 for skipped records; ``label_sets`` hold every
    record's classes (empty for skipped ones)."""

    def __init__(
        self,
        records_dir: str | Path,
        split: str,
        verify_crc: bool = True,
        skip_bad_records: bool = False,
        num_classes: int | None = None,
    ):
        self.records_dir = records_lib.as_path(records_dir)
        self.num_classes = num_classes
        self.split = split
        self.reader = records_lib.ShardedRecords(
            records_lib.list_shards(records_dir, split), verify_crc=verify_crc
        )
        self.skipped: list[str] = []
        self.label_sets: list[np.ndarray] = []
        self.labels, self.image_ids = self._scan(skip_bad_records)
        self.good = np.flatnonzero(self.image_ids >= 0)

    def _scan(self, skip_bad_records: bool) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image, UnidentifiedImageError

        labels = np.full(len(self.reader), -1, np.int64)
        ids = np.full(len(self.reader), -1, np.int64)
        for i in range(len(self.reader)):
            path, offset = self.reader.locate(i)
            where = f"{path} at byte offset {offset}"
            try:
                record = records_lib.ImageRecord.from_bytes(self.reader[i], where)
                try:
                    with Image.open(io.BytesIO(record.image_bytes)):
                        pass
                except (UnidentifiedImageError, OSError) as e:
                    raise records_lib.RecordError(
                        f"{where} (image id {record.image_id}): the image cannot be "
                        f"decoded ({e}); re-export it or set input.skip_bad_records=True."
                    ) from e
                self._check_label(record, where)
            except records_lib.RecordError as e:
                if not skip_bad_records:
                    raise
                self.skipped.append(str(e))
                log.warning("skipping bad record: %s", e)
                self.label_sets.append(np.zeros(0, np.int64))
                continue
            self.label_sets.append(np.atleast_1d(np.asarray(record.label, np.int64)))
            labels[i] = self.label_sets[-1][0] if len(self.label_sets[-1]) else -1
            ids[i] = record.image_id
        return labels, ids

    def _check_label(self, record: records_lib.ImageRecord, where: str) -> None:
        classes = np.atleast_1d(record.label)
        if self.num_classes and np.any((classes < 0) | (classes >= self.num_classes)):
            raise records_lib.RecordError(
                f"{where} (image id {record.image_id}): label {classes.tolist()} is not in "
                f"[0, {self.num_classes}) (num_classes of dataset_info.json); re-export it."
            )

    def __len__(self) -> int:
        return len(self.reader)


def split_train_validation(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, validation) record indices: each class gives ``round(fraction n_c)``
    images (at least one when it has two or more), chosen by a seeded permutation; multi-label
    records are stratified by their smallest class. The reference selects models on the test
    set (``docs/reference.md`` §9.6); we select on this held-out part of the training set."""
    rng = np.random.default_rng(seed)
    validation = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = int(round(fraction * len(members)))
        if fraction > 0 and take == 0 and len(members) >= 2:
            take = 1
        validation.extend(rng.permutation(members)[:take].tolist())
    validation = np.sort(np.asarray(validation, np.int64))
    train = np.setdiff1d(np.arange(len(labels)), validation)
    return train, validation


def fit_record(record: records_lib.ImageRecord, spec: PipelineSpec, where: str) -> Batch:
    """Decodes one record into the fixed-shape example the device step consumes."""
    image = records_lib.decode_image(record.image_bytes, where)
    height, width = image.shape[:2]
    canvas = views_lib.fit_image_to_canvas(image, spec.canvas_size)
    if spec.image_transform is not None:
        fit_h, fit_w = views_lib.fitted_size(height, width, spec.canvas_size)
        canvas[:fit_h, :fit_w] = spec.image_transform(canvas[:fit_h, :fit_w], record.image_id)
    n = record.num_masks
    slots = np.arange(spec.num_views) % n  # cyclic padding; if n > K keep the K largest
    boxes = views_lib.fit_box_to_canvas(record.boxes, height, width, spec.canvas_size)
    example = {
        "canvas": canvas,
        "boxes": boxes[slots].astype(np.float32),
        "valid": np.arange(spec.num_views) < n,
        "num_masks": np.int32(min(n, spec.num_views)),
        "label": spec.encode_label(record.label),
        "image_id": np.int32(record.image_id),
        "weight": np.float32(1.0),
    }
    if spec.with_masks:
        example["masks"] = np.stack(
            [fit_mask_to_canvas(record.mask_pngs[k], height, width, spec) for k in slots]
        )
    return example


def fit_mask_to_canvas(mask_png: bytes, height: int, width: int, spec: PipelineSpec):
    """A stored mask, placed like its image in the canvas, at ``mask_size`` resolution."""
    mask = records_lib.decode_mask_png(mask_png).astype(np.uint8) * 255
    canvas = views_lib.fit_image_to_canvas(
        np.repeat(mask[..., None], 3, axis=-1), spec.canvas_size
    )[..., 0]
    from PIL import Image

    small = Image.fromarray(canvas).resize((spec.mask_size, spec.mask_size), Image.BILINEAR)
    return (np.asarray(small) > 127).astype(np.uint8)


def filler_example(spec: PipelineSpec) -> Batch:
    """A zero-weight example that pads the last evaluation batch to the fixed shape."""
    example = {
        "canvas": np.zeros((spec.canvas_size, spec.canvas_size, 3), np.uint8),
        "boxes": np.tile(np.array([0.0, 0.0, 1.0, 1.0], np.float32), (spec.num_views, 1)),
        "valid": np.zeros(spec.num_views, bool),
        "num_masks": np.int32(1),
        "label": np.zeros_like(spec.encode_label(0)),  # no class
        "image_id": np.int32(-1),
        "weight": np.float32(0.0),
    }
    if spec.with_masks:
        example["masks"] = np.ones((spec.num_views, spec.mask_size, spec.mask_size), np.uint8)
    return example


class _Element:
    """Picklable grain map function: this process's row j -> decoded example.

    Row j is global stream position ``step B + p B/P + row``; ``order`` maps a position to
    an index into ``record_indices``, or -1 for filler."""

    def __init__(self, record_set, record_indices, spec, order, global_batch, process, processes):
        if global_batch % processes:
            raise UserError(
                f"config.input.batch_size={global_batch} must be divisible by the number of "
                f"processes ({processes})."
            )
        self.reader, self.record_indices = record_set.reader, record_indices
        self.spec, self.order, self.global_batch = spec, order, global_batch
        self.local_batch = global_batch // processes
        self.first_row = process * self.local_batch

    def __call__(self, j: int) -> Batch:
        step, row = divmod(int(j), self.local_batch)
        i = self.order(step * self.global_batch + self.first_row + row)
        if i < 0:
            return filler_example(self.spec)
        record_index = int(self.record_indices[i])
        path, offset = self.reader.locate(record_index)
        where = f"{path} at byte offset {offset}"
        # Bad records were found (and, if asked, left out) by RecordSet's start-up scan.
        record = records_lib.ImageRecord.from_bytes(self.reader[record_index], where)
        return fit_record(record, self.spec, where)


class _EpochPermutation:
    """Global stream position -> index into the split: epoch ``e`` is the first ``per_epoch``
    entries of the permutation seeded by ``(seed, e)``."""

    def __init__(self, size: int, seed: int, per_epoch: int):
        self.size, self.seed, self.per_epoch = size, seed, per_epoch

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one object per pipeline, small cache)
    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(self.size)

    def __call__(self, position: int) -> int:
        epoch, i = divmod(position, self.per_epoch)
        return int(self.permutation(epoch)[i])

    def __getstate__(self):
        return {"size": self.size, "seed": self.seed, "per_epoch": self.per_epoch}

    def __setstate__(self, state):
        self.__init__(**state)


class _InOrder:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, position: int) -> int:
        return position if position < self.size else -1


def _private_copy(array: np.ndarray) -> np.ndarray:
    """``array`` in this process's own memory. Worker processes hand batches over in shared
    memory segments that grain unlinks only when the array is collected, on a background
    thread; a segment still referenced or queued when Python exits is reported by the
    resource tracker as leaked. Copying out and unlinking the segment at once leaves none."""
    if not isinstance(array, SharedMemoryArray) or not isinstance(array.base, mmap.mmap):
        return array
    copy = np.array(array)
    array.shm.unlink()  # also unregisters it from the resource tracker
    array._unlink_on_del = False  # collected later, it only unmaps (unlinked already)
    return copy


class BatchIterator:
    """Iterates numpy batches of one stream; ``get_state``/``set_state`` like grain's."""

    def __init__(self, make_iter, num_batches: int | None, start: int = 0):
        self._make_iter = make_iter
        self.num_batches = num_batches
        self._position = start
        self._iter = make_iter(start)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.num_batches is not None and self._position >= self.num_batches:
            raise StopIteration
        batch = next(self._iter)
        self._position += 1
        return {key: _private_copy(value) for key, value in batch.items()}

    def get_state(self) -> dict[str, int]:
        return {"batches_consumed": self._position}

    def set_state(self, state: dict[str, Any]) -> None:
        self.close()
        self._position = int(state["batches_consumed"])
        self._iter = self._make_iter(self._position)

    def close(self) -> None:
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()


def _grain_stream(element: _Element, start_batch: int, stop_batch: int | None, num_workers: int):
    local_batch = element.local_batch
    stop = (stop_batch if stop_batch is not None else 1 << 40) * local_batch
    dataset = grain.MapDataset.range(start_batch * local_batch, stop).map(element)
    dataset = dataset.batch(local_batch, drop_remainder=True)
    iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if num_workers > 0:
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2)
        )
    return iter(iter_dataset)


def train_stream(
    record_set: RecordSet,
    record_indices: np.ndarray,
    spec: PipelineSpec,
    *,
    global_batch: int,
    seed: int,
    start_batch: int = 0,
    num_workers: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> BatchIterator:
    """The endless, shuffled stream of process-local batches of ``record_indices`` from
    batch ``start_batch`` on; epoch ``e`` (``len // global_batch`` batches) uses the
    permutation seeded by ``(seed, e)``. ``num_workers``: grain worker processes (0: decode
    in this process, two threads)."""
    per_epoch = len(record_indices) // global_batch * global_batch
    if per_epoch == 0:
        raise UserError(
            f"config.input.batch_size={global_batch} is larger than the {len(record_indices)} "
            "training images; lower it."
        )
    order = _EpochPermutation(len(record_indices), seed, per_epoch)
    element = _Element(
        record_set, record_indices, spec, order, global_batch, process_index, process_count
    )
    stream = functools.partial(_grain_stream, element, stop_batch=None, num_workers=num_workers)
    return BatchIterator(stream, None, start_batch)


def eval_stream(
    record_set: RecordSet,
    record_indices: np.ndarray,
    spec: PipelineSpec,
    *,
    global_batch: int,
    num_workers: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> BatchIterator:
    """One pass over ``record_indices`` in order; the last batch padded with ``weight=0``."""
    num_batches = -(-len(record_indices) // global_batch)
    order = _InOrder(len(record_indices))
    element = _Element(
        record_set, record_indices, spec, order, global_batch, process_index, process_count
    )
    stream = functools.partial(
        _grain_stream, element, stop_batch=num_batches, num_workers=num_workers
    )
    return BatchIterator(stream, num_batches)


def multi_hot(label_sets, num_classes: int) -> np.ndarray:
    """int32 ``[N, C]``: 1 where class c is among image n's classes."""
    hot = np.zeros((len(label_sets), num_classes), np.int32)
    for n, classes in enumerate(label_sets):
        hot[n, np.asarray(classes, np.int64)] = 1
    return hot


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The reference's cross-entropy class weights ``w_c = N / (C n_c)`` (absent → 0), from
    labels ``[N]`` or multi-hot ``[N, C]`` (n_c: the images holding c)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        counts = labels.sum(axis=0).astype(np.float64)
    else:
        counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return weights.astype(np.float32)
