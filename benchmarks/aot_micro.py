"""Alternatives for the parts of the CUB step on one v5e chip, compiled deviceless (no TPU):
does a known TPU rewrite lower the compiler's cycle estimate or the HBM traffic?

    python -m benchmarks.aot_micro            # -> benchmarks/results/aot_micro_v5e.json

Each experiment compiles small jitted functions (forward and backward, bfloat16 activations,
float32 BatchNorm arithmetic, as ``models/resnet.py``) for one chip of ``v5e:2x2`` at the
CUB step's 176 views per chip (16 images x 11), sums the optimised HLO's
``estimated_cycles`` and HBM traffic with ``benchmarks.aot.analyse_hlo``, and first checks
on the CPU that every variant computes what the baseline does:

- ``stem``: the 7 x 7 / 2 stem convolution as it is, against space-to-depth (the image
  folded 2 x 2 into 12 channels, a 4 x 4 / 1 convolution with the kernel rearranged: the
  MLPerf ResNet rewrite for 3-channel inputs); each with BatchNorm, ReLU and the max-pool,
  the pool as ``reduce_window`` or as a maximum of nine strided slices.
- ``batch_norm``: two stage-1 bottleneck blocks ([176, 56, 56, 256]) with BatchNorm
  differentiated by jax against a hand-written backward (``jax.custom_vjp``: two reductions,
  one elementwise pass).
- ``views_per_chip``: the same two blocks at 88 to 352 views per chip (8 to 32 images of
  11 views, and multiples of 64 and 128).
"""

from __future__ import annotations

from benchmarks import common

if __name__ == "__main__":
    common.use_deviceless_tpu()

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

VIEWS_PER_CHIP = 16 * 11
_NHWC = ("NHWC", "HWIO", "NHWC")


# ----------------------------------------------------------------------------- variants


def stem_conv(x, w):
    """torch's Conv2d(3, C, 7, stride=2, padding=3) on NHWC."""
    return jax.lax.conv_general_dilated(x, w, (2, 2), ((3, 3), (3, 3)), dimension_numbers=_NHWC)


def stem_conv_space_to_depth(x, w):
    """The same convolution on the image folded 2 x 2 into channels: with the input padded
    by 3 and the kernel by a zero eighth tap, tap ``k = 2a + b`` at output ``i`` reads
    padded pixel ``2(i + a) + b``, i.e. cell ``i + a``, phase ``b`` of the folded image."""
    n, h, width, c = x.shape
    padded = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
    hh, ww = (h + 6) // 2, (width + 6) // 2
    folded = padded.reshape(n, hh, 2, ww, 2, c).transpose(0, 1, 3, 2, 4, 5)
    folded = folded.reshape(n, hh, ww, 4 * c)
    out = w.shape[-1]
    kernel = jnp.pad(w, ((0, 1), (0, 1), (0, 0), (0, 0))).reshape(4, 2, 4, 2, c, out)
    kernel = kernel.transpose(0, 2, 1, 3, 4, 5).reshape(4, 4, 4 * c, out)
    return jax.lax.conv_general_dilated(folded, kernel, (1, 1), "VALID", dimension_numbers=_NHWC)


def max_pool(x):
    """torch's MaxPool2d(3, stride=2, padding=1), as ``models/resnet.py``."""
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    )


def max_pool_slices(x):
    """The same pool as the maximum of its nine strided windows' taps."""
    n, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    taps = [
        jax.lax.slice(padded, (0, i, j, 0), (n, i + h - 1, j + w - 1, c), (1, 2, 2, 1))
        for i in range(3)
        for j in range(3)
    ]
    out = taps[0]
    for tap in taps[1:]:
        out = jnp.maximum(out, tap)
    return out


def _statistics(x32):
    """Per-channel mean and reciprocal standard deviation, one pass as ``models/resnet``."""
    axes = tuple(range(x32.ndim - 1))
    mean = x32.mean(axes)
    var = jnp.maximum(jnp.square(x32).mean(axes) - jnp.square(mean), 0.0)
    return mean, jax.lax.rsqrt(var + 1e-5)


def batch_norm(x, scale, bias):
    """Training-mode BatchNorm as ``models/resnet.BatchNorm`` (float32 arithmetic)."""
    x32 = x.astype(jnp.float32)
    mean, rstd = _statistics(x32)
    multiplier = scale * rstd
    return (x32 * multiplier + (bias - mean * multiplier)).astype(x.dtype)


@jax.custom_vjp
def batch_norm_manual(x, scale, bias):
    return batch_norm(x, scale, bias)


def _bn_forward(x, scale, bias):
    x32 = x.astype(jnp.float32)
    mean, rstd = _statistics(x32)
    y = (x32 - mean) * (scale * rstd) + bias
    return y.astype(x.dtype), (x, mean, rstd, scale)


def _bn_backward(residuals, dy):
    x, mean, rstd, scale = residuals
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    dy32 = dy.astype(jnp.float32)
    normalised = (x.astype(jnp.float32) - mean) * rstd
    dbias = dy32.sum(axes)
    dscale = (dy32 * normalised).sum(axes)
    dx = (scale * rstd) * (dy32 - dbias / count - normalised * (dscale / count))
    return dx.astype(x.dtype), dscale, dbias


batch_norm_manual.defvjp(_bn_forward, _bn_backward)


def _conv(x, w):
    pad = w.shape[0] // 2
    return jax.lax.conv_general_dilated(
        x, w.astype(x.dtype), (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=_NHWC
    )


def bottlenecks(params, x, norm=batch_norm):
    """Stride-1 bottleneck blocks (1x1, 3x3, 1x1, identity shortcut), ReLU between."""
    for block in params:
        y = x
        for i, (w, scale, bias) in enumerate(block):
            y = norm(_conv(y, w), scale, bias)
            if i < len(block) - 1:
                y = jax.nn.relu(y)
        x = jax.nn.relu(y + x)
    return x


def stem(w, x, conv=stem_conv, pool=max_pool):
    y = conv(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    channels = y.shape[-1]
    return pool(jax.nn.relu(batch_norm(y, jnp.ones(channels), jnp.zeros(channels))))


def _weighted_sum(fn):
    """A scalar whose gradient reaches every output element with its own weight."""
    return lambda *args: jnp.sum(fn(*args[:-1]).astype(jnp.float32) * args[-1])


def bottleneck_shapes(blocks: int, channels: int = 256, planes: int = 64):
    return [
        [
            ((1, 1, channels, planes), planes),
            ((3, 3, planes, planes), planes),
            ((1, 1, planes, channels), channels),
        ]
        for _ in range(blocks)
    ]


# ----------------------------------------------------------------------------- checks


def check_equivalences(seed: int = 0) -> dict[str, float]:
    """Largest difference of each variant from its baseline on the CPU, float32, small
    shapes: the convolution and pool outputs, and the blocks' gradients (relative)."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32) * scale)

    image, kernel = normal(2, 32, 32, 3), normal(7, 7, 3, 8)
    conv = float(jnp.abs(stem_conv(image, kernel) - stem_conv_space_to_depth(image, kernel)).max())
    features = normal(2, 16, 16, 8)
    pool = float(jnp.abs(max_pool(features) - max_pool_slices(features)).max())
    params = [
        [
            (normal(*shape, scale=0.3), 1 + normal(c, scale=0.1), normal(c, scale=0.1))
            for shape, c in block
        ]
        for block in bottleneck_shapes(1, channels=8, planes=4)
    ]
    x, weights = normal(3, 6, 6, 8), normal(3, 6, 6, 8)
    grads = [
        jax.grad(_weighted_sum(lambda p, v, n=norm: bottlenecks(p, v, n)), argnums=(0, 1))(
            params, x, weights
        )
        for norm in (batch_norm, batch_norm_manual)
    ]
    bn = max(
        float(jnp.abs(a - b).max() / jnp.abs(a).max())
        for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True)
    )
    return {"stem_space_to_depth": conv, "max_pool_slices": pool, "batch_norm_manual_grad": bn}


# ----------------------------------------------------------------------------- compile


def _compile(fn, args, chip) -> dict:
    from benchmarks import aot

    start = time.perf_counter()
    hlo = aot.analyse_hlo(jax.jit(fn).lower(*args).compile().as_text())
    cycles = hlo["estimated_cycles"]
    uncosted = hlo["ops_without_estimate"]["bytes"]
    return {
        "estimated_cycles": cycles,
        "estimated_ms": 1e3 * (cycles / chip.clock_hz + uncosted / chip.hbm_bytes_per_s),
        "hbm_traffic_gb": hlo["hbm_traffic"]["bytes"] / 1e9,
        "cycles_by_category": hlo["cycles_by_category"],
        "compile_s": time.perf_counter() - start,
    }


def run(views: int = VIEWS_PER_CHIP) -> dict:
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    from benchmarks import aot

    device = topologies.get_topology_desc("v5e:2x2", "tpu").devices[0]
    chip = aot.CHIPS[device.device_kind]
    sharding = SingleDeviceSharding(device)

    def spec(shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def grad_of(fn, argnums=0):
        return jax.grad(_weighted_sum(fn), argnums=argnums)

    results: dict = {"equivalence_max_difference": check_equivalences()}
    stem_args = (spec((7, 7, 3, 64)), spec((views, 224, 224, 3), jnp.bfloat16),
                 spec((views, 56, 56, 64)))  # fmt: skip
    results["stem"] = {}
    for name, conv, pool in [
        ("baseline", stem_conv, max_pool),
        ("space_to_depth", stem_conv_space_to_depth, max_pool),
        ("pool_slices", stem_conv, max_pool_slices),
    ]:
        fn = grad_of(lambda w, x, c=conv, p=pool: stem(w, x, c, p))
        results["stem"][name] = _compile(fn, stem_args, chip)
        print(f"  stem/{name}: {results['stem'][name]['estimated_ms']:.2f} ms", flush=True)

    def block_args(n):
        params = [
            [(spec(shape), spec((c,)), spec((c,))) for shape, c in block]
            for block in bottleneck_shapes(2)
        ]
        return params, spec((n, 56, 56, 256), jnp.bfloat16), spec((n, 56, 56, 256))

    results["batch_norm"] = {}
    for name, norm in [("autodiff", batch_norm), ("custom_vjp", batch_norm_manual)]:
        fn = grad_of(lambda p, x, n=norm: bottlenecks(p, x, n), argnums=(0, 1))
        results["batch_norm"][name] = _compile(fn, block_args(views), chip)
        print(f"  batch_norm/{name}: {results['batch_norm'][name]['estimated_ms']:.2f} ms")

    results["views_per_chip"] = {}
    for n in (88, 128, views, 192, 256, 264, 352):
        fn = grad_of(lambda p, x: bottlenecks(p, x), argnums=(0, 1))
        r = _compile(fn, block_args(n), chip)
        r["estimated_ms_per_view"] = r["estimated_ms"] / n
        results["views_per_chip"][str(n)] = r
        print(f"  views_per_chip/{n}: {r['estimated_ms_per_view'] * 1e3:.1f} us per view")
    return {
        "benchmark": "aot_micro",
        "topology": "v5e:2x2 (one chip)",
        "chip": chip.name,
        "views_per_chip": views,
        **results,
        "environment": {
            "jax": jax.__version__,
            "libtpu": aot._libtpu_version(),
            "git": common.git_revision(),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/aot_micro_v5e.json"))
    args = parser.parse_args(argv)
    common.write_json(args.out, run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
