"""Tables over runs, on hand-made run folders: grouping by config difference, statistics
against numpy, the Markdown and LaTeX output, and one-line mistakes through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _trained_run import run_module

from protomask_jax import base, tables

# (method, seed, num_workers, top-1 %, faithfulness rate %, test accuracy, VLC or None)
RUNS = [
    ("gt", 0, 0, 90.0, 50.0, 0.90, 40.0),
    ("gt", 1, 2, 95.0, 55.0, 0.95, None),  # num_workers cannot change results: same group
    ("gt", 2, 0, 97.5, 61.0, 0.97, 44.0),
    ("slic", 0, 0, 80.0, 30.0, 0.80, 20.0),
    ("slic", 1, 0, 70.0, 20.0, 0.70, 30.0),
]


def _write_run(root: Path, method, seed, workers, top1, rate, accuracy, vlc) -> Path:
    workdir = root / f"{method}_seed{seed}"
    workdir.mkdir(parents=True)
    config = {
        "seed": seed,
        "dataset": {"name": "parts_world", "records_dir": "/data/records"},
        "segmentation": {"method": method},
        "input": {"num_workers": workers, "num_views": 6},
    }
    (workdir / "config.json").write_text(json.dumps({"config": config, "source": {}}))
    evaluation = {
        "split": "test",
        "checkpoint": f"best_finetune step {100 + seed}",
        "resolution": 64,
        "num_images": 160,
        "classification": {"top1_accuracy": top1, "macro_f1": top1 - 1},
        "faithfulness": {"k": 3, "rate": rate, "chance_rate": 25.0},
        "contrastivity": {"k": 5, "vlc": vlc, "prototype_histogram": {"3": 7}},
    }
    (workdir / "eval.json").write_text(json.dumps(evaluation))
    (workdir / "results.json").write_text(json.dumps({"test_accuracy": accuracy}))
    return workdir


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [_write_run(tmp_path, *run) for run in RUNS]


def test_runs_that_differ_only_in_seed_form_one_group(runs):
    table = tables.aggregate(runs)
    gt, slic = table["groups"]
    assert (gt["name"], slic["name"]) == ("segmentation.method=gt", "segmentation.method=slic")
    assert gt["seeds"] == [0, 1, 2] and slic["seeds"] == [0, 1]
    assert gt["workdirs"] == [str(r) for r in runs[:3]]
    for group, rows in ((gt, RUNS[:3]), (slic, RUNS[3:])):
        for metric, column, scale in (
            ("classification.top1_accuracy", 3, 1),
            ("faithfulness.rate", 4, 1),
            ("results.test_accuracy", 5, 100),
            ("contrastivity.vlc", 6, 1),
        ):
            values = np.array([r[column] for r in rows if r[column] is not None], float) * scale
            stats = group["metrics"][metric]
            assert stats["n"] == len(values)
            assert stats["mean"] == pytest.approx(values.mean())
            assert stats["std"] == pytest.approx(np.std(values, ddof=1))
            assert (stats["min"], stats["max"]) == (values.min(), values.max())
    # only table rows are metrics: k, counts and the histogram are not
    assert not any(m.endswith((".k", "histogram", "num_images")) for m in gt["metrics"])


def test_one_group_is_named_by_its_dataset_and_a_lone_run_has_no_std(runs, tmp_path):
    table = tables.aggregate(runs[:1])
    (group,) = table["groups"]
    assert group["name"] == "parts_world"
    assert group["metrics"]["faithfulness.rate"] == dict(
        n=1, mean=50.0, std=None, min=50.0, max=50.0
    )
    other = _write_run(tmp_path / "other", "gt", 5, 0, 1.0, 2.0, 0.1, 3.0)
    evaluation = json.loads((other / "eval.json").read_text())
    (other / "eval.json").write_text(json.dumps({**evaluation, "resolution": 224}))
    names = [g["name"] for g in tables.aggregate([runs[0], other])["groups"]]
    assert names == ["eval.resolution=64", "eval.resolution=224"]


def test_markdown_and_latex_show_mean_std_min_max(runs):
    table = tables.aggregate(runs)
    markdown = tables.render(table)
    top1 = np.array([90.0, 95.0, 97.5])
    cell = f"{top1.mean():.2f} ± {np.std(top1, ddof=1):.2f}"
    (main_row,) = [
        line for line in markdown.splitlines()
        if line.startswith("| top-1 accuracy (%)") and " to " not in line
    ]  # fmt: skip
    assert main_row == f"| top-1 accuracy (%) | {cell} | 75.00 ± 7.07 |"
    assert f"| top-1 accuracy (%) | {cell} (90.00 to 97.50) | 75.00 ± 7.07 (70.00 to 80.00) |" in (
        markdown
    )
    assert "| segmentation.method=gt | 3 | 0, 1, 2 |" in markdown
    assert "| explanations on the deciding part: chance level (a random mask) (%) |" in markdown
    assert "### Explanation faithfulness (top-3 contributions to the prediction)" in markdown
    latex = tables.render(table, latex=True)
    assert f"top-1 accuracy (\\%) & ${top1.mean():.2f} \\pm {np.std(top1, ddof=1):.2f}$" in latex
    assert "metric & segmentation.method=gt & segmentation.method=slic \\\\" in latex
    assert latex.count("\\begin{tabular}{lrr}") == latex.count("\\end{tabular}") >= 4


def test_cli_writes_the_tables_and_refuses_mistakes_in_one_line(runs, tmp_path):
    out = tmp_path / "tables"
    completed = run_module(
        "protomask_jax.tables", str(runs[0].parent / "*_seed*"), "--out", str(out)
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert (out / "tables.md").read_text() in completed.stdout
    assert json.loads((out / "tables.json").read_text())["groups"][0]["seeds"] == [0, 1, 2]
    assert "\\toprule" in (out / "tables.tex").read_text()

    (runs[1] / "eval.json").unlink()
    for args, message in (
        ([str(runs[1])], "protomask_jax.evaluate --workdir"),
        ([str(tmp_path / "nothing_*")], "nothing_*: no such run folder"),
        ([str(tmp_path / "missing")], "no such run folder"),
    ):
        completed = run_module("protomask_jax.tables", *args)
        assert completed.returncode == 2 and message in completed.stderr, completed.stderr
        assert completed.stderr.strip().count("\n") == 0


def test_damaged_json_is_named(runs):
    (runs[0] / "config.json").write_text("{not json")
    with pytest.raises(base.UserError, match="config.json is damaged"):
        tables.aggregate(runs)
