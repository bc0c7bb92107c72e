"""Segmenters: grid, slic, gt, SAM and SAM 2 (tiny random models running the real generators)."""

from __future__ import annotations

import copy
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import common
from segmentation import segmenters
from segmentation.sources import GroundTruth, SourceItem

ITEM = SourceItem(image_id=0, filename="images/00000.png", image_bytes=b"", label=0)


def _config(method: str, **sam_overrides):
    config = common.get_base_config()
    config.segmentation.method = method
    config.segmentation.sam.update(sam_overrides)
    return common.finalize(config)


def _as_set(masks: np.ndarray) -> set[bytes]:
    return {np.packbits(m).tobytes() for m in masks}


def test_grid_rectangles_by_hand():
    config = _config("grid")
    config.segmentation.grid.update(rows=2, cols=3)
    masks = segmenters.get_segmenter(config).segment(np.zeros((5, 7, 3), np.uint8), ITEM)
    # Row edges round(linspace(0, 5, 3)) = [0, 2, 5]; column edges round(linspace(0, 7, 4))
    # = [0, 2, 5, 7]. Cell index by pixel:
    expected_cells = np.array(
        [
            [0, 0, 1, 1, 1, 2, 2],
            [0, 0, 1, 1, 1, 2, 2],
            [3, 3, 4, 4, 4, 5, 5],
            [3, 3, 4, 4, 4, 5, 5],
            [3, 3, 4, 4, 4, 5, 5],
        ]
    )
    assert masks.shape == (6, 5, 7) and masks.dtype == bool
    for cell in range(6):
        np.testing.assert_array_equal(masks[cell], expected_cells == cell)


def test_slic_separates_two_flat_regions():
    image = np.zeros((32, 40, 3), np.uint8)
    image[:, :20] = (200, 30, 30)
    image[:, 20:] = (30, 30, 200)
    config = _config("slic")
    config.segmentation.slic.n_segments = 2
    masks = segmenters.get_segmenter(config).segment(image, ITEM)
    left = np.zeros((32, 40), bool)
    left[:, :20] = True
    assert _as_set(masks) == _as_set(np.stack([left, ~left]))


def test_slic_masks_partition_the_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    masks = segmenters.get_segmenter(_config("slic")).segment(image, ITEM)
    assert masks.dtype == bool and masks.shape[1:] == (48, 48)
    np.testing.assert_array_equal(masks.sum(axis=0), np.ones((48, 48)))
    assert 4 <= len(masks) <= 32  # n_segments = 16 is a target, not exact
    assert masks.any(axis=(1, 2)).all()


def test_gt_masks_are_the_parts_of_the_part_map():
    part_map = np.array([[0, 1, 1], [3, 3, 0], [3, 0, 0]], np.uint8)  # parts 0 and 2
    item = SourceItem(0, "a.png", b"", 0, GroundTruth(part_map=part_map))
    masks = segmenters.get_segmenter(_config("gt")).segment(np.zeros((3, 3, 3), np.uint8), item)
    np.testing.assert_array_equal(masks, [part_map == 1, part_map == 3])


def test_gt_uses_the_object_mask_without_a_part_map():
    object_mask = np.eye(4, dtype=bool)
    item = SourceItem(0, "bird.jpg", b"", 0, GroundTruth(object_mask=object_mask))
    masks = segmenters.get_segmenter(_config("gt")).segment(np.zeros((4, 4, 3), np.uint8), item)
    np.testing.assert_array_equal(masks, object_mask[None])


def test_gt_errors_name_the_file():
    segmenter = segmenters.get_segmenter(_config("gt"))
    with pytest.raises(segmenters.SegmenterError, match="images/00000.png.*no"):
        segmenter.segment(np.zeros((3, 3, 3), np.uint8), ITEM)
    item = SourceItem(0, "b.png", b"", 0, GroundTruth(part_map=np.zeros((2, 3), np.uint8)))
    with pytest.raises(segmenters.SegmenterError, match=r"b.png: part map is \(2, 3\)"):
        segmenter.segment(np.zeros((3, 3, 3), np.uint8), item)


def test_unknown_method_lists_the_valid_ones():
    valid = r"'watershed' is unknown; valid: \['grid', 'gt', 'sam', 'sam2', 'slic'\]"
    with pytest.raises(segmenters.SegmenterError, match=valid):
        segmenters.get_segmenter(_config("watershed"))


def test_descriptions_come_from_the_config_alone():
    assert segmenters.segmenter_description(_config("grid")) == {
        "method": "grid",
        "params": {"rows": 2, "cols": 2},
    }
    sam = segmenters.segmenter_description(_config("sam", checkpoint="/x/y/sam_vit_h.pth"))
    assert sam["params"]["checkpoint"] == "sam_vit_h.pth"
    assert sam["params"]["pred_iou_thresh"] == 0.86 and sam["params"]["input"] == "rgb"
    assert "points_per_batch" not in sam["params"]  # batching does not change the masks


def test_nothing_imports_torch_or_jax_except_the_sam_segmenter():
    code = (
        "import sys, numpy as np\n"
        "from configs import common\n"
        "from segmentation import export, parts_world, postprocess, segmenters, sources\n"
        "c = common.get_base_config()\n"
        "for m in ('grid', 'slic', 'gt'):\n"
        "    c.segmentation.method = m\n"
        "    segmenters.get_segmenter(c)\n"
        "bad = [m for m in ('torch', 'jax', 'segment_anything') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# --------------------------------------------------------------------------------- sam

RELAXED = dict(
    points_per_side=4, pred_iou_thresh=-100.0, stability_score_thresh=0.0, crop_n_layers=0
)


@pytest.mark.torch
def test_sam_returns_the_generator_masks_for_the_rgb_image(
    tiny_sam_model, monkeypatch, torch_single_thread
):
    from segment_anything import SamAutomaticMaskGenerator

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    segmenter = segmenters.get_segmenter(_config("sam", **RELAXED), sam_model=tiny_sam_model)
    masks = segmenter.segment(image, ITEM)
    direct = SamAutomaticMaskGenerator(
        tiny_sam_model,
        points_per_side=4,
        pred_iou_thresh=-100.0,
        stability_score_thresh=0.0,
        crop_n_layers=0,
    ).generate(image)
    assert len(direct) >= 1
    assert masks.dtype == bool and masks.shape == (len(direct), 40, 56)
    np.testing.assert_array_equal(masks, np.stack([d["segmentation"] for d in direct]))
    # The generator is fed the RGB image as is (the reference flips it to BGR, §9.4).
    seen = []
    monkeypatch.setattr(segmenter._generator, "generate", lambda x: seen.append(x) or [])
    assert segmenter.segment(image, ITEM).shape == (0, 40, 56)
    np.testing.assert_array_equal(seen[0], image)


@pytest.mark.torch
def test_sam_checkpoint_loading(tiny_sam_model, tmp_path, monkeypatch):
    import segment_anything
    import torch

    # A registry entry building the tiny architecture stands in for vit_h, so the real
    # loading path (build without weights, torch.load weights_only, strict load) runs.
    def build_tiny(checkpoint=None):
        assert checkpoint is None  # never let segment-anything open the file itself
        model = copy.deepcopy(tiny_sam_model)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()  # so the test sees that the weights really come from the file
        return model

    monkeypatch.setitem(segment_anything.sam_model_registry, "tiny", build_tiny)
    path = tmp_path / "tiny.pth"
    torch.save(tiny_sam_model.state_dict(), path)
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()

    model = segmenters.load_sam_model("tiny", str(path), sha256)
    for (name, loaded), original in zip(
        model.state_dict().items(), tiny_sam_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(loaded, original, msg=name)

    with pytest.raises(segmenters.SegmenterError, match="SHA-256 .* does not match"):
        segmenters.load_sam_model("tiny", str(path), "0" * 64)
    with pytest.raises(segmenters.SegmenterError, match="checkpoint is empty. Download"):
        segmenters.load_sam_model("vit_h", "")
    with pytest.raises(segmenters.SegmenterError, match="not found"):
        segmenters.load_sam_model("tiny", str(tmp_path / "missing.pth"))
    with pytest.raises(segmenters.SegmenterError, match="model_type='vit_x'.*vit_b"):
        segmenters.load_sam_model("vit_x", str(path))
    # weights_only: a checkpoint that needs arbitrary unpickling is refused.
    evil = tmp_path / "evil.pth"
    torch.save({"payload": _Unsafe()}, evil)
    with pytest.raises(Exception, match="[Ww]eights only|weights_only"):
        segmenters.load_sam_model("tiny", str(evil))
    # A state dict of another architecture is named as such.
    torch.save({"unexpected.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(segmenters.SegmenterError, match="does not fit model_type='tiny'"):
        segmenters.load_sam_model("tiny", str(tmp_path / "other.pth"))


class _Unsafe:
    """Any object that is not a tensor or plain container."""


@pytest.mark.torch
def test_sam_device_resolution():
    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert segmenters.resolve_torch_device("auto") == expected
    assert segmenters.resolve_torch_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(segmenters.SegmenterError, match="no CUDA device"):
            segmenters.resolve_torch_device("cuda")


@pytest.mark.torch
def test_sam_with_crops_and_no_mask_returns_none(tiny_sam_model, torch_single_thread):
    # The reference's thresholds reject every mask of a random SAM; with crop layers
    # segment-anything 1.0 then fails inside its cross-crop de-duplication (IndexError on an
    # empty tensor). The segmenter reports "no masks" instead, so the export falls back.
    config = _config("sam", points_per_side=2, crop_n_layers=1)
    segmenter = segmenters.get_segmenter(config, sam_model=tiny_sam_model)
    image = np.full((32, 32, 3), 128, np.uint8)
    with pytest.raises(IndexError, match="size 0"):
        segmenter._generator.generate(image)
    assert segmenter.segment(image, ITEM).shape == (0, 32, 32)


# -------------------------------------------------------------------------------- sam2

SAM2_RELAXED = dict(
    points_per_side=4, pred_iou_thresh=-100.0, stability_score_thresh=0.0, crop_n_layers=0
)


def _sam2_config(**overrides):
    config = common.get_base_config()
    config.segmentation.method = "sam2"
    config.segmentation.sam2.update(overrides)
    return common.finalize(config)


def test_sam2_defaults_are_the_reference_settings():
    # docs/reference.md §1.2: the authors' SAM2AutomaticMaskGenerator arguments.
    expected = dict(
        points_per_side=32, points_per_batch=512, pred_iou_thresh=0.8,
        stability_score_thresh=0.9, stability_score_offset=0.5, crop_n_layers=2,
        mask_threshold=0.0, box_nms_thresh=0.7, crop_nms_thresh=0.7,
        crop_overlap_ratio=512 / 1500, crop_n_points_downscale_factor=1,
        min_mask_region_area=10, use_m2m=False,
    )  # fmt: skip
    section = common.get_base_config().segmentation.sam2.to_dict()
    assert {key: section[key] for key in expected} == expected
    assert section["model_config"] == ""  # the sam2 package's sam2.1_hiera_b+.yaml
    config = _sam2_config(checkpoint="/w/sam2.1_b.pt", model_config="/w/configs/b+.yaml")
    params = segmenters.segmenter_description(config)["params"]
    assert params["checkpoint"] == "sam2.1_b.pt" and params["input"] == "rgb"
    assert params["model_config"] == "b+.yaml"
    assert "points_per_batch" not in params


def _tiny_generator(model, **overrides):
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    generator = SAM2AutomaticMaskGenerator(model, **{**SAM2_RELAXED, **overrides})
    # sam2 assumes 1024 px models; the tiny one works at 256 px.
    generator.predictor._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]
    return generator


@pytest.mark.torch
def test_sam2_returns_the_generator_masks_for_the_rgb_image(
    tiny_sam2_model, monkeypatch, torch_single_thread
):
    import warnings

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    segmenter = segmenters.get_segmenter(
        _sam2_config(**SAM2_RELAXED, min_mask_region_area=0), sam_model=tiny_sam2_model
    )
    masks = segmenter.segment(image, ITEM)
    direct = _tiny_generator(tiny_sam2_model, min_mask_region_area=0).generate(image)
    assert len(direct) >= 1
    assert masks.dtype == bool and masks.shape == (len(direct), 40, 56)
    np.testing.assert_array_equal(masks, np.stack([d["segmentation"] for d in direct]))
    # The reference's small-region clean-up runs without sam2's CUDA kernel (no warning).
    cleaned = segmenters.get_segmenter(_sam2_config(**SAM2_RELAXED), sam_model=tiny_sam2_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert cleaned.segment(image, ITEM).shape[1:] == (40, 56)
    # The generator is fed the RGB image as is (the reference flips it to BGR, §9.4).
    seen = []
    monkeypatch.setattr(segmenter._generator, "generate", lambda x: seen.append(x) or [])
    assert segmenter.segment(image, ITEM).shape == (0, 40, 56)
    np.testing.assert_array_equal(seen[0], image)


@pytest.mark.torch
def test_connected_components_by_hand():
    import torch

    mask = np.zeros((2, 1, 5, 6), bool)
    mask[0, 0, 0, 0] = mask[0, 0, 1, 1] = True  # diagonal neighbours: one component of 2
    mask[0, 0, 3:5, 3:6] = True  # a second component of 6
    labels, areas = segmenters.connected_components(torch.from_numpy(mask))
    labels, areas = labels.numpy(), areas.numpy()
    assert labels[0, 0, 0, 0] == labels[0, 0, 1, 1] > 0
    assert labels[0, 0, 4, 5] > 0 and labels[0, 0, 4, 5] != labels[0, 0, 0, 0]
    expected_areas = np.zeros((2, 1, 5, 6), np.int32)
    expected_areas[0, 0, 0, 0] = expected_areas[0, 0, 1, 1] = 2
    expected_areas[0, 0, 3:5, 3:6] = 6
    np.testing.assert_array_equal(areas, expected_areas)
    np.testing.assert_array_equal(labels[~mask], 0)


@pytest.mark.torch
def test_sam2_checkpoint_loading(tiny_sam2_model, tmp_path):
    import torch
    from omegaconf import OmegaConf

    from segmentation.tiny_sam import tiny_sam2_config

    model_config = tmp_path / "tiny_sam2.yaml"
    OmegaConf.save(tiny_sam2_config(), model_config)
    path = tmp_path / "tiny_sam2.pt"
    torch.save({"model": tiny_sam2_model.state_dict()}, path)  # sam2's checkpoint layout
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()

    model = segmenters.load_sam2_model(str(model_config), str(path), sha256)
    for (name, loaded), original in zip(
        model.state_dict().items(), tiny_sam2_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(loaded, original, msg=name)

    load = segmenters.load_sam2_model
    with pytest.raises(segmenters.SegmenterError, match="SHA-256 .* does not match"):
        load(str(model_config), str(path), "0" * 64)
    with pytest.raises(segmenters.SegmenterError, match="sam2.checkpoint is empty. Download"):
        load(str(model_config), "")
    with pytest.raises(segmenters.SegmenterError, match="SAM 2 checkpoint .* not found"):
        load(str(model_config), str(tmp_path / "missing.pt"))
    with pytest.raises(segmenters.SegmenterError, match="no_such_model.yaml not found"):
        load(str(tmp_path / "no_such_model.yaml"), str(path))
    # The default: the package's own config of the reference's model, which the tiny
    # checkpoint does not fit.
    with pytest.raises(segmenters.SegmenterError, match="sam2.1_hiera_b.*yaml: Error"):
        load("", str(path))
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Unsafe()}, evil)
    with pytest.raises(Exception, match="[Ww]eights only|weights_only"):
        load(str(model_config), str(evil))
    torch.save({"model": {"unexpected.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(segmenters.SegmenterError, match="does not fit .*tiny_sam2.yaml"):
        load(str(model_config), str(tmp_path / "other.pt"))
