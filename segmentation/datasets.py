"""The real datasets: CUB-200-2011, Stanford Dogs, Stanford Cars and prepared tfds datasets.

Each source reads local files in the dataset's official layout (``docs/datasets.md`` says
where to get the archives and how to unpack them); nothing is downloaded. A missing or
damaged file raises :class:`~segmentation.sources.SourceError` naming the file, where it
was looked for and which archive puts it there.

- ``cub200``: ``CUB_200_2011/`` text files; ground truth = the 15 part keypoints and, when
  ``segmentations.tgz`` is unpacked, the bird mask.
- ``dogs``: ``Images/``, ``lists/{train,test}_list.mat``; ``Annotation/`` for boxes.
- ``cars196``: ``cars_train/``, ``cars_test/``, ``devkit/*.mat`` and the labelled test
  annotations ``cars_test_annos_withlabels.mat``.
- ``tfds``: a tfds dataset prepared in the ``array_record`` format (random access without
  TensorFlow), e.g. ``caltech_birds2011``, ``stanford_dogs``, ``cars196``.

Besides what :class:`~segmentation.sources.Source` requires, every source here has
``object_boxes(entry) -> float32 [M, 4]``: the dataset's object bounding boxes, normalised
yxyx (pixel coordinate / image size, clipped to [0, 1], as tfds computes them); ``load``
stores them as ``gt.object_boxes``.

Labels are 0-based. Image ids are unique over all splits and stable: CUB's own ids minus
one; Dogs: rank of the image path among all listed images; Cars: train images by file
name, then test images by file name; tfds: position in the split, splits one after another.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from segmentation.sources import (
    GroundTruth,
    Source,
    SourceEntry,
    SourceError,
    SourceItem,
    _require_root,
    register_source,
)

# CUB's bird masks are greyscale PNGs whose value grows with the share of annotators who
# marked the pixel as bird (0 = nobody, 255 = everybody). A pixel is bird when its value is
# at least this (half of full agreement; the reference's "> 0.5 after min-max
# normalisation" gives the same cut for every mask that reaches 255).
OBJECT_MASK_THRESHOLD = 128

DOCS = "docs/datasets.md"


# ---------------------------------------------------------------------------- helpers


def _where(path: Path) -> str:
    """The path as configured, plus the folder a relative path was resolved against."""
    return str(path) if path.is_absolute() else f"{path} (relative to {Path.cwd()})"


def _missing_file(path: Path, unpack: str, root_holds: str) -> SourceError:
    """The error for a file or folder of the layout that is not there.

    Args:
      path: where it was looked for.
      unpack: how to put it there (e.g. "unpack CUB_200_2011.tgz").
      root_holds: what ``config.dataset.root`` must point at.
    """
    return SourceError(
        f"{_where(path)} not found: {unpack} so that {path} exists, or set "
        f"--config.dataset.root to the folder that holds {root_holds} (see {DOCS})."
    )


def _read_table(
    path: Path, columns: Sequence[Callable[[str], Any]], unpack: str, root_holds: str
) -> list[tuple[Any, ...]]:
    """Reads a whitespace-separated text file, one converter per column.

    The last column takes the rest of the line (CUB's part names contain spaces).

    Raises:
      SourceError: missing file, or a line that does not parse (names file and line).
    """
    if not path.is_file():
        raise _missing_file(path, unpack, root_holds)
    rows = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=len(columns) - 1)
        try:
            if len(fields) != len(columns):
                raise ValueError(f"{len(fields)} columns, expected {len(columns)}")
            rows.append(
                tuple(convert(field) for convert, field in zip(columns, fields, strict=True))
            )
        except ValueError as e:
            raise SourceError(
                f"{path}:{line_number}: cannot parse {line!r} ({e}); the file "
                f"is damaged, {unpack} again."
            ) from e
    if not rows:
        raise SourceError(f"{path} is empty; the file is damaged, {unpack} again.")
    return rows


def _image_size(image_bytes: bytes, path: Path) -> tuple[int, int]:
    """(height, width) from the image header (the pixels are not decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as e:
        raise SourceError(f"{path}: not a readable image ({e}); replace the file.") from e
    return height, width


def _threshold_soft_mask(image_bytes: bytes, path: Path, size: tuple[int, int]) -> np.ndarray:
    """Decodes a greyscale soft mask (any PNG mode) to bool ``[H, W]``, value >= 128."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            grey = np.asarray(image.convert("L"))
    except (UnidentifiedImageError, OSError) as e:
        raise SourceError(f"{path}: not a readable mask image ({e}).") from e
    if grey.shape != size:
        raise SourceError(
            f"{path}: the mask is {grey.shape[0]}x{grey.shape[1]} (HxW) but its "
            f"image is {size[0]}x{size[1]}; the mask belongs to another image."
        )
    return grey >= OBJECT_MASK_THRESHOLD


def _normalised_boxes(pixel_yxyx: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel yxyx boxes ``[M, 4]`` -> float32 normalised yxyx clipped to [0, 1]."""
    boxes = np.asarray(pixel_yxyx, np.float64).reshape(-1, 4)
    scale = np.array([height, width, height, width], np.float64)
    return np.clip(boxes / scale, 0.0, 1.0).astype(np.float32)


def _load_mat(path: Path, unpack: str, root_holds: str) -> dict[str, Any]:
    """Reads a MATLAB v5 file with scipy (squeezed: cells -> object arrays of str)."""
    if not path.is_file():
        raise _missing_file(path, unpack, root_holds)
    try:
        import scipy.io
    except ImportError as e:
        raise SourceError(f"reading {path} needs scipy (pip install scipy).") from e
    try:
        return scipy.io.loadmat(path, squeeze_me=True)
    except (ValueError, NotImplementedError, OSError) as e:
        raise SourceError(f"{path}: not a readable MATLAB v5 file ({e}); {unpack} again.") from e


def _mat_field(mat: dict[str, Any], key: str, path: Path) -> np.ndarray:
    if key not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise SourceError(
            f"{path}: has no variable {key!r} (found {found}); it is not the "
            f"file the official archive ships (see {DOCS})."
        )
    return np.atleast_1d(mat[key])


class _LocalSource(Source):
    """Shared by the folder-layout datasets: entries per split, decided at construction."""

    _entries: dict[str, list[SourceEntry]]

    def entries(self, split: str) -> list[SourceEntry]:
        return list(self._entries.get(split, []))

    def _set_entries(self, rows: list[tuple[int, str, int, str, Any]]) -> None:
        """``rows``: (image_id, filename, label, split, key); stored sorted by id."""
        self._entries = {split: [] for split in self.splits()}
        for image_id, filename, label, split, key in sorted(rows, key=lambda r: r[0]):
            self._entries[split].append(SourceEntry(image_id, filename, label, key))

    def _boxes_for(
        self, entry: SourceEntry, pixel_yxyx: np.ndarray, image_bytes: bytes | None = None
    ) -> np.ndarray:
        """Normalises pixel boxes by the image's size (``image_bytes``, when the caller has
        read the file already, saves reading it again)."""
        if image_bytes is None:
            image_bytes = self._read_bytes(entry.filename)
        height, width = _image_size(image_bytes, self.root / entry.filename)
        return _normalised_boxes(pixel_yxyx, height, width)


# ------------------------------------------------------------------------------- CUB

_CUB_ARCHIVE = "unpack CUB_200_2011.tgz"
_CUB_HOLDS = "images.txt, classes.txt, ... (the CUB_200_2011 folder)"
_CUB_LAYOUT = (
    "CUB_200_2011/ from CUB_200_2011.tgz: images.txt, image_class_labels.txt, "
    "classes.txt, train_test_split.txt, bounding_boxes.txt, parts/, images/"
)


@register_source("cub200")
class Cub200Source(_LocalSource):
    """CUB-200-2011 from ``CUB_200_2011.tgz`` (and optionally ``segmentations.tgz``).

    ``config.dataset.root`` is the ``CUB_200_2011`` folder (or the folder holding it).
    Reads ``images.txt`` (ids, paths), ``image_class_labels.txt``, ``classes.txt``,
    ``train_test_split.txt`` (1 = train), ``bounding_boxes.txt`` (x y width height),
    ``parts/parts.txt`` and ``parts/part_locs.txt`` (x y visible, pixels). Image id = CUB id
    - 1, label = CUB class - 1.

    Ground truth: ``keypoints`` float32 ``[15, 3]`` (y / H, x / W, visible) in part-id
    order, (0, 0, 0) for a part that is not visible; ``object_mask`` from
    ``segmentations/<class>/<image>.png`` (value >= 128, see ``OBJECT_MASK_THRESHOLD``),
    looked for inside the CUB folder first, then beside it. Without that folder there is
    no object mask, and ``segmentation.method == "gt"`` is refused.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        root = _require_root(config, _CUB_LAYOUT)
        if not (root / "images.txt").exists() and (root / "CUB_200_2011" / "images.txt").is_file():
            root = root / "CUB_200_2011"
        self.root = root

        def table(name: str, *columns: Callable[[str], Any]) -> list[tuple[Any, ...]]:
            return _read_table(root / name, columns, _CUB_ARCHIVE, _CUB_HOLDS)

        images = table("images.txt", int, str)
        labels = dict(table("image_class_labels.txt", int, int))
        is_train = dict(table("train_test_split.txt", int, int))
        classes = table("classes.txt", int, str)
        boxes = {
            i: (y, x, y + h, x + w)
            for i, x, y, w, h in table("bounding_boxes.txt", int, float, float, float, float)
        }
        parts = table("parts/parts.txt", int, str)
        part_locs = table("parts/part_locs.txt", int, int, float, float, int)
        if not (root / "images").is_dir():
            raise _missing_file(root / "images", _CUB_ARCHIVE, _CUB_HOLDS)

        self.class_names = self._names_by_id(classes, root / "classes.txt")
        self.part_names = self._names_by_id(parts, root / "parts/parts.txt")
        row_of = {cub_id: row for row, (cub_id, _) in enumerate(images)}
        if len(row_of) != len(images):
            raise SourceError(f"{root / 'images.txt'}: an image id appears twice.")
        # (x, y, visible) in pixels per image row and part; unlisted parts stay invisible.
        self._part_locs = np.zeros((len(images), len(self.part_names), 3), np.float64)
        for cub_id, part_id, x, y, visible in part_locs:
            if cub_id not in row_of or not 1 <= part_id <= len(self.part_names):
                raise SourceError(
                    f"{root / 'parts/part_locs.txt'}: image {cub_id} / part "
                    f"{part_id} is not in images.txt / parts/parts.txt."
                )
            self._part_locs[row_of[cub_id], part_id - 1] = (x, y, visible)

        rows = []
        for row, (cub_id, relative) in enumerate(images):
            for name, table_of in (
                ("image_class_labels.txt", labels),
                ("train_test_split.txt", is_train),
                ("bounding_boxes.txt", boxes),
            ):
                if cub_id not in table_of:
                    raise SourceError(
                        f"{root / name}: no line for image {cub_id} "
                        f"({relative}); {_CUB_ARCHIVE} again."
                    )
            label = labels[cub_id] - 1
            if not 0 <= label < len(self.class_names):
                raise SourceError(
                    f"{root / 'image_class_labels.txt'}: image {cub_id} has "
                    f"class {labels[cub_id]}, not in classes.txt."
                )
            split = "train" if is_train[cub_id] == 1 else "test"
            key = (relative, row, boxes[cub_id])
            rows.append((cub_id - 1, f"images/{relative}", label, split, key))
        self._set_entries(rows)

        self.segmentations_dir = next(
            (d for d in (root / "segmentations", root.parent / "segmentations") if d.is_dir()), None
        )
        if self.segmentations_dir is None and config.segmentation.method == "gt":
            raise SourceError(
                f"segmentation.method='gt' uses CUB's bird masks, but neither "
                f"{_where(root / 'segmentations')} nor {root.parent / 'segmentations'} "
                f"exists: unpack segmentations.tgz inside or beside {root} (see {DOCS})."
            )

    @staticmethod
    def _names_by_id(rows: list[tuple[int, str]], path: Path) -> list[str]:
        """Names of 1-based ids 1..N, which must all be present once."""
        ids = sorted(i for i, _ in rows)
        if ids != list(range(1, len(rows) + 1)):
            raise SourceError(f"{path}: ids must be 1..{len(rows)}, each once.")
        return [name for _, name in sorted(rows)]

    def keypoints(self, entry: SourceEntry, height: int, width: int) -> np.ndarray:
        """float32 ``[15, 3]``: (y / H, x / W, visible) per part, clipped to [0, 1]."""
        _, row, _ = entry.key
        x, y, visible = self._part_locs[row].T
        visible = visible > 0
        yx = np.clip(np.stack([y / height, x / width], axis=-1), 0.0, 1.0)
        return np.concatenate([yx * visible[:, None], visible[:, None]], axis=-1).astype(np.float32)

    def object_mask(self, entry: SourceEntry, height: int, width: int) -> np.ndarray | None:
        """The bird mask, bool ``[H, W]``, or None when segmentations.tgz is not unpacked."""
        if self.segmentations_dir is None:
            return None
        relative, _, _ = entry.key
        path = self.segmentations_dir / Path(relative).with_suffix(".png")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SourceError(
                f"{_where(path)}: cannot read the bird mask of {entry.filename} ({e}); the "
                f"masks in {self.segmentations_dir} are incomplete: unpack segmentations.tgz "
                "again."
            ) from e
        return _threshold_soft_mask(data, path, (height, width))

    def object_boxes(self, entry: SourceEntry, image_bytes: bytes | None = None) -> np.ndarray:
        """float32 ``[1, 4]``: the bird's box from ``bounding_boxes.txt``, normalised yxyx."""
        _, _, pixel_yxyx = entry.key
        return self._boxes_for(entry, np.asarray(pixel_yxyx), image_bytes)

    def load(self, entry: SourceEntry) -> SourceItem:
        image_bytes = self._read_bytes(entry.filename)
        height, width = _image_size(image_bytes, self.root / entry.filename)
        return SourceItem(
            image_id=entry.image_id,
            filename=entry.filename,
            image_bytes=image_bytes,
            label=entry.label,
            gt=GroundTruth(
                object_mask=self.object_mask(entry, height, width),
                keypoints=self.keypoints(entry, height, width),
                object_boxes=self.object_boxes(entry, image_bytes),
            ),
        )


# ------------------------------------------------------------------------------ Dogs

_DOGS_HOLDS = "Images/, Annotation/ and lists/"
_DOGS_LAYOUT = (
    "Images/<wnid-breed>/*.jpg from images.tar, Annotation/ from annotation.tar, "
    "lists/{train,test}_list.mat from lists.tar"
)


@register_source("dogs")
class StanfordDogsSource(_LocalSource):
    """Stanford Dogs from ``images.tar``, ``annotation.tar`` and ``lists.tar``.

    Splits: the official ``train_list.mat`` / ``test_list.mat`` (variable ``file_list``,
    paths relative to ``Images/``), read with scipy; looked for in ``lists/`` and, since
    ``lists.tar`` has no top folder, in the root itself. Classes: the ``<wnid>-<breed>``
    folder names, sorted (label = rank). Image ids: rank of the path among all listed
    images. ``Annotation/<wnid-breed>/<image stem>`` (PASCAL VOC XML) gives the boxes and is
    read only by :meth:`object_boxes`. No masks or keypoints.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        self.root = _require_root(config, _DOGS_LAYOUT)
        split_of: dict[str, str] = {}
        for split in ("train", "test"):
            for relative in self._read_list(split):
                if relative in split_of:
                    raise SourceError(
                        f"Images/{relative} is listed twice (in "
                        f"{split_of[relative]}_list.mat and {split}_list.mat)."
                    )
                split_of[relative] = split
        self.class_names = sorted({relative.split("/")[0] for relative in split_of})
        images_dir = self.root / "Images"
        for class_name in self.class_names:
            if not (images_dir / class_name).is_dir():
                raise _missing_file(images_dir / class_name, "unpack images.tar", _DOGS_HOLDS)
        class_index = {name: i for i, name in enumerate(self.class_names)}
        self._set_entries(
            [
                (
                    image_id,
                    f"Images/{relative}",
                    class_index[relative.split("/")[0]],
                    split_of[relative],
                    relative,
                )
                for image_id, relative in enumerate(sorted(split_of))
            ]
        )

    def _read_list(self, split: str) -> list[str]:
        name = f"{split}_list.mat"
        candidates = (self.root / "lists" / name, self.root / name)
        path = next((p for p in candidates if p.is_file()), candidates[0])
        mat = _load_mat(path, f"unpack lists.tar into {self.root / 'lists'}", _DOGS_HOLDS)
        files = [str(f).replace("\\", "/") for f in _mat_field(mat, "file_list", path)]
        if any(f.count("/") != 1 for f in files):
            raise SourceError(f"{path}: file_list entries must be '<wnid-breed>/<file>.jpg'.")
        return files

    def object_boxes(self, entry: SourceEntry, image_bytes: bytes | None = None) -> np.ndarray:
        """float32 ``[M, 4]``: the dogs' boxes from the VOC XML, normalised yxyx."""
        path = self.root / "Annotation" / Path(entry.key).with_suffix("")
        if not path.is_file():
            raise _missing_file(path, "unpack annotation.tar", _DOGS_HOLDS)
        try:
            tree = ElementTree.parse(path)
            pixel_yxyx = [
                [float(box.findtext(k)) for k in ("ymin", "xmin", "ymax", "xmax")]
                for box in tree.iter("bndbox")
            ]
        except (ElementTree.ParseError, TypeError, ValueError) as e:
            raise SourceError(
                f"{path}: not a PASCAL VOC annotation with numeric <bndbox> values ({e})."
            ) from e
        return self._boxes_for(entry, np.asarray(pixel_yxyx).reshape(-1, 4), image_bytes)

    def load(self, entry: SourceEntry) -> SourceItem:
        image_bytes = self._read_bytes(entry.filename)
        return SourceItem(
            image_id=entry.image_id,
            filename=entry.filename,
            image_bytes=image_bytes,
            label=entry.label,
            gt=GroundTruth(object_boxes=self.object_boxes(entry, image_bytes)),
        )


# ------------------------------------------------------------------------------ Cars

_CARS_HOLDS = "cars_train/, cars_test/ and devkit/"
_CARS_LAYOUT = (
    "cars_train/ and cars_test/ from cars_train.tgz / cars_test.tgz, devkit/ "
    "from car_devkit.tgz, and cars_test_annos_withlabels.mat"
)
_CARS_FIELDS = ("fname", "class", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")


@register_source("cars196")
class StanfordCarsSource(_LocalSource):
    """Stanford Cars (196 classes) in the official layout.

    Reads ``devkit/cars_meta.mat`` (``class_names``), ``devkit/cars_train_annos.mat`` and
    ``cars_test_annos_withlabels.mat`` (the labelled test annotations published after the
    devkit; looked for in the root, then in ``devkit/``): struct arrays ``annotations``
    with ``fname``, ``class`` (1-based; label = class - 1) and ``bbox_x1/y1/x2/y2``
    (pixels). Image ids: train images sorted by file name, then test images sorted by
    file name. No masks or keypoints.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        root = self.root = _require_root(config, _CARS_LAYOUT)
        meta_path = root / "devkit" / "cars_meta.mat"
        meta = _load_mat(meta_path, "unpack car_devkit.tgz", _CARS_HOLDS)
        self.class_names = [str(n) for n in _mat_field(meta, "class_names", meta_path)]
        test_candidates = (
            root / "cars_test_annos_withlabels.mat",
            root / "devkit" / "cars_test_annos_withlabels.mat",
        )
        annotation_paths = {
            "train": root / "devkit" / "cars_train_annos.mat",
            "test": next((p for p in test_candidates if p.is_file()), test_candidates[0]),
        }
        fetch = {
            "train": "unpack car_devkit.tgz",
            "test": f"download cars_test_annos_withlabels.mat into {root}",
        }
        rows = []
        for split, path in annotation_paths.items():
            if not (root / f"cars_{split}").is_dir():
                raise _missing_file(root / f"cars_{split}", f"unpack cars_{split}.tgz", _CARS_HOLDS)
            annotations = _mat_field(
                _load_mat(path, fetch[split], _CARS_HOLDS), "annotations", path
            )
            missing = [f for f in _CARS_FIELDS if f not in (annotations.dtype.names or ())]
            if missing:
                raise SourceError(
                    f"{path}: annotations lack the field(s) {missing} (the test file must be "
                    f"cars_test_annos_withlabels.mat, not devkit/cars_test_annos.mat; see "
                    f"{DOCS})."
                )
            for a in sorted(annotations, key=lambda a: str(a["fname"])):
                label = int(a["class"]) - 1
                if not 0 <= label < len(self.class_names):
                    raise SourceError(
                        f"{path}: {a['fname']} has class {int(a['class'])}; "
                        f"cars_meta.mat has {len(self.class_names)} classes."
                    )
                pixel_yxyx = tuple(
                    float(a[k]) for k in ("bbox_y1", "bbox_x1", "bbox_y2", "bbox_x2")
                )
                rows.append((len(rows), f"cars_{split}/{a['fname']}", label, split, pixel_yxyx))
        self._set_entries(rows)

    def object_boxes(self, entry: SourceEntry, image_bytes: bytes | None = None) -> np.ndarray:
        """float32 ``[1, 4]``: the car's box from the annotations, normalised yxyx."""
        return self._boxes_for(entry, np.asarray(entry.key), image_bytes)

    def load(self, entry: SourceEntry) -> SourceItem:
        image_bytes = self._read_bytes(entry.filename)
        return SourceItem(
            image_id=entry.image_id,
            filename=entry.filename,
            image_bytes=image_bytes,
            label=entry.label,
            gt=GroundTruth(object_boxes=self.object_boxes(entry, image_bytes)),
        )


# ------------------------------------------------------------------------------ tfds


def _tfds_prepare_hint(name: str, data_dir: str) -> str:
    return (
        f"prepare it once on a machine with TensorFlow: pip install tensorflow && tfds "
        f"build {name} --data_dir={data_dir} --file_format=array_record (see {DOCS})"
    )


@register_source("tfds")
class TfdsSource(Source):
    """A tfds dataset prepared as ``array_record`` under ``config.dataset.tfds_data_dir``.

    Read with ``tfds.builder(name, data_dir).as_data_source(split)`` (random access; needs
    ``array_record``, not TensorFlow). Any dataset with an ``image`` and a ``ClassLabel``
    ``label`` feature works; ``caltech_birds2011``, ``stanford_dogs`` and ``cars196`` are
    the ones this project uses. Images are returned as stored (never re-encoded); a
    ``segmentation_mask`` feature (caltech_birds2011: CUB's soft bird mask) becomes
    ``gt.object_mask`` (value >= 128); ``bbox`` / ``objects/bbox`` features are returned by
    :meth:`object_boxes`. Listing a split's entries reads every record of it once (labels
    and file names live in the records; no image is decoded).
    """

    def __init__(self, config: ml_collections.ConfigDict):
        name, data_dir = config.dataset.tfds_name, config.dataset.tfds_data_dir
        if not name:
            raise SourceError(
                "config.dataset.tfds_name is empty; set it to a prepared tfds "
                "dataset, e.g. caltech_birds2011, stanford_dogs or cars196."
            )
        if not data_dir:
            raise SourceError(
                "config.dataset.tfds_data_dir is empty; set it to the tfds "
                f"data_dir that holds the prepared {name}."
            )
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise SourceError(
                "dataset.name='tfds' needs tensorflow-datasets and "
                "array_record (pip install tensorflow-datasets)."
            ) from e
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise SourceError(
                f"config.dataset.tfds_name={name!r} is not a tfds dataset: {e}"
            ) from e
        if not builder.is_prepared():
            raise SourceError(
                f"no prepared {name} in {_where(Path(builder.data_dir))}: "
                f"{_tfds_prepare_hint(name, data_dir)}."
            )
        features = builder.info.features
        label = features["label"] if "label" in features else None
        if "image" not in features or not isinstance(label, tfds.features.ClassLabel):
            raise SourceError(
                f"tfds dataset {name} has features {sorted(features)}; this "
                "source needs an 'image' and a ClassLabel 'label'."
            )
        self._builder, self._data_dir = builder, data_dir
        self._skip_images = {
            key: tfds.decode.SkipDecoding()
            for key, feature in features.items()
            if isinstance(feature, tfds.features.Image)
        }
        self.root = Path(builder.data_dir)
        self.class_names = list(label.names)
        known = [s for s in ("train", "validation", "test") if s in builder.info.splits]
        self._splits = tuple(known + sorted(set(builder.info.splits) - set(known)))
        self._offsets: dict[str, int] = {}
        offset = 0
        for split in self._splits:
            self._offsets[split] = offset
            offset += builder.info.splits[split].num_examples
        self._data_sources: dict[str, Sequence[dict[str, Any]]] = {}
        self._entries: dict[str, list[SourceEntry]] = {}

    def splits(self) -> tuple[str, ...]:
        return self._splits

    def _data_source(self, split: str) -> Sequence[dict[str, Any]]:
        if split not in self._data_sources:
            name = self._builder.info.name
            try:
                self._data_sources[split] = self._builder.as_data_source(
                    split, decoders=self._skip_images
                )
            except NotImplementedError as e:
                raise SourceError(
                    f"{name} in {self._builder.data_dir} is prepared as "
                    f"{self._builder.info.file_format.value}, which has no random access: "
                    f"convert it with tfds convert_format --dataset_version_dir="
                    f"{self._builder.data_dir} --out_file_format=array_record, or "
                    f"{_tfds_prepare_hint(name, self._data_dir)}."
                ) from e
        return self._data_sources[split]

    def _filename(self, example: dict[str, Any], split: str, index: int) -> str:
        for key in ("image/filename", "id"):
            if key in example:
                value = example[key]
                return value.decode() if isinstance(value, bytes) else str(value)
        return f"{split}[{index}]"

    def entries(self, split: str) -> list[SourceEntry]:
        if split not in self._offsets:
            return []
        if split not in self._entries:
            data_source = self._data_source(split)
            rows = []
            for index in range(len(data_source)):
                example = data_source[index]
                rows.append(
                    SourceEntry(
                        self._offsets[split] + index,
                        self._filename(example, split, index),
                        int(example["label"]),
                        (split, index),
                    )
                )
            self._entries[split] = rows
        return list(self._entries[split])

    def _example(self, entry: SourceEntry) -> dict[str, Any]:
        split, index = entry.key
        return self._data_source(split)[index]

    def object_boxes(self, entry: SourceEntry) -> np.ndarray:
        """float32 ``[M, 4]`` normalised yxyx from ``bbox`` or ``objects/bbox`` ([0, 4]
        when the dataset has neither)."""
        return self._boxes_of(self._example(entry))

    @staticmethod
    def _boxes_of(example: dict[str, Any]) -> np.ndarray:
        if "bbox" in example:
            boxes = example["bbox"]
        elif isinstance(example.get("objects"), dict) and "bbox" in example["objects"]:
            boxes = example["objects"]["bbox"]
        else:
            boxes = ()
        return np.asarray(boxes, np.float32).reshape(-1, 4)

    def load(self, entry: SourceEntry) -> SourceItem:
        example = self._example(entry)
        image_bytes = example["image"]
        object_mask = None
        if "segmentation_mask" in example:
            where = Path(f"{self.root}/{entry.filename}:segmentation_mask")
            size = _image_size(image_bytes, self.root / entry.filename)
            object_mask = _threshold_soft_mask(example["segmentation_mask"], where, size)
        return SourceItem(
            image_id=entry.image_id,
            filename=entry.filename,
            image_bytes=image_bytes,
            label=entry.label,
            gt=GroundTruth(object_mask=object_mask, object_boxes=self._boxes_of(example)),
        )
