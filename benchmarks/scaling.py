"""Data-parallel scaling: a measured weak-scaling check and an analytic multi-GPU model.

    python -m benchmarks.scaling          # 8 fake CPU devices (set here) + the model

1. **Measured weak scaling** on the devices present: the product's joint-phase step, jitted
   with the state replicated and the batch sharded over the ``data`` axis of
   ``sharding.make_mesh``, at a fixed per-device batch on 1, 2, 4, 8 devices. It also checks
   that the sharded step computes the same loss as one device on the same global batch
   (BatchNorm statistics are global under jit + sharding). On the CPU the 8 devices are
   fake (``--xla_force_host_platform_device_count=8``) and share the machine's cores, so the
   step time grows with the device count: this is a functional check of the sharded
   program, not a speed measurement.
2. **Analytic model** for 1 / 8 / 64 GPUs at the CUB shape (ResNet-50, 16 images x 11 views
   per GPU): step time = single-GPU step time (from a committed ``train_step_cub_<gpu>.json``,
   or ``--step_time_s``) + gradient all-reduce (ring: ``2 (n-1)/n x bytes / bus bandwidth``)
   + the latency of the BatchNorm statistics all-reduces, with no overlap of communication
   and compute (XLA overlaps part of the all-reduce with the backward pass, so this bounds the
   cost from above). Bandwidths and latencies are assumptions, stated in the JSON.

Output: ``benchmarks/results/scaling_<device>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common
from benchmarks.train_step import (
    SHAPES,
    Shape,
    make_config,
    make_jax_step,
    synthetic_batches,
)
from protomask_jax import sharding as sharding_lib
from protomask_jax.models import protomask as model_lib

# Per-device shape of the measured check: small enough for 8 fake devices on 2 cores.
CHECK_SHAPE = Shape("resnet_tiny", 2, 4, 128, 64, 64, 2, 8, warmup=2, steps=5)
DEVICE_COUNTS = (1, 2, 4, 8)
# Agreement of the sharded and the single-device loss on the same global batch.
LOSS_RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Interconnect:
    """Assumed collective performance of one level of the network.

    Attributes:
      name: what it is.
      bus_bandwidth: NCCL all-reduce bus bandwidth per GPU, bytes/s (nccl-tests' ``busbw``:
        ring time = bytes x 2 (n - 1) / n / busbw).
      latency_s: time of one small all-reduce.
      basis: where the figure comes from.
    """

    name: str
    bus_bandwidth: float
    latency_s: float
    basis: str


NVLINK = Interconnect(
    "NVLink 4 / NVSwitch inside an 8-GPU H100 SXM node",
    360e9,
    15e-6,
    "80 % of the 450 GB/s per direction NVLink 4 bandwidth of an H100 SXM (data sheet: "
    "900 GB/s bidirectional); small-message latency ~15 us (assumed)",
)
INFINIBAND = Interconnect(
    "InfiniBand NDR, one 400 Gb/s NIC per GPU, 8 nodes",
    40e9,
    30e-6,
    "80 % of 50 GB/s (400 Gb/s) per GPU for the inter-node ring; latency ~30 us (assumed)",
)


def trainable_parameter_bytes(shape: Shape) -> dict[str, int]:
    """Bytes of the float32 gradients all-reduced per step in the joint phase, per group
    (the last layer is frozen: no gradient), from the model's abstract shapes."""
    config = make_config(shape, "bfloat16")
    abstract = nnx.eval_shape(
        lambda: model_lib.build_model(config, shape.num_classes, nnx.Rngs(params=0))
    )
    _, params, _, _ = model_lib.split_model(abstract)
    groups = {}
    for group in ("backbone", "add_on", "prototypes"):
        leaves = jax.tree_util.tree_leaves(params[group])
        groups[group] = int(sum(int(np.prod(leaf.shape)) for leaf in leaves) * 4)
    return groups


def batchnorm_layers(backbone: str) -> int:
    """BatchNorm layers of a ResNet preset (stem + per block + downsample)."""
    from protomask_jax.models.resnet import resnet_spec

    spec = resnet_spec(backbone)
    per_block = 2 if spec.block == "basic" else 3
    downsamples = sum(
        1
        for stage, _ in enumerate(spec.widths)
        if stage > 0 or spec.stem_width != spec.widths[0] * spec.expansion
    )
    return 1 + per_block * sum(spec.blocks_per_stage) + downsamples


def analytic_model(single_step_s: float | None, shape: Shape, source: str) -> dict[str, Any]:
    """Predicted step time and throughput on 1, 8 (one node) and 64 (8 nodes) GPUs."""
    grad_bytes = trainable_parameter_bytes(shape)
    total_bytes = sum(grad_bytes.values())
    bn_layers = batchnorm_layers(shape.backbone)
    # One all-reduce per BatchNorm layer forward (mean and mean of squares, combined) and
    # one backward.
    bn_collectives = 2 * bn_layers
    crops = shape.batch_size * shape.num_views
    rows = []
    for devices, link in ((1, None), (8, NVLINK), (64, INFINIBAND)):
        if link is None:
            all_reduce = latency = 0.0
        else:
            all_reduce = total_bytes * 2 * (devices - 1) / devices / link.bus_bandwidth
            latency = bn_collectives * link.latency_s
        row: dict[str, Any] = {
            "devices": devices,
            "interconnect": link.name if link else None,
            "gradient_all_reduce_s": all_reduce,
            "batchnorm_all_reduce_s": latency,
        }
        if single_step_s is not None:
            step = single_step_s + all_reduce + latency
            row.update(
                step_time_s=step,
                crops_per_s=devices * crops / step,
                images_per_s=devices * shape.batch_size / step,
                efficiency=single_step_s / step,
            )
        rows.append(row)
    return {
        "shape": dataclasses.asdict(shape),
        "single_device_step_s": single_step_s,
        "single_device_source": source,
        "gradient_bytes": grad_bytes,
        "gradient_bytes_total": total_bytes,
        "batchnorm_layers": bn_layers,
        "assumptions": {
            "intra_node": dataclasses.asdict(NVLINK),
            "inter_node": dataclasses.asdict(INFINIBAND),
            "overlap": "none (upper bound on communication cost)",
            "weak_scaling": "per-GPU batch fixed at the CUB shape; global batch grows with n",
        },
        "rows": rows,
    }


def committed_gpu_step_time(results_dir: Path) -> tuple[float | None, str]:
    """Median jax_bf16_aug step time (what training runs) from a GPU train_step JSON."""
    for path in sorted(results_dir.glob("train_step_cub_*.json")):
        payload = json.loads(path.read_text())
        if payload["device"]["platform"] != "gpu":
            continue
        variant = payload["variants"].get("jax_bf16_aug") or payload["variants"].get("jax_bf16")
        if variant:
            return variant["step_time_s"], f"{path.name} ({payload['device']['name']})"
    return None, "no GPU train_step_cub_*.json committed yet; pass --step_time_s"


def _measure_on(count: int, shape: Shape, seed: int) -> tuple[dict[str, Any], float, dict]:
    """One row of the weak-scaling table: ``count`` devices, ``count x`` the batch.

    Returns:
      ``(row, first_step_loss, first_host_batch)``.
    """
    global_shape = dataclasses.replace(shape, batch_size=shape.batch_size * count)
    config = make_config(global_shape, "float32")
    config.mesh.data = count
    mesh = sharding_lib.make_mesh(config, jax.devices()[:count])
    state, step_fn = make_jax_step(config, global_shape, augment=False)
    state_shardings = sharding_lib.tree_shardings(mesh, state)
    batch_shardings = sharding_lib.batch_sharding(mesh)
    replicated = sharding_lib.replicated(mesh)
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shardings, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    host_batches = synthetic_batches(global_shape, 2, seed)
    batches = [jax.device_put(b, batch_shardings) for b in host_batches]
    class_weights = jax.device_put(jnp.ones((shape.num_classes,), jnp.float32), replicated)
    holder = {"state": jax.device_put(state, state_shardings)}
    with common.stopwatch() as compile_time:
        compiled = jitted.lower(holder["state"], batches[0], class_weights).compile()

    def run_step(i: int) -> jax.Array:
        holder["state"], metrics = compiled(holder["state"], batches[i % 2], class_weights)
        return metrics["loss"]

    first_loss = float(run_step(0))
    timing = common.time_steps(run_step, jax.block_until_ready, shape.warmup, shape.steps)
    median = timing["per_step"]["median"]
    row = {
        "devices": count,
        "global_batch_images": global_shape.batch_size,
        "compile_s": compile_time["seconds"],
        "timing": timing,
        "step_time_s": median,
        "crops_per_s": global_shape.batch_size * shape.num_views / median,
    }
    return row, first_loss, host_batches[0]


def measure_weak_scaling(shape: Shape, seed: int) -> dict[str, Any]:
    """Step time at a fixed per-device batch on 1, 2, 4, 8 devices (as many as exist), and
    the loss of the largest sharded run against one device on the same global batch."""
    counts = [n for n in DEVICE_COUNTS if n <= len(jax.devices())]
    rows = []
    loss_check = None
    for count in counts:
        row, first_loss, first_batch = _measure_on(count, shape, seed)
        rows.append(row)
        if count == counts[-1] and count > 1:
            global_shape = dataclasses.replace(shape, batch_size=shape.batch_size * count)
            loss_check = _single_device_loss_check(global_shape, first_batch, first_loss)
    base = rows[0]["step_time_s"]
    for row in rows:
        row["weak_scaling_efficiency"] = base / row["step_time_s"]
    return {
        "per_device_shape": dataclasses.asdict(shape),
        "rows": rows,
        "sharded_vs_single_device_loss": loss_check,
    }


def _single_device_loss_check(
    global_shape: Shape, batch: dict[str, np.ndarray], sharded_loss: float
) -> dict[str, Any]:
    """The first-step loss of the same global batch on one device, against the sharded one."""
    config = make_config(global_shape, "float32")
    state, step_fn = make_jax_step(config, global_shape, augment=False)
    _, metrics = jax.jit(step_fn)(state, batch, jnp.ones((global_shape.num_classes,)))
    single = float(metrics["loss"])
    relative = abs(single - sharded_loss) / max(abs(single), 1e-12)
    return {
        "single_device_loss": single,
        "sharded_loss": sharded_loss,
        "relative_difference": relative,
        "tolerance": LOSS_RTOL,
        "passed": bool(relative <= LOSS_RTOL),
    }


def run(
    *,
    step_time_s: float | None = None,
    out_dir: Path = common.RESULTS_DIR,
    check_shape: Shape = CHECK_SHAPE,
    seed: int = 0,
) -> Path:
    """Measures weak scaling, evaluates the analytic model, writes the JSON."""
    started = common.cpu_sample()
    device_facts = common.device_facts()
    print(f"scaling: {device_facts['count']} x {device_facts['name']}", flush=True)
    measured = measure_weak_scaling(check_shape, seed)
    for row in measured["rows"]:
        print(
            f"  {row['devices']} device(s): {row['step_time_s'] * 1e3:.1f} ms, "
            f"efficiency {row['weak_scaling_efficiency']:.2f}",
            flush=True,
        )
    if step_time_s is not None:
        source = "--step_time_s"
    else:
        step_time_s, source = committed_gpu_step_time(common.RESULTS_DIR)
    payload = {
        "benchmark": "scaling",
        "device": device_facts,
        "host": common.host_facts(started),
        "versions": common.versions(with_torch=False),
        "git": common.git_revision(),
        "measured_weak_scaling": measured,
        "measured_note": (
            "fake CPU devices share the host's cores: a functional check of the sharded "
            "step (and of its loss against one device), not a speed measurement"
            if device_facts["platform"] == "cpu"
            else "real devices"
        ),
        "analytic_model": analytic_model(step_time_s, SHAPES["cub"], source),
    }
    slug = common.device_slug(device_facts["name"])
    return common.write_json(out_dir / f"scaling_{slug}.json", payload)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--step_time_s",
        type=float,
        default=None,
        help="single-GPU CUB step time for the model (default: from a committed GPU JSON)",
    )
    flags = common.parse_flags(parser, argv)
    # 8 CPU devices for the measured part (before jax starts its backends; no effect on GPUs).
    jax.config.update("jax_num_cpu_devices", max(DEVICE_COUNTS))
    return run(**flags)


if __name__ == "__main__":
    main()
