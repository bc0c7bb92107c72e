"""ProtoMask in PyTorch: the comparison point of the benchmarks and the reference of the tests.

One model serves both: ``benchmarks/train_step.py`` times it against our JAX step, and the
tests import its weights with ``protomask_jax.models.convert`` and check that our model
reproduces its outputs, loss and gradients. It is the same network, losses and joint-phase
optimizer as ``protomask_jax`` (docs/reference.md §3-§5), written the way a careful PyTorch
user would, so the benchmark compares two good implementations of one model:

* backbone (:class:`TorchResNet`): torchvision's own ``BasicBlock`` / ``Bottleneck`` modules
  under torchvision's module names (``conv1``, ``bn1``, ``layer1.0.conv1``,
  ``layer2.0.downsample.0`` ...) and init, any block counts and widths, no pooling head and
  no fc. For ResNet-50 this is ``torchvision.models.resnet50`` minus ``avgpool``/``fc``;
* add-on: global average pool, then the 1x1 projection ``C_b -> D`` applied as a matrix, then
  sigmoid (the reference's 1x1 conv commutes with the mean: the same function at 1/(h*w) of
  the FLOPs);
* prototypes ``[P, 1 x D]``; squared distances ``|z|^2 - 2 z.p + |p|^2`` clamped at 0; min over
  the K views; similarity ``log((d + 1) / (d + eps))`` (computed as
  ``log1p((1 - eps) / (d + eps))``, the same value); bias-free last layer initialised from
  the class identity;
* loss ``ce * CE + cluster * clst - separation * sep + diversity * div`` (§4, the diversity
  term with its gradient as in our default);
* joint-phase Adam per parameter group (backbone, add-on, prototypes; last layer frozen).

Parameters and buffers carry the reference's names and shapes (docs/reference.md §12), so
``TorchProtoMask.state_dict()`` *is* a quanproto ProtoMask checkpoint: ``backbone.*``,
``add_on_layers.0.weight [D, C_b, 1, 1]`` and ``.bias [D]``, ``prototype_vectors
[P, D, 1, 1]``, ``last_layer.weight [C, P]`` and ``classification_loss_fn.weight [C]``.

Views are cut from a ``uint8 [B, S, S, 3]`` canvas on the device with
``torchvision.ops.roi_align(aligned=True, sampling_ratio=1)``: one bilinear sample at the
centre of each output pixel's bin, which is exactly the un-augmented sampling grid of
``protomask_jax.data.views.make_views`` for boxes at least V pixels wide and high (smaller
boxes differ at the border pixels: roi_align clamps to the canvas, make_views to the box).
There is **no augmentation** on the torch side (no flip, rotation, shear, perspective or
colour jitter); the JAX step is timed with and without it.

``reference_style=True`` runs the forward the way quanproto does — the 1x1 add-on
convolution on every pixel of the ``h x w`` feature map *before* pooling, the distances as
convolutions with a ones kernel, and a NaN check that syncs with the host on every forward —
to show what the reference's forward costs. Same parameters, same function; not the
headline comparison.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import resnet as tv_resnet
from torchvision.ops import roi_align

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The reference's diversity loss is exp(-0.001 * S).
_DIVERSITY_SCALE = 1e-3

VARIANTS = ("eager_fp32", "eager_amp_bf16", "compile_amp_bf16", "reference_style_fp32")


@dataclasses.dataclass(frozen=True)
class LossCoefficients:
    """Joint-phase loss weights (reference: 1, 0.8, 0.2, 0.2)."""

    ce: float = 1.0
    cluster: float = 0.8
    separation: float = 0.2
    diversity: float = 0.2


@dataclasses.dataclass(frozen=True)
class JointLearningRates:
    """Adam learning rates of the joint phase (reference CUB values; add-on as our default)."""

    backbone: float = 6e-5
    add_on: float = 3e-3
    prototypes: float = 3e-3


# --------------------------------------------------------------------------- backbone


class TorchResNet(nn.Module):
    """torchvision's ResNet without ``avgpool`` and ``fc``: NCHW images -> last feature map.

    ``TorchResNet("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512))`` is ResNet-50's feature
    extractor with torchvision's keys; :meth:`from_spec` takes anything with ``block``,
    ``blocks_per_stage``, ``widths`` and ``stem_width`` (e.g. our ``ResNetSpec``).
    """

    def __init__(
        self, block: str, blocks_per_stage: Sequence[int], widths: Sequence[int], stem_width=64
    ):
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        block_cls = tv_resnet.BasicBlock if block == "basic" else tv_resnet.Bottleneck
        self.conv1 = nn.Conv2d(3, stem_width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = stem_width
        for stage, (num_blocks, planes) in enumerate(zip(blocks_per_stage, widths, strict=True)):
            blocks = []
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                out_channels = planes * block_cls.expansion
                downsample = None
                if stride != 1 or in_channels != out_channels:
                    downsample = nn.Sequential(
                        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                        nn.BatchNorm2d(out_channels),
                    )
                blocks.append(block_cls(in_channels, planes, stride, downsample))
                in_channels = out_channels
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.out_channels = in_channels
        # torchvision's init: Kaiming normal (fan_out, relu) convs, BatchNorm 1 / 0.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @classmethod
    def from_spec(cls, spec) -> TorchResNet:
        return cls(spec.block, spec.blocks_per_stage, spec.widths, spec.stem_width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> ``[N, C_b, H / 2^(1 + stages), W / 2^(1 + stages)]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return x


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random conv weights and random BatchNorm affine parameters *and running statistics*
    (a fresh model's are 0 / 1, which would hide a converter that mixes them up); returns
    the module in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d):
                fan_in = sub.weight[0].numel()
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator) / fan_in**0.5)
            elif isinstance(sub, nn.BatchNorm2d):
                shape = sub.weight.shape
                sub.weight.copy_(1 + 0.2 * torch.randn(shape, generator=generator))
                sub.bias.copy_(0.2 * torch.randn(shape, generator=generator))
                sub.running_mean.copy_(0.2 * torch.randn(shape, generator=generator))
                sub.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
    return module.eval()


# --------------------------------------------------------------------------- network


class TorchProtoMask(nn.Module):
    """ProtoMask over B images of K views, with the reference's state_dict (module docstring).

    Args:
      backbone: a feature extractor with an ``out_channels`` attribute (:class:`TorchResNet`).
      num_classes: C.
      prototypes_per_class: ppc; P = C * ppc, prototype j belongs to class j // ppc.
      prototype_dim: D.
      similarity_eps: eps of the log similarity.
      class_weights: ``[C]`` cross-entropy weights kept in ``classification_loss_fn`` as the
        reference does (default: all 1).
      incorrect_strength: last-layer init for connections to other classes.
      reference_style: run the add-on as a 1x1 conv before pooling, the distances as
        convolutions, and check for NaN with a host sync on every forward, as the reference
        does.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        prototypes_per_class: int,
        prototype_dim: int,
        similarity_eps: float = 1e-4,
        *,
        class_weights: torch.Tensor | None = None,
        incorrect_strength: float = 0.0,
        reference_style: bool = False,
    ):
        super().__init__()
        num_prototypes = num_classes * prototypes_per_class
        self.backbone = backbone
        self.add_on_layers = nn.Sequential(nn.Conv2d(backbone.out_channels, prototype_dim, 1))
        self.prototype_vectors = nn.Parameter(torch.rand(num_prototypes, prototype_dim, 1, 1))
        prototype_class = torch.arange(num_prototypes) // prototypes_per_class
        self.register_buffer("prototype_class", prototype_class, persistent=False)
        self.last_layer = nn.Linear(num_prototypes, num_classes, bias=False)
        with torch.no_grad():
            own_class = F.one_hot(prototype_class, num_classes).T.float()  # [C, P]
            self.last_layer.weight.copy_(own_class + (1 - own_class) * incorrect_strength)
        if class_weights is None:
            class_weights = torch.ones(num_classes)
        self.classification_loss_fn = nn.CrossEntropyLoss(weight=class_weights.float())
        self.num_classes = num_classes
        self.prototypes_per_class = prototypes_per_class
        self.similarity_eps = similarity_eps
        self.reference_style = reference_style

    @property
    def prototypes(self) -> torch.Tensor:
        """``[P, D]`` view of ``prototype_vectors``."""
        return self.prototype_vectors.flatten(1)

    def embed(self, views: torch.Tensor) -> torch.Tensor:
        """``[N, 3, V, V]`` normalised views -> ``[N, D]`` float32 embeddings in (0, 1).

        Under autocast the backbone runs in bf16; pooling, the add-on and everything after
        run in float32, as in the JAX model.
        """
        features = self.backbone(views)
        add_on = self.add_on_layers[0]
        with torch.autocast(views.device.type, enabled=False):
            if self.reference_style:
                projected = add_on(features.float())  # [N, D, h, w]: 1x1 conv per pixel
                return torch.sigmoid(F.adaptive_avg_pool2d(projected, 1).flatten(1))
            pooled = features.float().mean(dim=(2, 3))
            return torch.sigmoid(F.linear(pooled, add_on.weight.flatten(1), add_on.bias))

    def distances(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` -> squared L2 distances ``[N, P]`` to the prototypes, float32."""
        if self.reference_style:
            # quanproto's L2SquaredConv2d: three convolutions on the 1x1 map, then a NaN
            # check whose Python `if` waits for the device on every forward.
            z = embeddings[:, :, None, None]
            p = self.prototype_vectors
            z_sq = F.conv2d(z * z, torch.ones_like(p))
            cross = F.conv2d(z, p)
            p_sq = (p * p).sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
            distances = F.relu(z_sq - 2 * cross + p_sq).flatten(1)
            if torch.isnan(distances).any():
                raise ValueError("NaN in the prototype distances")
            return distances
        prototypes = self.prototypes
        z_sq = (embeddings * embeddings).sum(dim=1, keepdim=True)
        p_sq = (prototypes * prototypes).sum(dim=1)
        return (z_sq - 2 * embeddings @ prototypes.T + p_sq).clamp_min(0)

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, K, 3, V, V]`` normalised views -> ``(logits [B, C], min_distances [B, P])``,
        float32."""
        batch, num_views = views.shape[:2]
        embeddings = self.embed(views.flatten(0, 1))
        with torch.autocast(views.device.type, enabled=False):
            view_distances = self.distances(embeddings).view(batch, num_views, -1)
            min_distances = view_distances.min(dim=1).values
            eps = self.similarity_eps
            similarity = torch.log1p((1 - eps) / (min_distances + eps))
            return self.last_layer(similarity), min_distances


# --------------------------------------------------------------------------- views


def crop_views(canvas: torch.Tensor, boxes: torch.Tensor, view_size: int) -> torch.Tensor:
    """Bilinear crop-and-resize of K boxes per canvas, then ImageNet normalisation.

    Args:
      canvas: ``uint8 [B, S, S, 3]`` on the device.
      boxes: ``float32 [B, K, 4]`` yxyx normalised to the canvas (half-open pixel edges).
      view_size: V.

    Returns:
      ``float32 [B * K, 3, V, V]``, image-major.
    """
    batch, canvas_size = canvas.shape[0], canvas.shape[1]
    num_views = boxes.shape[1]
    images = canvas.permute(0, 3, 1, 2).float()
    yxyx = boxes.reshape(-1, 4).float() * canvas_size
    image_index = torch.arange(batch, device=canvas.device, dtype=yxyx.dtype)
    image_index = image_index.repeat_interleave(num_views)[:, None]
    rois = torch.cat([image_index, yxyx[:, [1, 0, 3, 2]]], dim=1)  # (index, x0, y0, x1, y1)
    crops = roi_align(images, rois, view_size, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    mean = torch.tensor(IMAGENET_MEAN, device=canvas.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=canvas.device).view(1, 3, 1, 1) * 255
    return (crops - mean) / std


# --------------------------------------------------------------------------- loss


def _safe_norm(squared: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 (not NaN) where ``squared`` is 0 (the diagonal pairs)."""
    positive = squared > 0
    return torch.where(positive, torch.where(positive, squared, 1.0).sqrt(), 0.0)


def joint_loss(
    model: TorchProtoMask,
    logits: torch.Tensor,
    min_distances: torch.Tensor,
    labels: torch.Tensor,
    coefficients: LossCoefficients,
) -> torch.Tensor:
    """``ce * CE + cluster * clst - separation * sep + diversity * div`` (docs/reference.md §4).

    The cross-entropy is weighted by ``model.classification_loss_fn.weight`` (mean reduction
    ``sum w_y nll / sum w_y``); the diversity term reads ``model``'s prototypes.

    Args:
      model: the network that produced ``logits`` and ``min_distances``.
      logits: ``[B, C]``.
      min_distances: ``[B, P]``.
      labels: ``[B]`` int64.
      coefficients: the loss weights.

    Returns:
      Scalar float32.
    """
    ce = F.cross_entropy(logits.float(), labels, weight=model.classification_loss_fn.weight)
    own = model.prototype_class[None, :] == labels[:, None]
    cluster = min_distances.masked_fill(~own, float("inf")).min(dim=1).values.mean()
    separation = min_distances.masked_fill(own, float("inf")).min(dim=1).values.mean()
    per_class = model.prototypes.unflatten(0, (-1, model.prototypes_per_class))  # [C, ppc, D]
    members = per_class[labels]  # [B, ppc, D]
    squared = (members[:, :, None, :] - members[:, None, :, :]).square().sum(dim=-1)
    spread = _safe_norm(squared).sum(dim=(1, 2))
    diversity = torch.exp(-_DIVERSITY_SCALE * spread).mean()
    return (
        coefficients.ce * ce
        + coefficients.cluster * cluster
        - coefficients.separation * separation
        + coefficients.diversity * diversity
    )


# --------------------------------------------------------------------------- train step


@dataclasses.dataclass(frozen=True)
class BackendFlags:
    """cuDNN / cuBLAS switches a variant runs under (they only matter on CUDA).

    Attributes:
      allow_tf32: TF32 tensor cores for float32 convolutions and matmuls.
      cudnn_benchmark: autotune convolution algorithms for the (fixed) shapes, what a
        careful user sets for fixed-shape training (XLA autotunes by default).
      cudnn_deterministic: deterministic algorithms only (the reference sets this).
    """

    allow_tf32: bool
    cudnn_benchmark: bool
    cudnn_deterministic: bool


# The reference sets float32 matmul precision "high" (TF32) and cudnn deterministic mode
# (docs/reference.md §5.1); the other variants are tuned and keep float32 exact.
VARIANT_FLAGS = {
    "eager_fp32": BackendFlags(False, True, False),
    "eager_amp_bf16": BackendFlags(False, True, False),
    "compile_amp_bf16": BackendFlags(False, True, False),
    "reference_style_fp32": BackendFlags(True, False, True),
}


@contextlib.contextmanager
def backend_flags(flags: BackendFlags) -> Iterator[None]:
    """Sets the cuDNN/cuBLAS switches for the block and restores them after."""
    cudnn = torch.backends.cudnn
    matmul = torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark, cudnn.deterministic)
    cudnn.allow_tf32 = matmul.allow_tf32 = flags.allow_tf32
    cudnn.benchmark = flags.cudnn_benchmark
    cudnn.deterministic = flags.cudnn_deterministic
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark, cudnn.deterministic = saved


class TrainStep:
    """One joint-phase training step: crop on the device, forward, loss, backward, Adam.

    Variants (``VARIANTS``):
      ``eager_fp32``: float32, NCHW, no autocast.
      ``eager_amp_bf16``: ``torch.autocast(bfloat16)`` with channels-last model and views.
      ``compile_amp_bf16``: the AMP variant with crop + forward + loss under
        ``torch.compile`` (the backward follows through AOTAutograd; Adam is fused).
      ``reference_style_fp32``: the model must be built with ``reference_style=True``;
        float32 with TF32 and deterministic cuDNN, as the reference runs.

    Each call runs under the variant's :data:`VARIANT_FLAGS`.

    Args:
      model: the network (moved to ``device``; channels-last for the AMP variants).
      variant: one of ``VARIANTS``.
      view_size: V.
      learning_rates: Adam learning rates per group; the last layer is frozen.
      coefficients: loss weights (the cross-entropy weights are the model's
        ``classification_loss_fn.weight``).
      device: torch device.
    """

    def __init__(
        self,
        model: TorchProtoMask,
        variant: str,
        *,
        view_size: int,
        learning_rates: JointLearningRates,
        coefficients: LossCoefficients,
        device: torch.device,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"Unknown torch variant {variant!r}; choose one of {VARIANTS}")
        if model.reference_style != (variant == "reference_style_fp32"):
            raise ValueError(
                f"Variant {variant!r} needs a model built with "
                f"reference_style={variant == 'reference_style_fp32'}"
            )
        self.variant = variant
        self.amp = variant in ("eager_amp_bf16", "compile_amp_bf16")
        self.memory_format = torch.channels_last if self.amp else torch.contiguous_format
        self.model = model.to(device=device, memory_format=self.memory_format).train()
        self.model.last_layer.weight.requires_grad_(False)
        self.view_size = view_size
        self.coefficients = coefficients
        self.device = device
        self.optimizer = torch.optim.Adam(
            [
                {"params": list(model.backbone.parameters()), "lr": learning_rates.backbone},
                {"params": list(model.add_on_layers.parameters()), "lr": learning_rates.add_on},
                {"params": [model.prototype_vectors], "lr": learning_rates.prototypes},
            ],
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=0.0,
            # The reference uses fused Adam; the fused kernel also exists for the CPU.
            fused=True,
        )
        self.forward_loss = (
            torch.compile(self._forward_loss)
            if variant == "compile_amp_bf16"
            else self._forward_loss
        )

    def _forward_loss(
        self, canvas: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        views = crop_views(canvas, boxes, self.view_size)
        views = views.contiguous(memory_format=self.memory_format).unflatten(0, boxes.shape[:2])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits, min_distances = self.model(views)
        return joint_loss(self.model, logits, min_distances, labels, self.coefficients)

    def __call__(
        self, canvas: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Runs one step; returns the loss *before* the update (a device scalar, no sync).

        Args:
          canvas: ``uint8 [B, S, S, 3]`` on the device.
          boxes: ``float32 [B, K, 4]`` normalised yxyx.
          labels: ``int64 [B]``.
        """
        with backend_flags(VARIANT_FLAGS[self.variant]):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.forward_loss(canvas, boxes, labels)
            loss.backward()
            self.optimizer.step()
        return loss.detach()
