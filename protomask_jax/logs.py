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
