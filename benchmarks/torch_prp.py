"""The reference's PRP algorithm in PyTorch, written for this project: the comparison point of
``benchmarks/prp.py`` and the independent check of ``protomask_jax.prp`` in the tests.

It follows the reference's explanation code (docs/reference.md §6) step by step, as a user
of that code runs it:

* ``CanonicalTorchProtoMask`` is built from a quanproto-layout ProtoMask ``state_dict``
  (``backbone.*`` with torchvision names, ``add_on_layers.0.*``, ``prototype_vectors``):
  every BatchNorm is folded into the conv before it and replaced by a reset BatchNorm in
  inference mode (a gain of 1/sqrt(1 + eps)); the add-on is the 1x1 conv on every pixel,
  then the average pool, then the sigmoid. NCHW, float32.
* Each layer is a ``torch.autograd.Function`` whose backward is its LRP rule (z-beta on the
  input conv, z+ on the other convs with the general ``W+ x+ + W- x-`` form, signed epsilon on
  residual sums and the pool, pass-through for ReLU, sigmoid and the reset BatchNorm, the plain
  max-pool gradient).
* ``relevance_map``: per (image, prototype): forward the image's K views without gradients,
  pick the view of highest log-similarity, forward that one view with gradients, start the
  backward from the prototype rule, sum the input relevance over RGB, ReLU. ``saliency_maps``
  loops over images and prototypes, K + 1 backbone passes per pair, as the reference does.
* ``paste``: resize the map to the box's size in the R x R frame (``F.interpolate``, bilinear,
  ``align_corners=False``) and copy it into a zero frame at the box's origin, with Python's
  rounding of the box edges.

``random_state_dict`` makes a quanproto-layout state_dict with random weights and randomised
BatchNorm statistics for any ResNet shape. Nothing here imports jax.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIXEL_LOW = min(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
PIXEL_HIGH = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
SUM_EPS = 1e-6
ZBETA_EPS = 1e-6
ZERO_EPS = 1e-12
PROTOTYPE_EPS = 1e-12
SIMILARITY_EPS = 1e-14


def _safe_divide(numerator, denominator, eps_at_zero: float, eps_signed: float):
    bump = eps_at_zero * (denominator == 0).to(denominator.dtype)
    return numerator / (denominator + bump + eps_signed * denominator.sign())


def _input_grad(shape, weight, grad, stride, padding):
    return torch.nn.grad.conv2d_input(shape, weight, grad, stride=stride, padding=padding)


class _ZPlusConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, relevance):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.geometry
        x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        z = F.conv2d(x_pos, w_pos, None, stride, padding) + F.conv2d(
            x_neg, w_neg, None, stride, padding
        )
        ratio = _safe_divide(relevance, z, ZERO_EPS, 0.0)
        out = x_pos * _input_grad(x.shape, w_pos, ratio, stride, padding)
        out = out + x_neg * _input_grad(x.shape, w_neg, ratio, stride, padding)
        return out, None, None, None, None


class _ZBetaConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, relevance):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.geometry
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        # The bounds as float32 tensors, as the reference stores them.
        low = torch.full_like(x, float(torch.tensor(PIXEL_LOW, dtype=torch.float32)))
        high = torch.full_like(x, float(torch.tensor(PIXEL_HIGH, dtype=torch.float32)))
        z = (
            F.conv2d(x, weight, None, stride, padding)
            - F.conv2d(low, w_pos, None, stride, padding)
            - F.conv2d(high, w_neg, None, stride, padding)
        )
        ratio = _safe_divide(relevance, z, ZBETA_EPS, ZBETA_EPS)
        out = x * _input_grad(x.shape, weight, ratio, stride, padding)
        out = out - low * _input_grad(x.shape, w_pos, ratio, stride, padding)
        out = out - high * _input_grad(x.shape, w_neg, ratio, stride, padding)
        return out, None, None, None, None


class _PassThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, relevance):
        return relevance, None


class _EpsSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a + b

    @staticmethod
    def backward(ctx, relevance):
        a, b = ctx.saved_tensors
        ratio = _safe_divide(relevance, a + b, SUM_EPS, SUM_EPS)
        return a * ratio, b * ratio


class _EpsMean(torch.autograd.Function):
    """Average pool to 1x1 (``[N, C, h, w] -> [N, C, 1, 1]``) with the epsilon rule."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a.mean(dim=(2, 3), keepdim=True)

    @staticmethod
    def backward(ctx, relevance):
        (a,) = ctx.saved_tensors
        ratio = _safe_divide(relevance, a.mean(dim=(2, 3), keepdim=True), SUM_EPS, SUM_EPS)
        return a * (ratio / (a.shape[2] * a.shape[3]))


def prototype_relevance(z: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    """The reference's relevance at the prototype layer for 1x1 embeddings ``z [N, D]``,
    ``prototype [N, D]``: its broadcasting pairs channel b of z with channel a of p,
    ``R_a = sum_b d(a, b) / (sum_a' d(a', b) + 2 eps)``, ``d(a, b) = 1/((z_b - p_a)^2 + eps)``."""
    d = 1.0 / ((z[:, None, :] - prototype[:, :, None]) ** 2 + PROTOTYPE_EPS)
    denominator = d.sum(dim=1, keepdim=True) + PROTOTYPE_EPS + PROTOTYPE_EPS
    return (d / denominator).sum(dim=2)


class CanonicalTorchProtoMask:
    """The canonized ProtoMask (BatchNorm folded, LRP rules attached) from a state_dict."""

    def __init__(
        self,
        state_dict: Mapping[str, object],
        *,
        bn_eps: float = 1e-5,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        """``dtype=torch.float64`` gives a rounding-free yardstick for float32 results."""
        sd = {
            k: torch.as_tensor(np.asarray(v)).to(device=device, dtype=dtype)
            for k, v in state_dict.items()
        }
        self.bn_gain = 1.0 / math.sqrt(1.0 + bn_eps)

        def fuse(conv: str, bn: str, stride: int):
            weight = sd[f"{conv}.weight"]
            gain = sd[f"{bn}.weight"] / (sd[f"{bn}.running_var"] + bn_eps) ** 0.5
            bias = (0 - sd[f"{bn}.running_mean"]) * gain + sd[f"{bn}.bias"]
            return weight * gain.reshape(-1, 1, 1, 1), bias, stride, weight.shape[-1] // 2

        self.stem = fuse("backbone.conv1", "backbone.bn1", 2)
        self.blocks = []
        stage = 1
        while f"backbone.layer{stage}.0.conv1.weight" in sd:
            index = 0
            while f"backbone.layer{stage}.{index}.conv1.weight" in sd:
                name = f"backbone.layer{stage}.{index}"
                stride = 2 if stage > 1 and index == 0 else 1
                bottleneck = f"{name}.conv3.weight" in sd
                strides = (1, stride, 1) if bottleneck else (stride, 1)
                convs = [
                    fuse(f"{name}.conv{n}", f"{name}.bn{n}", s)
                    for n, s in zip((1, 2, 3), strides, strict=False)
                ]
                shortcut = None
                if f"{name}.downsample.0.weight" in sd:
                    shortcut = fuse(f"{name}.downsample.0", f"{name}.downsample.1", stride)
                self.blocks.append((convs, shortcut))
                index += 1
            stage += 1
        self.add_on_weight = sd["add_on_layers.0.weight"]
        self.add_on_bias = sd["add_on_layers.0.bias"]
        self.prototypes = sd["prototype_vectors"][:, :, 0, 0]

    def _reset_bn(self, x):
        return _PassThrough.apply(x, lambda t: t * self.bn_gain)

    def _conv_bn(self, conv, x):
        return self._reset_bn(_ZPlusConv.apply(x, *conv))

    def embed(self, views: torch.Tensor) -> torch.Tensor:
        """``[N, 3, V, V]`` normalised views -> ``z [N, D]``."""
        x = _ZBetaConv.apply(views, *self.stem)
        x = _PassThrough.apply(self._reset_bn(x), F.relu)
        x = F.max_pool2d(x, 3, 2, 1)
        for convs, shortcut in self.blocks:
            y = x
            for index, conv in enumerate(convs):
                y = self._conv_bn(conv, y)
                if index < len(convs) - 1:
                    y = _PassThrough.apply(y, F.relu)
            identity = x if shortcut is None else self._conv_bn(shortcut, x)
            x = _PassThrough.apply(_EpsSum.apply(y, identity), F.relu)
        x = _ZPlusConv.apply(x, self.add_on_weight, self.add_on_bias, 1, 0)
        x = _PassThrough.apply(_EpsMean.apply(x), torch.sigmoid)
        return x[:, :, 0, 0]

    def relevance_map(self, views: torch.Tensor, prototype_index: int) -> tuple[torch.Tensor, int]:
        """One image's K views ``[K, 3, V, V]`` -> ``(map [V, V], winning view)``."""
        prototype = self.prototypes[prototype_index][None]
        with torch.no_grad():
            z = self.embed(views)
            distances = F.relu((z**2).sum(1) - 2 * (z @ prototype[0]) + (prototype**2).sum())
            similarity = torch.log((1 + distances) / (distances + SIMILARITY_EPS))
            winner = int(torch.max(similarity, dim=0)[1])
        view = views[winner : winner + 1].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            z = self.embed(view)
            z.backward(prototype_relevance(z.detach(), prototype))
        return F.relu(view.grad[0].sum(0)), winner

    def saliency_maps(
        self,
        views: torch.Tensor,
        prototype_ids: Sequence[Sequence[int]],
        boxes: np.ndarray | None = None,
        frame_size: int | None = None,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """``views [B, K, 3, V, V]``, ``prototype_ids [B][J]`` -> ``(maps [B, J, V, V] or, with
        ``boxes [B, K, 4]`` (normalised yxyx) and ``frame_size``, [B, J, R, R]; winners [B, J])``.
        """
        maps, winners = [], []
        for b, ids in enumerate(prototype_ids):
            row, row_winners = [], []
            for j in ids:
                relevance, winner = self.relevance_map(views[b], int(j))
                if boxes is not None:
                    relevance = paste(relevance, boxes[b][winner], frame_size)
                row.append(relevance)
                row_winners.append(winner)
            maps.append(torch.stack(row))
            winners.append(row_winners)
        return torch.stack(maps), np.asarray(winners, np.int32)


def paste(relevance: torch.Tensor, box: Sequence[float], frame_size: int) -> torch.Tensor:
    """Resize ``[V, V]`` into the box (normalised yxyx) of an ``R x R`` frame, zero elsewhere."""
    y0, x0, y1, x1 = (float(v) for v in box)
    top, left = round(y0 * frame_size), round(x0 * frame_size)
    height, width = round((y1 - y0) * frame_size), round((x1 - x0) * frame_size)
    frame = torch.zeros(frame_size, frame_size, dtype=torch.float32, device=relevance.device)
    if height == 0 or width == 0:
        return frame
    resized = F.interpolate(
        relevance[None, None], size=(height, width), mode="bilinear", align_corners=False
    )[0, 0]
    bottom, right = min(top + height, frame_size), min(left + width, frame_size)
    frame[top:bottom, left:right] = resized[: bottom - top, : right - left]
    return frame


def random_state_dict(
    block: str,
    blocks_per_stage: Sequence[int],
    widths: Sequence[int],
    *,
    stem_width: int = 64,
    prototype_dim: int,
    num_prototypes: int,
    num_classes: int,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A quanproto-layout ProtoMask state_dict (numpy float32): He-normal convs, BatchNorm
    affine and running statistics drawn around their defaults, torch-default add-on,
    prototypes U[0, 1), last layer from the class identity."""
    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}

    def conv(name: str, out_c: int, in_c: int, k: int) -> None:
        sd[f"{name}.weight"] = rng.normal(0, math.sqrt(2 / (k * k * out_c)), (out_c, in_c, k, k))

    def bn(name: str, c: int) -> None:
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c)
        sd[f"{name}.bias"] = rng.normal(0, 0.1, c)
        sd[f"{name}.running_mean"] = rng.normal(0, 0.2, c)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c)

    expansion = 4 if block == "bottleneck" else 1
    conv("backbone.conv1", stem_width, 3, 7)
    bn("backbone.bn1", stem_width)
    in_c = stem_width
    for stage, (count, planes) in enumerate(zip(blocks_per_stage, widths, strict=True)):
        for index in range(count):
            name = f"backbone.layer{stage + 1}.{index}"
            stride = 2 if stage > 0 and index == 0 else 1
            out_c = planes * expansion
            if block == "bottleneck":
                shapes = ((planes, in_c, 1), (planes, planes, 3), (out_c, planes, 1))
            else:
                shapes = ((planes, in_c, 3), (planes, planes, 3))
            for n, (o, i, k) in enumerate(shapes, start=1):
                conv(f"{name}.conv{n}", o, i, k)
                bn(f"{name}.bn{n}", o)
            if stride != 1 or in_c != out_c:
                conv(f"{name}.downsample.0", out_c, in_c, 1)
                bn(f"{name}.downsample.1", out_c)
            in_c = out_c
    bound = 1 / math.sqrt(in_c)
    sd["add_on_layers.0.weight"] = rng.uniform(-bound, bound, (prototype_dim, in_c, 1, 1))
    sd["add_on_layers.0.bias"] = rng.uniform(-bound, bound, prototype_dim)
    sd["prototype_vectors"] = rng.uniform(0, 1, (num_prototypes, prototype_dim, 1, 1))
    per_class = num_prototypes // num_classes
    identity = np.arange(num_prototypes) // per_class == np.arange(num_classes)[:, None]
    sd["last_layer.weight"] = identity.astype(np.float64)
    return {k: v.astype(np.float32) for k, v in sd.items()}


def to_nchw(views: np.ndarray) -> torch.Tensor:
    """``[..., V, V, 3]`` (our layout) -> ``[..., 3, V, V]`` float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(views), -1, -3)))
