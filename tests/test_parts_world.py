"""The synthetic parts world: determinism, consistency of labels, splits and part maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segmentation import parts_world as pw

SMALL = dict(num_classes=4, image_size=64, train_per_class=3, test_per_class=2, seed=7)


@pytest.fixture(scope="module")
def world_96(tmp_path_factory) -> tuple[Path, dict]:
    """8 classes at the default 96 px, 4 train + 2 test images per class."""
    root = tmp_path_factory.mktemp("pw96")
    metadata = pw.generate(root, num_classes=8, image_size=96, train_per_class=4,
                           test_per_class=2, seed=3)
    return root, metadata


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path: Path):
    pw.generate(tmp_path / "a", **SMALL)
    pw.generate(tmp_path / "b", **SMALL)
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(files_a) == 2 * 4 * 5 + 2  # images, part maps, metadata, contact sheet
    assert files_a == files_b
    pw.generate(tmp_path / "c", **{**SMALL, "seed": 8})
    files_c = _files(tmp_path / "c")
    assert files_c["images/00000.png"] != files_a["images/00000.png"]


def test_rerun_on_a_complete_folder_does_nothing(tmp_path: Path):
    pw.generate(tmp_path, **SMALL)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    pw.generate(tmp_path, **SMALL)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    with pytest.raises(ValueError, match="other parameters|already holds"):
        pw.generate(tmp_path, **{**SMALL, "train_per_class": 4})


def test_labels_splits_and_ids(world_96):
    root, metadata = world_96
    images = metadata["images"]
    assert [e["id"] for e in images] == list(range(8 * 6))
    train = [e for e in images if e["split"] == "train"]
    test = [e for e in images if e["split"] == "test"]
    assert max(e["id"] for e in train) < min(e["id"] for e in test)
    # Balanced: 4 train and 2 test images per class; ids interleave the classes.
    assert np.bincount([e["label"] for e in train], minlength=8).tolist() == [4] * 8
    assert np.bincount([e["label"] for e in test], minlength=8).tolist() == [2] * 8
    assert [e["label"] for e in train[:8]] == list(range(8))
    assert metadata["class_names"] == [c["name"] for c in metadata["classes"]]
    assert metadata["part_names"] == list(pw.PART_NAMES)
    for entry in images:
        with Image.open(root / entry["image"]) as image:
            assert image.mode == "RGB" and image.size == (96, 96)
        with Image.open(root / entry["part_map"]) as part_map:
            assert part_map.mode == "L" and part_map.size == (96, 96)
    assert json.loads((root / pw.METADATA_FILE).read_text()) == metadata


def test_part_maps_match_the_painted_parts(world_96):
    """Inside every labelled part (away from its outline) the pixels have exactly the part's
    recorded colour, or its stripe shade for striped parts; every recorded part is in the
    map and no unrecorded part is."""
    root, metadata = world_96
    for entry in metadata["images"]:
        image = np.asarray(Image.open(root / entry["image"]), np.int64)
        part_map = np.asarray(Image.open(root / entry["part_map"]))
        present = {pw.PART_NAMES[v - 1] for v in np.unique(part_map) if v > 0}
        assert present == set(entry["parts"]), entry["id"]
        padded = np.pad(part_map, 1, mode="edge")
        interior = ((padded[:-2, 1:-1] == part_map) & (padded[2:, 1:-1] == part_map)
                    & (padded[1:-1, :-2] == part_map) & (padded[1:-1, 2:] == part_map))
        for name, attributes in entry["parts"].items():
            inside = (part_map == pw.PART_NAMES.index(name) + 1) & interior
            rgb = np.asarray(attributes["rgb"])
            allowed = [rgb]
            if attributes["pattern"] == "stripes":
                allowed.append(np.rint(rgb * pw.STRIPE_SHADE).astype(np.int64))
            pixels = image[inside]
            matches = np.zeros(len(pixels), bool)
            for colour in allowed:
                matches |= (pixels == colour).all(axis=1)
            assert inside.sum() > 0 and matches.all(), (entry["id"], name)


def test_decisive_parts_present_with_the_class_signature(world_96):
    root, metadata = world_96
    signature, distractor = set(pw.SIGNATURE_COLOURS), set(pw.DISTRACTOR_COLOURS)
    for entry in metadata["images"]:
        spec = metadata["classes"][entry["label"]]
        part_map = np.asarray(Image.open(root / entry["part_map"]))
        for part_id in spec["decisive_parts"]:
            name = pw.PART_NAMES[part_id]
            # Visible, and big enough that its box survives post-processing (> 2 px).
            ys, xs = np.nonzero(part_map == part_id + 1)
            assert len(ys) >= 50, (entry["id"], name)
            assert ys.max() - ys.min() + 1 >= 8 and xs.max() - xs.min() + 1 >= 8
            assert entry["parts"][name]["shape"] == spec["decisive"][name]["shape"]
            assert entry["parts"][name]["colour"] == spec["decisive"][name]["colour"]
        for name, attributes in entry["parts"].items():
            is_decisive = pw.PART_NAMES.index(name) in spec["decisive_parts"]
            assert attributes["colour"] in (signature if is_decisive else distractor)


def test_class_is_identified_by_its_decisive_parts_alone(world_96):
    """A rule that looks only at saturated parts recovers every label: the class is decided
    by the decisive parts, and any one decisive part suffices."""
    _, metadata = world_96
    owner = {}
    for label, spec in enumerate(metadata["classes"]):
        for name, attributes in spec["decisive"].items():
            owner[(name, attributes["shape"], attributes["colour"])] = label
    palette = {**pw.SIGNATURE_COLOURS, **pw.DISTRACTOR_COLOURS}
    for entry in metadata["images"]:
        votes = set()
        for name, attributes in entry["parts"].items():
            # The painted colour is within the jitter of its palette colour, and its nearest
            # palette colour is of the same kind (signature or distractor): the jitter never
            # makes a distractor look decisive, or a signature colour look like another.
            distances = {k: np.abs(np.subtract(attributes["rgb"], v)).max()
                         for k, v in palette.items()}
            assert distances[attributes["colour"]] <= pw.COLOUR_JITTER
            nearest = min(distances, key=distances.get)
            if attributes["colour"] in pw.SIGNATURE_COLOURS:
                assert nearest == attributes["colour"]
            else:
                assert nearest in pw.DISTRACTOR_COLOURS
            if nearest in pw.SIGNATURE_COLOURS:
                votes.add(owner[(name, attributes["shape"], nearest)])
        assert votes == {entry["label"]}


def test_class_specs_are_unique_up_to_the_limit():
    specs = pw.class_specs(pw.MAX_CLASSES)
    triples = [(p, s, c) for spec in specs for p, (s, c) in spec.decisive.items()]
    assert len(set(triples)) == len(triples)
    assert len({spec.name for spec in specs}) == pw.MAX_CLASSES
    assert {len(spec.decisive) for spec in specs} == {1, 2}
    assert all(set(spec.decisive) <= set(pw.DECISIVE_CANDIDATES) for spec in specs)
    # Pairs differ only by the decisive part's shape (the fine-grained distinction).
    first, second = specs[0].decisive, specs[1].decisive
    assert first.keys() == second.keys()
    part = next(iter(first))
    assert first[part][1] == second[part][1] and first[part][0] != second[part][0]
    with pytest.raises(ValueError, match="num_classes"):
        pw.class_specs(pw.MAX_CLASSES + 1)


def test_objects_have_four_to_six_parts_and_stay_inside(world_96):
    root, metadata = world_96
    counts = [len(e["parts"]) for e in metadata["images"]]
    assert min(counts) >= 4 and max(counts) <= 6
    for entry in metadata["images"]:
        part_map = np.asarray(Image.open(root / entry["part_map"]))
        border = np.concatenate([part_map[0], part_map[-1], part_map[:, 0], part_map[:, -1]])
        assert not border.any(), entry["id"]


def test_contact_sheet_and_cli(tmp_path: Path, capsys):
    pw.main(["--root", str(tmp_path), "--num_classes", "3", "--image_size", "48",
             "--train_per_class", "2", "--test_per_class", "1"])
    assert "9 images, 3 classes" in capsys.readouterr().out
    with Image.open(tmp_path / pw.CONTACT_SHEET_FILE) as sheet:
        assert sheet.size[1] == 3 * (48 + 2)
        sheet = np.asarray(sheet.convert("RGB"))
    # The first example of class 0 is pasted, unchanged, right of the label column.
    first = np.asarray(Image.open(tmp_path / "images/00000.png").convert("RGB"))
    np.testing.assert_array_equal(sheet[:48, 200:248], first)
