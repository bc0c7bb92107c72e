"""ResNet backbones in flax.nnx with torchvision's module tree, so that importing ImageNet
(or ProtoPNet/quanproto) weights is a renaming (``models/convert.py``)::

    torchvision key                      our state path
    conv1.weight        [O, I, kh, kw]   conv1/kernel           [kh, kw, I, O]
    bn1.weight / bias                    bn1/scale / bias
    bn1.running_mean / running_var       bn1/mean / var         (nnx.BatchStat)
    layer2.0.conv1.weight                layer2/0/conv1/kernel
    layer2.0.downsample.0.weight         layer2/0/downsample/0/kernel

Images are NHWC; the network returns the last feature map, in ``compute_dtype`` (e.g.
bfloat16; parameters and BatchNorm statistics stay float32). Padding is symmetric as in
torch; ``'SAME'`` pads asymmetrically on stride 2 and would shift every feature map by a
pixel against torch, breaking weight import."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", relu): an
# untruncated normal with variance 2 / (kh * kw * out_channels).
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
    """``block``: ``"basic"`` (two 3x3 convs: ResNet-18/34) or ``"bottleneck"`` (1x1, 3x3
    with the stride — torchvision's "v1.5" —, 1x1 expanding by 4: ResNet-50/101/152);
    ``widths``: planes per stage (the output has ``widths[-1] * expansion`` channels)."""

    block: Literal["basic", "bottleneck"]
    blocks_per_stage: tuple[int, ...]
    widths: tuple[int, ...]
    stem_width: int = 64

    def __post_init__(self):
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(
                f"ResNetSpec.block must be 'basic' or 'bottleneck', got {self.block!r}"
            )
        if len(self.blocks_per_stage) != len(self.widths) or not self.widths:
            raise ValueError(
                "ResNetSpec needs one width per stage: got blocks_per_stage="
                f"{self.blocks_per_stage} and widths={self.widths}"
            )

    @property
    def expansion(self) -> int:
        return 1 if self.block == "basic" else 4

    @property
    def out_channels(self) -> int:
        return self.widths[-1] * self.expansion


RESNET_PRESETS: dict[str, ResNetSpec] = {
    "resnet18": ResNetSpec("basic", (2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet34": ResNetSpec("basic", (3, 4, 6, 3), (64, 128, 256, 512)),
    "resnet50": ResNetSpec("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512)),
    "resnet101": ResNetSpec("bottleneck", (3, 4, 23, 3), (64, 128, 256, 512)),
    "resnet152": ResNetSpec("bottleneck", (3, 8, 36, 3), (64, 128, 256, 512)),
    # CPU demo: 64x64 views -> stem /4 -> 16x16, then 8x8, 4x4 (stays off the XLA:CPU
    # slow path for 2x2 maps).
    "resnet_tiny": ResNetSpec("basic", (1, 1, 1), (16, 32, 64), stem_width=16),
    "resnet_micro": ResNetSpec("basic", (1, 1), (8, 16), stem_width=8),  # fast unit tests
}


def resnet_spec(name_or_spec: str | ResNetSpec) -> ResNetSpec:
    if isinstance(name_or_spec, ResNetSpec):
        return name_or_spec
    if name_or_spec not in RESNET_PRESETS:
        raise ValueError(
            f"Unknown backbone {name_or_spec!r}; model.backbone must be one of "
            f"{sorted(RESNET_PRESETS)}"
        )
    return RESNET_PRESETS[name_or_spec]


# Unlike nnx.BatchNorm, on purpose: the running variance takes the unbiased batch variance
# (n / (n - 1)), as torch's does; and all arithmetic is float32, only the output is cast to
# the activation dtype, as cuDNN's BatchNorm under torch autocast. nnx.BatchNorm(dtype=bf16)
# normalises in bfloat16, backward pass included, where the batch-statistics terms nearly
# cancel the direct term. Inside XLA's fusions the float32 math moves no extra bytes (H100,
# ResNet-50 bf16 step on 176 views, two alternating runs: 35.1 -> 35.2, 32.2 -> 34.5 ms).
class BatchNorm(nnx.Module):
    """torch's BatchNorm over the channel axis: ``scale``, ``bias``, ``mean``, ``var`` are
    torch's ``weight``, ``bias``, ``running_mean``, ``running_var``."""

    def __init__(self, num_features: int, *, momentum: float = 0.9, epsilon: float = 1e-5):
        # momentum in flax's convention: new = momentum * old + (1 - momentum) * batch,
        # so 0.9 is torch's 0.1.
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.momentum = momentum
        self.epsilon = epsilon

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """``train``: batch statistics, running averages updated (torch's ``train()``)."""
        x32 = x.astype(jnp.float32)
        if train:
            reduce_axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axis=reduce_axes)
            # One pass E[x^2] - E[x]^2 in float32 (as nnx.BatchNorm); rounding can make it
            # slightly negative.
            var = jnp.maximum(jnp.mean(jnp.square(x32), axis=reduce_axes) - jnp.square(mean), 0.0)
            count = x.size // x.shape[-1]
            unbiased_var = var * (count / max(count - 1, 1))
            self.mean[...] = jax.lax.stop_gradient(
                self.momentum * self.mean[...] + (1.0 - self.momentum) * mean
            )
            self.var[...] = jax.lax.stop_gradient(
                self.momentum * self.var[...] + (1.0 - self.momentum) * unbiased_var
            )
        else:
            mean, var = self.mean[...], self.var[...]
        multiplier = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
        shift = self.bias[...] - mean * multiplier
        return (x32 * multiplier + shift).astype(x.dtype)


def _conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """Bias-free conv with torch's symmetric padding ``kernel_size // 2``."""
    pad = kernel_size // 2
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_CONV_INIT,
        rngs=rngs,
    )


class _ResidualBlock(nnx.Module):
    """``conv1``/``bn1``, ``conv2``/``bn2``, ... (ReLU between) plus the shortcut, which is
    torchvision's ``downsample = [conv1x1, BatchNorm]`` when the shape changes.
    ``kernel_sizes`` gives each conv; the stride sits on the first 3x3."""

    expansion: int
    kernel_sizes: tuple[int, ...]

    def __init__(
        self, in_channels: int, planes: int, stride: int, dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        out_channels = planes * self.expansion
        channels, strided = in_channels, self.kernel_sizes.index(3)
        for i, kernel_size in enumerate(self.kernel_sizes):
            width = out_channels if i == len(self.kernel_sizes) - 1 else planes
            conv = _conv(channels, width, kernel_size, stride if i == strided else 1, dtype, rngs)
            setattr(self, f"conv{i + 1}", conv)
            setattr(self, f"bn{i + 1}", BatchNorm(width))
            channels = width
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nnx.List(
                [_conv(in_channels, out_channels, 1, stride, dtype, rngs), BatchNorm(out_channels)]
            )
        self.downsample = downsample

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = x
        for i in range(1, len(self.kernel_sizes) + 1):
            if i > 1:
                y = jax.nn.relu(y)
            y = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(y), train=train)
        shortcut = x
        if self.downsample is not None:
            conv, bn = self.downsample
            shortcut = bn(conv(x), train=train)
        return jax.nn.relu(y + shortcut)


class BasicBlock(_ResidualBlock):
    expansion = 1
    kernel_sizes = (3, 3)


class Bottleneck(_ResidualBlock):
    expansion = 4
    kernel_sizes = (1, 3, 1)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch's MaxPool2d(3, stride=2, padding=1): padded cells are -inf, never selected."""
    return jax.lax.reduce_window(
        x,
        -jnp.inf,
        jax.lax.max,
        window_dimensions=(1, 3, 3, 1),
        window_strides=(1, 2, 2, 1),
        padding=((0, 0), (1, 1), (1, 1), (0, 0)),
    )


# "blocks": recompute each residual block's activations in the backward pass (the compiled
# CUB joint step: +22 % FLOPs, 25 % less memory per chip; docs/tpu.md).
REMAT_POLICIES = ("none", "blocks")


class ResNet(nnx.Module):
    """Stem (``conv1``, ``bn1``, max-pool), then ``layer1`` .. ``layerN`` (``nnx.List`` of
    blocks); ``[N, H, W, 3]`` images -> ``[N, H / 2^(1 + N), W / 2^(1 + N), out_channels]``
    in ``compute_dtype`` (224 -> 7 for the four-stage presets)."""

    def __init__(
        self,
        spec: str | ResNetSpec,
        *,
        compute_dtype: jnp.dtype | str = jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"ResNet: remat must be one of {REMAT_POLICIES}, got {remat!r}")
        self.remat = remat
        self.spec = resnet_spec(spec)
        self.compute_dtype = jnp.dtype(compute_dtype)
        block_cls = BasicBlock if self.spec.block == "basic" else Bottleneck
        self.conv1 = _conv(3, self.spec.stem_width, 7, 2, self.compute_dtype, rngs)
        self.bn1 = BatchNorm(self.spec.stem_width)
        in_channels = self.spec.stem_width
        for stage, (num_blocks, planes) in enumerate(
            zip(self.spec.blocks_per_stage, self.spec.widths, strict=True)
        ):
            blocks = []
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(block_cls(in_channels, planes, stride, self.compute_dtype, rngs))
                in_channels = planes * block_cls.expansion
            setattr(self, f"layer{stage + 1}", nnx.List(blocks))
        self.out_channels = in_channels

    @property
    def stages(self) -> list[nnx.List]:
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.spec.widths))]

    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        x = images.astype(self.compute_dtype)
        x = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        x = _max_pool_3x3_s2(x)
        for stage in self.stages:
            for block in stage:
                if self.remat == "blocks":
                    x = _rematerialised(block, x, train)
                else:
                    x = block(x, train=train)
        return x


def _rematerialised(block: nnx.Module, x: jax.Array, train: bool) -> jax.Array:
    """``block(x)`` under ``jax.checkpoint``: differentiated, only the block's input is kept
    and its inner activations are recomputed in the backward pass (forward-only calls are
    unchanged). Functional split/merge, so the BatchNorm statistics update crosses it."""
    graphdef, state = nnx.split(block)

    def run(state, x):
        module = nnx.merge(graphdef, state, copy=True)  # Variables owned by this trace
        return module(x, train=train), nnx.state(module)

    y, state = jax.checkpoint(run)(state, x)
    nnx.update(block, state)
    return y
