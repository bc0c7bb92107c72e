"""The datasets the export reads, registered as ``parts_world``, ``folder``, ``cub200``,
``dogs``, ``cars196`` and ``tfds`` (``config.dataset.name``).

Files are read in the official layouts (``docs/datasets.md``); nothing is downloaded. A
missing or damaged file raises :class:`SourceError` naming it, where it was looked for and
which archive puts it there. Object boxes are normalised yxyx (pixel / image size, clipped
to [0, 1], as tfds computes them). Labels are 0-based. Image ids are stable: CUB's id - 1;
Dogs, folder: the rank of the path; Cars: train then test, each by file name; tfds: the
position in the split, splits one after another."""

from __future__ import annotations

import hashlib
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
    register_source,
    require_root,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# CUB's bird masks are greyscale PNGs whose value grows with the share of annotators who
# marked the pixel (255 = all). Half agreement is the cut; the reference's "> 0.5 after
# min-max normalisation" gives the same cut for every mask that reaches 255.
OBJECT_MASK_THRESHOLD = 128
DOCS = "docs/datasets.md"


# ---------------------------------------------------------------------------- helpers


def _where(path: Path) -> str:
    return str(path) if path.is_absolute() else f"{path} (relative to {Path.cwd()})"


def _missing_file(path: Path, unpack: str, root_holds: str) -> SourceError:
    """``unpack`` says how to put the file there, ``root_holds`` what the root must hold."""
    return SourceError(
        f"{_where(path)} not found: {unpack} so that {path} exists, or set "
        f"--config.dataset.root to the folder that holds {root_holds} (see {DOCS})."
    )


def _read_table(
    path: Path, columns: Sequence[Callable[[str], Any]], unpack: str, root_holds: str
) -> list[tuple[Any, ...]]:
    """A whitespace-separated text file, one converter per column; the last column takes
    the rest of the line (CUB's part names contain spaces)."""
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
            rows.append(tuple(f(field) for f, field in zip(columns, fields, strict=True)))
        except ValueError as e:
            raise SourceError(
                f"{path}:{line_number}: cannot parse {line!r} ({e}); the file "
                f"is damaged, {unpack} again."
            ) from e
    if not rows:
        raise SourceError(f"{path} is empty; the file is damaged, {unpack} again.")
    return rows


def _image_size(image_bytes: bytes, path: Path) -> tuple[int, int]:
    """(height, width) from the image header; the pixels are not decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as e:
        raise SourceError(f"{path}: not a readable image ({e}); replace the file.") from e
    return height, width


def _threshold_soft_mask(image_bytes: bytes, path: Path, size: tuple[int, int]) -> np.ndarray:
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


def _load_mat(path: Path, unpack: str, root_holds: str) -> dict[str, Any]:
    """A MATLAB v5 file read with scipy, squeezed (cells become object arrays of str)."""
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
    """A dataset of local files whose entries are known at construction; ground truth is
    at least the object boxes (``object_boxes``)."""

    _entries: dict[str, list[SourceEntry]]

    def entries(self, split: str) -> list[SourceEntry]:
        return list(self._entries.get(split, []))

    def _set_entries(self, rows: list[tuple[int, str, int, str, Any]]) -> None:
        """``rows``: (image_id, filename, label, split, key), in any order."""
        self._entries = {split: [] for split in self.splits()}
        for image_id, filename, label, split, key in sorted(rows, key=lambda r: r[0]):
            self._entries[split].append(SourceEntry(image_id, filename, label, key))

    def _set_entries_by_path(self, files: list[tuple[str, str, str, Any]]) -> None:
        """``files``: (filename, split, class name, key); classes are the sorted names, ids
        the rank of the filename."""
        self.class_names = sorted({c for _, _, c, _ in files})
        label = {name: i for i, name in enumerate(self.class_names)}
        rows = enumerate(sorted(files, key=lambda f: f[0]))
        self._set_entries([(i, f, label[c], split, key) for i, (f, split, c, key) in rows])

    def object_boxes(self, entry: SourceEntry, image_bytes: bytes | None = None) -> np.ndarray:
        """float32 ``[M, 4]`` normalised yxyx (``image_bytes`` saves reading the file again)."""
        if image_bytes is None:
            image_bytes = self.read_bytes(entry.filename)
        height, width = _image_size(image_bytes, self.root / entry.filename)
        pixel_yxyx = np.asarray(self._pixel_boxes(entry), np.float64).reshape(-1, 4)
        scale = np.array([height, width, height, width], np.float64)
        return np.clip(pixel_yxyx / scale, 0.0, 1.0).astype(np.float32)

    def _pixel_boxes(self, entry: SourceEntry) -> Any:
        """The entry's object boxes in pixels, yxyx."""
        raise NotImplementedError

    def ground_truth(self, entry: SourceEntry, image_bytes: bytes) -> GroundTruth:
        return GroundTruth(object_boxes=self.object_boxes(entry, image_bytes))


# ----------------------------------------------------------------- parts world, folder


@register_source("parts_world")
class PartsWorldSource(Source):
    def __init__(self, config: ml_collections.ConfigDict):
        from segmentation import parts_world

        if not config.dataset.root:
            raise SourceError(
                "config.dataset.root is empty; set it to the folder the parts "
                "world is generated into (e.g. data/parts_world)."
            )
        self.root = Path(config.dataset.root)
        self._metadata = parts_world.generate(self.root, **config.dataset.synthetic.to_dict())
        self.class_names = list(self._metadata["class_names"])
        self.part_names = list(self._metadata["part_names"])
        self.multi_label = bool(config.dataset.synthetic.multi_label)
        self._decisive = [c["decisive_parts"] for c in self._metadata["classes"]]

    def entries(self, split: str) -> list[SourceEntry]:
        rows = []
        for e in self._metadata["images"]:
            if e["split"] == split:
                # multi-label: a tuple of attributes, and the parts showing them
                if self.multi_label:
                    label, decisive = tuple(e["label"]), e["decisive_parts"]
                else:
                    label, decisive = e["label"], self._decisive[e["label"]]
                rows.append(
                    SourceEntry(e["id"], e["image"], label, key=(e["part_map"], tuple(decisive)))
                )
        return sorted(rows, key=lambda e: e.image_id)

    def ground_truth(self, entry: SourceEntry, image_bytes: bytes) -> GroundTruth:
        from PIL import Image

        part_map_file, decisive = entry.key
        with Image.open(self.root / part_map_file) as part_map:
            part_map = np.asarray(part_map, dtype=np.uint8)
        return GroundTruth(part_map=part_map, decisive_parts=np.asarray(decisive, np.int64))


_FOLDER_LAYOUT = (
    "one sub-folder per class holding its images, optionally under train/ and test/ sub-folders"
)


@register_source("folder")
class FolderSource(_LocalSource):
    """Classes are the sorted union of the class folders' names."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.root = require_root(config, _FOLDER_LAYOUT)
        split_dirs = [s for s in ("train", "test") if (self.root / s).is_dir()]
        bases = {s: self.root / s for s in split_dirs} or {"train": self.root}
        files = []
        for split, base in bases.items():
            for class_dir in sorted(p for p in base.iterdir() if p.is_dir()):
                for path in class_dir.rglob("*"):
                    # Not is_file(): an unreadable "image" should fail later, naming itself.
                    if path.suffix.lower() in IMAGE_SUFFIXES and not path.is_dir():
                        relative = path.relative_to(self.root).as_posix()
                        files.append((relative, split, class_dir.name, None))
        if not files:
            raise SourceError(f"{self.root}: no images found; expected {_FOLDER_LAYOUT}.")
        self._splits = tuple(bases)
        self._set_entries_by_path(files)
        self._splits = tuple(s for s in self._splits if self._entries[s])

    def splits(self) -> tuple[str, ...]:
        return self._splits

    def ground_truth(self, entry: SourceEntry, image_bytes: bytes) -> GroundTruth:
        return GroundTruth()


# ------------------------------------------------------------------------------- CUB

_CUB_ARCHIVE = "unpack CUB_200_2011.tgz"
_CUB_HOLDS = "images.txt, classes.txt, ... (the CUB_200_2011 folder)"
_CUB_LAYOUT = (
    "CUB_200_2011/ from CUB_200_2011.tgz: images.txt, image_class_labels.txt, "
    "classes.txt, train_test_split.txt, bounding_boxes.txt, parts/, images/"
)


@register_source("cub200")
class Cub200Source(_LocalSource):
    """``config.dataset.root`` is the ``CUB_200_2011`` folder or the folder holding it.

    Keypoints are (y / H, x / W, visible) in part-id order, zero for a hidden part. The
    bird masks (``segmentations/<class>/<image>.png``, value >= 128) are looked for inside
    the CUB folder, then beside it; without them ``segmentation.method="gt"`` is refused."""

    def __init__(self, config: ml_collections.ConfigDict):
        root = require_root(config, _CUB_LAYOUT)
        if not (root / "images.txt").exists() and (root / "CUB_200_2011" / "images.txt").is_file():
            root = root / "CUB_200_2011"
        self.root = root
        images = self._table("images.txt", int, str)
        self.class_names = self._names_by_id(self._table("classes.txt", int, str), "classes.txt")
        parts = self._table("parts/parts.txt", int, str)
        self.part_names = self._names_by_id(parts, "parts/parts.txt")
        if not (root / "images").is_dir():
            raise _missing_file(root / "images", _CUB_ARCHIVE, _CUB_HOLDS)
        row_of = {cub_id: row for row, (cub_id, _) in enumerate(images)}
        if len(row_of) != len(images):
            raise SourceError(f"{root / 'images.txt'}: an image id appears twice.")
        self._part_locs = self._read_part_locs(row_of)
        self._set_entries(self._rows(images))
        self.segmentations_dir = next(
            (d for d in (root / "segmentations", root.parent / "segmentations") if d.is_dir()), None
        )
        if self.segmentations_dir is None and config.segmentation.method == "gt":
            raise SourceError(
                f"segmentation.method='gt' uses CUB's bird masks, but neither "
                f"{_where(root / 'segmentations')} nor {root.parent / 'segmentations'} "
                f"exists: unpack segmentations.tgz inside or beside {root} (see {DOCS})."
            )

    def _table(self, name: str, *columns: Callable[[str], Any]) -> list[tuple[Any, ...]]:
        return _read_table(self.root / name, columns, _CUB_ARCHIVE, _CUB_HOLDS)

    def _names_by_id(self, rows: list[tuple[int, str]], file: str) -> list[str]:
        if sorted(i for i, _ in rows) != list(range(1, len(rows) + 1)):
            raise SourceError(f"{self.root / file}: ids must be 1..{len(rows)}, each once.")
        return [name for _, name in sorted(rows)]

    def _read_part_locs(self, row_of: dict[int, int]) -> np.ndarray:
        """(x, y, visible) in pixels per image row and part; unlisted parts stay hidden."""
        part_locs = np.zeros((len(row_of), len(self.part_names), 3), np.float64)
        for cub_id, part_id, x, y, visible in self._table(
            "parts/part_locs.txt", int, int, float, float, int
        ):
            if cub_id not in row_of or not 1 <= part_id <= len(self.part_names):
                raise SourceError(
                    f"{self.root / 'parts/part_locs.txt'}: image {cub_id} / part "
                    f"{part_id} is not in images.txt / parts/parts.txt."
                )
            part_locs[row_of[cub_id], part_id - 1] = (x, y, visible)
        return part_locs

    def _rows(self, images: list[tuple[int, str]]) -> list[tuple[int, str, int, str, Any]]:
        labels = dict(self._table("image_class_labels.txt", int, int))
        is_train = dict(self._table("train_test_split.txt", int, int))
        boxes = {
            i: (y, x, y + h, x + w)
            for i, x, y, w, h in self._table("bounding_boxes.txt", int, float, float, float, float)
        }
        rows = []
        for row, (cub_id, relative) in enumerate(images):
            for name, table in (
                ("image_class_labels.txt", labels),
                ("train_test_split.txt", is_train),
                ("bounding_boxes.txt", boxes),
            ):
                if cub_id not in table:
                    raise SourceError(
                        f"{self.root / name}: no line for image {cub_id} "
                        f"({relative}); {_CUB_ARCHIVE} again."
                    )
            label = labels[cub_id] - 1
            if not 0 <= label < len(self.class_names):
                raise SourceError(
                    f"{self.root / 'image_class_labels.txt'}: image {cub_id} has "
                    f"class {labels[cub_id]}, not in classes.txt."
                )
            split = "train" if is_train[cub_id] == 1 else "test"
            key = (relative, row, boxes[cub_id])
            rows.append((cub_id - 1, f"images/{relative}", label, split, key))
        return rows

    def keypoints(self, entry: SourceEntry, height: int, width: int) -> np.ndarray:
        _, row, _ = entry.key
        x, y, visible = self._part_locs[row].T
        visible = visible > 0
        yx = np.clip(np.stack([y / height, x / width], axis=-1), 0.0, 1.0)
        return np.concatenate([yx * visible[:, None], visible[:, None]], axis=-1).astype(np.float32)

    def _mask_path(self, entry: SourceEntry) -> Path:
        relative, _, _ = entry.key
        return self.segmentations_dir / Path(relative).with_suffix(".png")

    def ground_truth_inputs(self, entries: Sequence[SourceEntry]) -> dict[str, Any]:
        """How many of ``entries`` have a bird mask file and a digest of those files' bytes
        (a missing file marked), so unpacking or replacing segmentations.tgz re-exports."""
        if self.segmentations_dir is None:
            return {"object_masks": 0}
        digest, found = hashlib.sha256(), 0
        for entry in entries:
            try:
                data = self._mask_path(entry).read_bytes()
            except OSError:  # building the record names the file
                digest.update(b"missing")
                continue
            found += 1
            digest.update(hashlib.sha256(data).digest())
        return {"object_masks": found, "object_masks_sha256": digest.hexdigest()}

    def object_mask_location(self) -> str:
        if self.segmentations_dir is not None:
            return str(self.segmentations_dir)
        return f"{self.root / 'segmentations'} or {self.root.parent / 'segmentations'}"

    def object_mask(self, entry: SourceEntry, height: int, width: int) -> np.ndarray | None:
        if self.segmentations_dir is None:
            return None
        path = self._mask_path(entry)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SourceError(
                f"{_where(path)}: cannot read the bird mask of {entry.filename} ({e}); the "
                f"masks in {self.segmentations_dir} are incomplete: unpack segmentations.tgz "
                "again."
            ) from e
        return _threshold_soft_mask(data, path, (height, width))

    def _pixel_boxes(self, entry: SourceEntry) -> Any:
        return entry.key[2]

    def ground_truth(self, entry: SourceEntry, image_bytes: bytes) -> GroundTruth:
        height, width = _image_size(image_bytes, self.root / entry.filename)
        return GroundTruth(
            object_mask=self.object_mask(entry, height, width),
            keypoints=self.keypoints(entry, height, width),
            object_boxes=self.object_boxes(entry, image_bytes),
        )


# ------------------------------------------------------------------------------ Dogs

_DOGS_HOLDS = "Images/, Annotation/ and lists/"
_DOGS_LAYOUT = (
    "Images/<wnid-breed>/*.jpg from images.tar, Annotation/ from annotation.tar, "
    "lists/{train,test}_list.mat from lists.tar"
)


@register_source("dogs")
class StanfordDogsSource(_LocalSource):
    """Splits from ``{train,test}_list.mat`` (in ``lists/`` or, since ``lists.tar`` has no
    top folder, the root); classes are the sorted ``<wnid>-<breed>`` folders; boxes come
    from the PASCAL VOC files ``Annotation/<wnid-breed>/<image stem>``."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.root = require_root(config, _DOGS_LAYOUT)
        split_of: dict[str, str] = {}
        for split in ("train", "test"):
            for relative in self._read_list(split):
                if relative in split_of:
                    raise SourceError(
                        f"Images/{relative} is listed twice (in "
                        f"{split_of[relative]}_list.mat and {split}_list.mat)."
                    )
                split_of[relative] = split
        self._set_entries_by_path(
            [
                (f"Images/{path}", split, path.split("/")[0], path)
                for path, split in split_of.items()
            ]
        )
        for class_name in self.class_names:
            if not (self.root / "Images" / class_name).is_dir():
                raise _missing_file(
                    self.root / "Images" / class_name, "unpack images.tar", _DOGS_HOLDS
                )

    def _read_list(self, split: str) -> list[str]:
        candidates = (self.root / "lists" / f"{split}_list.mat", self.root / f"{split}_list.mat")
        path = next((p for p in candidates if p.is_file()), candidates[0])
        mat = _load_mat(path, f"unpack lists.tar into {self.root / 'lists'}", _DOGS_HOLDS)
        files = [str(f).replace("\\", "/") for f in _mat_field(mat, "file_list", path)]
        if any(f.count("/") != 1 for f in files):
            raise SourceError(f"{path}: file_list entries must be '<wnid-breed>/<file>.jpg'.")
        return files

    def _pixel_boxes(self, entry: SourceEntry) -> Any:
        path = self.root / "Annotation" / Path(entry.key).with_suffix("")
        if not path.is_file():
            raise _missing_file(path, "unpack annotation.tar", _DOGS_HOLDS)
        try:
            return [
                [float(box.findtext(k)) for k in ("ymin", "xmin", "ymax", "xmax")]
                for box in ElementTree.parse(path).iter("bndbox")
            ]
        except (ElementTree.ParseError, TypeError, ValueError) as e:
            raise SourceError(
                f"{path}: not a PASCAL VOC annotation with numeric <bndbox> values ({e})."
            ) from e


# ------------------------------------------------------------------------------ Cars

_CARS_HOLDS = "cars_train/, cars_test/ and devkit/"
_CARS_LAYOUT = (
    "cars_train/ and cars_test/ from cars_train.tgz / cars_test.tgz, devkit/ "
    "from car_devkit.tgz, and cars_test_annos_withlabels.mat"
)
_CARS_FIELDS = ("fname", "class", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")


@register_source("cars196")
class StanfordCarsSource(_LocalSource):
    """Annotations (``fname``, 1-based ``class``, pixel ``bbox_*``) from
    ``devkit/cars_train_annos.mat`` and the labelled test annotations published after the
    devkit, ``cars_test_annos_withlabels.mat`` (in the root or ``devkit/``)."""

    def __init__(self, config: ml_collections.ConfigDict):
        root = self.root = require_root(config, _CARS_LAYOUT)
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
            mat = _load_mat(path, fetch[split], _CARS_HOLDS)
            for a in self._annotations(mat, path):
                yxyx = tuple(float(a[k]) for k in ("bbox_y1", "bbox_x1", "bbox_y2", "bbox_x2"))
                rows.append(
                    (len(rows), f"cars_{split}/{a['fname']}", int(a["class"]) - 1, split, yxyx)
                )
        self._set_entries(rows)

    def _annotations(self, mat: dict[str, Any], path: Path) -> list[Any]:
        """The struct array ``annotations`` checked and sorted by file name."""
        annotations = _mat_field(mat, "annotations", path)
        missing = [f for f in _CARS_FIELDS if f not in (annotations.dtype.names or ())]
        if missing:
            raise SourceError(
                f"{path}: annotations lack the field(s) {missing} (the test file must be "
                f"cars_test_annos_withlabels.mat, not devkit/cars_test_annos.mat; see {DOCS})."
            )
        for a in annotations:
            if not 1 <= int(a["class"]) <= len(self.class_names):
                raise SourceError(
                    f"{path}: {a['fname']} has class {int(a['class'])}; "
                    f"cars_meta.mat has {len(self.class_names)} classes."
                )
        return sorted(annotations, key=lambda a: str(a["fname"]))

    def _pixel_boxes(self, entry: SourceEntry) -> Any:
        return entry.key


# ------------------------------------------------------------------------------ tfds


def _tfds_prepare_hint(name: str, data_dir: str) -> str:
    return (
        f"prepare it once on a machine with TensorFlow: pip install tensorflow && tfds "
        f"build {name} --data_dir={data_dir} --file_format=array_record (see {DOCS})"
    )


@register_source("tfds")
class TfdsSource(Source):
    """Any tfds dataset with an ``image`` and a ``ClassLabel`` ``label``, read through
    ``as_data_source`` (needs ``array_record``, not TensorFlow). Images are returned as
    stored; ``segmentation_mask`` (caltech_birds2011's soft bird mask) becomes the object
    mask (>= 128), ``bbox`` / ``objects/bbox`` the object boxes. Listing a split reads each
    of its records once (labels and names live there; no image is decoded)."""

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
        builder = self._builder = _tfds_builder(name, data_dir)
        self._data_dir = data_dir
        features, tfds = builder.info.features, _tfds()
        self._skip_images = {
            key: tfds.decode.SkipDecoding()
            for key, feature in features.items()
            if isinstance(feature, tfds.features.Image)
        }
        self.root = Path(builder.data_dir)
        self.class_names = list(features["label"].names)
        known = [s for s in ("train", "validation", "test") if s in builder.info.splits]
        self._splits = tuple(known + sorted(set(builder.info.splits) - set(known)))
        self._offsets, offset = {}, 0
        for split in self._splits:
            self._offsets[split], offset = offset, offset + builder.info.splits[split].num_examples
        self._data_sources: dict[str, Sequence[dict[str, Any]]] = {}
        self._entries: dict[str, list[SourceEntry]] = {}

    def splits(self) -> tuple[str, ...]:
        return self._splits

    def _data_source(self, split: str) -> Sequence[dict[str, Any]]:
        if split not in self._data_sources:
            builder = self._builder
            try:
                self._data_sources[split] = builder.as_data_source(
                    split, decoders=self._skip_images
                )
            except NotImplementedError as e:
                raise SourceError(
                    f"{builder.info.name} in {builder.data_dir} is prepared as "
                    f"{builder.info.file_format.value}, which has no random access: "
                    f"convert it with tfds convert_format --dataset_version_dir="
                    f"{builder.data_dir} --out_file_format=array_record, or "
                    f"{_tfds_prepare_hint(builder.info.name, self._data_dir)}."
                ) from e
        return self._data_sources[split]

    def entries(self, split: str) -> list[SourceEntry]:
        if split not in self._offsets:
            return []
        if split not in self._entries:
            data_source, rows = self._data_source(split), []
            for index in range(len(data_source)):
                example = data_source[index]
                image_id, name = self._offsets[split] + index, _tfds_filename(example, split, index)
                rows.append(SourceEntry(image_id, name, int(example["label"]), (split, index)))
            self._entries[split] = rows
        return list(self._entries[split])

    def _example(self, entry: SourceEntry) -> dict[str, Any]:
        split, index = entry.key
        return self._data_source(split)[index]

    def object_boxes(self, entry: SourceEntry) -> np.ndarray:
        """float32 ``[M, 4]`` normalised yxyx (``[0, 4]`` when the dataset has no boxes)."""
        return _tfds_boxes(self._example(entry))

    def load(self, entry: SourceEntry) -> SourceItem:
        example = self._example(entry)
        image_bytes = example["image"]
        object_mask = None
        if "segmentation_mask" in example:
            where = Path(f"{self.root}/{entry.filename}:segmentation_mask")
            size = _image_size(image_bytes, self.root / entry.filename)
            object_mask = _threshold_soft_mask(example["segmentation_mask"], where, size)
        gt = GroundTruth(object_mask=object_mask, object_boxes=_tfds_boxes(example))
        return SourceItem(entry.image_id, entry.filename, image_bytes, entry.label, gt)


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


def _tfds_builder(name: str, data_dir: str) -> Any:
    """The prepared builder, checked to have an ``image`` and a ClassLabel ``label``."""
    try:
        tfds = _tfds()
    except ImportError as e:
        raise SourceError(
            "dataset.name='tfds' needs tensorflow-datasets and "
            "array_record (pip install tensorflow-datasets)."
        ) from e
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise SourceError(f"config.dataset.tfds_name={name!r} is not a tfds dataset: {e}") from e
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
    return builder


def _tfds_filename(example: dict[str, Any], split: str, index: int) -> str:
    for key in ("image/filename", "id"):
        if key in example:
            value = example[key]
            return value.decode() if isinstance(value, bytes) else str(value)
    return f"{split}[{index}]"


def _tfds_boxes(example: dict[str, Any]) -> np.ndarray:
    if "bbox" in example:
        boxes = example["bbox"]
    elif isinstance(example.get("objects"), dict) and "bbox" in example["objects"]:
        boxes = example["objects"]["bbox"]
    else:
        boxes = ()
    return np.asarray(boxes, np.float32).reshape(-1, 4)
