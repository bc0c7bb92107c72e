"""What a person sees during training: a progress bar, ``metrics.jsonl``, TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm


class MetricsWriter:
    """Appends one JSON line per logged step to ``workdir/metrics.jsonl`` and mirrors the
    scalars to TensorBoard event files in ``workdir/tensorboard`` (process 0 only)."""

    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tensorboard = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))

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
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ProgressBar:
    """One tqdm bar per epoch with images/s and the latest logged loss and accuracy."""

    def __init__(self, phase: str, steps_per_epoch: int, global_batch: int, enabled=True):
        self.phase = phase
        self.steps_per_epoch = steps_per_epoch
        self.global_batch = global_batch
        self.enabled = enabled
        self.total = None
        self._bar = None
        self._start = 0.0
        self._done = 0

    def start_epoch(self, epoch: int, done: int = 0) -> None:
        self.close()
        self.total = self.steps_per_epoch
        self._done = 0
        self._start = time.perf_counter()
        if self.enabled:
            self._bar = tqdm(
                total=self.steps_per_epoch,
                initial=done,
                desc=f"{self.phase} epoch {epoch}",
                unit="step",
                leave=False,
                dynamic_ncols=True,
            )

    def advance(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.update(1)

    def set_metrics(self, values: dict[str, float]) -> None:
        if self._bar is None:
            return
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        self._bar.set_postfix(
            loss=f"{values.get('loss', float('nan')):.3f}",
            acc=f"{values.get('accuracy', float('nan')):.3f}",
            img_s=f"{self._done * self.global_batch / elapsed:.0f}",
        )

    def end_epoch(self) -> None:
        if self._bar is not None:
            elapsed = max(time.perf_counter() - self._start, 1e-9)
            postfix = self._bar.postfix or ""
            self._bar.close()
            self._bar = None
            tqdm.write(
                f"{self.phase}: epoch done in {elapsed:.1f} s "
                f"({self._done * self.global_batch / elapsed:.0f} images/s) {postfix}"
            )
        self.total = None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
