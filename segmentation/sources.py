"""What the export reads: the source interface and the registry of datasets.

A source lists, per split, light :class:`SourceEntry` rows sorted by image id (no file is
read) and loads one :class:`SourceItem` (the image file's bytes and any ground truth) on
demand, so an export process reads only the images of its own shards. A dataset is one
subclass registered by name (``config.dataset.name``); ``segmentation/datasets.py`` holds
the built-in ones. Ids must be unique across all splits and stable between runs: shard
ranges and resume depend on them.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from protomask_jax.base import UserError


class SourceError(UserError):
    """A dataset is missing, incomplete or not laid out as its source expects."""


@dataclasses.dataclass(frozen=True)
class GroundTruth:
    """Optional per-image annotations a dataset ships (``None`` when absent)."""

    part_map: np.ndarray | None = None  # uint8 [H, W]: 0 background, p + 1 = part p
    decisive_parts: np.ndarray | None = None  # int [D]: the parts that decide the class
    object_mask: np.ndarray | None = None  # bool [H, W], e.g. CUB's bird
    keypoints: np.ndarray | None = None  # float32 [Q, 3]: (y, x) normalised, visible
    # float32 [M, 4] normalised yxyx; evaluation uses their union as the object region
    # when there is no object mask.
    object_boxes: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class SourceEntry:
    """One image of a split, before anything is read."""

    image_id: int
    filename: str  # relative to the dataset root
    label: int | tuple[int, ...]  # a tuple of positive classes when multi-label
    key: Any = None  # whatever the source needs to load the image


@dataclasses.dataclass(frozen=True)
class SourceItem:
    """One loaded image: the file's bytes as found (never re-encoded) and ground truth."""

    image_id: int
    filename: str
    image_bytes: bytes
    label: int | tuple[int, ...]
    gt: GroundTruth = GroundTruth()


class Source(abc.ABC):
    """A dataset the export can read; ``name`` is set by :func:`register_source`."""

    name: str = ""
    root: Path
    class_names: Sequence[str]
    part_names: Sequence[str] = ()  # what the part map's labels name
    multi_label: bool = False

    def splits(self) -> tuple[str, ...]:
        return ("train", "test")

    @abc.abstractmethod
    def entries(self, split: str) -> list[SourceEntry]:
        """The images of ``split``, sorted by ``image_id``."""

    def ground_truth(self, entry: SourceEntry, image_bytes: bytes) -> GroundTruth:
        return GroundTruth()

    def ground_truth_inputs(self, entries: Sequence[SourceEntry]) -> dict[str, Any] | None:
        """What decides the ground truth of ``entries`` besides the image files and the
        dataset's fixed tables, if it can change between export runs (files unpacked later):
        part of the shard fingerprint, so a change re-exports the shard. None: nothing."""
        return None

    def object_mask_location(self) -> str | None:
        """Where object masks are looked for, for the export's summary (None: the dataset
        has no optional object masks)."""
        return None

    def load(self, entry: SourceEntry) -> SourceItem:
        image_bytes = self.read_bytes(entry.filename)
        return SourceItem(
            entry.image_id,
            entry.filename,
            image_bytes,
            entry.label,
            self.ground_truth(entry, image_bytes),
        )

    def read_bytes(self, relative: str) -> bytes:
        path = self.root / relative
        try:
            return path.read_bytes()
        except OSError as e:
            raise SourceError(f"{path}: cannot read image file ({e}).") from e


_SOURCES: dict[str, Callable[[ml_collections.ConfigDict], Source]] = {}


def register_source(name: str):
    """Class decorator: makes a :class:`Source` subclass available as ``dataset.name``."""

    def register(cls):
        cls.name = name
        _SOURCES[name] = cls
        return cls

    return register


def get_source(config: ml_collections.ConfigDict) -> Source:
    """Builds the source ``config.dataset.name`` names (registered by importing its module)."""
    name = config.dataset.name
    if name not in _SOURCES:
        raise SourceError(
            f"config.dataset.name={name!r} is not a known source; known: {sorted(_SOURCES)}."
        )
    return _SOURCES[name](config)


def require_root(config: ml_collections.ConfigDict, layout: str) -> Path:
    """``config.dataset.root`` as a folder that exists; ``layout`` says what belongs there."""
    if not config.dataset.root:
        raise SourceError(
            f"config.dataset.root is empty; set it to the folder holding the "
            f"{config.dataset.name} dataset ({layout})."
        )
    root = Path(config.dataset.root)
    if not root.is_dir():
        raise SourceError(
            f"dataset root {root.resolve()} does not exist. Put the {config.dataset.name} "
            f"dataset there ({layout}) or point --config.dataset.root at it."
        )
    return root
