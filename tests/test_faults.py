"""Faults with real processes and signals: kill, preemption, corrupt records, NaN, bad CLI input.

docs/reliability.md lists each fault, what happens and what is kept.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_train import TINY_OVERRIDES, final_state_leaves, tiny_config

from protomask_jax import trainer
from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _command(records_dir, workdir, **extra):
    overrides = {**TINY_OVERRIDES, "train.log_every_steps": 1, **extra}
    return [
        sys.executable,
        "-m",
        "protomask_jax.train",
        "--config",
        "configs/demo.py",
        "--workdir",
        str(workdir),
        f"--config.dataset.records_dir={records_dir}",
        *[f"--config.{k}={v}" for k, v in overrides.items()],
    ]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONUNBUFFERED="1")


def _run(command, timeout=900):
    return subprocess.run(
        command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _start_and_signal_at(command, workdir, step, sig):
    """Starts the CLI, sends ``sig`` once metrics.jsonl shows training step ``step``."""
    process = subprocess.Popen(
        command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = Path(workdir) / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError("the run ended before the signal:\n" + process.stderr.read())
        if metrics.exists():
            steps = [
                json.loads(line)["step"]
                for line in metrics.read_text().splitlines()
                if "train/loss" in line
            ]
            if steps and max(steps) >= step:
                process.send_signal(sig)
                break
        time.sleep(0.05)
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def test_sigkill_at_a_random_step_then_rerun_matches_an_uninterrupted_run(tiny_records, tmp_path):
    extra = {"train.checkpoint_every_steps": 1}
    full = _run(_command(tiny_records, tmp_path / "full", **extra))
    assert full.returncode == 0, full.stderr[-2000:]
    kill_step = int(np.random.default_rng(int(time.time())).integers(2, 6))  # of 6 steps
    code, _, _ = _start_and_signal_at(
        _command(tiny_records, tmp_path / "killed", **extra),
        tmp_path / "killed",
        kill_step,
        signal.SIGKILL,
    )
    assert code == -signal.SIGKILL
    rerun = _run(_command(tiny_records, tmp_path / "killed", **extra))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    step_a, leaves_a = final_state_leaves(tmp_path / "full")
    step_b, leaves_b = final_state_leaves(tmp_path / "killed")
    assert step_a == step_b, f"killed at step {kill_step}"
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"killed at step {kill_step}")
    results = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("full", "killed")]
    assert results[0]["test_accuracy"] == results[1]["test_accuracy"]


def test_sigterm_saves_a_checkpoint_before_exiting(tiny_records, tmp_path):
    workdir = tmp_path / "run"
    # Checkpoints would otherwise only be written at the phase start (step 0) and end.
    code, out, err = _start_and_signal_at(
        _command(tiny_records, workdir), workdir, 2, signal.SIGTERM
    )
    assert code == 0, err[-2000:]
    assert "stopped at step" in out
    stopped_at = int(out.split("stopped at step")[1].split(";")[0])
    assert stopped_at >= 2
    step, _ = final_state_leaves(workdir)
    assert step == stopped_at
    # and the same command finishes the run
    rerun = _run(_command(tiny_records, workdir))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (workdir / "results.json").exists()


def _copy_records(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_record(records_dir, split, index, mutate):
    """Rewrites the split's first shard with its record ``index`` passed through ``mutate``."""
    shard = records_lib.list_shards(records_dir, split)[0]
    reader = records_lib.ShardedRecords([shard])
    payloads = [reader[i] for i in range(len(reader))]
    reader.close()
    payloads[index] = mutate(payloads[index])
    records_lib.write_shard(shard, payloads)
    return shard


def _record(data):
    return records_lib.ImageRecord.from_bytes(data)


def _zero_masks(data):
    record = _record(data)
    record.boxes = np.zeros((0, 4), np.float32)
    record.areas = np.zeros(0, np.float32)
    record.mask_pngs = []
    return record.to_bytes()


def _box_outside(data):
    record = _record(data)
    record.boxes = record.boxes.copy()
    record.boxes[0] = [0.5, 0.5, 1.4, 0.9]
    return record.to_bytes()


def _undecodable(data):
    record = _record(data)
    record.image_bytes = b"\x89PNG but not really an image"
    return record.to_bytes()


@pytest.mark.parametrize(
    "fault, message",
    [
        ("bad_crc", "CRC mismatch"),
        ("truncated", "truncated"),
        ("undecodable", "cannot be decoded"),
        ("zero_masks", "zero masks"),
        ("box_outside", "outside the image"),
    ],
)
def test_corrupt_record_is_named_or_skipped(tiny_records, tmp_path, fault, message):
    records_dir = _copy_records(tiny_records, tmp_path / "records")
    shard = records_lib.list_shards(records_dir, "train")[0]
    if fault == "bad_crc":
        data = bytearray(shard.read_bytes())
        offset = int(records_lib.read_index(shard)[1, 0])
        data[offset + 40] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif fault == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 100])  # the index still claims the last record
    else:
        mutate = {"undecodable": _undecodable, "zero_masks": _zero_masks}.get(fault, _box_outside)
        _rewrite_record(records_dir, "train", 1, mutate)

    # Default: a clear error naming file, offset and (where readable) the image id.
    with pytest.raises(records_lib.RecordError, match=message) as error:
        pipeline.RecordSet(records_dir, "train")
    assert shard.name in str(error.value) and "byte offset" in str(error.value)
    if fault in ("undecodable", "zero_masks", "box_outside"):
        assert "image id" in str(error.value)

    # skip_bad_records: the record is left out and reported.
    records = pipeline.RecordSet(records_dir, "train", skip_bad_records=True)
    assert len(records.skipped) == 1 and len(records.good) == len(records) - 1
    assert message in records.skipped[0]


def test_training_with_skip_bad_records_reports_the_count(tiny_records, tmp_path):
    records_dir = _copy_records(tiny_records, tmp_path / "records")
    _rewrite_record(records_dir, "train", 1, _undecodable)
    refused = _run(_command(records_dir, tmp_path / "refused"))
    assert refused.returncode == 2
    assert "cannot be decoded" in refused.stderr and "byte offset" in refused.stderr
    config = tiny_config(records_dir, **{"input.skip_bad_records": True})
    results = trainer.train_and_evaluate(config, tmp_path / "skipping")
    assert results["skipped_records"] == {"train": 1, "test": 0}


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tiny_records, tmp_path):
    # An absurd learning rate overflows the parameters to inf within a step or two.
    config = tiny_config(
        tiny_records,
        **{"train.backbone_lr": 1e38, "train.prototype_lr": 1e38, "train.log_every_steps": 1},
    )
    with pytest.raises(trainer.TrainingDiverged, match=r"at step \d+ .*last good checkpoint"):
        trainer.train_and_evaluate(config, tmp_path)
    step, leaves = final_state_leaves(tmp_path)
    assert step == 0  # the phase-start checkpoint, saved before anything went wrong
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves if leaf.dtype.kind == "f")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "configs/nope.py"], "nope.py"),
        (["--config", "configs/demo.py", "--config.input.num_views=0"], "config.input.num_views"),
        (["--config", "configs/demo.py", "--config.train.prototype_lr=-1"], "train.prototype_lr"),
        (["--config", "configs/demo.py", "--config.mesh.data=16"], "config.mesh.data=16"),
        (["--config", "configs/demo.py"], "--workdir is required"),
    ],
)
def test_cli_refuses_bad_input_with_what_to_fix(tmp_path, args, message):
    if "--workdir is required" not in message:
        args = [
            *args,
            "--workdir",
            str(tmp_path / "w"),
            "--config.dataset.records_dir=/nonexistent",
        ]
    result = _run([sys.executable, "-m", "protomask_jax.train", *args], timeout=300)
    assert result.returncode != 0
    assert message in result.stderr
    if message.startswith("config."):  # our own checks: one line, exit code 2, no traceback
        assert result.returncode == 2 and "Traceback" not in result.stderr
