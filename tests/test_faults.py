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

from protomask_jax import cli, config_checks, inference, trainer
from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib
from protomask_jax.logs import read_metrics

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


# ------------------------------------------------ user mistakes: one line, nothing written


def _one_line(completed) -> str:
    """The single ``error:`` line of a refused command (exit code 2, no traceback)."""
    output = completed.stdout + completed.stderr
    assert completed.returncode == 2 and "Traceback" not in output, output[-3000:]
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, completed.stderr[-3000:]
    return errors[0]


def _damaged_records(tiny_records, tmp_path):
    """Copies of the tiny records, each with one fault, by name."""
    damaged = {}
    for name, fault in {
        "info_bytes": lambda d: (d / "dataset_info.json").write_bytes(bytes(range(256))),
        "info_text": lambda d: (d / "dataset_info.json").write_text("8 classes of birds\n"),
        "info_null": lambda d: (d / "dataset_info.json").write_text("null"),
        "info_names": _drop_a_class_name,
        "test_shard": _flip_a_record_byte,
        "train_index": _flip_an_index_byte,
    }.items():
        damaged[name] = _copy_records(tiny_records, tmp_path / name)
        fault(damaged[name])
    return damaged


def _drop_a_class_name(records_dir):
    info = json.loads((records_dir / "dataset_info.json").read_text())
    info["class_names"].pop()
    (records_dir / "dataset_info.json").write_text(json.dumps(info))


def _flip_a_record_byte(records_dir):
    shard = records_lib.list_shards(records_dir, "test")[0]
    data = bytearray(shard.read_bytes())
    data[int(records_lib.read_index(shard)[2, 0]) + 50] ^= 0x10
    shard.write_bytes(bytes(data))


def _flip_an_index_byte(records_dir):
    index = Path(f"{records_lib.list_shards(records_dir, 'train')[1]}.index")
    data = bytearray(index.read_bytes())
    data[16 * 3] ^= 0x01  # the offset of record 3
    index.write_bytes(bytes(data))


def test_user_mistakes_end_in_one_line_before_anything_is_written(tiny_records, tmp_path):
    """Each mistake through the real CLI: exit code 2, one line naming what to fix, no
    traceback, and no workdir (nor records folder) left behind."""
    from concurrent.futures import ThreadPoolExecutor

    from tests import _trained_run

    config_file = _trained_run.write_config_file(tmp_path / "tiny.py", tiny_records)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(1000))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # root writes anywhere; /proc/sys is read-only even so
        read_only = Path("/proc/sys")
    damaged = _damaged_records(tiny_records, tmp_path)
    train = {
        "weights_missing": (["--config.model.pretrained=/nonexistent/r50.pth"], "No state_dict"),
        "weights_hash": (
            [f"--config.model.pretrained={garbage}", "--config.model.pretrained_sha256=ab"],
            "SHA-256 mismatch",
        ),
        "protomask_not_torch": ([f"--config.model.import_protomask={garbage}"], "torch.load"),
        "seed": (["--config.seed=-1"], "config.seed: must be in [0, 2**32), got -1"),
        # Found before the records are read (their folder does not exist).
        "no_epochs": (
            [
                "--config.train.joint_epochs=0",
                "--config.train.finetune_epochs=0",
                "--config.dataset.records_dir=/nonexistent",
            ],
            "every phase has 0 epochs",
        ),  # fmt: skip
        "keep_none": (["--config.train.keep_checkpoints=0"], "config.train.keep_checkpoints"),
        "max_steps": (["--max_steps=0"], "--max_steps=0: must be >= 1"),
        "mesh": (["--config.mesh.data=16"], "config.mesh.data=16"),
        "batch": (["--config.input.batch_size=24"], "more than the 20 training images"),
        "workdir_file": ([], "is a file; give a folder"),
        "workdir_read_only": ([], "is read-only"),
        "info_bytes": ([], "dataset_info.json is not valid JSON"),
        "info_text": ([], "dataset_info.json is not valid JSON"),
        "info_null": ([], "dataset_info.json holds null"),
        "info_names": ([], "class_names must be 4 distinct"),
        "test_shard": ([], "test-00000-of-00001.tfrecord at byte offset"),
        "train_index": ([], "train-00001-of-00002.tfrecord.index: the offsets"),
    }
    workdirs = {"workdir_file": a_file, "workdir_read_only": read_only / "run"}

    def run_train(name):
        args, _ = train[name]
        records = [f"--config.dataset.records_dir={damaged[name]}"] if name in damaged else []
        workdir = workdirs.get(name, tmp_path / f"run_{name}")
        return _trained_run.run_module(
            "protomask_jax.train", "--config", str(config_file), "--workdir", str(workdir),
            *records, *args,
        )  # fmt: skip

    sam = [
        "--config", "configs/demo.py", f"--config.dataset.root={tiny_records.parent}/dataset",
        "--config.dataset.num_classes=4", "--config.dataset.synthetic.num_classes=4",
        "--config.dataset.synthetic.image_size=64", "--config.dataset.synthetic.train_per_class=6",
        "--config.dataset.synthetic.test_per_class=2", "--config.segmentation.method=sam",
        f"--config.dataset.records_dir={tmp_path / 'sam_records'}",
    ]  # fmt: skip
    export = {
        "sam_missing": (["--config.segmentation.sam.checkpoint=/nonexistent/sam.pth"], "not found"),
        "sam_hash": (
            [
                f"--config.segmentation.sam.checkpoint={garbage}",
                "--config.segmentation.sam.checkpoint_sha256=ab",
            ],
            "does not match segmentation.sam.checkpoint_sha256=ab",
        ),  # fmt: skip
        "sam_not_torch": ([f"--config.segmentation.sam.checkpoint={garbage}"], "torch.load"),
    }

    def run_export(name):
        return _trained_run.run_module("segmentation.export", *sam, *export[name][0])

    with ThreadPoolExecutor(max_workers=2) as pool:
        done = {name: pool.submit(run_train, name) for name in train}
        done.update({name: pool.submit(run_export, name) for name in export})
        for name, needle in [(n, m) for n, (_, m) in {**train, **export}.items()]:
            line = _one_line(done[name].result())
            assert needle in line, (name, line)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(("run_", "sam_"))]
    assert leftovers == [] and not (read_only / "run").exists()


def _sigterm_then(function):
    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # handled before the next line runs
        return function(*args, **kwargs)

    return wrapped


def test_a_resumed_run_logs_each_step_once_and_refuses_what_would_go_wrong(
    tiny_records, tmp_path, monkeypatch
):
    records_dir = _copy_records(tiny_records, tmp_path / "records")
    workdir = tmp_path / "run"
    extra = {"train.log_every_steps": 1}
    config = cli.absolute_paths(tiny_config(records_dir, **extra))  # as the CLI resolves it
    # 18 training images in batches of 8: 2 steps per epoch, 6 in all (joint 4, finetune 2).
    assert trainer.train_and_evaluate(config, workdir, max_steps=3) == {"stopped_at_step": 3}
    # As if killed after logging step 4 (and half a line) but before its checkpoint.
    metrics = workdir / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write(json.dumps({"step": 4, "phase": "joint", "train/loss": 99.0}) + '\n{"step": 5')
    before = metrics.read_bytes()
    # --max_steps at or below the step reached trains nothing: one line.
    command = _command(records_dir, workdir, **extra) + ["--max_steps=3"]
    assert "the run in" in _one_line(_run(command)) and metrics.read_bytes() == before

    # Records whose class names changed: neither resumed nor evaluated.
    info_path = records_dir / "dataset_info.json"
    original = info_path.read_text()
    info = json.loads(original)
    info["class_names"][1] = "renamed"
    info_path.write_text(json.dumps(info))
    with pytest.raises(config_checks.ConfigError, match="class 1 is 'renamed' here but 'red-"):
        trainer.train_and_evaluate(config, workdir)
    with pytest.raises(config_checks.ConfigError, match="class 1 is 'renamed' here"):
        inference.restore_trained(config, workdir)
    info_path.write_text(original)

    # SIGTERM during start-up, then during the final evaluation: stopped, nothing lost.
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "_initial_state", _sigterm_then(trainer._initial_state))
        assert trainer.train_and_evaluate(config, workdir) == {"stopped_at_step": 3}
    assert metrics.read_bytes() == before
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "final_evaluation", _sigterm_then(trainer.final_evaluation))
        assert trainer.train_and_evaluate(config, workdir) == {"stopped_at_step": 6}
    assert not (workdir / "results.json").exists()
    trainer.train_and_evaluate(config, workdir)
    rows = read_metrics(workdir)
    assert [row["step"] for row in rows if "train/loss" in row] == [1, 2, 3, 4, 5, 6]
    assert 99.0 not in [row.get("train/loss") for row in rows]
    logged = [(row["step"], row["phase"], key) for row in rows for key in row if "/" in key]
    assert len(logged) == len(set(logged)) and sum("test/accuracy" in r for r in rows) == 1


def test_sigterm_during_start_up_stops_with_the_loop_s_message(tiny_records, tmp_path):
    process = subprocess.Popen(
        _command(tiny_records, tmp_path / "run"),
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen = []
    for line in process.stderr:
        seen.append(line)
        if "checking the records" in line:  # the trainer's start-up has begun
            process.send_signal(signal.SIGTERM)
            break
    out, err = process.communicate(timeout=600)
    err = "".join(seen) + err
    assert "checking the records" in err and process.returncode == 0, err[-3000:]
    assert "SIGTERM received" in err and "Traceback" not in err
    assert "stopped at step" in out and "run the same command to resume" in out
