"""Segmenters: one RGB image ``uint8 [H, W, 3]`` in, boolean masks ``[N, H, W]`` out, in any
order and number (``postprocess`` sorts, filters and caps them): ``sam`` and ``sam2``
(segment-anything's and SAM 2's automatic mask generators, local checkpoints; torch is
imported only to build them), ``slic`` (scikit-image superpixels), ``grid`` (rectangles) and
``gt`` (the dataset's part map, else its object mask). ``params`` names the config values
that determine a segmenter's masks: recorded in ``dataset_info.json`` and checked on resume
without building the segmenter."""

from __future__ import annotations

import abc
import hashlib
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from protomask_jax.base import UserError
from segmentation.sources import SourceItem

SAM_CHECKPOINT_URLS = {
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
}
SAM2_CHECKPOINT_URL = (
    "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_base_plus.pt"
)
SAM2_DEFAULT_CONFIG = "configs/sam2.1/sam2.1_hiera_b+.yaml"  # inside the sam2 package


class SegmenterError(UserError):
    """A segmenter cannot be built or cannot segment an image."""


class Segmenter(abc.ABC):
    """Built once per export process from ``config.segmentation``."""

    method: str = ""

    def __init__(self, seg: ml_collections.ConfigDict, sam_model: Any = None):
        self.seg = seg

    @staticmethod
    def params(seg: ml_collections.ConfigDict) -> dict[str, Any]:
        """The values of ``config.segmentation`` that determine the masks (JSON-able)."""
        return {}

    @abc.abstractmethod
    def segment(self, image: np.ndarray, item: SourceItem) -> np.ndarray:
        """bool ``[N, H, W]`` masks of ``image``; ``item`` is what it was decoded from."""


class GridSegmenter(Segmenter):
    """Rectangles with edges at ``round(linspace(0, size, n + 1))``."""

    method = "grid"

    def __init__(self, seg: ml_collections.ConfigDict, sam_model: Any = None):
        self.rows, self.cols = seg.grid.rows, seg.grid.cols
        if self.rows < 1 or self.cols < 1:
            raise SegmenterError(
                f"segmentation.grid rows and cols must be >= 1, got {self.rows} x {self.cols}."
            )

    def segment(self, image: np.ndarray, item: SourceItem) -> np.ndarray:
        height, width = image.shape[:2]
        row_edges = np.round(np.linspace(0, height, self.rows + 1)).astype(np.int64)
        col_edges = np.round(np.linspace(0, width, self.cols + 1)).astype(np.int64)
        row_of = np.searchsorted(row_edges, np.arange(height), side="right") - 1  # [H]
        col_of = np.searchsorted(col_edges, np.arange(width), side="right") - 1  # [W]
        cell = row_of[:, None] * self.cols + col_of[None, :]  # [H, W]
        return cell[None] == np.arange(self.rows * self.cols)[:, None, None]

    @staticmethod
    def params(seg: ml_collections.ConfigDict) -> dict[str, Any]:
        return dict(rows=seg.grid.rows, cols=seg.grid.cols)


class SlicSegmenter(Segmenter):
    """scikit-image SLIC superpixels (k-means in colour + position), one mask each."""

    method = "slic"

    def segment(self, image: np.ndarray, item: SourceItem) -> np.ndarray:
        from skimage.segmentation import slic

        labels = slic(image, **self.seg.slic.to_dict(), start_label=0, channel_axis=-1)
        return labels[None] == np.unique(labels)[:, None, None]

    @staticmethod
    def params(seg: ml_collections.ConfigDict) -> dict[str, Any]:
        return seg.slic.to_dict()


class GroundTruthSegmenter(Segmenter):
    """The dataset's masks: each part of ``gt.part_map``, else ``gt.object_mask``."""

    method = "gt"

    def segment(self, image: np.ndarray, item: SourceItem) -> np.ndarray:
        gt = item.gt
        if gt.part_map is not None:
            part_map = np.asarray(gt.part_map)
            _check_size(part_map.shape, image, item, "part map")
            part_values = np.unique(part_map)
            return part_map[None] == part_values[part_values > 0][:, None, None]
        if gt.object_mask is not None:
            object_mask = np.asarray(gt.object_mask, dtype=bool)
            _check_size(object_mask.shape, image, item, "object mask")
            return object_mask[None]
        raise SegmenterError(
            f"{item.filename}: segmentation.method='gt' needs ground-truth masks (a part map "
            "or an object mask) but this dataset provides none; choose sam, slic or grid."
        )


def _check_size(shape: tuple[int, ...], image: np.ndarray, item: SourceItem, what: str) -> None:
    if tuple(shape) != image.shape[:2]:
        raise SegmenterError(
            f"{item.filename}: {what} is {tuple(shape)} but the image is {image.shape[:2]}."
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _local_checkpoint(key: str, checkpoint: str, checkpoint_sha256: str, url: str) -> Path:
    """``segmentation.<key>.checkpoint`` as an existing file whose SHA-256 matches (if given)."""
    name = {"sam": "SAM", "sam2": "SAM 2"}[key]
    if not checkpoint:
        raise SegmenterError(
            f"segmentation.{key}.checkpoint is empty. Download the {name} weights by hand (e.g. "
            f"{url}) and pass --config.segmentation.{key}.checkpoint=/path/to/file."
        )
    path = Path(checkpoint)
    if not path.is_file():
        raise SegmenterError(f"{name} checkpoint {path.resolve()} not found (download: {url}).")
    if checkpoint_sha256:
        actual = _sha256(path)
        if actual != checkpoint_sha256.lower():
            raise SegmenterError(
                f"{name} checkpoint {path}: SHA-256 {actual} does not match "
                f"segmentation.{key}.checkpoint_sha256={checkpoint_sha256}; the file is corrupt "
                "or a different model."
            )
    return path


def load_sam_model(model_type: str, checkpoint: str, checkpoint_sha256: str = ""):
    """A ``segment_anything`` SAM on the CPU with the weights of a local checkpoint.

    The model is built without a checkpoint (``sam_model_registry[model_type]()`` never
    downloads), then the state dict is read with ``weights_only=True`` (no pickled code
    runs), after checking its SHA-256 when one is given, and loaded strictly."""
    import torch
    from segment_anything import sam_model_registry

    if model_type not in sam_model_registry:
        raise SegmenterError(
            f"segmentation.sam.model_type={model_type!r} is unknown; valid: "
            f"{sorted(sam_model_registry)}."
        )
    url = SAM_CHECKPOINT_URLS.get(model_type, "the segment-anything release page")
    path = _local_checkpoint("sam", checkpoint, checkpoint_sha256, url)
    model = sam_model_registry[model_type]()
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a file it cannot read
        raise SegmenterError(
            f"SAM checkpoint {path} is not a file torch.load(weights_only=True) can read "
            f"({type(e).__name__}); check segmentation.sam.checkpoint."
        ) from None
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise SegmenterError(
            f"SAM checkpoint {path} does not fit model_type={model_type!r}: {e}"
        ) from e
    return model


def load_sam2_model(model_config: str, checkpoint: str, checkpoint_sha256: str = ""):
    """A SAM 2 on the CPU: the architecture from a sam2 model config file (default: the
    package's ``configs/sam2.1/sam2.1_hiera_b+.yaml``, the reference's), built without
    ``sam2.build_sam`` (which opens the checkpoint itself) and without the post-processing
    overrides it adds (the reference passes ``apply_postprocessing=False``); then the
    checkpoint's ``model`` state dict, read with ``weights_only=True``, loaded strictly."""
    import sam2
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = _local_checkpoint("sam2", checkpoint, checkpoint_sha256, SAM2_CHECKPOINT_URL)
    model_config = model_config or str(Path(sam2.__file__).parent / SAM2_DEFAULT_CONFIG)
    if not Path(model_config).is_file():
        raise SegmenterError(
            f"segmentation.sam2.model_config: {model_config} not found; give a sam2 model "
            f"config file, e.g. {Path(sam2.__file__).parent / 'configs/sam2.1'}/*.yaml."
        )
    model = instantiate(OmegaConf.load(model_config).model, _recursive_=True)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state_dict.get("model", state_dict))
    except RuntimeError as e:
        raise SegmenterError(f"SAM 2 checkpoint {path} does not fit {model_config}: {e}") from e
    return model


def resolve_torch_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; checks an explicit ``cuda``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SegmenterError(
            f"segmentation.device={device!r} but torch sees no CUDA device; use 'auto' or 'cpu'."
        )
    return device


class _GeneratorSegmenter(Segmenter):
    """The masks of an automatic mask generator (SAM's or SAM 2's) fed the RGB image: the
    reference feeds BGR (``docs/reference.md`` §9.4) to models trained on RGB. Every key of
    the config section but the model's and the checkpoint's is a generator argument."""

    _model_keys = ("checkpoint", "checkpoint_sha256")

    def _build(self, generator_class, model, seg, section) -> None:
        self.device = resolve_torch_device(seg.device)
        model.to(self.device).eval()
        generator_args = section.to_dict()
        for key in self._model_keys:
            del generator_args[key]
        self._generator = generator_class(model, output_mode="binary_mask", **generator_args)

    def segment(self, image: np.ndarray, item: SourceItem) -> np.ndarray:
        height, width = image.shape[:2]
        try:
            # a writable copy: SAM 2's transform hands the array to torch, which warns on
            # read-only ones (PIL's arrays are)
            found = self._generator.generate(np.array(image, order="C"))
        except IndexError as e:
            # Both generators index an empty tensor in their cross-crop de-duplication when
            # no crop yields a mask (crop_n_layers > 0): that case means "no masks".
            if self._generator.crop_n_layers == 0 or "size 0" not in str(e):
                raise
            found = []
        if not found:
            return np.zeros((0, height, width), bool)
        return np.stack([np.asarray(record["segmentation"], bool) for record in found])

    @classmethod
    def params(cls, seg: ml_collections.ConfigDict) -> dict[str, Any]:
        params = seg[cls.method].to_dict()
        # Batching does not change the masks; a resumed export may use another batch size.
        del params["points_per_batch"]
        # File names identify the weights and the architecture; their folders do not matter.
        for key in ("checkpoint", "model_config"):
            if params.get(key):
                params[key] = Path(params[key]).name
        params["input"] = "rgb"
        return params


class SamSegmenter(_GeneratorSegmenter):
    """segment-anything's ``SamAutomaticMaskGenerator`` over ``segmentation.sam``."""

    method = "sam"
    _model_keys = ("checkpoint", "checkpoint_sha256", "model_type")

    def __init__(self, seg: ml_collections.ConfigDict, sam_model: Any = None):
        from segment_anything import SamAutomaticMaskGenerator

        sam = seg.sam
        if sam.min_mask_region_area > 0:
            try:
                import cv2  # noqa: F401  (segment-anything needs it to remove small regions)
            except ImportError as e:
                raise SegmenterError(
                    "segmentation.sam.min_mask_region_area > 0 needs opencv (pip install "
                    "opencv-python-headless); set it to 0 (the reference's value)."
                ) from e
        model = sam_model
        if model is None:
            model = load_sam_model(sam.model_type, sam.checkpoint, sam.checkpoint_sha256)
        self._build(SamAutomaticMaskGenerator, model, seg, sam)


class Sam2Segmenter(_GeneratorSegmenter):
    """``sam2``'s ``SAM2AutomaticMaskGenerator`` over ``segmentation.sam2`` (the reference's
    settings, ``docs/reference.md`` §1)."""

    method = "sam2"
    _model_keys = ("checkpoint", "checkpoint_sha256", "model_config")

    def __init__(self, seg: ml_collections.ConfigDict, sam_model: Any = None):
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        s = seg.sam2
        model = sam_model
        if model is None:
            model = load_sam2_model(s.model_config, s.checkpoint, s.checkpoint_sha256)
        self._build(SAM2AutomaticMaskGenerator, model, seg, s)
        # SAM2ImagePredictor hard-codes the feature maps of a 1024 px model (strides 4, 8,
        # 16); derive them from the model, so models of other sizes (tests) work too.
        size = model.image_size
        self._generator.predictor._bb_feat_sizes = [(size // k, size // k) for k in (4, 8, 16)]
        if s.min_mask_region_area > 0:
            _connected_components_without_cuda()


def connected_components(masks):
    """``sam2.utils.misc.get_connected_components`` on the CPU: for bool/uint8 ``[N, 1, H, W]``
    masks, each pixel's 8-connected component label and that component's area (0 outside)."""
    import torch
    from scipy import ndimage

    found = masks.detach().to("cpu", torch.uint8).numpy()
    labels, areas = np.zeros(found.shape, np.int32), np.zeros(found.shape, np.int32)
    for n, mask in enumerate(found[:, 0]):
        labels[n, 0] = ndimage.label(mask, structure=np.ones((3, 3)))[0]
        areas[n, 0] = np.bincount(labels[n, 0].ravel())[labels[n, 0]] * (labels[n, 0] > 0)
    return torch.from_numpy(labels).to(masks.device), torch.from_numpy(areas).to(masks.device)


def _connected_components_without_cuda() -> None:
    """SAM 2 fills small holes and removes small islands (``min_mask_region_area``) with a
    CUDA kernel (``sam2._C``); where it was not built, sam2 warns and skips that step, so the
    masks would differ from the reference's. Then :func:`connected_components` stands in."""
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        import sam2.utils.misc

        sam2.utils.misc.get_connected_components = connected_components


SEGMENTERS: dict[str, type[Segmenter]] = {
    cls.method: cls
    for cls in (SamSegmenter, Sam2Segmenter, SlicSegmenter, GridSegmenter, GroundTruthSegmenter)
}


def _segmenter_class(config: ml_collections.ConfigDict) -> type[Segmenter]:
    method = config.segmentation.method
    if method not in SEGMENTERS:
        raise SegmenterError(
            f"segmentation.method={method!r} is unknown; valid: {sorted(SEGMENTERS)}."
        )
    return SEGMENTERS[method]


def get_segmenter(config: ml_collections.ConfigDict, sam_model: Any = None) -> Segmenter:
    """The segmenter ``config.segmentation.method`` names; ``sam_model``: a prebuilt SAM
    (the checkpoint is then not read)."""
    return _segmenter_class(config)(config.segmentation, sam_model)


def segmenter_description(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``{"method": ..., "params": {...}}`` for ``dataset_info.json``, without building it."""
    cls = _segmenter_class(config)
    return {"method": cls.method, "params": cls.params(config.segmentation)}
