"""Training-step throughput: our jitted JAX joint-phase step against the same model in PyTorch.

One process, one device, the same shapes and the same device-resident synthetic batches
(``uint8`` canvases + K boxes per image) for every variant::

    PYTHONUNBUFFERED=1 python -m benchmarks.train_step --shape cub   # GPU: ResNet-50, paper shape
    python -m benchmarks.train_step --shape cpu                      # CPU: ResNet-18, small views

Variants
  jax_fp32              ``protomask_jax.steps.make_train_step`` in float32 at
                        ``precision=highest`` (no TF32), no augmentation;
  jax_bf16              the same step with bfloat16 activations (f32 parameters, f32 head and
                        loss), no augmentation — the like-for-like comparison with torch;
  jax_bf16_aug          ``jax_bf16`` plus the on-device augmentation (flip, rotation, shear,
                        perspective, colour jitter), as training runs it;
  torch_eager_fp32      PyTorch float32, TF32 off, NCHW;
  torch_eager_amp_bf16  ``torch.autocast(bfloat16)`` + channels-last;
  torch_compile_amp_bf16  the AMP variant under ``torch.compile`` (first call = compile time);
  torch_reference_style_fp32  quanproto's forward as it is (1x1 add-on conv on the feature map
                        before pooling, NaN check with a host sync every forward) in float32
                        with TF32 on, as the reference sets it. Shows what the reference's
                        forward costs; not part of the headline.

Every step: crop the K views from the canvas on the device, backbone over B*K views, add-on,
prototype distances, min over views, losses (CE + cluster - separation + diversity), backward,
Adam on backbone + add-on + prototypes (last layer frozen) — the optimizer is applied every
step (``train.accumulate_steps = 1``) on both sides. The torch side has no augmentation.

Before timing, ``jax_fp32`` and ``torch_eager_fp32`` start from the same weights (exported
from the torch model, imported with ``protomask_jax.models.convert``) and run two steps on the
same batch: the loss before and after one Adam update must agree within the tolerances below
(BatchNorm in training mode on both sides). The check is recorded in the JSON. Its batch has
smooth canvases (``parity_batch``): on pixel noise, float32 rounding of the sampling
coordinates (~1e-5 px on a 448 canvas) changes views by up to 3e-4 and, through ResNet-50,
the loss by 4e-5 relative — crop arithmetic, not the model; on smooth canvases the two
sides agree to 3e-6 at the CUB shape.

Output: ``benchmarks/results/train_step_<shape>_<device>.json`` and a ``.png`` bar plot.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common
from protomask_jax import phases as phases_lib
from protomask_jax import steps as steps_lib
from protomask_jax.models import convert
from protomask_jax.models import protomask as model_lib
from protomask_jax.models.resnet import ResNetSpec, resnet_spec

JAX_VARIANTS = ("jax_fp32", "jax_bf16", "jax_bf16_aug")
TORCH_VARIANTS = (
    "torch_eager_fp32",
    "torch_eager_amp_bf16",
    "torch_compile_amp_bf16",
    "torch_reference_style_fp32",
)
ALL_VARIANTS = JAX_VARIANTS + TORCH_VARIANTS
# The order variants are timed in: the float32 pair (parity), then the headline pair.
TIMING_ORDER = (
    "jax_fp32",
    "torch_eager_fp32",
    "jax_bf16",
    "torch_eager_amp_bf16",
    "torch_compile_amp_bf16",
    "jax_bf16_aug",
    "torch_reference_style_fp32",
)
# The like-for-like pair of the headline: bf16 activations, no augmentation on either side.
HEADLINE_JAX_VARIANT = "jax_bf16"
# Loss agreement of jax_fp32 and torch_eager_fp32 on the same weights and batch, relative to
# the loss: before any update (pure forward: float32 summation order only) and after one Adam
# step (Adam's first step moves every weight by ~lr * sign(grad), so tiny gradients whose sign
# is decided by rounding move in different directions; the loss still agrees closely).
PARITY_RTOL_BEFORE_UPDATE = 1e-4
PARITY_RTOL_AFTER_UPDATE = 1e-3
# CUB-200 training split: only sets the (unused here) length of the StepLR schedule.
_NUM_TRAIN_IMAGES = 5994


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark shape.

    Attributes:
      backbone: ``model.backbone`` preset.
      batch_size: B images per step.
      num_views: K views per image.
      canvas_size: S (canvas side, pixels).
      view_size: V (view side, pixels).
      prototype_dim: D.
      prototypes_per_class: ppc (P = C * ppc).
      num_classes: C.
      warmup: untimed steps before timing.
      steps: timed steps (per timing method).
    """

    backbone: str
    batch_size: int
    num_views: int
    canvas_size: int
    view_size: int
    prototype_dim: int
    prototypes_per_class: int
    num_classes: int
    warmup: int
    steps: int


SHAPES = {
    # The paper's CUB-200 setting (docs/reference.md §11): 16 images x 11 SAM2 views of 224^2.
    "cub": Shape("resnet50", 16, 11, 448, 224, 1280, 10, 200, warmup=5, steps=20),
    # Seconds per step on a 2-core CPU; the last feature map is 4x4 (off the XLA CPU cliff).
    "cpu": Shape("resnet18", 4, 4, 256, 128, 128, 10, 10, warmup=5, steps=10),
    # For tests: runs end to end in a few seconds.
    "micro": Shape("resnet_micro", 2, 2, 64, 32, 16, 2, 3, warmup=1, steps=2),
}


# --------------------------------------------------------------------------- config, data


def make_config(shape: Shape, compute_dtype: str) -> Any:
    """The project's base config with the benchmark shape filled in."""
    config = common.base_config()
    config.model.backbone = shape.backbone
    config.model.prototype_dim = shape.prototype_dim
    config.model.prototypes_per_class = shape.prototypes_per_class
    config.model.compute_dtype = compute_dtype
    config.dataset.num_classes = shape.num_classes
    config.input.batch_size = shape.batch_size
    config.input.num_views = shape.num_views
    config.input.canvas_size = shape.canvas_size
    config.input.view_size = shape.view_size
    # The torch step updates every batch; so does ours here.
    config.train.accumulate_steps = 1
    config.train.warmup_epochs = 0
    return config


def synthetic_batches(shape: Shape, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Random canvases, boxes and labels.

    Boxes are at least V pixels wide and high, so that roi_align's sampling grid equals
    make_views' exactly (see ``torch_protomask``); the compute does not depend on box sizes.

    Returns:
      ``count`` dicts with ``canvas uint8 [B, S, S, 3]``, ``boxes float32 [B, K, 4]``
      (normalised yxyx) and ``label int32 [B]``.
    """
    rng = np.random.default_rng(seed)
    b, k, s = shape.batch_size, shape.num_views, shape.canvas_size
    batches = []
    for _ in range(count):
        side = rng.uniform(shape.view_size / s, 1.0, (b, k, 2))
        start = rng.uniform(0.0, 1.0 - side)
        boxes = np.concatenate([start, start + side], axis=-1).astype(np.float32)
        batches.append(
            {
                "canvas": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
                "boxes": boxes,
                "label": rng.integers(0, shape.num_classes, (b,)).astype(np.int32),
            }
        )
    return batches


def parity_batch(shape: Shape, seed: int) -> dict[str, np.ndarray]:
    """A batch like ``synthetic_batches``' but with smooth canvases: 14 x 14 noise upsampled
    bilinearly to S x S, so sub-pixel differences in where the two crops sample do not
    masquerade as model differences (see the module docstring)."""
    import torch

    (batch,) = synthetic_batches(shape, 1, seed)
    small = np.random.default_rng(seed).uniform(0, 255, (shape.batch_size, 3, 14, 14))
    canvas = torch.nn.functional.interpolate(
        torch.from_numpy(small.astype(np.float32)),
        size=(shape.canvas_size, shape.canvas_size),
        mode="bilinear",
        align_corners=False,
    )
    batch["canvas"] = canvas.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return batch


# --------------------------------------------------------------------------- FLOPs


def resnet_forward_flops(spec: ResNetSpec, image_size: int) -> int:
    """Multiply-adds x 2 of the ResNet's convolutions for one square image (BatchNorm,
    ReLU, pooling and residual adds are left out: well under 1 % for ResNet-50)."""

    def out_size(size: int, stride: int) -> int:
        return (size - 1) // stride + 1  # every conv/pool here pads to keep ceil(size/stride)

    def conv(size: int, c_in: int, c_out: int, kernel: int) -> int:
        return 2 * size * size * c_in * c_out * kernel * kernel

    size = out_size(image_size, 2)
    flops = conv(size, 3, spec.stem_width, 7)
    size = out_size(size, 2)  # max-pool
    in_channels = spec.stem_width
    for stage, (num_blocks, planes) in enumerate(
        zip(spec.blocks_per_stage, spec.widths, strict=True)
    ):
        for index in range(num_blocks):
            stride = 2 if stage > 0 and index == 0 else 1
            out_channels = planes * spec.expansion
            new_size = out_size(size, stride)
            if spec.block == "basic":
                flops += conv(new_size, in_channels, planes, 3) + conv(new_size, planes, planes, 3)
            else:
                flops += conv(size, in_channels, planes, 1)
                flops += conv(new_size, planes, planes, 3) + conv(new_size, planes, out_channels, 1)
            if stride != 1 or in_channels != out_channels:
                flops += conv(new_size, in_channels, out_channels, 1)
            size, in_channels = new_size, out_channels
    return flops


def analytic_step_flops(shape: Shape) -> dict[str, float]:
    """Model FLOPs of one training step: 3 x forward (backward ~ 2 x forward)."""
    spec = resnet_spec(shape.backbone)
    views = shape.batch_size * shape.num_views
    num_prototypes = shape.num_classes * shape.prototypes_per_class
    backbone = resnet_forward_flops(spec, shape.view_size) * views
    head = views * (2 * spec.out_channels * shape.prototype_dim) + views * (
        2 * shape.prototype_dim * num_prototypes
    )
    head += shape.batch_size * 2 * num_prototypes * shape.num_classes
    forward = backbone + head
    return {
        "backbone_forward_per_view": backbone / views,
        "forward_per_step": float(forward),
        "train_step": float(3 * forward),
    }


# --------------------------------------------------------------------------- JAX


def _joint_phase(config: Any) -> phases_lib.Phase:
    (joint,) = [
        phase
        for phase in phases_lib.plan_phases(config, _NUM_TRAIN_IMAGES)
        if phase.name == phases_lib.JOINT
    ]
    return joint


def make_jax_step(
    config: Any,
    shape: Shape,
    *,
    augment: bool,
    torch_weights: dict[str, np.ndarray] | None = None,
) -> tuple[steps_lib.TrainState, Any]:
    """The product's joint-phase train step and its initial state (on the host).

    Args:
      config: from :func:`make_config`.
      shape: the benchmark shape.
      augment: on-device augmentation as configured (``input.augment``), or none.
      torch_weights: quanproto-layout weights to start from (imported with
        ``protomask_jax.models.convert``); None keeps the model's random init.

    Returns:
      ``(state, step)`` with ``step(state, batch, class_weights) -> (state, metrics)``
      from ``steps.make_train_step`` (not jitted).
    """
    model = model_lib.build_model(config, shape.num_classes, nnx.Rngs(params=0))
    if torch_weights is not None:
        imported, _ = convert.protomask_state_from_torch(torch_weights, model)
        nnx.update(model, imported)
    graphdef, params, batch_stats, constants = model_lib.split_model(model)
    joint = _joint_phase(config)
    tx = phases_lib.make_optimizer(joint)
    step_config = steps_lib.StepConfig.from_config(config, shape.prototypes_per_class)
    if not augment:
        step_config = dataclasses.replace(step_config, augment=None)
    state = steps_lib.TrainState(
        jnp.zeros((), jnp.int32), params, batch_stats, constants, tx.init(params)
    )
    return state, steps_lib.make_train_step(graphdef, joint, tx, step_config)


class JaxVariant:
    """One JAX variant: the product's joint-phase step, jitted with the state donated.

    Args:
      variant: one of ``JAX_VARIANTS``.
      shape: the benchmark shape.
      torch_weights: quanproto-layout weights (numpy) every variant starts from; None keeps
        the model's random init.
      batches: host batches (placed on the device here).
      class_weights: ``[C]`` cross-entropy weights.
    """

    def __init__(
        self,
        variant: str,
        shape: Shape,
        torch_weights: dict[str, np.ndarray] | None,
        batches: list[dict[str, np.ndarray]],
        class_weights: np.ndarray,
    ):
        self.variant = variant
        self.shape = shape
        self.fp32 = variant == "jax_fp32"
        self.augment = variant == "jax_bf16_aug"
        config = make_config(shape, "float32" if self.fp32 else "bfloat16")
        state, step_fn = make_jax_step(
            config, shape, augment=self.augment, torch_weights=torch_weights
        )
        self.device = jax.devices()[0]
        self.state = jax.device_put(state, self.device)
        self.batches = [jax.device_put(batch, self.device) for batch in batches]
        self.class_weights = jax.device_put(jnp.asarray(class_weights), self.device)
        jitted = jax.jit(step_fn, donate_argnums=0)
        # fp32 means fp32: no TF32 in convolutions and matmuls (as torch_eager_fp32).
        with jax.default_matmul_precision("highest" if self.fp32 else "default"):
            with common.stopwatch() as lower_time:
                lowered = jitted.lower(self.state, self.batches[0], self.class_weights)
            with common.stopwatch() as compile_time:
                self.compiled = lowered.compile()
        self.lower_s = lower_time["seconds"]
        self.compile_s = compile_time["seconds"]

    def step(self, batch_index: int) -> jax.Array:
        """Runs one step on batch ``batch_index % 2``; returns the loss (not synchronised)."""
        self.state, metrics = self.compiled(
            self.state, self.batches[batch_index % len(self.batches)], self.class_weights
        )
        return metrics["loss"]

    def parity_losses(self, batch: dict[str, np.ndarray]) -> list[float]:
        """Loss before and after one update, both on ``batch``."""
        placed = jax.device_put(batch, self.device)
        losses = []
        for _ in range(2):
            self.state, metrics = self.compiled(self.state, placed, self.class_weights)
            losses.append(float(metrics["loss"]))
        return losses

    def measure(self) -> dict[str, Any]:
        """Times the step and returns the variant's figures."""
        timing = common.time_steps(
            self.step, jax.block_until_ready, self.shape.warmup, self.shape.steps
        )
        memory = self.compiled.memory_analysis()
        stats = self.device.memory_stats() or {}
        return {
            "framework": "jax",
            "precision": (
                "float32 (matmul precision highest: no TF32)" if self.fp32 else "bfloat16"
            ),
            "augmentation": self.augment,
            "lower_s": self.lower_s,
            "compile_s": self.compile_s,
            "timing": timing,
            "xla_flops_per_step": _cost_flops(self.compiled),
            "peak_memory_bytes": _xla_peak_bytes(memory),
            "peak_memory_source": (
                "XLA memory analysis of the compiled step: arguments + outputs - donated "
                "(aliased) + temporaries"
            ),
            "process_peak_bytes_in_use": stats.get("peak_bytes_in_use"),
            "final_loss": float(self.step(0)),
        }


def _cost_flops(compiled: Any) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def _xla_peak_bytes(memory: Any) -> int | None:
    if memory is None:
        return None
    return int(
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )


# --------------------------------------------------------------------------- torch


def torch_model(shape: Shape, *, reference_style: bool = False, class_weights: Any = None) -> Any:
    """The PyTorch ProtoMask (``benchmarks.torch_protomask.TorchProtoMask``) of ``shape``,
    with torch's current random state; ``class_weights`` is a ``[C]`` tensor or None."""
    from benchmarks import torch_protomask as tp

    return tp.TorchProtoMask(
        tp.TorchResNet.from_spec(resnet_spec(shape.backbone)),
        shape.num_classes,
        shape.prototypes_per_class,
        shape.prototype_dim,
        make_config(shape, "float32").model.similarity_eps,
        class_weights=class_weights,
        reference_style=reference_style,
    )


class TorchVariant:
    """One PyTorch variant of ``benchmarks.torch_protomask.TrainStep``.

    Args:
      variant: one of ``TORCH_VARIANTS``.
      shape: the benchmark shape.
      torch_weights: the state_dict (quanproto layout, class weights included) every
        variant starts from.
      batches: host batches (copied to the device here).
      device: the torch device.
    """

    def __init__(
        self,
        variant: str,
        shape: Shape,
        torch_weights: dict[str, Any],
        batches: list[dict[str, np.ndarray]],
        device: Any,
    ):
        import torch

        from benchmarks import torch_protomask as tp

        self.torch = torch
        self.variant = variant
        self.shape = shape
        self.device = device
        self.step_variant = variant.removeprefix("torch_")
        model = torch_model(shape, reference_style=self.step_variant == "reference_style_fp32")
        model.load_state_dict(torch_weights)
        config = make_config(shape, "float32")
        self.train_step = tp.TrainStep(
            model,
            self.step_variant,
            view_size=shape.view_size,
            learning_rates=tp.JointLearningRates(
                backbone=config.train.backbone_lr,
                add_on=config.train.addon_lr,
                prototypes=config.train.prototype_lr,
            ),
            coefficients=tp.LossCoefficients(
                ce=config.loss.ce,
                cluster=config.loss.cluster,
                separation=config.loss.separation,
                diversity=config.loss.diversity,
            ),
            device=device,
        )
        self.flags = tp.VARIANT_FLAGS[self.step_variant]
        self.batches = [self._to_device(batch) for batch in batches]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def synchronize(self, _value: Any = None) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def step(self, batch_index: int) -> Any:
        """Runs one step on batch ``batch_index % 2``; returns the loss (not synchronised)."""
        return self.train_step(*self.batches[batch_index % len(self.batches)])

    def _to_device(self, batch: dict[str, np.ndarray]) -> tuple[Any, Any, Any]:
        """``(canvas, boxes, label)`` tensors on the device, as ``TrainStep`` takes them."""
        torch = self.torch
        return (
            torch.from_numpy(batch["canvas"]).to(self.device),
            torch.from_numpy(batch["boxes"]).to(self.device),
            torch.from_numpy(batch["label"]).long().to(self.device),
        )

    def parity_losses(self, batch: dict[str, np.ndarray]) -> list[float]:
        """Loss before and after one update, both on ``batch``."""
        placed = self._to_device(batch)
        return [float(self.train_step(*placed)), float(self.train_step(*placed))]

    def measure(self) -> dict[str, Any]:
        """Times the step (the first call separately: torch.compile compiles there)."""
        with common.stopwatch() as first_call:
            self.synchronize(self.step(0))
        timing = common.time_steps(self.step, self.synchronize, self.shape.warmup, self.shape.steps)
        peak = None
        if self.device.type == "cuda":
            peak = int(self.torch.cuda.max_memory_allocated(self.device))
        return {
            "framework": "torch",
            "precision": {
                "eager_fp32": "float32 (TF32 off)",
                "eager_amp_bf16": "autocast bfloat16, channels-last",
                "compile_amp_bf16": "autocast bfloat16, channels-last, torch.compile",
                "reference_style_fp32": "float32 with TF32 (as the reference sets it)",
            }[self.step_variant],
            "backend_flags": dataclasses.asdict(self.flags),
            "augmentation": False,
            "first_call_s": first_call["seconds"],
            "compile_s": (
                first_call["seconds"] if self.step_variant == "compile_amp_bf16" else None
            ),
            "timing": timing,
            "peak_memory_bytes": peak,
            "peak_memory_source": "torch.cuda.max_memory_allocated" if peak else None,
            "final_loss": float(self.step(0)),
        }

    def close(self) -> None:
        del self.train_step, self.batches
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
        if self.step_variant == "compile_amp_bf16":
            self.torch._dynamo.reset()


# --------------------------------------------------------------------------- harness


def check_parity(jax_losses: list[float], torch_losses: list[float]) -> dict[str, Any]:
    """Compares the fp32 losses before and after one update (see the module docstring)."""
    before = abs(jax_losses[0] - torch_losses[0]) / max(abs(torch_losses[0]), 1e-12)
    after = abs(jax_losses[1] - torch_losses[1]) / max(abs(torch_losses[1]), 1e-12)
    return {
        "checked": True,
        "variants": ["jax_fp32", "torch_eager_fp32"],
        "what": (
            "same weights (torch export -> protomask_jax.models.convert), same batch "
            "(smooth canvases: parity_batch), "
            "no augmentation, float32 without TF32, BatchNorm in training mode; loss before "
            "and after one Adam update"
        ),
        "jax_loss": jax_losses,
        "torch_loss": torch_losses,
        "relative_difference": [before, after],
        "tolerance": [PARITY_RTOL_BEFORE_UPDATE, PARITY_RTOL_AFTER_UPDATE],
        "passed": bool(before <= PARITY_RTOL_BEFORE_UPDATE and after <= PARITY_RTOL_AFTER_UPDATE),
    }


def _derived_figures(
    figures: dict[str, Any], shape: Shape, flops_per_step: float, peak_flops: float | None
) -> None:
    """Adds crops/s, images/s and MFU (from the median step time) in place."""
    median = figures["timing"]["per_step"]["median"]
    figures["step_time_s"] = median
    figures["crops_per_s"] = shape.batch_size * shape.num_views / median
    figures["images_per_s"] = shape.batch_size / median
    figures["achieved_flops"] = flops_per_step / median
    figures["mfu"] = flops_per_step / median / peak_flops if peak_flops else None


def _headline(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    torch_candidates = {
        name: r
        for name, r in results.items()
        if r["framework"] == "torch" and name != "torch_reference_style_fp32"
    }
    if HEADLINE_JAX_VARIANT not in results or not torch_candidates:
        return {"available": False, "reason": "needs jax_bf16 and a non-reference torch variant"}
    best_torch = min(torch_candidates, key=lambda n: torch_candidates[n]["step_time_s"])
    torch_time = torch_candidates[best_torch]["step_time_s"]
    headline = {
        "available": True,
        "jax_variant": HEADLINE_JAX_VARIANT,
        "best_torch_variant": best_torch,
        "speedup": torch_time / results[HEADLINE_JAX_VARIANT]["step_time_s"],
        "meaning": (
            "best torch median step time / jax_bf16 median step time (= JAX crops/s over "
            "torch crops/s); both without augmentation"
        ),
    }
    if "jax_bf16_aug" in results:
        headline["speedup_with_jax_augmentation"] = (
            torch_time / results["jax_bf16_aug"]["step_time_s"]
        )
    if "torch_reference_style_fp32" in results:
        headline["speedup_vs_reference_style"] = (
            results["torch_reference_style_fp32"]["step_time_s"]
            / results[HEADLINE_JAX_VARIANT]["step_time_s"]
        )
    return headline


_TORCH_CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


@contextlib.contextmanager
def cold_torch_compile_caches() -> Iterator[None]:
    """Empty inductor and Triton caches for the block, so ``torch.compile``'s first call
    measures a cold compilation — as JAX's compile does (no persistent cache)."""
    saved = {name: os.environ.get(name) for name in _TORCH_CACHE_VARIABLES}
    with tempfile.TemporaryDirectory(prefix="protomask_bench_torch_cache_") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def run(
    shape_name: str,
    variants: tuple[str, ...] = ALL_VARIANTS,
    *,
    warmup: int | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    out_dir: Path = common.RESULTS_DIR,
    seed: int = 0,
    plot: bool = True,
) -> Path:
    """Runs the benchmark and writes the JSON (and plot); returns the JSON path.

    Args:
      shape_name: a key of ``SHAPES``.
      variants: which of ``ALL_VARIANTS`` to run (the parity check needs ``jax_fp32`` and
        ``torch_eager_fp32``).
      warmup, steps: override the shape's step counts.
      batch_size: override the shape's images per step (a smaller one checks the CUB model
        on a CPU in minutes; the JSON records the shape that ran).
      out_dir: where the JSON and PNG go.
      seed: seeds the weights and the synthetic batches.
      plot: write the PNG.
    """
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown:
        raise ValueError(f"Unknown variants {unknown}; choose from {ALL_VARIANTS}")
    shape = SHAPES[shape_name]
    shape = dataclasses.replace(
        shape,
        warmup=shape.warmup if warmup is None else warmup,
        steps=shape.steps if steps is None else steps,
        batch_size=shape.batch_size if batch_size is None else batch_size,
    )
    # JAX's CUDA backend starts before torch loads its CUDA libraries: JAX checks the
    # versions of the cuDNN/cuBLAS it finds loaded and refuses older ones.
    started = common.cpu_sample()
    device_facts = common.device_facts()
    import torch

    torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if (device_facts["platform"] == "gpu") != (torch_device.type == "cuda"):
        raise RuntimeError(
            f"JAX runs on {device_facts['platform']} but torch on {torch_device.type}: the "
            "comparison would not be on one device. Install the matching builds."
        )
    torch_device_name = (
        torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu"
    )
    print(
        f"train_step --shape {shape_name}: {shape}\n  jax device: {device_facts['name']}, "
        f"torch device: {torch_device_name}",
        flush=True,
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device_facts["platform"] == "cpu" and load > 0.5 * (device_facts["host_cpu_count"] or 1):
        print(
            f"  warning: host load average {load:.1f} on {device_facts['host_cpu_count']} "
            "cores before starting: other processes compete for the CPU, timings will be "
            "inflated",
            flush=True,
        )

    batches = synthetic_batches(shape, 2, seed)
    class_weights = np.random.default_rng(seed + 1).uniform(0.5, 1.5, shape.num_classes)
    class_weights = class_weights.astype(np.float32)
    torch.manual_seed(seed)
    initial_model = torch_model(shape, class_weights=torch.from_numpy(class_weights))
    torch_weights = {k: v.detach().clone() for k, v in initial_model.state_dict().items()}
    numpy_weights = convert.read_state_dict(torch_weights)
    del initial_model

    def build(variant: str) -> JaxVariant | TorchVariant:
        print(f"  building {variant} ...", flush=True)
        if variant in JAX_VARIANTS:
            return JaxVariant(variant, shape, numpy_weights, batches, class_weights)
        return TorchVariant(variant, shape, torch_weights, batches, torch_device)

    # Parity first: nothing is timed unless both fp32 steps agree.
    prepared: dict[str, JaxVariant | TorchVariant] = {}
    parity: dict[str, Any] = {"checked": False, "reason": "jax_fp32 or torch_eager_fp32 not run"}
    if "jax_fp32" in variants and "torch_eager_fp32" in variants:
        prepared["jax_fp32"] = build("jax_fp32")
        check_batch = parity_batch(shape, seed + 2)
        jax_losses = prepared["jax_fp32"].parity_losses(check_batch)
        prepared["torch_eager_fp32"] = build("torch_eager_fp32")
        torch_losses = prepared["torch_eager_fp32"].parity_losses(check_batch)
        parity = check_parity(jax_losses, torch_losses)
        print(f"  parity: {parity['relative_difference']} (passed={parity['passed']})", flush=True)

    device_slug = common.device_slug(device_facts["name"])
    json_path = out_dir / f"train_step_{shape_name}_{device_slug}.json"
    results: dict[str, dict[str, Any]] = {}

    def payload(complete: bool) -> dict[str, Any]:
        analytic = analytic_step_flops(shape)
        xla_reference = results.get(HEADLINE_JAX_VARIANT, {}).get("xla_flops_per_step")
        flops_per_step = xla_reference or analytic["train_step"]
        for figures in results.values():
            _derived_figures(figures, shape, flops_per_step, device_facts["peak_bf16_flops"])
        return {
            "benchmark": "train_step",
            "shape_name": shape_name,
            "shape": dataclasses.asdict(shape),
            "device": {**device_facts, "torch_device": torch_device_name},
            "host": common.host_facts(started),
            "versions": common.versions(with_torch=True),
            "git": common.git_revision(),
            "config": _config_summary(shape),
            "parity": parity,
            "flops": {
                "per_step_used_for_mfu": flops_per_step,
                "source": (
                    f"XLA cost analysis of the compiled {HEADLINE_JAX_VARIANT} step"
                    if xla_reference
                    else "analytic (3 x forward)"
                ),
                "analytic": analytic,
                "xla_over_analytic": (
                    xla_reference / analytic["train_step"] if xla_reference else None
                ),
                "mfu_peak": "dense bf16 tensor-core peak of the device, for every variant",
            },
            "headline": _headline(results),
            "variants": results,
            "complete": complete,
        }

    # The headline pair right after the float32 pair; the JSON is rewritten after every
    # variant, so a run cut short (a time limit on a lent GPU) keeps what it measured, marked
    # "complete": false.
    timed = sorted(variants, key=TIMING_ORDER.index) if parity.get("passed", True) else []
    with cold_torch_compile_caches():
        for variant in timed:
            bench = prepared.pop(variant, None) or build(variant)
            print(f"  timing {variant} ...", flush=True)
            results[variant] = bench.measure()
            print(
                f"    median {results[variant]['timing']['per_step']['median'] * 1e3:.1f} ms",
                flush=True,
            )
            if isinstance(bench, TorchVariant):
                bench.close()
            del bench
            gc.collect()
            common.write_json(json_path, payload(complete=False))
    common.write_json(json_path, payload(complete=True))
    if plot and results:
        names = list(results)
        common.bar_plot(
            json_path.with_suffix(".png"),
            [f"{n} ({results[n]['step_time_s'] * 1e3:.0f} ms)" for n in names],
            [results[n]["crops_per_s"] for n in names],
            title=(
                f"ProtoMask train step, {shape_name}: {shape.backbone}, B={shape.batch_size}, "
                f"K={shape.num_views}, V={shape.view_size} on {device_facts['name']}"
            ),
            xlabel="crops (views) per second, median step",
        )
    if not parity.get("passed", True):
        raise SystemExit(f"Parity check failed, nothing timed: {parity}")
    return json_path


def _config_summary(shape: Shape) -> dict[str, Any]:
    config = make_config(shape, "bfloat16")
    return {
        "model": dict(config.model.to_dict()),
        "loss": dict(config.loss.to_dict()),
        "learning_rates": {
            "backbone": config.train.backbone_lr,
            "add_on": config.train.addon_lr,
            "prototypes": config.train.prototype_lr,
        },
        "accumulate_steps": config.train.accumulate_steps,
        "augment": dict(config.input.augment.to_dict()),
        "torch_crop": "torchvision.ops.roi_align(aligned=True, sampling_ratio=1), no augmentation",
        "batches": "2 synthetic device-resident batches, alternated; boxes >= V pixels",
        "compile_caches": {
            "torch": "fresh inductor and Triton cache folders (cold compile)",
            "jax_persistent_cache_dir": jax.config.jax_compilation_cache_dir,
        },
    }


def _variant_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", dest="shape_name", choices=sorted(SHAPES), default="cpu")
    parser.add_argument(
        "--variants",
        type=_variant_list,
        default=ALL_VARIANTS,
        help=f"comma-separated subset of {','.join(ALL_VARIANTS)}",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method")
    parser.add_argument("--batch_size", type=int, default=None, help="images per step")
    parser.add_argument("--no_plot", dest="plot", action="store_false")
    return run(**common.parse_flags(parser, argv))


if __name__ == "__main__":
    main()
