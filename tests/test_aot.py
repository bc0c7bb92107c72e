# ruff: noqa: E501  (the hand-written HLO keeps the compiler's one-line instructions)
"""The TPU compiler on a CPU host: the trainer's joint step compiled for a v5e:2x2 slice
(benchmarks/aot.py, deviceless) fits a chip and reduces across chips only what data
parallelism must: the trainable parameters' gradients and the BatchNorm batch statistics.

Expected byte counts come from the model's own parameter shapes, not from the compiler."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

# libtpu is in the dev extra for Linux x86-64; there the test must run, never skip.
if not (sys.platform == "linux" and platform.machine() == "x86_64"):
    pytest.skip("libtpu ships for Linux x86-64 only", allow_module_level=True)


def _compile_joint_step(tmp_path_factory, *flags):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.aot", "--topology", "v5e:2x2", "--shape", "tiny",
         "--per_chip_batch", "4", "--programs", "train/joint", "--out", str(out), *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stderr


@pytest.fixture(scope="module")
def joint_step(tmp_path_factory):
    return _compile_joint_step(tmp_path_factory)


def _expected_reduction_bytes():
    """Bytes of the joint phase's trainable parameters' gradients (convolution kernels in
    bfloat16, the compute dtype the convolutions run in; the rest float32) and of the
    BatchNorm statistics (forward mean and mean of squares, backward two sums per channel)."""
    import jax
    from flax import nnx

    from benchmarks import aot
    from protomask_jax import inference

    config = aot.SHAPES["tiny"].config()
    assert config.model.compute_dtype == "bfloat16"
    model = nnx.eval_shape(lambda: inference.build_model(config, 0))
    params = nnx.state(model, nnx.Param)
    trainable = ("backbone", "add_on", "prototypes")  # the last layer is frozen in joint
    gradients = sum(
        (2 if leaf.ndim == 4 else 4) * int(np.prod(leaf.shape))
        for group in trainable
        for leaf in jax.tree.leaves(params[group])
    )
    stats = nnx.state(model, nnx.BatchStat)
    channels = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(stats)) // 2
    return gradients, 4 * 4 * channels


@pytest.mark.slow
def test_joint_step_fits_a_v5e_chip_and_reduces_only_gradients_and_statistics(joint_step):
    payload, stderr = joint_step
    assert payload["chips"] == 4 and payload["chip"]["name"] == "v5e"
    joint = payload["programs"]["train/joint"]
    memory = joint["memory_per_chip"]
    assert joint["fits"] and memory["total_bytes"] < memory["hbm_bytes"] == 16 * 1024**3
    # The donated state comes back in place: outputs alias the arguments.
    assert memory["alias_bytes"] > 0.9 * memory["output_bytes"]

    assert set(joint["collectives"]) == {"all-reduce"}, joint["collectives"]
    gradients, statistics = _expected_reduction_bytes()
    reduced = joint["collectives"]["all-reduce"]["bytes"]
    # Gradients and statistics, plus a few scalars (loss terms, accuracy, sample counts).
    assert gradients <= reduced <= gradients + statistics + 1024, (reduced, gradients)

    # The compiler counts the FLOPs our analytic formula does (same model, same batch).
    assert 0.8 < joint["flops_per_chip"]["compiler_over_analytic"] < 1.3
    assert joint["compiler_estimate"]["cycles"] > 0
    # Every argument is read and every output written at least once.
    traffic = joint["hbm_traffic"]
    assert traffic["bytes"] >= memory["argument_bytes"] + memory["output_bytes"]
    assert 0 < traffic["mfu_ceiling"] <= 1
    # every loop's trip count was read, so no loop body is counted only once
    assert joint["compiler_estimate"]["loops_of_unknown_trip_count"] == []
    # libtpu starts quietly: no metadata-server warnings.
    assert "metadata" not in stderr.lower() and "Failed to get" not in stderr, stderr[-2000:]


def test_importing_the_harness_leaves_the_environment_alone():
    # In a fresh interpreter: TPU_WORKER_HOSTNAMES set by an import would make a later
    # training in the same process try to join a TPU pod.
    code = (
        "import os; keys = lambda: {k: v for k, v in os.environ.items() if k.startswith("
        "('TPU_', 'JAX_', 'ALLOW_MULTIPLE'))}; before = keys(); import benchmarks.aot; "
        "assert keys() == before, keys()"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--topology", "v9x:1x1"], "aot: --topology v9x:1x1: "),
        (["--set", "model.nope=1"], "aot: no config key 'model.nope'"),
        (["--set", "model.prototype_dim=abc"], "aot: --set model.prototype_dim=abc: expected"),
    ],
)
def test_bad_flags_end_in_one_line_and_exit_code_2(flags, message, tmp_path):
    out = tmp_path / "aot.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.aot", "--shape", "tiny", *flags, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), done.stderr[-2000:]
    assert not out.exists()


def test_hlo_analysis_on_a_hand_written_module():
    """Cycle sums, while-loop trip counts and collective bytes on a hand-built HLO text."""
    from benchmarks import aot

    text = """HloModule m
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %f = f32[8]{0} fusion(%p), kind=kLoop, calls=%fc, metadata={op_name="jit(step)/jit(make_views)/mul"}, backend_config={"estimated_cycles":"10"}
  %i = s32[8]{0} parameter(1)
  %g = u8[8,12]{1,0} fusion(%f, %i), kind=kCustom, calls=%gc, metadata={op_name="jit(step)/jit(make_views)/gather"}
  ROOT %t = (s32[], f32[8]) tuple(%p, %f)
}
ENTRY %main (a: f32[1024]) -> f32[1024] {
  %a = f32[1024]{0} parameter(0)
  %cb = f32[2048]{0} custom-call(%a, %a), custom_call_target="ConcatBitcast"
  %c = bf16[16,16]{1,0} convolution(%a), metadata={op_name="jit(step)/conv_general_dilated"}, backend_config={"estimated_cycles":"100"}
  %w = (s32[], f32[8]) while(%a), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %r = f32[1024]{0} all-reduce(%a), channel_id=1, to_apply=%add
  %g = (bf16[4,4]{1,0}, bf16[4,4]{1,0}) all-gather-start(%a), channel_id=2
  %gd = bf16[4,4]{1,0} all-gather-done(%g)
  %s = f32[8]{0} parameter(1)
  %z = s32[] constant(0)
  %u = f32[1024]{0} dynamic-update-slice(%r, %s, %z)
  ROOT %o = f32[1024]{0} copy(%r)
}
"""
    result = aot.analyse_hlo(text)
    assert result["estimated_cycles"] == 100 + 3 * 10
    assert result["cycles_by_category"] == {"convolutions": 100, "crop and augment": 30}
    assert result["collectives"] == {
        "all-reduce": {"count": 1, "bytes": 4096},
        "all-gather": {"count": 1, "bytes": 4 * 4 * 2},  # the result, not the operand
    }
    # Without a cycle estimate: the loop's gather, 3 trips x (result 96 + operands 32 + 32
    # bytes), the in-place update (its 32 + 4 byte update read and written, not the 4 KB
    # buffer) and the final copy (4096 + 4096); not the ConcatBitcast, a reinterpretation.
    uncosted = result["ops_without_estimate"]
    assert uncosted["count"] == 3 + 1 + 1
    assert uncosted["bytes"] == 3 * (8 * 12 + 8 * 4 + 8 * 4) + 2 * (32 + 4) + 2 * 4096
    assert [op["op"] for op in uncosted["largest"]] == ["copy", "fusion", "dynamic-update-slice"]
    # HBM traffic counts every op that moves data, with or without an estimate: the
    # convolution (512 + 4096), the loop's fusion (3 x (32 + the 36-byte tuple)) and gather,
    # the update, the copy; collectives are the ring model's.
    assert result["hbm_traffic"]["bytes_by_category"] == {
        "convolutions": 512 + 4096,
        "crop and augment": 3 * (32 + 36) + 3 * (96 + 32 + 32),
        "elementwise and other": 2 * (32 + 4),
        "data movement": 2 * 4096,
    }
    assert result["hbm_traffic"]["bytes"] == 4608 + 684 + 72 + 8192


def test_hlo_analysis_reads_trip_counts_from_loop_conditions():
    """TPU's optimised HLO drops known_trip_count: lax.map over 11 view slots lowers to a
    loop whose condition is ``i < 11``; its body counts 11 times, and a loop no rule reads
    is reported."""
    from benchmarks import aot

    text = """HloModule m
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %f = f32[8]{0} fusion(%p), kind=kLoop, calls=%fc, metadata={op_name="jit(step)/jit(make_views)/mul"}, backend_config={"estimated_cycles":"10"}
  ROOT %t = (s32[], f32[8]) tuple(%p, %f)
}
%cond (q: (s32[], f32[8])) -> pred[] {
  %k = s32[]{:T(128)} constant(11)
  %q = (s32[], f32[8]) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%q), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %k), direction=LT, metadata={op_name="jit(step)/while/cond/lt"}
}
%odd (q: (s32[], f32[8])) -> pred[] {
  %q = (s32[], f32[8]) parameter(0)
  ROOT %b = pred[] get-tuple-element(%q), index=1
}
ENTRY %main (a: f32[1024]) -> f32[1024] {
  %a = f32[1024]{0} parameter(0)
  %w = (s32[], f32[8]) while(%a), condition=%cond, body=%body, metadata={op_name="jit(step)/jit(make_views)/while"}
  %v = (s32[], f32[8]) while(%a), condition=%odd, body=%body, metadata={op_name="jit(step)/other/while"}
  ROOT %o = f32[1024]{0} copy(%a)
}
"""
    result = aot.analyse_hlo(text)
    assert result["estimated_cycles"] == 11 * 10 + 10
    assert result["loops_of_unknown_trip_count"] == ["jit(step)/other/while"]


@pytest.mark.slow
def test_fsdp_holds_a_quarter_of_the_large_parameters_per_chip(joint_step, tmp_path_factory):
    """mesh.fsdp on 4 chips: every parameter of >= fsdp_min_size elements (and its Adam
    moments) is held a quarter per chip, gathered where used; gradients are reduce-scattered."""
    import jax
    from flax import nnx

    from benchmarks import aot
    from protomask_jax import inference

    min_size = 256  # the tiny shape's leaves are small
    fsdp, _ = _compile_joint_step(
        tmp_path_factory, "--set", "mesh.fsdp=true", "--set", f"mesh.fsdp_min_size={min_size}"
    )
    plain = joint_step[0]["programs"]["train/joint"]
    split = fsdp["programs"]["train/joint"]
    assert split["fits"]
    config = aot.SHAPES["tiny"].config()
    params = nnx.state(nnx.eval_shape(lambda: inference.build_model(config, 0)), nnx.Param)
    large = sum(
        4 * leaf.size
        for leaf in jax.tree.leaves(params)
        if leaf.size >= min_size and any(n % 4 == 0 for n in leaf.shape)
    )
    assert large > 0
    saved = plain["memory_per_chip"]["argument_bytes"] - split["memory_per_chip"]["argument_bytes"]
    # at least the parameters' own three quarters (the Adam moments save more)
    assert saved >= 0.75 * large, (saved, large)
    kinds = set(split["collectives"])
    assert "all-gather" in kinds and kinds & {"reduce-scatter", "all-reduce"}, kinds


def test_a_device_per_tensor_core_gets_its_share_of_the_chip():
    # v4 slices without megacore show one device per TensorCore: 16 of the chip's 32 GiB
    from benchmarks import aot

    v4 = aot.CHIPS["TPU v4"]
    core = v4.per_device(1)
    assert core.hbm_bytes == 16 * 1024**3 and core.peak_bf16_flops == 137.5e12
    assert core.clock_hz == v4.clock_hz and core.name == "v4 TensorCore"
    assert (
        v4.per_device(2) is v4 and aot.CHIPS["TPU v5 lite"].per_device(1).hbm_bytes == 16 * 1024**3
    )


def test_update_replaces_only_the_recompiled_programs_of_the_same_run():
    from benchmarks import aot

    run = {"topology": "v5e:2x4", "shape": "cub", "config_overrides": [], "per_chip_batch": 64,
           "per_chip_eval_batch": 64, "per_chip_prp_batch": 2}  # fmt: skip
    previous = run | {"programs": {"train/joint": {"git": "old"}, "eval": {"git": "old"}},
                      "weak_scaling": [{"chips": 8}]}  # fmt: skip
    update = run | {"programs": {"train/joint": {"git": "new"}}}
    out = aot.merged(previous, update)
    assert out["programs"] == {"train/joint": {"git": "new"}, "eval": {"git": "old"}}
    assert out["weak_scaling"] == [{"chips": 8}]
    with pytest.raises(aot.UsageError, match="per_chip_batch 64 there, 16 here"):
        aot.merged(previous, update | {"per_chip_batch": 16})


def test_micro_variants_compute_what_their_baselines_do():
    """benchmarks/aot_micro.py compares rewrites by the compiler's estimate; each must be
    the same function: space-to-depth stem against the strided convolution, the pool of
    nine strided slices against reduce_window (exact), the hand-written BatchNorm backward
    against jax's gradient."""
    from benchmarks import aot_micro

    differences = aot_micro.check_equivalences()
    assert differences["stem_space_to_depth"] < 1e-4
    assert differences["max_pool_slices"] == 0.0
    assert differences["batch_norm_manual_grad"] < 1e-5


def test_the_table_shows_hbm_traffic_and_leaves_it_blank_for_older_files():
    """A row with HBM traffic shows GB moved, the floor in ms and the MFU ceiling; a row
    from a file compiled before the harness measured it shows blanks, not zeros."""
    from benchmarks import aot

    def program(traffic):
        row = {
            "images_per_chip": 16,
            "memory_per_chip": {"argument_bytes": 5e8, "output_bytes": 4e8, "temp_bytes": 7e9,
                                "hbm_fraction": 0.43},
            "flops_per_chip": {"compiler": 4.2e12, "analytic": 4.3e12},
            "compiler_estimate": {"compute_s": 0.12},
            "estimated_mfu": 0.18,
            "collectives": {},
        }  # fmt: skip
        return row | ({"hbm_traffic": traffic} if traffic else {})

    payload = {
        "topology": "v5e:2x4", "chips": 8, "chip": {"name": "v5e", "hbm_bytes": 16 * 2**30},
        "shape": "cub", "config_overrides": [],
        "programs": {
            "new": program({"bytes": 50.2e9, "floor_s": 0.0613, "mfu_ceiling": 0.358}),
            "old": program(None),
        },
    }  # fmt: skip
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in
            aot.markdown(payload).splitlines() if line.startswith("| new") or
            line.startswith("| old")}  # fmt: skip
    header = next(line for line in aot.markdown(payload).splitlines() if "MFU ceiling" in line)
    moved = header.split(" | ").index("HBM GB moved (floor ms)")
    assert rows["new"][moved : moved + 2] == ["50.2 (61.3)", "36%"]
    assert rows["old"][moved : moved + 2] == ["", ""]
