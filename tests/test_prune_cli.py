"""Pruning a finished run (``python -m protomask_jax.prune``): the rule against numpy on an
independent forward, the original run untouched, evaluation of the pruned run, and a rerun
after an interruption."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _trained_run import independent_outputs, run_module, tiny_config, trained_workdir

from protomask_jax import inference, prune, trainer
from protomask_jax.data import pipeline

pytestmark = pytest.mark.slow

K = 6


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_records):
    """A private copy of the shared tiny run, the own-class counts among each prototype's k
    nearest training images (numpy, from an independent forward) and a threshold that prunes
    some prototypes but not all."""
    source = trained_workdir(tmp_path_factory, tiny_records)
    workdir = tmp_path_factory.mktemp("prune") / "run"
    shutil.copytree(source, workdir)
    config = tiny_config(tiny_records)
    trained = inference.restore_trained(config, workdir)
    records = pipeline.RecordSet(tiny_records, "train")
    train, _ = pipeline.split_train_validation(
        records.labels[records.good], config.input.validation_fraction, config.seed
    )
    outputs = independent_outputs(trained, records)
    distances = outputs["min_distances"][records.good[train]]  # [N, P]
    labels = outputs["labels"][records.good[train]]
    classes = np.asarray(trained.state.constants["prototype_class"][...])
    own = np.zeros(len(classes), int)
    for j, c in enumerate(classes):
        nearest = np.argsort(distances[:, j], kind="stable")[:K]
        own[j] = np.sum(labels[nearest] == c)
    thresholds = [t for t in range(1, K + 1) if 0 < np.sum(own >= t) < len(own)]
    assert thresholds, f"no threshold prunes some but not all: own-class counts {own}"
    config.unlock()
    config.train.prune.finetune_epochs = 2
    config.lock()
    return config, workdir, own, thresholds[0]


@pytest.fixture(scope="module")
def cli_pruned(run):
    """The command run once on ``run``: (its output, the run's file hashes before it)."""
    _, workdir, _, threshold = run
    before = _hashes(workdir)
    completed = run_module(
        "protomask_jax.prune", "--workdir", str(workdir), "--k", str(K),
        "--threshold", str(threshold), "--config.train.prune.finetune_epochs=2",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed, before


def test_cli_prunes_into_a_new_folder_and_leaves_the_run_untouched(run, cli_pruned):
    config, workdir, own, threshold = run
    completed, before = cli_pruned
    out = workdir / f"pruned_k{K}_t{threshold}"
    assert str(out) in completed.stdout and "top-1 accuracy" in completed.stdout
    after = _hashes(workdir)
    assert {name: after[name] for name in before} == before
    assert all(name.startswith(out.name) for name in set(after) - set(before))

    expected = np.flatnonzero(own >= threshold)
    stored = json.loads((out / "config.json").read_text())["config"]["train"]["prune"]
    assert stored == dict(enabled=True, k=K, threshold=threshold, finetune_epochs=2)
    pruned_config = prune.pruned_config(config, K, threshold)
    trained = inference.restore_trained(pruned_config, out)
    assert trained.meta["kept_prototypes"] == expected.tolist()
    assert trained.checkpoint.startswith("best_prune_finetune")
    np.testing.assert_array_equal(
        np.asarray(trained.state.constants["prototype_class"][...]), expected // 2
    )
    evaluation = json.loads((out / "eval.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert evaluation["num_prototypes"] == results["num_prototypes"] == len(expected) < len(own)
    assert evaluation["compactness"]["global_explanation_size"] <= len(expected)


def test_an_interrupted_prune_resumes_to_the_same_model(run, cli_pruned, tmp_path):
    config, workdir, _, threshold = run
    pruned_config = prune.pruned_config(config, K, threshold)
    whole = workdir / f"pruned_k{K}_t{threshold}"
    # Interrupted one step into the last-layer fine-tune, then the same command again.
    interrupted = tmp_path / "interrupted"
    trainer.start_pruned_run(pruned_config, workdir, interrupted)
    start = inference.restore_trained(pruned_config, interrupted, which="latest").meta["step"]
    stopped = trainer.train_and_evaluate(pruned_config, interrupted, max_steps=start + 1)
    assert stopped == {"stopped_at_step": start + 1}
    prune.prune(config, workdir, k=K, threshold=threshold, out_dir=interrupted)
    a = inference.restore_trained(pruned_config, whole, which="latest")
    b = inference.restore_trained(pruned_config, interrupted, which="latest")
    assert a.meta["kept_prototypes"] == b.meta["kept_prototypes"]
    np.testing.assert_array_equal(
        np.asarray(a.state.params["last_layer"][...]),
        np.asarray(b.state.params["last_layer"][...]),
    )
    for name in ("results.json", "eval.json"):
        first = json.loads((whole / name).read_text())
        second = json.loads((interrupted / name).read_text())
        for key in ("train_time_s", "workdir", "config"):
            first.pop(key, None), second.pop(key, None)
        assert first == second, name


def test_mistakes_end_in_one_line(run, tmp_path):
    _, workdir, _, _ = run
    completed = run_module("protomask_jax.prune", "--workdir", str(tmp_path / "nothing"))
    assert completed.returncode == 2
    assert completed.stderr.strip().count("\n") == 0 and "no training run" in completed.stderr
    completed = run_module("protomask_jax.prune", "--workdir", str(workdir), "--threshold", "9")
    assert completed.returncode == 2 and "train.prune.threshold" in completed.stderr
