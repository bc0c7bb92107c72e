"""Report section "Training": loss and accuracies by step from ``metrics.jsonl`` (train,
validation, validation right after push, the reported test accuracy), phases shaded and named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from protomask_jax import logs
from protomask_jax.report import html

_SHADES = ("#eef2fb", "#fbf3e9", "#eef8f0", "#f6eefa")
_LOSSES = (("train/loss", "total loss", "#2f5db8"), ("train/ce", "cross-entropy", "#e07b39"))
_ACCURACIES = (
    ("train/accuracy", "train", "#2f5db8", dict(lw=1.8, marker=".", ms=4)),
    ("val/accuracy", "validation", "#1a7f37", dict(lw=1.8, marker="o", ms=5)),
    ("val/accuracy_after_push", "validation after push", "#9c27b0", dict(ls="", marker="D")),
    ("test/accuracy", "test (reported)", "#c62828", dict(ls="", marker="*", ms=13)),
)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    # A resumed run logs some steps twice: keep the last value per step.
    points = {row["step"]: row[key] for row in rows if key in row}
    steps = sorted(points)
    return np.array(steps, np.float64), np.array([points[s] for s in steps], np.float64)


def _phase_spans(train_rows: list[dict[str, Any]]) -> list[list]:
    """``[phase, first step, last step]`` per run of rows of one phase."""
    spans, previous_end = [], 0
    for row in train_rows:
        if not spans or spans[-1][0] != row["phase"]:
            spans.append([row["phase"], previous_end, row["step"]])
        spans[-1][2] = previous_end = row["step"]
    return spans


def _shade_phases(axis, spans: list[list]) -> None:
    for i, (phase, start, end) in enumerate(spans):
        axis.axvspan(start, end, color=_SHADES[i % len(_SHADES)], zorder=0)
        if i:
            axis.axvline(start, color="#8a94a6", lw=1, ls="--", zorder=1)
        axis.text(
            (start + end) / 2,
            1.01,
            phase,
            transform=axis.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=9,
            color="#5f6b7a",
        )
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
    axis.spines[["top", "right"]].set_visible(False)
    axis.set_xlim(0, spans[-1][2])


def plot_training_curves(rows: list[dict[str, Any]], path: Path) -> bool:
    """Writes the PNG; False (nothing written) without any training row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows = sorted((r for r in rows if "train/loss" in r), key=lambda r: r["step"])
    if not train_rows:
        return False
    spans = _phase_spans(train_rows)
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(13, 3.9), dpi=110)
    for axis in (loss_axis, accuracy_axis):
        _shade_phases(axis, spans)
    for key, label, colour in _LOSSES:
        steps, values = _series(rows, key)
        if len(steps):
            loss_axis.plot(steps, values, color=colour, lw=1.8, label=label, marker=".", ms=4)
    loss_axis.set_ylabel("loss")
    loss_axis.legend(frameon=False, fontsize=9)
    for key, label, colour, style in _ACCURACIES:
        steps, values = _series(rows, key)
        if len(steps):
            accuracy_axis.plot(steps, 100 * values, color=colour, label=label, **style)
    accuracy_axis.set_ylabel("accuracy (%)")
    accuracy_axis.set_ylim(0, 102)
    accuracy_axis.legend(frameon=False, fontsize=9, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return True


def section(workdir: Path, out_dir: Path) -> html.Section:
    plotted = plot_training_curves(logs.read_metrics(workdir), out_dir / "curves.png")
    note = "" if plotted else "metrics.jsonl holds no training rows."
    body = '<img class="curves" src="curves.png" alt="training curves">' if plotted else ""
    return html.Section("curves", "Training", "Training", note, body)
