"""Every jitted program of a training run, compiled for a TPU slice on a CPU host (no TPU).

The TPU compiler (libtpu, the dev extra) compiles against a topology description instead of
devices, so this runs on any Linux x86-64 machine::

    python -m benchmarks.aot --topology v5e:2x4 --per_chip_batch 64      # make aot
    python -m benchmarks.aot --topology v5e:2x2 --shape tiny --out /tmp/a.json

Programs, each jitted with the functions and shardings training uses
(``steps.jit_train_step`` / ``jit_eval_step`` on ``sharding.make_mesh``'s mesh): the train
step of every phase, the evaluation step, push (forward with per-view outputs, then the
running-nearest update), and the batched PRP of ``evaluate``. For each: per-chip argument,
output, aliased and temporary bytes (XLA's memory analysis of the partitioned program)
against the chip's HBM; the compiler's FLOP count against the analytic one; a step-time
estimate summed from the optimised HLO's per-op ``estimated_cycles`` (the TPU compiler's
cost model: an estimate, not a measurement; collectives carry none and are modelled from
their bytes and the chip's ICI bandwidth); the collectives by kind, count and bytes. Then
the largest per-chip batch whose joint step fits, and the joint step from 8 to 256 chips at
a fixed per-chip batch (weak scaling). ``cost_analysis()["optimal_seconds"]`` is not used:
it comes out negative on programs this large.

Output: ``benchmarks/results/aot_<topology>.json`` (``--out`` elsewhere);
``benchmarks/report.py`` renders its table into ``benchmarks/README.md``.
"""

from __future__ import annotations

from benchmarks import common

if __name__ == "__main__":
    common.use_deviceless_tpu()

import argparse  # noqa: E402
import collections  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of a TPU generation (Cloud TPU system-architecture pages).

    ``clock_hz`` turns the compiler's cycle estimates into seconds; it is the peak divided
    by the MXUs' multiply-adds per cycle (128 x 128 each, 2 FLOPs per multiply-add)."""

    name: str
    hbm_bytes: int
    peak_bf16_flops: float
    mxus: int  # 128 x 128 MXUs per chip (all TensorCores)
    ici_bytes_per_s: float  # all links of one chip, one direction
    hbm_bytes_per_s: float
    tensor_cores: int = 1

    def per_device(self, cores: int) -> Chip:
        """The share of one jax device that drives ``cores`` of the chip's TensorCores
        (a v4 slice without megacore is one device per TensorCore): same clock."""
        if cores >= self.tensor_cores:
            return self
        share = cores / self.tensor_cores
        return Chip(
            f"{self.name} TensorCore",
            int(self.hbm_bytes * share),
            self.peak_bf16_flops * share,
            max(1, round(self.mxus * share)),
            self.ici_bytes_per_s * share,
            self.hbm_bytes_per_s * share,
            cores,
        )

    @property
    def clock_hz(self) -> float:
        return self.peak_bf16_flops / (self.mxus * 128 * 128 * 2)


# Keyed by jax's device_kind.
CHIPS = {
    # 16 GB HBM2 at 819 GB/s, 197 TFLOP/s bf16, 4 MXUs, ICI 1,600 Gbit/s.
    "TPU v5 lite": Chip("v5e", 16 * GIB, 197e12, 4, 1600e9 / 8, 819e9),
    # 32 GiB HBM2 at 1,200 GB/s, 275 TFLOP/s bf16, 2 TensorCores x 4 MXUs, ICI 2,400 Gbit/s.
    "TPU v4": Chip("v4", 32 * GIB, 275e12, 8, 2400e9 / 8, 1200e9, tensor_cores=2),
    # 95 GB HBM2e at 2,765 GB/s, 459 TFLOP/s bf16, 2 TensorCores x 4 MXUs, ICI 4,800 Gbit/s.
    "TPU v5": Chip("v5p", 95 * 10**9, 459e12, 8, 4800e9 / 8, 2765e9, tensor_cores=2),
}

# The weak-scaling series (v5e slices: chips = product of the grid).
SCALING_TOPOLOGIES = ("v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:8x8", "v5e:8x16", "v5e:16x16")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
}  # fmt: skip
_NUM_TRAIN_IMAGES = 5994  # CUB-200's training split: only the StepLR schedule's length


# --------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class Shape:
    """The model and input of one run: ``cub`` is configs/cub.py unchanged."""

    name: str
    overrides: dict

    def config(self):
        from configs import cub

        config = cub.get_config()
        with config.unlocked():
            for dotted, value in self.overrides.items():
                node, leaf = _config_node(config, dotted)
                node[leaf] = value
            config.mesh.data, config.mesh.model = -1, 1
        return config


class UsageError(Exception):
    """A bad flag: ``main`` prints the message as one line and exits with 2."""


def _config_node(config, dotted: str):
    """``("model.remat")`` -> ``(config.model, "remat")``."""
    *parents, leaf = dotted.split(".")
    node = config
    try:
        for part in parents:
            node = node[part]
        node[leaf]
    except (KeyError, AttributeError, TypeError):
        raise UsageError(f"aot: no config key {dotted!r} (see configs/common.py)") from None
    return node, leaf


SHAPES = {
    "cub": Shape("cub", {}),
    # Seconds to compile: the tests' size.
    "tiny": Shape(
        "tiny",
        {
            "model.backbone": "resnet_micro",
            "model.prototype_dim": 16,
            "model.prototypes_per_class": 2,
            "dataset.num_classes": 4,
            "input.canvas_size": 64,
            "input.num_views": 3,
            "input.view_size": 32,
        },
    ),
}


# --------------------------------------------------------------------------- programs


@dataclasses.dataclass
class Program:
    name: str
    jitted: Any
    args: tuple
    images_per_chip: int
    analytic_flops_per_chip: float | None  # model FLOPs (no recompute), where known


def _abstract(tree, sharding_of):
    import jax

    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(p, x)), tree
    )


def _batch(spec, global_size: int, mesh, extra: dict | None = None) -> dict:
    import jax

    from protomask_jax import sharding as sharding_lib
    from protomask_jax.data import pipeline

    example = dict(pipeline.filler_example(spec), **(extra or {}))
    split = sharding_lib.batch_sharding(mesh)
    return {
        k: jax.ShapeDtypeStruct((global_size, *np.shape(v)), np.asarray(v).dtype, sharding=split)
        for k, v in example.items()
    }


def analytic_flops(config, images: int, *, backward: bool) -> float:
    """Model FLOPs of ``images`` images (backbone convolutions, add-on, prototypes, last layer;
    ``benchmarks.train_step``'s count); ``backward``: 3 x forward."""
    from benchmarks import train_step

    shape = train_step.Shape(
        backbone=config.model.backbone,
        batch_size=images,
        num_views=config.input.num_views,
        canvas_size=config.input.canvas_size,
        view_size=config.input.view_size,
        prototype_dim=config.model.prototype_dim,
        prototypes_per_class=config.model.prototypes_per_class,
        num_classes=config.dataset.num_classes,
        warmup=0,
        steps=0,
    )
    flops = train_step.analytic_step_flops(shape)
    return flops["train_step"] if backward else flops["forward_per_step"]


def _leaf(variable):
    """The one array (or ShapeDtypeStruct) inside an nnx variable."""
    import jax

    (leaf,) = jax.tree.leaves(variable)
    return leaf


def programs(
    config, mesh, per_chip_batch: int, per_chip_eval_batch: int, per_chip_prp_batch: int,
    only: tuple[str, ...] | None = None,
) -> list[Program]:  # fmt: skip
    """The jitted programs of one run on ``mesh`` with abstract (shape + sharding) inputs."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from protomask_jax import inference, prp, push, trainer
    from protomask_jax import phases as phases_lib
    from protomask_jax import sharding as sharding_lib
    from protomask_jax import steps as steps_lib
    from protomask_jax.data import pipeline

    chips = mesh.devices.size
    spec = pipeline.PipelineSpec.from_config(config)
    step_config = steps_lib.StepConfig.from_config(config)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: inference.build_model(config, 0)))
    num_prototypes = config.dataset.num_classes * config.model.prototypes_per_class
    replicated = sharding_lib.replicated(mesh)
    class_weights = jax.ShapeDtypeStruct(
        (config.dataset.num_classes,), jnp.float32, sharding=replicated
    )
    train_batch = _batch(spec, per_chip_batch * chips, mesh)
    eval_batch = _batch(spec, per_chip_eval_batch * chips, mesh)
    result = []
    wanted = lambda name: only is None or name in only

    for phase in phases_lib.plan_phases(config, _NUM_TRAIN_IMAGES):
        if phase.name == phases_lib.PRUNE_FINETUNE or not wanted(f"train/{phase.name}"):
            continue
        state = trainer._abstract_train_state(config, mesh, phase, num_prototypes)
        backbone_trains = "backbone" in phase.learning_rates
        flops = analytic_flops(config, per_chip_batch, backward=backbone_trains)
        result.append(
            Program(
                f"train/{phase.name}",
                steps_lib.jit_train_step(graphdef, phase, step_config, mesh, state),
                (state, train_batch, class_weights),
                per_chip_batch,
                # A frozen backbone runs forward only (its activations need no gradient).
                flops if backbone_trains else None,
            )
        )
    if not any(wanted(n) for n in ("eval", "push/forward", "push/update", "prp")):
        return result

    phase = phases_lib.plan_phases(config, _NUM_TRAIN_IMAGES)[0]
    state = trainer._abstract_train_state(config, mesh, phase, num_prototypes)
    weights = (state.params, state.batch_stats, state.constants)
    forward_flops = analytic_flops(config, per_chip_eval_batch, backward=False)
    if wanted("eval"):
        result.append(
            Program(
                "eval",
                steps_lib.jit_eval_step(graphdef, step_config, mesh),
                (*weights, eval_batch),
                per_chip_eval_batch,
                forward_flops,
            )
        )
    if wanted("push/forward") or wanted("push/update"):
        forward = steps_lib.jit_eval_step(graphdef, step_config, mesh, return_views=True)
        outputs = jax.eval_shape(forward, *weights, eval_batch)
        outputs = _abstract(outputs, lambda p, x: sharding_lib.batch_sharding(mesh))
        carry = _abstract(
            jax.eval_shape(push.init_push_carry, _leaf(state.params["prototypes"])),
            lambda p, x: replicated,
        )
        update = jax.jit(lambda c, o, b, pc: push.push_update(c, o, b, pc), donate_argnums=0)
        prototype_class = _leaf(state.constants["prototype_class"])
        if wanted("push/forward"):
            result.append(
                Program(
                    "push/forward", forward, (*weights, eval_batch), per_chip_eval_batch,
                    forward_flops,
                )
            )  # fmt: skip
        if wanted("push/update"):
            result.append(
                Program(
                    "push/update", update, (carry, outputs, eval_batch, prototype_class),
                    per_chip_eval_batch, None,
                )
            )  # fmt: skip
    if wanted("prp"):
        from protomask_jax.evaluators import chunk as chunk_lib

        explained = min(chunk_lib.TOP_K, num_prototypes)
        canonical = jax.eval_shape(lambda w: prp.canonize((graphdef, *w)), weights)
        canonical = _abstract(canonical, lambda p, x: replicated)
        prp_batch = _batch(
            spec,
            per_chip_prp_batch * chips,
            mesh,
            {
                "ids": np.zeros(explained, np.int32),
                "frame_boxes": np.zeros((config.input.num_views, 4), np.float32),
            },
        )
        frames = jax.jit(
            functools.partial(
                inference._prp_frames,
                view_size=config.input.view_size,
                rule=config.explain.prp_rule,
                resolution=config.input.canvas_size,
            ),
            static_argnums=(2, 3),
        )
        args = (canonical, prp_batch, 0, 0.0)
        result.append(Program("prp", frames, args, per_chip_prp_batch, None))
    return result


# --------------------------------------------------------------------------- analysis


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_SHAPE = re.compile(r"\b(pred|[suf](?:8|16|32|64)|bf16)\[([0-9,]*)\]")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CUSTOM_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_CALLEES = re.compile(r"(?:to_apply|calls|branch_computations)=\{?%([\w.-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size * _DTYPE_BYTES[dtype]
    return total


def _category(op: str, op_name: str) -> str:
    """Which part of the step an HLO instruction belongs to, from its jax name stack."""
    if any(op.startswith(c) for c in _COLLECTIVES):
        return "collectives"
    if "make_views" in op_name:
        return "crop and augment"
    if "conv_general_dilated" in op_name:
        return "convolutions (backward)" if "transpose(" in op_name else "convolutions"
    if "dot_general" in op_name:
        return "matmuls (head)"
    if "batch_norm" in op_name.lower() or "BatchNorm" in op_name:
        return "batch norm"
    if op in ("copy", "copy-start", "copy-done", "transpose", "bitcast", "tuple",
              "get-tuple-element", "parameter", "constant"):  # fmt: skip
        return "data movement"
    return "elementwise and other"


def _trip_count(while_line: str, computations: dict[str, list[str]]) -> int | None:
    """Iterations of a while loop: the backend's known trip count when it states one, else
    read from a condition of the form ``counter < constant`` (how lax.map, scan and
    fori_loop lower, counting up from 0 by 1); None when neither says."""
    trip = _TRIP.search(while_line)
    if trip:
        return int(trip.group(1))
    condition = re.search(r"condition=%([\w.-]+)", while_line)
    lines = computations.get(condition.group(1), []) if condition else []
    root = next((line for line in lines if line.lstrip().startswith("ROOT")), "")
    compare = re.search(r"compare\(%([\w.-]+), %([\w.-]+)\), direction=LT", root)
    if not compare:
        return None
    for line in lines:
        match = re.match(r"\s*%([\w.-]+) = [su]\d+\[\]\S* constant\((\d+)\)", line)
        if match and match.group(1) == compare.group(2):
            return int(match.group(2))
    return None


# Instructions that move no data of their own (or are accounted elsewhere: loops and calls
# by their bodies, collectives by the ring model); async pairs (``-start``/``-done``) too.
_FREE_OPS = frozenset({
    "parameter", "constant", "bitcast", "get-tuple-element", "tuple", "while", "call",
    "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency",
})  # fmt: skip
# Custom calls that only allocate, reinterpret or annotate.
_FREE_CUSTOM_CALLS = ("AllocateBuffer", "ConcatBitcast", "AssumeGatherIndicesInBound")


def _moves_data(op: str, line: str) -> bool:
    if op in _FREE_OPS or op.endswith(("-start", "-done")):
        return False
    target = _CUSTOM_TARGET.search(line) if op == "custom-call" else None
    return not (target and target.group(1) in _FREE_CUSTOM_CALLS)


def _operand_sizes(arguments: str, shapes: dict[str, str]) -> list[int]:
    """Bytes of each of an instruction's operands, looked up by name in its computation."""
    operands = arguments.split(")", 1)[0]
    return [_shape_bytes(shapes.get(name, "")) for name in re.findall(r"%([\w.-]+)", operands)]


def _traffic_bytes(op: str, op_name: str, result_shape: str, arguments: str, shapes) -> int:
    """HBM bytes an instruction reads and writes, taken as its operands' and result's sizes
    (an overestimate for ops that read part of an operand). A dynamic-update-slice updates
    its buffer in place: it moves its update (read, then written), not the buffer."""
    result = _shape_bytes(result_shape)
    operands = _operand_sizes(arguments, shapes)
    if op == "dynamic-update-slice" or (op == "fusion" and "dynamic_update_slice" in op_name):
        if result in operands:
            operands.remove(result)
            return 2 * sum(operands)
    return result + sum(operands)


def analyse_hlo(text: str) -> dict[str, Any]:
    """Sums the compiler's ``estimated_cycles`` over the instructions the program runs (the
    entry computation, while bodies times their known trip counts; fusion bodies are parts
    of their fusion's estimate) and lists the cross-chip collectives. Instructions the
    cost model gives no estimate (on TPU: custom fusions such as gathers and scatters) are
    listed with the bytes they read and write, for a bandwidth bound."""
    computations: dict[str, list[str]] = {}
    entry = None
    current = None
    for line in text.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            head = line.split("(")[0].split()
            name = head[-1].lstrip("%")
            if head[0] == "ENTRY":
                entry = name
            current = computations.setdefault(name, [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)

    cycles_by_category: collections.Counter = collections.Counter()
    collectives: dict[str, dict[str, int]] = {}
    largest: list[tuple[int, str, str]] = []
    visited: set[str] = set()
    unknown_trips: list[str] = []
    loops: list[dict[str, Any]] = []
    uncosted: dict[str, Any] = {"count": 0, "bytes": 0, "largest": []}
    traffic: collections.Counter = collections.Counter()

    def walk(name: str, multiplier: int) -> None:
        visited.add(name)
        parsed = [
            (line, m) for line in computations.get(name, ()) if (m := _INSTRUCTION.match(line))
        ]
        defined = {match.group(1): match.group(2) for _, match in parsed}
        for line, match in parsed:
            _, result_shape, op, arguments = match.groups()
            op_name = (_OP_NAME.search(line) or [None, ""])[1]
            cycles = _CYCLES.search(line)
            if op == "while":
                body = re.search(r"body=%([\w.-]+)", line).group(1)
                trip = _trip_count(line, computations)
                loops.append({"op_name": (op_name or body)[-160:], "trip_count": trip})
                if trip is None:
                    unknown_trips.append(op_name or body)
                walk(body, multiplier * (trip or 1))
                continue
            if op in ("call", "conditional", "async-start"):
                for callee in _CALLEES.findall(line):
                    walk(callee, multiplier)
            kind = next((c for c in _COLLECTIVES if op.startswith(c)), None)
            if kind and not op.endswith("-done"):
                entry_ = collectives.setdefault(kind, {"count": 0, "bytes": 0})
                entry_["count"] += multiplier
                # An async start's tuple holds (operand, result[, context]): count the result.
                shapes = _SHAPE.findall(result_shape)
                if op.endswith("-start") and len(shapes) > 1:
                    result_shape = "{}[{}]".format(*shapes[1])
                entry_["bytes"] += multiplier * _shape_bytes(result_shape)
            category = _category(op, op_name)
            moved = 0
            if not kind and _moves_data(op, line):
                moved = multiplier * _traffic_bytes(op, op_name, result_shape, arguments, defined)
                traffic[category] += moved
            if cycles:
                n = int(cycles.group(1)) * multiplier
                cycles_by_category[category] += n
                largest.append((n, op, op_name))
            elif moved:
                uncosted["count"] += multiplier
                uncosted["bytes"] += moved
                uncosted["largest"].append({"bytes": moved, "op": op, "op_name": op_name[-160:]})

    if entry is None:
        raise ValueError("no ENTRY computation in the compiled HLO text")
    walk(entry, 1)
    largest.sort(reverse=True)
    return {
        "estimated_cycles": int(sum(cycles_by_category.values())),
        "cycles_by_category": dict(cycles_by_category.most_common()),
        "collectives": collectives,
        "largest_ops": [
            {"cycles": n, "op": op, "op_name": op_name[-160:]} for n, op, op_name in largest[:12]
        ],
        # the compiler's cost_analysis() counts each loop body once; the cycles above do not
        "loops": loops,
        # loops whose body was counted once: their share is underestimated
        "loops_of_unknown_trip_count": unknown_trips,
        "ops_without_estimate": uncosted
        | {"largest": sorted(uncosted["largest"], key=lambda op: -op["bytes"])[:8]},
        "hbm_traffic": {
            "bytes": int(sum(traffic.values())),
            "bytes_by_category": dict(traffic.most_common()),
        },
    }


def _ring_seconds(collectives: dict, chips: int, chip: Chip) -> float:
    """All-reduce traffic of a bidirectional ring over ``chips``: each chip sends and
    receives ``2 (n - 1) / n`` of the bytes; all-gather and reduce-scatter half that."""
    if chips < 2:
        return 0.0
    factor = {"all-reduce": 2.0, "all-gather": 1.0, "reduce-scatter": 1.0}
    traffic = sum(
        factor.get(kind, 1.0) * (chips - 1) / chips * entry["bytes"]
        for kind, entry in collectives.items()
    )
    return traffic / chip.ici_bytes_per_s


def compile_program(
    program: Program, chip: Chip, chips: int, hlo_dir: Path | None = None
) -> dict[str, Any]:
    """Compiles ``program`` and summarises memory, FLOPs, the cycle estimate, collectives;
    the optimised HLO goes to ``hlo_dir`` when given."""
    start = time.perf_counter()
    lowered = program.jitted.lower(*program.args)
    try:
        compiled = lowered.compile()
    except Exception as error:  # the TPU compiler refuses programs that exceed HBM
        message = str(error)
        if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
            raise
        return {
            "images_per_chip": program.images_per_chip,
            "fits": False,
            "compile_error": message.splitlines()[0][:400],
            "compile_s": time.perf_counter() - start,
        }
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    text = compiled.as_text()
    if hlo_dir is not None:
        hlo_dir.mkdir(parents=True, exist_ok=True)
        (hlo_dir / (program.name.replace("/", "_") + ".hlo.txt")).write_text(text)
    hlo = analyse_hlo(text)
    compute_s = hlo["estimated_cycles"] / chip.clock_hz
    collective_s = _ring_seconds(hlo["collectives"], chips, chip)
    uncosted = hlo["ops_without_estimate"]
    uncosted_s = uncosted["bytes"] / chip.hbm_bytes_per_s
    step_s = compute_s + collective_s + uncosted_s
    analytic = program.analytic_flops_per_chip
    floor_s = hlo["hbm_traffic"]["bytes"] / chip.hbm_bytes_per_s
    ceiling = None
    if analytic and floor_s:
        peak_s = analytic / chip.peak_bf16_flops
        ceiling = peak_s / max(floor_s, peak_s)
    return {
        "images_per_chip": program.images_per_chip,
        "fits": bool(total <= chip.hbm_bytes),
        "compile_s": compile_s,
        "memory_per_chip": {
            "argument_bytes": int(memory.argument_size_in_bytes),
            "output_bytes": int(memory.output_size_in_bytes),
            "alias_bytes": int(memory.alias_size_in_bytes),
            "temp_bytes": int(memory.temp_size_in_bytes),
            "total_bytes": int(total),
            "hbm_bytes": chip.hbm_bytes,
            "hbm_fraction": total / chip.hbm_bytes,
        },
        "flops_per_chip": {
            "compiler": float(cost.get("flops", 0.0)) or None,
            "analytic": analytic,
            "compiler_over_analytic": (
                float(cost["flops"]) / analytic if analytic and cost.get("flops") else None
            ),
        },
        "compiler_estimate": {
            "note": "sum of the optimised HLO's per-op estimated_cycles (TPU cost model), "
            f"at {chip.clock_hz / 1e9:.3f} GHz; collectives modelled separately",
            "cycles": hlo["estimated_cycles"],
            "compute_s": compute_s,
            "cycles_by_category": hlo["cycles_by_category"],
            "largest_ops": hlo["largest_ops"],
            "loops": hlo["loops"],
            "loops_of_unknown_trip_count": hlo["loops_of_unknown_trip_count"],
        },
        # No cycle estimate: counted in the step at HBM bandwidth (a lower bound; a gather
        # of 12-byte rows is likely far slower).
        "ops_without_estimate": uncosted | {"hbm_bound_s": uncosted_s},
        # What XLA's fusion boundaries leave to HBM: the step cannot be faster than moving
        # it at full bandwidth, whatever the MXU does; MFU ceiling = analytic FLOPs at peak
        # against that floor (or the FLOPs themselves where those take longer).
        "hbm_traffic": hlo["hbm_traffic"] | {"floor_s": floor_s, "mfu_ceiling": ceiling},
        "collectives": hlo["collectives"],
        "collective_s_ring_model": collective_s,
        "estimated_step_s": step_s,
        "estimated_images_per_s_per_chip": program.images_per_chip / step_s if step_s else None,
        "estimated_mfu": (analytic / (step_s * chip.peak_bf16_flops)) if analytic else None,
    }


# --------------------------------------------------------------------------- driver


def topology_mesh(topology: str, config):
    from jax.experimental import topologies

    from protomask_jax import sharding as sharding_lib

    try:
        devices = topologies.get_topology_desc(topology, "tpu").devices
    except Exception as error:  # libtpu's message names what it could not parse
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"aot: --topology {topology}: {first} (e.g. v5e:2x4, v4:2x2x1)") from None
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise UsageError(f"aot: no chip figures for {kind!r} ({topology}); known: {sorted(CHIPS)}")
    chip = CHIPS[kind].per_device(getattr(devices[0], "num_cores", CHIPS[kind].tensor_cores))
    return sharding_lib.make_mesh(config, devices), chip


def largest_fitting_batch(
    config, topology: str, start: int, known: dict | None = None, limit: int = 1024
) -> dict:
    """The largest multiple of 8 images per chip whose joint step fits, by doubling then
    bisecting from ``start``; every tried size with its per-chip bytes (``known``: sizes
    already compiled)."""
    mesh, chip = topology_mesh(topology, config)
    tried: dict[int, dict] = dict(known or {})

    def fits(batch: int) -> bool:
        if batch in tried:
            return tried[batch]["fits"]
        (program,) = programs(config, mesh, batch, batch, batch, only=("train/joint",))
        result = compile_program(program, chip, mesh.devices.size)
        tried[batch] = {
            "fits": result["fits"],
            "total_bytes": result.get("memory_per_chip", {}).get("total_bytes"),
        }
        print(f"  joint step, {batch} images/chip: fits={result['fits']}", flush=True)
        return result["fits"]

    low, high = 0, None
    batch = start
    while high is None and batch <= limit:
        if fits(batch):
            low, batch = batch, batch * 2
        else:
            high = batch
    if high is None:
        return {"largest_fitting": low, "limit": limit, "tried": tried}
    while high - low > 8:
        middle = (low + high) // 16 * 8
        if fits(middle):
            low = middle
        else:
            high = middle
    return {"largest_fitting": low, "tried": dict(sorted(tried.items()))}


def weak_scaling(config, per_chip_batch: int, topologies: tuple[str, ...]) -> list[dict]:
    rows = []
    for topology in topologies:
        mesh, chip = topology_mesh(topology, config)
        (program,) = programs(config, mesh, per_chip_batch, 1, 1, only=("train/joint",))
        result = compile_program(program, chip, mesh.devices.size)
        rows.append(
            {
                "topology": topology,
                "chips": int(mesh.devices.size),
                "fits": result["fits"],
                "compute_s": result["compiler_estimate"]["compute_s"],
                "collectives": result["collectives"],
                "collective_s_ring_model": result["collective_s_ring_model"],
                "estimated_step_s": result["estimated_step_s"],
                "estimated_images_per_s": result["estimated_images_per_s_per_chip"]
                * mesh.devices.size,
            }
        )
        print(f"  {topology}: step ~{result['estimated_step_s'] * 1e3:.1f} ms", flush=True)
    base = rows[0]["estimated_images_per_s"] / rows[0]["chips"]
    for row in rows:
        row["efficiency_vs_first"] = row["estimated_images_per_s"] / (row["chips"] * base)
    return rows


def _set(config, dotted: str, text: str) -> None:
    """``--set model.remat=blocks``: the value parsed as the key's current type."""
    node, leaf = _config_node(config, dotted)
    current = node[leaf]
    if isinstance(current, bool):
        value = text.lower() in ("1", "true", "yes")
    elif isinstance(current, (int, float)):
        try:
            value = type(current)(text)
        except ValueError:
            expected = type(current).__name__
            raise UsageError(f"aot: --set {dotted}={text}: expected a {expected}") from None
    else:
        value = text
    with config.unlocked():
        node[leaf] = value


def run(args) -> dict[str, Any]:
    import jax

    shape = SHAPES[args.shape]
    config = shape.config()
    for override in args.set:
        key, _, value = override.partition("=")
        _set(config, key, value)
    mesh, chip = topology_mesh(args.topology, config)
    chips = int(mesh.devices.size)
    print(f"aot: {args.topology} ({chips} x {chip.name}), shape {shape.name}", flush=True)
    results = {}
    revision = common.git_revision()
    eval_batch = args.per_chip_eval_batch or args.per_chip_batch
    only = tuple(args.programs.split(",")) if args.programs else None  # "none": no programs
    for program in programs(
        config, mesh, args.per_chip_batch, eval_batch, args.per_chip_prp_batch, only=only
    ):
        results[program.name] = compile_program(program, chip, chips, args.hlo_dir)
        r = results[program.name]
        r["git"] = revision
        line = f"  {program.name}: {r['compile_s']:.0f} s to compile, fits={r['fits']}"
        if "estimated_mfu" in r and r["estimated_mfu"]:
            line += f", est. MFU {r['estimated_mfu']:.1%}"
        print(line, flush=True)
    payload = {
        "benchmark": "aot",
        "topology": args.topology,
        "chips": chips,
        "chip": dataclasses.asdict(chip) | {"clock_hz": chip.clock_hz},
        "shape": shape.name,
        "config_overrides": list(args.set),
        "per_chip_batch": args.per_chip_batch,
        "per_chip_eval_batch": eval_batch,
        "per_chip_prp_batch": args.per_chip_prp_batch,
        "programs": results,
        "environment": {
            "jax": jax.__version__,
            "libtpu": _libtpu_version(),
            "git": revision,
        },
    }
    if args.fit_search:
        known = {}
        if "train/joint" in results:
            joint = results["train/joint"]
            total = joint.get("memory_per_chip", {}).get("total_bytes")
            known[args.per_chip_batch] = {"fits": joint["fits"], "total_bytes": total}
        payload["largest_fitting_batch"] = largest_fitting_batch(
            config, args.topology, args.per_chip_batch, known
        )
    if args.scaling:
        topologies = tuple(args.scaling.split(","))
        payload["weak_scaling"] = weak_scaling(config, args.per_chip_batch, topologies)
    return payload


_SAME_RUN_KEYS = ("topology", "shape", "config_overrides", "per_chip_batch", "per_chip_eval_batch",
                  "per_chip_prp_batch")  # fmt: skip


def merged(previous: dict, update: dict) -> dict:
    """``previous`` with ``update``'s programs and searches in place of its own; both must
    describe the same run (topology, shape, overrides, batches)."""
    differing = [k for k in _SAME_RUN_KEYS if previous.get(k) != update.get(k)]
    if differing:
        raise UsageError(
            "--update needs the same run as the file: "
            + ", ".join(f"{k} {previous.get(k)!r} there, {update.get(k)!r} here" for k in differing)
        )
    programs = {**previous["programs"], **update["programs"]}
    return {**previous, **update, "programs": programs}


def markdown(payload: dict) -> str:
    """The README table of one result file (per-chip figures)."""

    def gb(n):
        return f"{n / 1e9:.2f}"

    lines = [
        f"{payload['topology']} ({payload['chips']} x {payload['chip']['name']}, "
        f"{payload['chip']['hbm_bytes'] / 2**30:.0f} GiB HBM), shape {payload['shape']}"
        + (f", {', '.join(payload['config_overrides'])}" if payload["config_overrides"] else ""),
    ]
    if payload["programs"]:
        lines += [
            "",
            "| program | images/chip | args GB | outputs GB | temps GB | of HBM | compiler TFLOP "
            "| analytic TFLOP | est. compute ms | est. MFU | HBM GB moved (floor ms) "
            "| MFU ceiling | collectives |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for name, r in payload["programs"].items():
        if "memory_per_chip" not in r:
            lines.append(f"| {name} | {r['images_per_chip']} | does not fit: "
                         f"{r['compile_error']} |||||||||||")  # fmt: skip
            continue
        m, f, t = r["memory_per_chip"], r["flops_per_chip"], r.get("hbm_traffic")
        collectives = ", ".join(
            f"{kind} x{c['count']} ({c['bytes'] / 1e6:.1f} MB)"
            for kind, c in r["collectives"].items()
        )
        cells = [
            name, r["images_per_chip"], gb(m["argument_bytes"]), gb(m["output_bytes"]),
            gb(m["temp_bytes"]), f"{m['hbm_fraction']:.0%}",
            f"{f['compiler'] / 1e12:.2f}" if f["compiler"] else "",
            f"{f['analytic'] / 1e12:.2f}" if f["analytic"] else "",
            f"{r['compiler_estimate']['compute_s'] * 1e3:.1f}",
            f"{r['estimated_mfu']:.1%}" if r["estimated_mfu"] else "",
            f"{t['bytes'] / 1e9:.1f} ({t['floor_s'] * 1e3:.1f})" if t else "",
            f"{t['mfu_ceiling']:.0%}" if t and t["mfu_ceiling"] else "", collectives or "none",
        ]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    looped = {
        name: r["compiler_estimate"].get("loops", [])
        for name, r in payload["programs"].items()
        if r.get("compiler_estimate", {}).get("loops")
    }
    if looped:
        described = "; ".join(
            f"{name}: " + ", ".join(
                f"{loop['op_name'].removeprefix('jit(step)/').removesuffix('/while')} "
                f"x{loop['trip_count'] or '?'}"
                for loop in loops
            )
            for name, loops in looped.items()
        )  # fmt: skip
        lines += ["", "Compiler TFLOP count each loop body once; the estimated times count "
                  f"every trip ({described})."]  # fmt: skip
    uncosted = {
        name: r["ops_without_estimate"]
        for name, r in payload["programs"].items()
        if r.get("ops_without_estimate", {}).get("count")
    }
    if uncosted:
        described = "; ".join(
            f"{name}: {u['bytes'] / 1e9:.2f} GB, {u['hbm_bound_s'] * 1e3:.1f} ms"
            for name, u in uncosted.items()
        )
        lines += ["", "Ops the cost model gives no cycles (gathers, select-and-scatter, "
                  "relayouts) count in est. MFU at HBM bandwidth, a lower bound "
                  f"({described})."]  # fmt: skip
    if any("hbm_traffic" in r for r in payload["programs"].values()):
        lines += ["", "HBM GB moved: every op's operands and result (read and written once, "
                  "as XLA fused them; an overestimate for ops that read part of an operand); "
                  "floor: that at full HBM bandwidth; MFU ceiling: analytic FLOPs at peak "
                  "against the floor."]  # fmt: skip
    if "largest_fitting_batch" in payload:
        fit = payload["largest_fitting_batch"]
        tried = ", ".join(f"{b}: {'fits' if t['fits'] else 'no'}" for b, t in fit["tried"].items())
        lines += ["", f"Largest joint-step batch that fits: {fit['largest_fitting']} "
                  f"images/chip (tried {tried})."]  # fmt: skip
    if "weak_scaling" in payload:
        lines += ["", "| topology | chips | est. step ms | collective MB | ring-model ms "
                  "| est. images/s | efficiency |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in payload["weak_scaling"]:
            reduced = sum(c["bytes"] for c in row["collectives"].values()) / 1e6
            lines.append(
                f"| {row['topology']} | {row['chips']} | {row['estimated_step_s'] * 1e3:.1f} "
                f"| {reduced:.1f} | {row['collective_s_ring_model'] * 1e3:.2f} "
                f"| {row['estimated_images_per_s']:.0f} | {row['efficiency_vs_first']:.1%} |"
            )
    return "\n".join(lines)


def _libtpu_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", default="v5e:2x4", help="e.g. v5e:2x4, v4:2x2x1, v5p:2x2x1")
    parser.add_argument("--per_chip_batch", type=int, default=64)
    parser.add_argument("--per_chip_eval_batch", type=int, default=0, help="0: per_chip_batch")
    parser.add_argument("--per_chip_prp_batch", type=int, default=2)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cub")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. model.remat=blocks")  # fmt: skip
    parser.add_argument(
        "--programs", default="", help="comma list (e.g. train/joint,eval); none: only the "
        "searches; default: all"
    )  # fmt: skip
    parser.add_argument("--fit_search", action="store_true", help="largest fitting batch")
    parser.add_argument(
        "--scaling", nargs="?", const=",".join(SCALING_TOPOLOGIES), default="",
        help="the joint step on these topologies (default: v5e from 8 to 256 chips)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--update", action="store_true",
        help="replace only the compiled programs (and searches) in an existing --out file",
    )  # fmt: skip
    parser.add_argument("--hlo_dir", type=Path, default=None, help="save the optimised HLO")
    parser.add_argument("--table", type=Path, nargs="+", help="print these results as tables")
    args = parser.parse_args(argv)
    if args.table:
        print("\n\n".join(markdown(json.loads(p.read_text())) for p in args.table))
        return 0
    try:
        payload = run(args)
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2
    out = args.out or common.RESULTS_DIR / f"aot_{args.topology.replace(':', '_')}.json"
    if args.update and out.exists():
        try:
            payload = merged(json.loads(out.read_text()), payload)
        except UsageError as error:
            print(f"{out}: {error}", file=sys.stderr)
            return 2
    common.write_json(out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
