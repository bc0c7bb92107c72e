"""Dataset sources: what the export reads, one class per dataset.

A source lists, per split, light :class:`SourceEntry` rows sorted by image id (cheap: no
file is read) and loads one :class:`SourceItem` (the image file's bytes and any ground
truth) on demand, so an export process only reads the images of its own shards.

Adding a dataset (CUB-200, Stanford Dogs, Cars-196, tfds) is one subclass registered by
name; ``config.dataset.name`` selects it::

    @register_source("cub200")
    class Cub200Source(Source):
        def __init__(self, config): ...          # read config.dataset.root, check layout
        class_names = [...]                      # or a property
        def entries(self, split): ...            # -> list[SourceEntry], sorted by image_id
        def load(self, entry): ...               # -> SourceItem (bytes + GroundTruth)

Ids must be unique across all splits of a dataset and stable between runs (the export's
shard ranges and resume depend on it).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class SourceError(ValueError):
    """A dataset is missing, incomplete or not laid out as its source expects."""


@dataclasses.dataclass(frozen=True)
class GroundTruth:
    """Optional per-image annotations a dataset ships (all ``None`` when absent).

    Attributes:
      part_map: uint8 ``[H, W]`` label map, 0 background, p + 1 = part p.
      decisive_parts: int ``[D]`` ids of the parts that decide the image's class.
      object_mask: bool ``[H, W]`` mask of the whole object (e.g. CUB's bird).
      keypoints: float32 ``[Q, 3]`` (y, x normalised to [0, 1], visible) per part.
      object_boxes: float32 ``[M, 4]`` normalised yxyx boxes of the objects (CUB's bird,
        Dogs' dogs, Cars' car); evaluation uses their union as the object region when there
        is no object mask.
    """

    part_map: np.ndarray | None = None
    decisive_parts: np.ndarray | None = None
    object_mask: np.ndarray | None = None
    keypoints: np.ndarray | None = None
    object_boxes: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class SourceEntry:
    """One image of a split, before anything is read.

    Attributes:
      image_id: unique within the dataset (all splits).
      filename: path relative to the dataset root (used in records and messages).
      label: class index, or a tuple of positive classes for multi-label datasets.
      key: whatever the source needs to load the image (a path, an index); opaque.
    """

    image_id: int
    filename: str
    label: int | tuple[int, ...]
    key: Any = None


@dataclasses.dataclass(frozen=True)
class SourceItem:
    """One loaded image: the file's bytes as found (never re-encoded) and ground truth."""

    image_id: int
    filename: str
    image_bytes: bytes
    label: int | tuple[int, ...]
    gt: GroundTruth = GroundTruth()


class Source(abc.ABC):
    """A dataset the export can read. Subclasses are registered with :func:`register_source`.

    Attributes:
      name: the registry name (``config.dataset.name``).
      root: the dataset folder, for messages.
      class_names: one name per class index.
      part_names: names of the parts ``GroundTruth.part_map`` refers to (may be empty).
      multi_label: whether labels are tuples of positive classes.
    """

    name: str = ""
    root: Path
    class_names: Sequence[str]
    part_names: Sequence[str] = ()
    multi_label: bool = False

    def splits(self) -> tuple[str, ...]:
        """The splits this source has images for (``train`` and ``test`` by default)."""
        return ("train", "test")

    @abc.abstractmethod
    def entries(self, split: str) -> list[SourceEntry]:
        """The images of ``split``, sorted by ``image_id``."""

    @abc.abstractmethod
    def load(self, entry: SourceEntry) -> SourceItem:
        """Reads one image's bytes (and ground truth)."""

    def items(self, split: str) -> Iterator[SourceItem]:
        """Loads the images of ``split`` in id order."""
        for entry in self.entries(split):
            yield self.load(entry)

    def _read_bytes(self, relative: str) -> bytes:
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
    """Builds the source ``config.dataset.name`` names.

    Args:
      config: the full experiment config (reads ``config.dataset``).

    Raises:
      SourceError: for an unknown name (lists the known ones) or a missing dataset.
    """
    name = config.dataset.name
    if name not in _SOURCES:
        raise SourceError(
            f"config.dataset.name={name!r} is not a known source; known: {sorted(_SOURCES)}."
        )
    return _SOURCES[name](config)


def _require_root(config: ml_collections.ConfigDict, layout: str) -> Path:
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


# ----------------------------------------------------------------------- parts world


@register_source("parts_world")
class PartsWorldSource(Source):
    """The synthetic parts world (``segmentation.parts_world``), generated on first use into
    ``config.dataset.root`` from ``config.dataset.synthetic``. Ground truth: part maps and
    the decisive parts of each image's class."""

    def __init__(self, config: ml_collections.ConfigDict):
        from segmentation import parts_world

        if not config.dataset.root:
            raise SourceError(
                "config.dataset.root is empty; set it to the folder the parts "
                "world is generated into (e.g. data/parts_world)."
            )
        self.root = Path(config.dataset.root)
        synthetic = config.dataset.synthetic
        self._metadata = parts_world.generate(
            self.root,
            num_classes=synthetic.num_classes,
            image_size=synthetic.image_size,
            train_per_class=synthetic.train_per_class,
            test_per_class=synthetic.test_per_class,
            seed=synthetic.seed,
        )
        self.class_names = list(self._metadata["class_names"])
        self.part_names = list(self._metadata["part_names"])
        self._decisive = [
            np.asarray(c["decisive_parts"], np.int64) for c in self._metadata["classes"]
        ]

    def entries(self, split: str) -> list[SourceEntry]:
        rows = [
            SourceEntry(image_id=e["id"], filename=e["image"], label=e["label"], key=e["part_map"])
            for e in self._metadata["images"]
            if e["split"] == split
        ]
        return sorted(rows, key=lambda e: e.image_id)

    def load(self, entry: SourceEntry) -> SourceItem:
        from PIL import Image

        with Image.open(self.root / entry.key) as part_map:
            part_map = np.asarray(part_map, dtype=np.uint8)
        return SourceItem(
            image_id=entry.image_id,
            filename=entry.filename,
            image_bytes=self._read_bytes(entry.filename),
            label=entry.label,
            gt=GroundTruth(part_map=part_map, decisive_parts=self._decisive[entry.label]),
        )


# -------------------------------------------------------------------------- folder

_FOLDER_LAYOUT = (
    "one sub-folder per class holding its images, optionally under train/ and test/ sub-folders"
)


@register_source("folder")
class FolderSource(Source):
    """Images in one folder per class: ``root/<class>/*`` (everything is ``train``) or
    ``root/{train,test}/<class>/*``. Classes are the sorted union of class folder names; ids
    are assigned in sorted order of the relative paths (all splits together)."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.root = _require_root(config, _FOLDER_LAYOUT)
        split_dirs = [s for s in ("train", "test") if (self.root / s).is_dir()]
        bases = {s: self.root / s for s in split_dirs} or {"train": self.root}
        files: list[tuple[str, str, str]] = []  # (relative path, split, class name)
        for split, base in bases.items():
            for class_dir in sorted(p for p in base.iterdir() if p.is_dir()):
                for path in class_dir.rglob("*"):
                    # Not is_file(): anything that is not a folder and looks like an image
                    # is listed; an unreadable one fails later, naming the file.
                    if path.suffix.lower() in IMAGE_SUFFIXES and not path.is_dir():
                        files.append(
                            (path.relative_to(self.root).as_posix(), split, class_dir.name)
                        )
        if not files:
            raise SourceError(f"{self.root}: no images found; expected {_FOLDER_LAYOUT}.")
        self.class_names = sorted({c for _, _, c in files})
        class_index = {name: i for i, name in enumerate(self.class_names)}
        self._entries: dict[str, list[SourceEntry]] = {s: [] for s in bases}
        for image_id, (relative, split, class_name) in enumerate(sorted(files)):
            self._entries[split].append(
                SourceEntry(image_id=image_id, filename=relative, label=class_index[class_name])
            )

    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in ("train", "test") if self._entries.get(s))

    def entries(self, split: str) -> list[SourceEntry]:
        return list(self._entries.get(split, []))

    def load(self, entry: SourceEntry) -> SourceItem:
        return SourceItem(
            image_id=entry.image_id,
            filename=entry.filename,
            image_bytes=self._read_bytes(entry.filename),
            label=entry.label,
        )


def image_format(data: bytes) -> str | None:
    """``"png"`` or ``"jpeg"`` from the file's magic bytes, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    return None


# The real datasets (cub200, dogs, cars196, tfds) register themselves into the same registry.
from segmentation import datasets  # noqa: E402, F401
