"""Prototype relevance propagation (PRP): which pixels of its winning view make a prototype match.

PRP is layer-wise relevance propagation started at the prototype layer; every evaluation of
the reference explains a prototype this way (docs/reference.md §6, §7.7; our account of the
rules: docs/prp.md). Data flow for B images of K views (V x V), J prototypes per image::

    model --canonize--> CanonicalProtoMask (pytree: BatchNorm folded into the convolutions)
    views [B, K, V, V, 3] --forward of B*K views--> z [B, K, D] --similarity to p_j-->
        winning_view [B, J] (argmax over K, first on ties)
    winning views [B*J, V, V, 3] --jax.vjp of the forward below, cotangent R_z [B*J, D]
        (the prototype rule)--> input relevance [B*J, V, V, 3]
        --sum over RGB, ReLU--> relevance [B, J, V, V]
    paste_into_frame(relevance, boxes [B, J, 4], R) -> [B, J, R, R] (image frame)

The forward is the reference's canonized network: each conv carries its BatchNorm folded in,
followed by a reset BatchNorm (inference mode, mean 0, var 1: it multiplies by
1/sqrt(1 + eps)); the add-on applies its 1x1 conv to every pixel, then averages, then the
sigmoid. Every layer's backward is an LRP rule (a ``jax.custom_vjp``), so one vjp gives the
relevance of all B*J pairs at once. Everything runs in float32 at HIGHEST precision.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from protomask_jax.data.views import IMAGENET_MEAN, IMAGENET_STD
from protomask_jax.models import protomask as model_lib

_HIGHEST = jax.lax.Precision.HIGHEST
SUM_EPS = 1e-6  # residual sums and the add-on's average pool (signed epsilon rule)
ZBETA_EPS = 1e-6  # the input convolution's z-beta rule
ZERO_EPS = 1e-12  # z+ rule: added only where the denominator is exactly 0
PROTOTYPE_EPS = 1e-12
SIMILARITY_EPS = 1e-14  # the reference's log-similarity, which picks the winning view
# z-beta bounds: the lowest and highest value a normalised pixel can take, over all channels.
_MEAN, _STD = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
PIXEL_LOW = float(np.float32(np.min(-_MEAN / _STD)))
PIXEL_HIGH = float(np.float32(np.max((1 - _MEAN) / _STD)))
# Frame edges computed from float32 boxes carry ~1e-5 px of rounding; within this of a
# half-integer they are taken as the exact tie the reference sees in integer pixels.
_TIE_TOLERANCE = 1e-4

PrototypeRule = Literal["reference", "channelwise"]


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["kernel", "bias"], meta_fields=["stride"]
)
@dataclasses.dataclass(frozen=True)
class FusedConv:
    """A convolution with its BatchNorm folded in: ``kernel [kh, kw, I, O]``, ``bias [O]``,
    torch's padding ``kh // 2``."""

    kernel: jax.Array
    bias: jax.Array
    stride: int


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["stem", "blocks", "add_on_kernel", "add_on_bias", "prototypes"],
    meta_fields=["bn_gain"],
)
@dataclasses.dataclass(frozen=True)
class CanonicalProtoMask:
    """The network PRP runs on. ``blocks``: per residual block ``(main-branch convs, shortcut
    conv or None)``; ``add_on_kernel [C_b, D]``; ``prototypes [P, D]``; ``bn_gain`` =
    1/sqrt(1 + eps), what each reset BatchNorm multiplies by."""

    stem: FusedConv
    blocks: tuple[tuple[tuple[FusedConv, ...], FusedConv | None], ...]
    add_on_kernel: jax.Array
    add_on_bias: jax.Array
    prototypes: jax.Array
    bn_gain: float


ModelLike = model_lib.ProtoMask | tuple | CanonicalProtoMask


def canonize(model: ModelLike) -> CanonicalProtoMask:
    """Folds every BatchNorm (inference statistics) into the conv before it.

    Args:
      model: a :class:`~protomask_jax.models.protomask.ProtoMask`, the tuple of
        ``model_lib.split_model``, or an already canonical model (returned as is).
    """
    if isinstance(model, CanonicalProtoMask):
        return model
    if isinstance(model, tuple):
        model = nnx.merge(*model)
    backbone = model.backbone

    def fuse(conv, bn) -> FusedConv:
        # The reference's arithmetic, in its order: w / sqrt(var + eps), (0 - mean) * g + b.
        gain = bn.scale[...] / jnp.sqrt(bn.var[...] + bn.epsilon)
        stride = conv.strides if isinstance(conv.strides, int) else conv.strides[0]
        bias = (0.0 - bn.mean[...]) * gain + bn.bias[...]
        return FusedConv(conv.kernel[...].astype(jnp.float32) * gain, bias, int(stride))

    blocks = []
    for stage in backbone.stages:
        for block in stage:
            names = ("1", "2", "3") if hasattr(block, "conv3") else ("1", "2")
            convs = tuple(fuse(getattr(block, "conv" + n), getattr(block, "bn" + n)) for n in names)
            shortcut = None if block.downsample is None else fuse(*block.downsample)
            blocks.append((convs, shortcut))
    return CanonicalProtoMask(
        stem=fuse(backbone.conv1, backbone.bn1),
        blocks=tuple(blocks),
        add_on_kernel=model.add_on.kernel[...],
        add_on_bias=model.add_on.bias[...],
        prototypes=model.prototypes[...],
        bn_gain=float(np.float32(1.0 / np.sqrt(1.0 + backbone.bn1.epsilon))),
    )


# --------------------------------------------------------------------------- rules


def _conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST,
    )  # fmt: skip


def _conv_transpose(relevance: jax.Array, input_shape, kernel: jax.Array, stride: int):
    """The transpose of ``_conv(., kernel)`` applied to ``relevance`` (the input gradient)."""
    conv = functools.partial(_conv, kernel=kernel, stride=stride)
    primal = jax.ShapeDtypeStruct(input_shape, relevance.dtype)
    (out,) = jax.linear_transpose(conv, primal)(relevance)
    return out


def _safe_divide(numerator, denominator, eps_at_zero: float, eps_signed: float):
    """The reference's division: ``eps_at_zero`` only where the denominator is exactly 0,
    ``eps_signed`` pushes it away from 0 on its own side."""
    return numerator / (
        denominator + eps_at_zero * (denominator == 0) + eps_signed * jnp.sign(denominator)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def zplus_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int) -> jax.Array:
    """Conv + bias; backward: the z+ rule (beta = 0, bias ignored).

    ``R_in = x * W+^T (R / z+)`` with ``z+ = W+ x``. The reference's rule also has a
    ``W- x-`` term; every input here is post-ReLU (x >= 0), where that term is exactly 0.
    """
    return _conv(x, kernel, stride) + bias


def _conv_fwd(x, kernel, bias, stride):
    return _conv(x, kernel, stride) + bias, (x, kernel)


def _zplus_bwd(stride, residuals, relevance):
    x, kernel = residuals
    positive = jnp.maximum(kernel, 0.0)
    ratio = _safe_divide(relevance, _conv(x, positive, stride), ZERO_EPS, 0.0)
    return x * _conv_transpose(ratio, x.shape, positive, stride), None, None


zplus_conv.defvjp(_conv_fwd, _zplus_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def zbeta_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int) -> jax.Array:
    """Conv + bias on normalised pixels; backward: the z-beta rule with the pixel bounds
    (PIXEL_LOW, PIXEL_HIGH), bias ignored, signed epsilon ZBETA_EPS."""
    return _conv(x, kernel, stride) + bias


def _zbeta_bwd(stride, residuals, relevance):
    x, kernel = residuals
    positive, negative = jnp.maximum(kernel, 0.0), jnp.minimum(kernel, 0.0)
    # Constant bound images, zero-padded by the conv like any input (borders see less).
    low = jnp.full((1, *x.shape[1:]), PIXEL_LOW, x.dtype)
    high = jnp.full((1, *x.shape[1:]), PIXEL_HIGH, x.dtype)
    z = _conv(x, kernel, stride) - _conv(low, positive, stride) - _conv(high, negative, stride)
    ratio = _safe_divide(relevance, z, ZBETA_EPS, ZBETA_EPS)
    # Three transposed convs as one: the kernels side by side along the input channels.
    stacked = jnp.concatenate([kernel, positive, negative], axis=2)
    grads = _conv_transpose(ratio, (*x.shape[:-1], 3 * x.shape[-1]), stacked, stride)
    g, g_pos, g_neg = jnp.split(grads, 3, axis=-1)
    return x * g + low * -g_pos + high * -g_neg, None, None


zbeta_conv.defvjp(_conv_fwd, _zbeta_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def pass_through(fn, x: jax.Array) -> jax.Array:
    """``fn(x)``; backward: relevance passes unchanged (ReLU, sigmoid, reset BatchNorm)."""
    return fn(x)


pass_through.defvjp(lambda fn, x: (fn(x), None), lambda fn, _, relevance: (relevance,))


@jax.custom_vjp
def eps_sum(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a + b``; backward: the epsilon rule, ``R_a = a R / (a + b +- SUM_EPS)``."""
    return a + b


def _eps_sum_bwd(residuals, relevance):
    a, b = residuals
    ratio = _safe_divide(relevance, a + b, SUM_EPS, SUM_EPS)
    return a * ratio, b * ratio


eps_sum.defvjp(lambda a, b: (a + b, (a, b)), _eps_sum_bwd)


@jax.custom_vjp
def eps_mean(a: jax.Array) -> jax.Array:
    """Average over the spatial axes ``[N, h, w, C] -> [N, C]``; backward: the epsilon rule,
    ``R_a = a R / (h w (mean +- SUM_EPS))``."""
    return jnp.mean(a, axis=(1, 2))


def _eps_mean_bwd(a, relevance):
    ratio = _safe_divide(relevance, jnp.mean(a, axis=(1, 2)), SUM_EPS, SUM_EPS)
    return (a * (ratio / (a.shape[1] * a.shape[2]))[:, None, None, :],)


eps_mean.defvjp(lambda a: (eps_mean(a), a), _eps_mean_bwd)


def prototype_relevance(z: jax.Array, prototypes: jax.Array, rule: PrototypeRule = "reference"):
    """Relevance of each embedding channel for the prototype, ``[N, D], [N, D] -> [N, D]``.

    With ``d(a, b) = 1 / ((z_b - p_a)^2 + eps)``:

    * ``"reference"``: what the reference computes for 1x1 embeddings, where its broadcasting
      pairs every channel b of z with every channel a of p:
      ``R_a = sum_b d(a, b) / (sum_a' d(a', b) + 2 eps)``; the total is ~D (docs/prp.md).
    * ``"channelwise"``: the per-channel rule it was written for,
      ``R_c = d(c, c) / (sum_c' d(c', c') + 2 eps)``; the total is ~1.
    """
    if rule == "channelwise":
        d = 1.0 / (jnp.square(z - prototypes) + PROTOTYPE_EPS)
        return d / (jnp.sum(d, axis=-1, keepdims=True) + PROTOTYPE_EPS + PROTOTYPE_EPS)
    if rule != "reference":
        raise ValueError(f"prototype_rule must be 'reference' or 'channelwise', got {rule!r}")
    d = 1.0 / (jnp.square(z[:, None, :] - prototypes[:, :, None]) + PROTOTYPE_EPS)  # [N, a, b]
    denominator = jnp.sum(d, axis=1, keepdims=True) + PROTOTYPE_EPS + PROTOTYPE_EPS
    return jnp.sum(d / denominator, axis=2)


# --------------------------------------------------------------------------- network


def _reset_bn(x: jax.Array, gain: float) -> jax.Array:
    return pass_through(functools.partial(jnp.multiply, gain), x)


def _relu(x: jax.Array) -> jax.Array:
    return pass_through(jax.nn.relu, x)


def _max_pool(x: jax.Array) -> jax.Array:
    """MaxPool2d(3, 2, padding 1); its plain gradient is the reference's rule (winner takes
    all, first maximum on ties)."""
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    )


def _fused(conv: FusedConv, x: jax.Array, gain: float) -> jax.Array:
    return _reset_bn(zplus_conv(x, conv.kernel, conv.bias, conv.stride), gain)


def embed(model: CanonicalProtoMask, views: jax.Array) -> jax.Array:
    """The canonized forward ``[N, V, V, 3] -> z [N, D]``, every layer carrying its rule."""
    gain = model.bn_gain
    stem = model.stem
    x = _relu(_reset_bn(zbeta_conv(views, stem.kernel, stem.bias, stem.stride), gain))
    x = _max_pool(x)
    for convs, downsample in model.blocks:
        y = x
        for index, conv in enumerate(convs):
            y = _fused(conv, y, gain)
            if index < len(convs) - 1:
                y = _relu(y)
        shortcut = x if downsample is None else _fused(downsample, x, gain)
        x = _relu(eps_sum(y, shortcut))
    # The reference's add-on order: 1x1 conv on every pixel, average pool, sigmoid.
    per_pixel = zplus_conv(x, model.add_on_kernel[None, None], model.add_on_bias, 1)
    return pass_through(jax.nn.sigmoid, eps_mean(per_pixel))


def input_relevance(
    model: CanonicalProtoMask,
    views: jax.Array,
    prototypes: jax.Array,
    prototype_rule: PrototypeRule = "reference",
) -> jax.Array:
    """Signed pixel relevance ``[N, V, V, 3]`` of prototype vector ``prototypes[n]`` ``[N, D]``
    on view ``views[n]`` ``[N, V, V, 3]``: one vjp for all N pairs."""
    z, pullback = jax.vjp(functools.partial(embed, model), views.astype(jnp.float32))
    (relevance,) = pullback(prototype_relevance(z, prototypes, prototype_rule))
    return relevance


def _gather_prototypes(prototypes: jax.Array, ids: jax.Array) -> jax.Array:
    """``prototypes[ids]`` as an exact one-hot product (x * 1 plus zeros): unlike an indexing
    gather it needs no output sharding when ``ids`` is sharded over an explicit mesh axis."""
    one_hot = jax.nn.one_hot(ids, prototypes.shape[0], dtype=prototypes.dtype)
    return jnp.einsum("...p,pd->...d", one_hot, prototypes, precision=_HIGHEST)


def winning_views(
    model: CanonicalProtoMask,
    views: jax.Array,
    prototype_ids: jax.Array,
    valid: jax.Array | None = None,
) -> jax.Array:
    """``[B, J]`` int32: for each requested prototype the view of highest similarity, from the
    canonized forward of all ``[B, K]`` views (the reference's choice; first on ties)."""
    batch, num_views = views.shape[:2]
    flat = views.reshape(batch * num_views, *views.shape[2:]).astype(jnp.float32)
    z = embed(model, flat).reshape(batch, num_views, -1)  # [B, K, D]
    p = _gather_prototypes(model.prototypes, prototype_ids)  # [B, J, D]
    cross = jnp.einsum("bkd,bjd->bkj", z, p, precision=_HIGHEST)
    z_sq = jnp.sum(jnp.square(z), axis=-1)[:, :, None]
    p_sq = jnp.sum(jnp.square(p), axis=-1)[:, None, :]
    distances = jax.nn.relu(z_sq - 2.0 * cross + p_sq)
    similarity = jnp.log((1.0 + distances) / (distances + SIMILARITY_EPS))
    if valid is not None:
        similarity = jnp.where(valid[:, :, None], similarity, -jnp.inf)
    return jnp.argmax(similarity, axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("prototype_rule",))
def _relevance_maps(model, views, prototype_ids, valid, prototype_rule):
    batch, num_prototypes = prototype_ids.shape
    winners = winning_views(model, views, prototype_ids, valid)
    one_hot = jax.nn.one_hot(winners, views.shape[1], dtype=jnp.float32)  # [B, J, K]
    chosen = jnp.einsum("bjk,bk...->bj...", one_hot, views.astype(jnp.float32), precision=_HIGHEST)
    relevance = input_relevance(
        model,
        chosen.reshape(batch * num_prototypes, *views.shape[2:]),
        _gather_prototypes(model.prototypes, prototype_ids).reshape(batch * num_prototypes, -1),
        prototype_rule,
    )
    maps = jax.nn.relu(jnp.sum(relevance, axis=-1))
    return maps.reshape(batch, num_prototypes, *maps.shape[1:]), winners


def relevance_maps(
    model: ModelLike,
    views: jax.Array,
    prototype_ids: jax.Array,
    valid: jax.Array | None = None,
    *,
    prototype_rule: PrototypeRule = "reference",
) -> tuple[jax.Array, jax.Array]:
    """PRP maps of prototypes ``prototype_ids [B, J]`` on their winning views, in one jit.

    Args:
      model: a ProtoMask, its ``split_model`` tuple or :func:`canonize`'s result (canonize
        once when calling for many batches).
      views: ``[B, K, V, V, 3]`` normalised views without augmentation, best in float32
        (``views.make_views(..., dtype=jnp.float32)``); other dtypes are upcast.
      prototype_ids: ``[B, J]`` int.
      valid: optional ``[B, K]`` bool; False views never win.
      prototype_rule: see :func:`prototype_relevance`.

    Returns:
      ``(relevance [B, J, V, V] float32 >= 0 in the view frame, winning_view [B, J] int32)``.
    """
    return _relevance_maps(canonize(model), views, prototype_ids, valid, prototype_rule)


# --------------------------------------------------------------------------- image frame


def _round_edge(value: jax.Array) -> jax.Array:
    """Python's round (half to even), taking values within _TIE_TOLERANCE of a tie as a tie."""
    half = jnp.floor(value) + 0.5
    value = jnp.where(jnp.abs(value - half) < _TIE_TOLERANCE, half, value)
    return jnp.round(value).astype(jnp.int32)


def _axis_sampling(start, stop, frame_size: int, view_size: int):
    """Per frame pixel along one axis ``[B, J, R]``: the two view pixels torch's bilinear
    resize (align_corners=False) reads and their weights, zero outside the box."""
    first = _round_edge(start * frame_size)[..., None]
    length = _round_edge((stop - start) * frame_size)[..., None]
    offset = jnp.arange(frame_size, dtype=jnp.int32) - first
    inside = (offset >= 0) & (offset < length)
    scale = view_size / jnp.maximum(length, 1).astype(jnp.float32)
    source = jnp.maximum(scale * (offset.astype(jnp.float32) + 0.5) - 0.5, 0.0)
    low = jnp.clip(jnp.floor(source).astype(jnp.int32), 0, view_size - 1)
    high_weight = jnp.clip(source - low, 0.0, 1.0)
    high = jnp.minimum(low + 1, view_size - 1)
    return low, high, jnp.where(inside, 1.0 - high_weight, 0.0), jnp.where(inside, high_weight, 0.0)


@functools.partial(jax.jit, static_argnames=("frame_size",))
def paste_into_frame(relevance: jax.Array, boxes: jax.Array, frame_size: int) -> jax.Array:
    """Maps view-frame relevance back into the image: the reference's ``invert_cropping``.

    The box ``(y0, x0, y1, x1)`` (normalised to the image, half-open) covers frame rows
    ``round(y0 R) .. round(y0 R) + round((y1 - y0) R)`` (Python rounding, clipped to the
    frame); the map is resized to that size bilinearly (torch ``align_corners=False``) and
    placed there, zero elsewhere. Computed per frame pixel, so shapes stay fixed.

    Args:
      relevance: ``[B, J, V, V]``.
      boxes: ``[B, J, 4]`` the box of each map's view.
      frame_size: R.

    Returns:
      ``[B, J, R, R]`` float32.
    """
    relevance = relevance.astype(jnp.float32)
    boxes = boxes.astype(jnp.float32)
    rows = _axis_sampling(boxes[..., 0], boxes[..., 2], frame_size, relevance.shape[-2])
    cols = _axis_sampling(boxes[..., 1], boxes[..., 3], frame_size, relevance.shape[-1])

    def columns(index):
        return jnp.take_along_axis(relevance, index[..., None, :], axis=-1)

    # Width first, then height: torch's order of the four products.
    across = columns(cols[0]) * cols[2][..., None, :] + columns(cols[1]) * cols[3][..., None, :]

    def rows_of(index):
        return jnp.take_along_axis(across, index[..., :, None], axis=-2)

    return rows_of(rows[0]) * rows[2][..., :, None] + rows_of(rows[1]) * rows[3][..., :, None]
