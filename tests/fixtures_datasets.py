"""Builders of tiny datasets in the official layouts of CUB-200-2011, Stanford Dogs, Stanford
Cars and prepared (array_record) tfds datasets, for ``tests/test_datasets.py``.

Every builder writes real files (random-pixel JPEGs, the text / XML / MATLAB v5 files the
archives ship) and returns what a correct reader must find, computed here from the values
written (not by the code under test): ids, labels, splits, class names, boxes, keypoints
and masks.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
from PIL import Image

CUB_PART_NAMES = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye",
                  "left leg", "left wing", "nape", "right eye", "right leg", "right wing",
                  "tail", "throat"]


@dataclasses.dataclass
class ExpectedImage:
    """What a source must report for one image.

    Attributes:
      image_id, filename, label, split: the entry.
      height, width: the image size.
      boxes: float32 ``[M, 4]`` normalised yxyx object boxes.
      keypoints: float32 ``[Q, 3]`` (y, x normalised, visible) or None.
      object_mask: bool ``[H, W]`` or None.
      image_bytes: the file's bytes.
    """

    image_id: int
    filename: str
    label: int
    split: str
    height: int
    width: int
    boxes: np.ndarray
    image_bytes: bytes
    keypoints: np.ndarray | None = None
    object_mask: np.ndarray | None = None


@dataclasses.dataclass
class ExpectedDataset:
    root: Path
    class_names: list[str]
    images: list[ExpectedImage]  # sorted by image_id
    part_names: list[str] = dataclasses.field(default_factory=list)

    def split(self, name: str) -> list[ExpectedImage]:
        return [image for image in self.images if image.split == name]


def jpeg_bytes(rng: np.random.Generator, height: int, width: int) -> bytes:
    """A random-pixel RGB JPEG."""
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def soft_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A greyscale mask like CUB's: values 0..255 with both sides of the 128 cut present."""
    levels = np.array([0, 51, 102, 127, 128, 153, 204, 255], np.uint8)
    return levels[rng.integers(0, len(levels), (height, width))]


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)


def _lines(rows) -> str:
    return "".join(" ".join(str(v) for v in row) + "\n" for row in rows)


# ------------------------------------------------------------------------------- CUB


def make_cub(base: Path, segmentations: str | None = "inside", seed: int = 0
             ) -> ExpectedDataset:
    """``base/CUB_200_2011`` with 3 classes x 3 images (2 train, 1 test).

    Args:
      segmentations: ``"inside"`` (``CUB_200_2011/segmentations``), ``"beside"``
        (``base/segmentations``) or None (not unpacked).

    The text files list rows in shuffled order; one visible keypoint lies right of the
    image (its normalised x clips to 1); every image has invisible parts.
    """
    rng = np.random.default_rng(seed)
    root = base / "CUB_200_2011"
    class_names = ["001.Black_footed_Albatross", "002.Laysan_Albatross",
                   "003.Sooty_Albatross"]
    images, rows = [], dict(images=[], labels=[], split=[], boxes=[], locs=[])
    cub_id = 0
    for class_index, class_name in enumerate(class_names):
        for k in range(3):
            cub_id += 1
            height, width = int(rng.integers(20, 40)), int(rng.integers(20, 40))
            stem = f"{class_name.split('.')[1]}_{k:04d}_{1000 + cub_id}"
            relative = f"{class_name}/{stem}.jpg"
            data = jpeg_bytes(rng, height, width)
            _write(root / "images" / relative, data)
            is_train = int(k < 2)
            x, y = float(rng.integers(0, width // 2)), float(rng.integers(0, height // 2))
            w, h = float(rng.integers(2, width - x)), float(rng.integers(2, height - y))
            keypoints = np.zeros((15, 3), np.float32)
            for part_id in rng.permutation(np.arange(1, 16)):
                visible = int(rng.random() < 0.6) if part_id != 1 else 1
                if visible:
                    px, py = float(rng.integers(0, width)) + 0.5, float(rng.integers(0, height))
                    if part_id == 1 and cub_id == 1:
                        px = width + 3.0  # annotated just outside the image
                    keypoints[part_id - 1] = (py / height, min(px / width, 1.0), 1.0)
                else:
                    px = py = 0.0
                rows["locs"].append((cub_id, int(part_id), px, py, visible))
            object_mask = None
            if segmentations is not None:
                grey = soft_mask(rng, height, width)
                seg_base = root if segmentations == "inside" else base
                _write(seg_base / "segmentations" / class_name / f"{stem}.png", png_bytes(grey))
                object_mask = grey >= 128
            rows["images"].append((cub_id, relative))
            rows["labels"].append((cub_id, class_index + 1))
            rows["split"].append((cub_id, is_train))
            rows["boxes"].append((cub_id, x, y, w, h))
            images.append(ExpectedImage(
                image_id=cub_id - 1, filename=f"images/{relative}", label=class_index,
                split="train" if is_train else "test", height=height, width=width,
                boxes=np.array([[y / height, x / width, (y + h) / height, (x + w) / width]],
                               np.float32),
                image_bytes=data, keypoints=keypoints, object_mask=object_mask))

    def shuffled(table):
        return [table[i] for i in rng.permutation(len(table))]

    _write(root / "images.txt", _lines(shuffled(rows["images"])))
    _write(root / "image_class_labels.txt", _lines(shuffled(rows["labels"])))
    _write(root / "train_test_split.txt", _lines(shuffled(rows["split"])))
    _write(root / "bounding_boxes.txt", _lines(shuffled(rows["boxes"])))
    _write(root / "classes.txt", _lines(shuffled(list(enumerate(class_names, start=1)))))
    _write(root / "parts" / "parts.txt", _lines(enumerate(CUB_PART_NAMES, start=1)))
    _write(root / "parts" / "part_locs.txt", _lines(rows["locs"]))
    return ExpectedDataset(root, class_names, images, list(CUB_PART_NAMES))


# ------------------------------------------------------------------------------ Dogs


def make_dogs(root: Path, lists_in_subfolder: bool = True, seed: int = 1) -> ExpectedDataset:
    """``root/{Images,Annotation,lists}`` with 3 breeds x 3 images (2 train, 1 test).

    Args:
      lists_in_subfolder: write the .mat lists to ``lists/`` (else to the root, as
        ``tar -xf lists.tar`` in the root leaves them).
    """
    import scipy.io

    rng = np.random.default_rng(seed)
    class_names = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel",
                   "n02085936-Maltese_dog"]
    listed = {"train": [], "test": []}
    written = []
    for class_index, class_name in enumerate(class_names):
        wnid = class_name.split("-")[0]
        for k in range(3):
            height, width = int(rng.integers(20, 40)), int(rng.integers(20, 40))
            stem = f"{wnid}_{int(rng.integers(100, 99999))}"
            relative = f"{class_name}/{stem}.jpg"
            data = jpeg_bytes(rng, height, width)
            _write(root / "Images" / relative, data)
            boxes_px = []
            for _ in range(1 + k % 2):  # one or two dogs
                x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
                boxes_px.append((x0, y0, int(rng.integers(x0 + 2, width)),
                                 int(rng.integers(y0 + 2, height))))
            objects = "".join(
                f"<object><name>{class_name.split('-', 1)[1]}</name><pose>Unspecified</pose>"
                f"<truncated>0</truncated><difficult>0</difficult><bndbox><xmin>{x0}</xmin>"
                f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
                for x0, y0, x1, y1 in boxes_px)
            _write(root / "Annotation" / class_name / stem,
                   f"<annotation><folder>{wnid[1:]}</folder><filename>{stem}</filename>"
                   f"<size><width>{width}</width><height>{height}</height><depth>3</depth>"
                   f"</size><segment>0</segment>{objects}</annotation>")
            split = "train" if k < 2 else "test"
            listed[split].append((relative, class_index + 1))
            boxes = np.array([[y0 / height, x0 / width, y1 / height, x1 / width]
                              for x0, y0, x1, y1 in boxes_px], np.float32)
            written.append((relative, class_index, split, height, width, boxes, data))
    lists_dir = root / "lists" if lists_in_subfolder else root
    lists_dir.mkdir(parents=True, exist_ok=True)
    for split, entries in listed.items():
        order = rng.permutation(len(entries))  # the official lists are not sorted by path
        files = np.array([entries[i][0] for i in order], dtype=object).reshape(-1, 1)
        scipy.io.savemat(lists_dir / f"{split}_list.mat", {
            "file_list": files,
            "annotation_list": np.array([f[: -len(".jpg")] for f in files[:, 0]],
                                        dtype=object).reshape(-1, 1),
            "labels": np.array([entries[i][1] for i in order], np.float64).reshape(-1, 1),
        })
    images = [
        ExpectedImage(image_id=i, filename=f"Images/{relative}", label=label, split=split,
                      height=h, width=w, boxes=boxes, image_bytes=data)
        for i, (relative, label, split, h, w, boxes, data) in enumerate(sorted(written))
    ]
    return ExpectedDataset(root, class_names, images)


# ------------------------------------------------------------------------------ Cars


def make_cars(root: Path, test_labels_in_devkit: bool = False, seed: int = 2
              ) -> ExpectedDataset:
    """``root/{cars_train,cars_test,devkit}`` + ``cars_test_annos_withlabels.mat``:
    3 classes, 4 train and 3 test images; annotations stored in shuffled order."""
    import scipy.io

    rng = np.random.default_rng(seed)
    class_names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012",
                   "Acura TL Sedan 2012"]
    devkit = root / "devkit"
    devkit.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(devkit / "cars_meta.mat",
                     {"class_names": np.array(class_names, dtype=object).reshape(1, -1)})
    fields = [(name, "O") for name in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class",
                                       "fname")]
    images = []
    for split, count in (("train", 4), ("test", 3)):
        annotations = np.zeros((1, count), dtype=fields)
        for k, slot in enumerate(rng.permutation(count)):
            height, width = int(rng.integers(20, 40)), int(rng.integers(20, 40))
            fname = f"{k + 1:05d}.jpg"
            data = jpeg_bytes(rng, height, width)
            _write(root / f"cars_{split}" / fname, data)
            x1, y1 = int(rng.integers(1, width // 2)), int(rng.integers(1, height // 2))
            x2, y2 = int(rng.integers(x1 + 2, width)), int(rng.integers(y1 + 2, height))
            label = k % len(class_names)
            # MATLAB stores these as small integer matrices.
            annotations[0, slot] = (np.array([[x1]], np.uint8), np.array([[y1]], np.uint8),
                                    np.array([[x2]], np.uint16), np.array([[y2]], np.uint8),
                                    np.array([[label + 1]], np.uint8), fname)
            images.append(ExpectedImage(
                image_id=k + (4 if split == "test" else 0), filename=f"cars_{split}/{fname}",
                label=label, split=split, height=height, width=width,
                boxes=np.array([[y1 / height, x1 / width, y2 / height, x2 / width]],
                               np.float32),
                image_bytes=data))
        if split == "train":
            path = devkit / "cars_train_annos.mat"
        else:
            path = (devkit if test_labels_in_devkit else root) / "cars_test_annos_withlabels.mat"
        scipy.io.savemat(path, {"annotations": annotations})
    images.sort(key=lambda image: image.image_id)
    return ExpectedDataset(root, class_names, images)


# ------------------------------------------------------------------------------ tfds


def make_tfds(data_dir: Path, name: str, file_format: str = "array_record", seed: int = 3
              ) -> ExpectedDataset:
    """A prepared tfds ``name`` (caltech_birds2011, stanford_dogs or cars196) under
    ``data_dir``: 3 train and 2 test examples, written with the builder's own feature
    serialisation into ``array_record`` shards, as ``tfds build --file_format=array_record``
    leaves them (no TensorFlow needed). With ``file_format="tfrecord"`` only the metadata
    of a tfrecord-prepared dataset is written (enough to be refused)."""
    import tensorflow_datasets as tfds
    from array_record.python.array_record_module import ArrayRecordWriter

    rng = np.random.default_rng(seed)
    builder = tfds.builder(name, data_dir=data_dir, file_format=file_format)
    features = builder.info.features
    if name == "stanford_dogs":
        features["label"].names = [f"n{i:08d}-breed_{i}" for i in range(120)]
    version_dir = Path(builder.data_dir)
    version_dir.mkdir(parents=True, exist_ok=True)
    split_infos, images = [], []
    for split, count in (("train", 3), ("test", 2)):
        template = tfds.core.ShardedFileTemplate(
            data_dir=builder.data_dir, dataset_name=name, split=split,
            filetype_suffix=file_format)
        writer = None
        if file_format == "array_record":
            writer = ArrayRecordWriter(str(template.sharded_filepaths(1)[0]), "group_size:1")
        num_bytes = 0
        for index in range(count):
            height, width = int(rng.integers(20, 40)), int(rng.integers(20, 40))
            data = jpeg_bytes(rng, height, width)
            label = int(rng.integers(0, features["label"].num_classes))
            box = np.sort(rng.random(4).reshape(2, 2), axis=0).reshape(-1)  # ymin xmin ymax xmax
            filename = f"{split}/{index:03d}.jpg"
            example = {"image": data, "label": label}
            object_mask, boxes = None, box[None]
            if name == "caltech_birds2011":
                grey = soft_mask(rng, height, width)
                object_mask = grey >= 128
                example.update({"image/filename": filename, "label_name": "bird",
                                "bbox": tfds.features.BBox(*box),
                                "segmentation_mask": png_bytes(grey)})
            elif name == "stanford_dogs":
                boxes = np.stack([box, box * 0.5])
                example.update({"image/filename": filename,
                                "objects": [{"bbox": tfds.features.BBox(*b)} for b in boxes]})
            elif name == "cars196":
                filename = f"{index + 1:05d}"
                example.update({"bbox": tfds.features.BBox(*box), "id": filename})
            serialized = features.serialize_example(example)
            num_bytes += len(serialized)
            if writer is not None:
                writer.write(serialized)
            images.append(ExpectedImage(
                image_id=len(images), filename=filename, label=label, split=split,
                height=height, width=width, boxes=boxes.astype(np.float32), image_bytes=data,
                object_mask=object_mask))
        if writer is not None:
            writer.close()
        split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[count],
                                               num_bytes=num_bytes, filename_template=template))
    builder.info.set_splits(tfds.core.SplitDict(split_infos))
    builder.info.write_to_directory(builder.data_dir)
    return ExpectedDataset(version_dir, list(features["label"].names), images)
