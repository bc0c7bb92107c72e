"""What a person sees during training: a progress bar per epoch and per evaluation stage
(validation, push, prune, test), ``metrics.jsonl``, TensorBoard."""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from protomask_jax.base import as_path, is_remote, write_text_atomic


class MetricsWriter:
    """Appends one JSON line per logged step to ``workdir/metrics.jsonl`` and mirrors the
    scalars to TensorBoard event files in ``workdir/tensorboard`` (process 0 only).

    ``resumed_step``: a run resumed from that step's checkpoint redoes the steps after it,
    so their rows (and the test rows of an unfinished final evaluation) are removed from
    ``metrics.jsonl`` and hidden in TensorBoard (its ``purge_step``).

    In a ``gs://`` workdir objects cannot be appended to: the rows are kept here, the events
    written to a local folder, and both uploaded whole (through etils.epath) at most every
    ``upload_every_s`` seconds and on :meth:`close`."""

    def __init__(
        self,
        workdir: str | Path,
        enabled: bool = True,
        resumed_step: int | None = None,
        upload_every_s: float = 30.0,
    ):
        self.enabled = enabled
        self.remote = is_remote(workdir)
        self.path = as_path(workdir) / "metrics.jsonl"
        self.upload_every_s = upload_every_s
        self._tensorboard = None
        self._rows: list[dict] = []  # a bucket's rows, all of them
        self._uploaded = time.monotonic()
        self._events_dir = as_path(workdir) / "tensorboard"
        self._staging = None  # a bucket's events, written here first
        if enabled:
            from tensorboardX import SummaryWriter

            if resumed_step is not None and self.path.exists():
                kept = [
                    row
                    for row in read_metrics(workdir)
                    if row.get("step", 0) <= resumed_step and row.get("phase") != "test"
                ]
                if self.remote:
                    self._rows = kept
                write_text_atomic(self.path, _lines(kept))
            purge = None if resumed_step is None else resumed_step + 1
            events_dir, suffix = self._events_dir, ""
            if self.remote:
                self._staging = tempfile.TemporaryDirectory(prefix="protomask-tensorboard-")
                # Named by the second and host: a restart within the second would overwrite
                # the earlier run's events in the bucket.
                events_dir, suffix = self._staging.name, f".{uuid.uuid4().hex[:8]}"
            self._tensorboard = SummaryWriter(
                str(events_dir), purge_step=purge, filename_suffix=suffix
            )

    def write(self, step: int, scalars: dict[str, float], phase: str) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "phase": phase, "time": round(time.time(), 3)}
        row.update({key: float(value) for key, value in scalars.items()})
        for key, value in scalars.items():
            self._tensorboard.add_scalar(key, float(value), int(step))
        if not self.remote:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self._tensorboard.flush()
            return
        self._rows.append(row)
        if time.monotonic() - self._uploaded >= self.upload_every_s:
            self._upload()

    def _upload(self) -> None:
        write_text_atomic(self.path, _lines(self._rows))
        self._tensorboard.flush()
        for events in Path(self._staging.name).iterdir():
            (self._events_dir / events.name).write_bytes(events.read_bytes())
        self._uploaded = time.monotonic()

    def close(self) -> None:
        if self._tensorboard is not None:
            if self.remote:
                self._upload()
            self._tensorboard.close()
            self._tensorboard = None
        if self._staging is not None:
            self._staging.cleanup()
            self._staging = None


def _lines(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def read_metrics(workdir: str | Path) -> list[dict]:
    """The rows of ``workdir/metrics.jsonl`` (empty if it does not exist)."""
    path = as_path(workdir) / "metrics.jsonl"
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
    """A tqdm bar per epoch counting images (tqdm shows images/s) with the last loss, then one
    line per epoch (:func:`epoch_line`). ``clock``: seconds, for tests."""

    def __init__(
        self, phase: str, steps_per_epoch: int, global_batch: int, clock=time.perf_counter
    ):
        self.phase = phase
        self.steps_per_epoch = steps_per_epoch
        self.global_batch = global_batch
        self.clock = clock
        self._bar = None

    @property
    def in_epoch(self) -> bool:
        return self._bar is not None

    def start_epoch(self, epoch: int, done: int = 0) -> None:
        self.close()
        self._epoch, self._steps, self._times = epoch, 0, [self.clock()]
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
        self._steps += 1
        if self._steps == 1:
            self._times.append(self.clock())

    def set_metrics(self, values: dict[str, float]) -> None:
        self._bar.set_postfix(loss=f"{values['loss']:.3f}", acc=f"{values['accuracy']:.3f}")

    def end_epoch(self) -> None:
        """Call once the epoch's metrics are on the host, so every step has finished."""
        started, first_step_done = self._times
        postfix = self._bar.format_dict["postfix"]
        self.close()
        line = epoch_line(
            self.phase,
            self._epoch,
            self._steps * self.global_batch,
            first_step_s=first_step_done - started,
            rest_s=self.clock() - first_step_done,
            images_per_step=self.global_batch,
        )
        tqdm.write(f"{line}, {postfix}" if postfix else line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def images_per_second(images: int, seconds: float) -> float:
    """``images / seconds``; a step too quick for the clock (0 s) gives a large finite rate."""
    return images / max(seconds, 1e-9)


def epoch_line(
    phase: str, epoch: int, images: int, first_step_s: float, rest_s: float, images_per_step: int
) -> str:
    """The summary of an epoch of ``images`` trained in steps of ``images_per_step``. Its
    throughput leaves out the first step, which compiles the step at a phase's start (or
    after a resume): including it put 2 images/s beside a bar showing 344. The steps are
    dispatched asynchronously, so ``rest_s`` runs until the last step's metrics arrived."""
    total_s = first_step_s + rest_s
    head = f"{phase} epoch {epoch} done in {total_s:.1f} s"
    if images <= images_per_step:
        rate = images_per_second(images, total_s)
        return f"{head} (one step, {rate:.0f} images/s including its start-up)"
    rate = images_per_second(images - images_per_step, rest_s)
    return f"{head}: {rate:.0f} images/s after the first step ({first_step_s:.1f} s)"


class StageProgress:
    """A tqdm bar ``label (N images)`` over one pass of a stage the train loop has no bar
    for (validation, push, prune, test), then the line ``label: N images in X s``. As a
    context manager, so the time runs until the caller has its results on the host::

        with StageProgress("test", len(indices)) as stage:
            for batch in stage.track(batches): ...
    """

    def __init__(self, label: str, num_images: int, clock=time.perf_counter):
        self.label, self.num_images, self.clock = label, num_images, clock

    def __enter__(self) -> StageProgress:
        self._started = self.clock()
        self._bar = tqdm(
            total=self.num_images,
            desc=f"{self.label} ({self.num_images} images)",
            unit="img",
            leave=False,
            dynamic_ncols=True,
        )
        return self

    def track(self, batches: Iterable[dict]) -> Iterator[dict]:
        """``batches``, the bar advanced by each one's images (filler rows of the padded last
        batch not counted)."""
        for batch in batches:
            yield batch
            self._bar.update(min(len(batch["weight"]), self.num_images - self._bar.n))

    def __exit__(self, kind, value, traceback) -> None:
        self._bar.close()
        if kind is None:
            seconds = self.clock() - self._started
            tqdm.write(f"{self.label}: {self.num_images} images in {seconds:.1f} s")


def setup_cli_logging() -> None:
    """Command-line tools: our own progress at INFO, libraries (orbax, jax) at WARNING."""
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("protomask_jax").setLevel(logging.INFO)
