"""Training end to end on tiny exported records: outputs, exact resume, refusals, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import demo
from protomask_jax import config_checks, inference, trainer
from protomask_jax.data import pipeline

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# Command-line overrides that shrink the demo to the tiny fixture (4 classes, 24 train images).
TINY_OVERRIDES = {
    "dataset.num_classes": 4,
    "input.canvas_size": 64,
    "input.view_size": 32,
    "input.num_views": 4,
    "input.batch_size": 8,
    "input.eval_batch_size": 8,
    "input.validation_fraction": 0.25,
    "model.backbone": "resnet_micro",
    "model.prototype_dim": 8,
    "model.prototypes_per_class": 2,
    "train.joint_epochs": 2,
    "train.finetune_epochs": 1,
    "train.eval_every_epochs": 1,
    "train.log_every_steps": 2,
    "train.checkpoint_every_steps": 100,
    "mesh.data": 1,
}


def tiny_config(records_dir, **extra):
    config = demo.get_config()
    config.unlock()
    config.dataset.records_dir = str(records_dir)
    for dotted, value in {**TINY_OVERRIDES, **extra}.items():
        section, key = dotted.split(".")
        config[section][key] = value
    config.lock()
    return config


def final_state_leaves(workdir):
    manager = ocp.CheckpointManager(
        Path(workdir).absolute() / "checkpoints", item_names=("state", "meta")
    )
    step = manager.latest_step()
    # Onto this process's first device, whatever topology saved it (a multi-process run's
    # checkpoint records devices this process does not have).
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        ocp.StandardCheckpointer().metadata(manager.directory / str(step) / "state").item_metadata,
    )
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )
    manager.close()
    return step, [np.asarray(x) for x in jax.tree.leaves(restored["state"])]


def test_run_writes_outputs_and_resumes_bitwise(tiny_records, tmp_path):
    config = tiny_config(tiny_records)
    full = trainer.train_and_evaluate(config, tmp_path / "full")

    # What a person and the later stages read.
    workdir = tmp_path / "full"
    assert 0.0 <= full["test_accuracy"] <= 1.0
    assert (
        json.loads((workdir / "results.json").read_text())["test_accuracy"] == full["test_accuracy"]
    )
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/accuracy"} <= set().union(*rows)
    assert any("val/accuracy" in row for row in rows)
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    push = json.loads((workdir / "push.json").read_text())
    num_prototypes = 4 * 2
    assert len(push["image_id"]) == num_prototypes
    # every prototype was projected onto a training image of its own class
    assert all(i >= 0 for i in push["image_id"]) and all(np.isfinite(push["distance"]))

    # Stop mid-epoch (16 training images / batch 8 = 2 steps per epoch), then resume.
    stopped = trainer.train_and_evaluate(config, tmp_path / "resumed", max_steps=3)
    assert stopped == {"stopped_at_step": 3}
    resumed = trainer.train_and_evaluate(config, tmp_path / "resumed")
    assert resumed["test_accuracy"] == full["test_accuracy"]
    step_a, leaves_a = final_state_leaves(tmp_path / "full")
    step_b, leaves_b = final_state_leaves(tmp_path / "resumed")
    assert step_a == step_b
    assert len(leaves_a) == len(leaves_b)
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(a, b)


def test_push_leaves_prototypes_on_training_views(tiny_records, tmp_path):
    config = tiny_config(tiny_records, **{"train.finetune_epochs": 1})
    trainer.train_and_evaluate(config, tmp_path)
    trained = inference.restore_trained(config, tmp_path, which="latest")
    push = trained.meta["push"]
    assert push is not None and trained.meta["pushed"]
    # After push each prototype *is* the embedding of its source view; fine-tuning freezes the
    # backbone, add-on, prototypes and BatchNorm, so recomputing that view's embedding now
    # must give the prototype back.
    prototypes = np.asarray(trained.state.params["prototypes"][...])
    records = pipeline.RecordSet(tiny_records, "train")
    index_of_id = {int(i): n for n, i in enumerate(records.image_ids)}
    sources = np.array([index_of_id[i] for i in push["image_id"]])
    forward = trained.eval_fn(return_views=True)
    embeddings = []
    for batch in trained.eval_batches(records, sources):
        out = forward(
            trained.state.params, trained.state.batch_stats, trained.state.constants, batch
        )
        embeddings.append(np.asarray(out.embeddings)[np.asarray(batch["weight"]) > 0])
    embeddings = np.concatenate(embeddings)
    matched = embeddings[np.arange(len(sources)), push["view_index"]]
    np.testing.assert_allclose(matched, prototypes, atol=1e-5)


def test_end_of_training_stages_show_progress_bars_and_lines(tiny_records, tmp_path, capfd):
    # 16 training images (2 steps of 8 per epoch), 8 validation and 8 test images; joint is
    # epoch 0, fine-tune epoch 1, whose best checkpoint is its last step, 4.
    config = tiny_config(tiny_records, **{"train.joint_epochs": 1})
    trainer.train_and_evaluate(config, tmp_path)
    captured = capfd.readouterr()
    stages = [
        ("joint validation, epoch 0", 8),
        ("push, training images", 16),
        ("validation after push", 8),
        ("finetune validation, epoch 1", 8),
        ("test, final", 8),
        ("test, best finetune checkpoint, step 4", 8),
    ]
    for label, images in stages:
        assert f"{label} ({images} images)" in captured.err  # the bar
    lines = [line for line in captured.out.splitlines() if " images in " in line]
    assert [line.split(":")[0] for line in lines] == [label for label, _ in stages]
    for line, (_, images) in zip(lines, stages, strict=True):
        assert f": {images} images in " in line
    epoch_lines = [line for line in captured.out.splitlines() if " done in " in line]
    assert [line.split(" done")[0] for line in epoch_lines] == ["joint epoch 0", "finetune epoch 1"]
    assert all("images/s after the first step" in line for line in epoch_lines)


def test_workdir_of_another_config_is_refused(tiny_records, tmp_path):
    trainer.train_and_evaluate(tiny_config(tiny_records), tmp_path, max_steps=1)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    other = tiny_config(tiny_records, **{"train.prototype_lr": 1e-2})
    with pytest.raises(config_checks.ConfigError, match="train.prototype_lr"):
        trainer.train_and_evaluate(other, tmp_path)
    # nothing written: no new TensorBoard file, config.json and metrics untouched
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("input.num_views", 0, "input.num_views"),
        ("train.backbone_lr", -1.0, "train.backbone_lr"),
        ("model.backbone", "resnet7", "model.backbone"),
        ("dataset.num_classes", 5, "dataset.num_classes"),
    ],
)
def test_bad_values_are_refused_with_the_key(tiny_records, tmp_path, key, value, message):
    with pytest.raises(config_checks.ConfigError, match=message):
        trainer.train_and_evaluate(tiny_config(tiny_records, **{key: value}), tmp_path)


def _cli(args, cwd=REPO):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run(
        [sys.executable, "-m", "protomask_jax.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_cli_trains_end_to_end(tiny_records, tmp_path):
    """With grain worker processes, and a segmentation section that is not the records'."""
    overrides = [f"--config.{k}={v}" for k, v in TINY_OVERRIDES.items()]
    result = _cli(
        [
            "--config",
            "configs/demo.py",
            "--workdir",
            str(tmp_path / "run"),
            f"--config.dataset.records_dir={tiny_records}",
            *overrides,
            "--config.input.num_workers=2",
            "--config.segmentation.method=sam",
            "--config.segmentation.max_masks=16",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test accuracy:" in result.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert f"{results['test_accuracy']:.4f}" in result.stdout
    # Batches from the workers came in shared memory; none may be left at exit.
    assert "leaked shared_memory" not in result.stderr, result.stderr[-3000:]
    # config.json records how the records were made (the fixture: gt masks, at most 8).
    segmentation = json.loads((tmp_path / "run" / "config.json").read_text())["config"][
        "segmentation"
    ]
    assert (segmentation["method"], segmentation["max_masks"]) == ("gt", 8)


def test_records_segmentation_replaces_the_config_files_request():
    info = {
        "segmenter": {"method": "slic", "params": {"n_segments": 7, "compactness": 4.0,
                                                   "sigma": 0.5}},
        "postprocess": {"max_masks": 5, "skip_background": 1, "min_box_px": 3},
    }  # fmt: skip
    config = demo.get_config()
    config.unlock()
    config.segmentation.method = "sam"
    config.segmentation.sam.checkpoint = "/weights/sam_vit_h_4b8939.pth"
    config.lock()
    made = trainer.records_segmentation(config, info)
    seg = made.segmentation
    assert seg.method == "slic"
    assert seg.slic.to_dict() == {"n_segments": 7, "compactness": 4.0, "sigma": 0.5}
    assert (seg.max_masks, seg.skip_background, seg.min_box_px) == (5, 1, 3)
    assert seg.sam.checkpoint == "/weights/sam_vit_h_4b8939.pth"  # paths stay as given
    assert config.segmentation.method == "sam"  # the caller's config is untouched
    # SAM records: the generator's settings are the records'; the file name is not a path.
    params = {"points_per_side": 8, "model_type": "vit_b", "checkpoint": "sam_vit_b_01ec64.pth"}
    sam = {"method": "sam", "params": params | {"input": "rgb"}}
    made = trainer.records_segmentation(config, {"segmenter": sam, "postprocess": {}})
    assert (made.segmentation.sam.points_per_side, made.segmentation.sam.model_type) == (8, "vit_b")
    assert made.segmentation.sam.checkpoint == "/weights/sam_vit_h_4b8939.pth"
    assert "input" not in made.segmentation.sam  # no key the config does not have


def test_cli_refuses_a_misspelt_key(tmp_path):
    result = _cli(
        ["--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.input.num_view=3"]
    )
    assert result.returncode != 0
    assert "num_views" in result.stderr  # the valid key is named


def test_pruning_drops_prototypes_and_fine_tunes_the_rest(tiny_records, tmp_path):
    config = tiny_config(tiny_records)
    config.unlock()
    config.train.prune.enabled = True
    config.train.prune.k = 4
    config.train.prune.threshold = 2
    config.train.prune.finetune_epochs = 1
    config.lock()
    results = trainer.train_and_evaluate(config, tmp_path)
    trained = inference.restore_trained(config, tmp_path, which="latest")
    kept = trained.meta["kept_prototypes"]
    assert trained.meta["pruned"] and trained.meta["phase"] == "prune_finetune"
    assert results["num_prototypes"] == len(kept) <= 4 * 2
    # the class identity survives pruning (the reference loses it): kept j had class j // 2
    np.testing.assert_array_equal(
        np.asarray(trained.state.constants["prototype_class"][...]), np.asarray(kept) // 2
    )
    assert trained.state.params["last_layer"][...].shape == (len(kept), 4)
