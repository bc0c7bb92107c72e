"""The command lines as a user meets them: a run remembers its config, and a mistake in the
flags ends in one line naming it, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from protomask_jax import cli
from tests import _trained_run
from tests import fixtures_datasets as fx

pytest.importorskip("scipy")
REPO = Path(__file__).resolve().parents[1]


def _one_line_error(completed, *needles: str) -> str:
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "Traceback" not in completed.stderr + completed.stdout
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, completed.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("module", ["protomask_jax.train", "segmentation.export"])
def test_config_flag_mistakes_are_one_line(tmp_path, module):
    workdir = ("--workdir", str(tmp_path / "w")) if module.endswith("train") else ()
    run = _trained_run.run_module
    _one_line_error(
        run(module, "--config", "configs/nope.py", *workdir), "configs/nope.py", "no such"
    )
    _one_line_error(
        run(module, "--config", "configs/demo.py", "--config.input.num_view=8", *workdir),
        "--config.input.num_view",
        "num_views",  # the valid keys are listed
        "view_size",
    )
    _one_line_error(
        run(module, "--config", "configs/demo.py", "--config.train.epochs=3", *workdir),
        "train has no key 'epochs'",
        "joint_epochs",
    )
    _one_line_error(
        run(module, "--config", "configs/demo.py", "--config.input.num_views=abc", *workdir),
        "num_views",
    )
    assert not (tmp_path / "w").exists()


def test_absolute_paths_and_misspelt_keys_of_a_locked_config():
    from configs import demo

    config = cli.absolute_paths(demo.get_config())
    assert config.dataset.records_dir.startswith("/")
    assert config.dataset.records_dir.endswith("data/parts_world/records_gt")
    assert config.model.pretrained == ""  # empty stays empty
    bucket = demo.get_config()
    bucket.dataset.records_dir = "gs://protomask-test/records"
    # a bucket URL is kept as given (made absolute it would name a local "gs:" folder)
    assert cli.absolute_paths(bucket).dataset.records_dir == "gs://protomask-test/records"
    argv = ["--config", "configs/demo.py", "--config.model.backbone_x=1"]
    assert "model has no key 'backbone_x'" in cli.config_key_error(argv)
    assert cli.config_key_error(["--config", "configs/demo.py", "--config.seed=3"]) is None


@pytest.mark.slow
def test_cub_commands_as_written_after_training_with_overrides(tmp_path):
    """README's CUB workflow on a miniature CUB tree: export and train with overrides, then
    evaluate and explain with only --config configs/cub.py and --workdir."""
    expected = fx.make_cub(tmp_path / "data")
    records = tmp_path / "records"
    run = _trained_run.run_module
    data = [
        f"--config.dataset.root={expected.root}",
        f"--config.dataset.records_dir={records}",
        "--config.dataset.num_classes=3",
    ]
    grid = ["--config.segmentation.method=grid", "--config.segmentation.shards.train=1",
            "--config.segmentation.shards.test=1"]  # fmt: skip
    # configs/cub.py says 200 classes: the error names the flag and the count found.
    _one_line_error(
        run("segmentation.export", "--config", "configs/cub.py", *data[:2], *grid),
        "has 3 classes; set --config.dataset.num_classes=3.",
    )
    exported = run("segmentation.export", "--config", "configs/cub.py", *data, *grid)
    assert exported.returncode == 0, exported.stderr
    assert "object masks: found for 9/9 images" in exported.stdout
    workdir = tmp_path / "workdir"
    small = [
        "--config.model.backbone=resnet_micro", "--config.model.prototype_dim=8",
        "--config.model.prototypes_per_class=2", "--config.model.compute_dtype=float32",
        "--config.input.canvas_size=32", "--config.input.view_size=32",
        "--config.input.num_views=4", "--config.input.batch_size=6", "--config.mesh.data=2",
        "--config.input.eval_batch_size=8", "--config.input.validation_fraction=0",
        "--config.input.num_workers=0",
        "--config.train.joint_epochs=1", "--config.train.finetune_epochs=1",
    ]  # fmt: skip
    wrong = run("protomask_jax.train", "--config", "configs/cub.py", *data[:2],
                "--config.dataset.num_classes=5", *small, "--workdir", str(workdir))  # fmt: skip
    _one_line_error(wrong, "says 3 classes; set --config.dataset.num_classes=3 ")
    assert not workdir.exists()
    trained = run("protomask_jax.train", "--config", "configs/cub.py", *data, *small,
                  "--workdir", str(workdir))  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    stored = json.loads((workdir / cli.RUN_CONFIG).read_text())
    # configs/cub.py asks for SAM masks; the run was trained on grid records and says so.
    assert stored["config"]["segmentation"]["method"] == "grid"
    assert stored["config"]["model"]["backbone"] == "resnet_micro"
    assert stored["source"]["file"] == str(REPO / "configs" / "cub.py")
    assert stored["source"]["overrides"]["model.backbone"] == "resnet_micro"

    evaluated = run("protomask_jax.evaluate", "--config", "configs/cub.py", "--workdir",
                    str(workdir))  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads((workdir / "eval.json").read_text())
    assert results["num_images"] == 3 and results["num_classes"] == 3
    # CUB has bird masks but no deciding parts: faithfulness is not computed, and says why.
    assert "complexity" in results and "faithfulness" not in results
    reason = results["not_computed"]["faithfulness"]
    assert "gt/decisive_parts" in reason and f"not computed: {reason}" in evaluated.stdout
    explained = run("protomask_jax.explain", "--config", "configs/cub.py", "--workdir",
                    str(workdir))  # fmt: skip
    assert explained.returncode == 0, explained.stderr[-3000:]
    assert (workdir / "report" / "index.html").is_file()
    # Without --config the run's own config; with a conflicting override a clear refusal.
    alone = run("protomask_jax.evaluate", "--workdir", str(workdir), "--techniques",
                "classification")  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-3000:]
    _one_line_error(
        run(
            "protomask_jax.evaluate",
            "--config",
            "configs/cub.py",
            "--config.model.backbone=resnet50",
            "--workdir",
            str(workdir),
        ),  # fmt: skip
        "model.backbone is 'resnet_micro' in the run, 'resnet50' here",
    )
    _one_line_error(
        run("protomask_jax.evaluate", "--config", "configs/dogs.py", "--workdir", str(workdir)),
        "dataset.num_classes is 3 in the run, 120 here",
    )
    _one_line_error(
        run("protomask_jax.evaluate", "--workdir", str(tmp_path / "nothing")),
        "holds no training run",
    )
    assert not (tmp_path / "nothing").exists()
    # The same records named by a relative path resume the same run.
    relative = os.path.relpath(records, REPO)
    again = run("protomask_jax.train", "--config", "configs/cub.py", *data[:1],
                f"--config.dataset.records_dir={relative}", *data[2:], *small,
                "--workdir", str(workdir))  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.parametrize(
    "module", ["protomask_jax.evaluate", "protomask_jax.explain", "protomask_jax.predict"]
)
def test_misspelt_key_without_config_file_is_one_line(tmp_path, module):
    """Without --config the tools check overrides against the base config while defining the
    flag, before absl parses anything."""
    completed = _trained_run.run_module(
        module, "--workdir", str(tmp_path / "w"), "--config.input.num_view=3", str(tmp_path)
    )
    _one_line_error(completed, "--config.input.num_view", "num_views")
    assert not (tmp_path / "w").exists()
