"""What a person sees during training: a progress bar, ``metrics.jsonl``, TensorBoard."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tqdm.auto import tqdm


class MetricsWriter:
    """Appends one JSON line per logged step to ``workdir/metrics.jsonl`` and mirrors the
    scalars to TensorBoard event files in ``workdir/tensorboard`` (process 0 only).

    ``resumed_step``: a run resumed from that step's checkpoint redoes the steps after it,
    so their rows (and the test rows of an unfinished final evaluation) are removed from
    ``metrics.jsonl`` and hidden in TensorBoard (its ``purge_step``)."""

    def __init__(self, workdir: str | Path, enabled: bool = True, resumed_step: int | None = None):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tensorboard = None
        if enabled:
            from tensorboardX import SummaryWriter

            if resumed_step is not None and self.path.exists():
                kept = [
                    row
                    for row in read_metrics(workdir)
                    if row.get("step", 0) <= resumed_step and row.get("phase") != "test"
                ]
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
                os.replace(tmp, self.path)
            purge = None if resumed_step is None else resumed_step + 1
            self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=purge)

    def write(self, step: int, scalars: dict[str, float], phase: str) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "phase": phase, "time": round(time.time(), 3)}
        row.update({key: float(value) for key, value in scalars.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in scalars.items():
            self._tensorboard.add_scalar(key, float(value), int(step))
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def read_metrics(workdir: str | Path) -> list[dict]:
    """The rows of ``workdir/metrics.jsonl`` (empty if it does not exist)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a kill
            continue
    return [row for row in rows if isinstance(row, dict)]


class ProgressBar:
    """A tqdm bar per epoch counting images (tqdm shows images/s) with the last loss."""

    def __init__(self, phase: str, steps_per_epoch: int, global_batch: int):
        self.phase = phase
        self.steps_per_epoch = steps_per_epoch
        self.global_batch = global_batch
        self._bar = None

    @property
    def in_epoch(self) -> bool:
        return self._bar is not None

    def start_epoch(self, epoch: int, done: int = 0) -> None:
        self.close()
        self._bar = tqdm(
            total=self.steps_per_epoch * self.global_batch,
            initial=done * self.global_batch,
            desc=f"{self.phase} epoch {epoch}",
            unit="img",
            leave=False,
            dynamic_ncols=True,
        )

    def advance(self) -> None:
        self._bar.update(self.global_batch)

    def set_metrics(self, values: dict[str, float]) -> None:
        self._bar.set_postfix(loss=f"{values['loss']:.3f}", acc=f"{values['accuracy']:.3f}")

    def end_epoch(self) -> None:
        bar = self._bar.format_dict
        elapsed = max(bar["elapsed"], 1e-9)
        images_per_s = (bar["n"] - bar["initial"]) / elapsed
        self.close()
        tqdm.write(
            f"{self.phase}: epoch done in {elapsed:.1f} s ({images_per_s:.0f} images/s) "
            f"{bar['postfix'] or ''}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def setup_cli_logging() -> None:
    """Command-line tools: our own progress at INFO, libraries (orbax, jax) at WARNING."""
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("protomask_jax").setLevel(logging.INFO)
