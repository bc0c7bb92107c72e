"""End-to-end training throughput: the real training loop on CUB-shaped records vs its step alone.

    python -m benchmarks.end_to_end --shape cub   # GPU: ResNet-50, 16 images x 11 views of 224^2
    python -m benchmarks.end_to_end --shape cpu   # CPU: resnet_tiny, 8 images x 11 views of 64^2

    records   cub_records: JPEGs 500 x 375, 11 boxes each  -> --data_dir/records (reused)
    host      grain stream per worker count, per-image costs -> cores for 6,000 views/s
    loop      trainer.train_and_evaluate(max_steps=warmup_steps + steps), timed between the
              log steps warmup_steps and warmup_steps + steps        -> images/s, data wait
    step      train_step.JaxVariant("jax_bf16_aug") at the same shape -> images/s
    ratio     loop images/s / step images/s (goal >= 0.95)

The JSON (``end_to_end_<shape>_<device>.json``) is rewritten after each part, so a run
stopped by a time limit keeps what it measured (``"complete": false``). The loop is watched
from outside, through two public names the trainer uses (:class:`LoopProbe`): the training
stream, to time the waits for data, and ``MetricsWriter.write``, to note when each log step
(a sync with the device) happened. ``benchmarks/README.md`` describes every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common, cub_records, input_pipeline, train_step

# What the host must feed one H100-class GPU running the CUB step: 6,000 views/s.
TARGET_VIEWS_PER_S = 6000.0


@dataclasses.dataclass(frozen=True)
class EndToEndShape:
    """One benchmark shape.

    Attributes:
      model: the model and batch (``train_step.Shape``); its ``warmup``/``steps`` time the
        step alone.
      images: the JPEGs per class (C = ``model.num_classes``) and split, and their size.
      log_every_steps: ``train.log_every_steps`` of the loop (it must divide the next two).
      warmup_steps: loop steps before the timed window (compilation included).
      steps: timed loop steps.
      worker_counts: grain worker counts the host part measures.
    """

    model: train_step.Shape
    images: cub_records.ImageSet
    log_every_steps: int
    warmup_steps: int
    steps: int
    worker_counts: tuple[int, ...]


SHAPES = {
    # The paper's CUB shape; 2,400 training images (12 per class), 150 steps per epoch.
    "cub": EndToEndShape(
        train_step.SHAPES["cub"],
        cub_records.ImageSet(train_per_class=12, test_per_class=1),
        log_every_steps=25,
        warmup_steps=50,
        steps=250,
        worker_counts=(0, 1, 2, 4, 8),
    ),
    # A step of a few hundred ms on 2 CPU cores, the canvas and K of CUB.
    "cpu": EndToEndShape(
        train_step.Shape("resnet_tiny", 8, 11, 448, 64, 64, 2, 8, warmup=3, steps=10),
        cub_records.ImageSet(train_per_class=48, test_per_class=1),
        log_every_steps=5,
        warmup_steps=10,
        steps=40,
        worker_counts=(0, 1, 2),
    ),
    # For tests: seconds end to end.
    "micro": EndToEndShape(
        train_step.Shape("resnet_micro", 2, 11, 64, 32, 16, 2, 3, warmup=1, steps=2),
        cub_records.ImageSet(train_per_class=4, test_per_class=1, height=48, width=64),
        log_every_steps=2,
        warmup_steps=2,
        steps=4,
        worker_counts=(0,),
    ),
}


# --------------------------------------------------------------------------- config


def loop_config(shape: EndToEndShape, data_dir: Path, num_workers: int) -> Any:
    """The training config: ``train_step.make_config``'s (the step the ``step`` part times)
    with the records of ``data_dir`` and the loop's settings."""
    config = train_step.make_config(shape.model, "bfloat16")
    cub_records.configure_records(
        config, data_dir, train_images=shape.images.train_per_class * shape.model.num_classes
    )
    config.input.num_workers = num_workers
    config.input.validation_fraction = 0.0
    config.train.log_every_steps = shape.log_every_steps
    # One device, as the step alone runs on.
    config.mesh.data = 1
    return config


# --------------------------------------------------------------------------- host


def host_costs(record_set: Any, spec: Any, count: int) -> dict[str, Any]:
    """Single-core seconds per image of the host pipeline's parts (medians over ``count``
    records), in the order ``data.pipeline`` runs them, and of one option to make it cheaper.

    ``prefitted_s`` is that option, measured without changing the product: the image stored
    already fitted to the canvas (resized at export, JPEG of the same quality), so training
    decodes a smaller JPEG and only pads it: decode + fit of such a JPEG.
    """
    import io

    from PIL import Image

    from protomask_jax.data import pipeline
    from protomask_jax.data import records as records_lib
    from protomask_jax.data import views as views_lib

    parts: dict[str, list[float]] = {
        name: [] for name in ("read", "parse", "decode", "fit", "all", "prefitted")
    }

    def timed(name: str, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        result = fn(*args)
        parts[name].append(time.perf_counter() - start)
        return result

    for index in range(min(count, len(record_set))):
        data = timed("read", record_set.reader.__getitem__, index)
        record = timed("parse", records_lib.ImageRecord.from_bytes, data)
        image = timed("decode", records_lib.decode_image, record.image_bytes)
        canvas = timed("fit", views_lib.fit_image_to_canvas, image, spec.canvas_size)
        fresh = records_lib.ImageRecord.from_bytes(record_set.reader[index])
        timed("all", pipeline.fit_record, fresh, spec, "")
        fit_h, fit_w = views_lib.fitted_size(*image.shape[:2], spec.canvas_size)
        buffer = io.BytesIO()
        Image.fromarray(canvas[:fit_h, :fit_w]).save(
            buffer, format="JPEG", quality=cub_records.JPEG_QUALITY
        )
        timed(
            "prefitted",
            lambda jpeg: views_lib.fit_image_to_canvas(
                records_lib.decode_image(jpeg), spec.canvas_size
            ),
            buffer.getvalue(),
        )
    costs: dict[str, Any] = {f"{name}_s": float(np.median(v)) for name, v in parts.items()}
    costs["images"] = len(parts["all"])
    costs["what"] = (
        "median single-core seconds per image: read (pread + CRC32C), parse (tf.train.Example "
        "-> ImageRecord), decode (PIL JPEG -> RGB array), fit (resize into the canvas, pad); "
        "all = data.pipeline.fit_record on a freshly read record; prefitted = decode + fit of "
        "the same image stored already fitted to the canvas (an option, not what runs)"
    )
    return costs


def measure_host(
    shape: EndToEndShape, record_set: Any, spec: Any, batches: int, seed: int
) -> dict[str, Any]:
    """The host part: stream images/s per worker count and per-image costs.

    Each stream row also has ``images_per_cpu_s``: images per CPU second of the main process
    and its workers together. Unlike images/s it does not depend on how much of the cores
    other processes took (the build machines are shared), so the cores a rate needs follow
    from it.
    """
    rows = []
    for workers in shape.worker_counts:
        row = input_pipeline.measure_stream(
            record_set, spec, workers, batches, seed, batch_size=shape.model.batch_size
        )
        cores = row["cpu"]["main_process_cores"] + (row["cpu"]["children_cores"] or 0.0)
        row["images_per_s_per_worker"] = row["images_per_s"] / workers if workers else None
        row["images_per_cpu_s"] = row["images_per_s"] / cores if cores > 0 else None
        rows.append(row)
        print(f"  host, {workers} worker(s): {row['images_per_s']:.0f} images/s", flush=True)
    costs = host_costs(record_set, spec, 64)
    target_images = TARGET_VIEWS_PER_S / shape.model.num_views
    one_worker = next((r for r in rows if r["num_workers"] == 1), None)
    per_cpu_s = one_worker and one_worker["images_per_cpu_s"]
    return {
        "streams": rows,
        "costs": costs,
        "target": {
            "views_per_s": TARGET_VIEWS_PER_S,
            "images_per_s": target_images,
            "cores_at_single_core_cost": target_images * costs["all_s"],
            "cores_at_one_worker_cpu_cost": target_images / per_cpu_s if per_cpu_s else None,
            "workers_at_one_worker_rate": (
                math.ceil(target_images / one_worker["images_per_s"]) if one_worker else None
            ),
            "meaning": (
                "cores_at_single_core_cost: target images/s x the single-core seconds of "
                "fit_record (no batching, no transfer between processes); "
                "cores_at_one_worker_cpu_cost: target images/s over the 1-worker stream's "
                "images per CPU second (main process + worker: batching and the transfer "
                "included); workers_at_one_worker_rate: grain workers at the measured 1-worker "
                "images/s (load-dependent on a shared machine)"
            ),
        },
    }


# --------------------------------------------------------------------------- loop


class _TimedStream:
    """A training stream whose ``next()`` time is added to ``probe.wait_s``."""

    def __init__(self, stream: Any, probe: LoopProbe):
        self._stream = stream
        self._probe = probe

    def __iter__(self) -> _TimedStream:
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            return next(self._stream)
        finally:
            self._probe.wait_s += time.perf_counter() - start
            self._probe.batches += 1

    def __getattr__(self, name: str) -> Any:  # close, get_state, set_state
        return getattr(self._stream, name)


class LoopProbe:
    """Watches ``trainer.train_and_evaluate`` from outside: while :meth:`attached`, the
    trainer's training streams are timed and each logged training step is noted with the
    CPU counters (``marks[step] = (CpuSample, wait_s)``)."""

    def __init__(self):
        self.wait_s = 0.0
        self.batches = 0
        self.marks: dict[int, tuple[common.CpuSample, float]] = {}

    @contextlib.contextmanager
    def attached(self) -> Iterator[LoopProbe]:
        from protomask_jax import logs
        from protomask_jax.data import pipeline

        train_stream, write = pipeline.train_stream, logs.MetricsWriter.write
        probe = self

        def timed_train_stream(*args, **kwargs):
            return _TimedStream(train_stream(*args, **kwargs), probe)

        def noted_write(writer, step, scalars, phase):
            # The trainer calls this right after fetching the step's metrics: every step up
            # to `step` has finished on the device.
            if any(key.startswith("train/") for key in scalars):
                probe.marks[int(step)] = (common.cpu_sample(), probe.wait_s)
            return write(writer, step, scalars, phase)

        pipeline.train_stream, logs.MetricsWriter.write = timed_train_stream, noted_write
        try:
            yield self
        finally:
            pipeline.train_stream, logs.MetricsWriter.write = train_stream, write


def measure_loop(shape: EndToEndShape, config: Any, workdir: Path) -> dict[str, Any]:
    """Runs the trainer for ``warmup_steps + steps`` and times the window between them."""
    from protomask_jax import trainer

    first, last = shape.warmup_steps, shape.warmup_steps + shape.steps
    if first % shape.log_every_steps or last % shape.log_every_steps:
        raise ValueError("log_every_steps must divide warmup_steps and steps")
    probe = LoopProbe()
    with probe.attached(), common.stopwatch() as run_time:
        result = trainer.train_and_evaluate(config, workdir, max_steps=last)
    ended = time.perf_counter()
    if result.get("stopped_at_step") != last or {first, last} - set(probe.marks):
        raise RuntimeError(f"the loop did not log steps {first} and {last}: {result}")
    (start, wait_start), (stop, wait_stop) = probe.marks[first], probe.marks[last]
    seconds = stop.wall_s - start.wall_s
    cpu = common.cpu_usage(start, stop)
    model = shape.model
    images_per_s = shape.steps * model.batch_size / seconds
    checkpoint_s = ended - stop.wall_s
    return {
        "steps": shape.steps,
        "warmup_steps": first,
        "seconds": seconds,
        "step_time_s": seconds / shape.steps,
        "images_per_s": images_per_s,
        "views_per_s": images_per_s * model.num_views,
        "data_wait_s_per_step": (wait_stop - wait_start) / shape.steps,
        "num_workers": config.input.num_workers,
        "prefetch": config.input.prefetch,
        "cpu": cpu,
        "main_process_cpu_s_per_step": cpu["main_process_cores"] * seconds / shape.steps,
        "run_s": run_time["seconds"],
        "final_checkpoint_s": checkpoint_s,
        "checkpoint_every_steps": config.train.checkpoint_every_steps,
        "checkpoint_s_per_step_amortised": checkpoint_s / config.train.checkpoint_every_steps,
        "what": (
            "trainer.train_and_evaluate between the log steps warmup_steps and "
            "warmup_steps + steps (no checkpoint falls in between); data_wait: time in the "
            "host stream's next() per step; final_checkpoint_s: from the last log step to the "
            "return (the synchronous save at max_steps), amortised over "
            "checkpoint_every_steps"
        ),
    }


# --------------------------------------------------------------------------- step alone


def measure_step(shape: EndToEndShape, seed: int) -> dict[str, Any]:
    """The loop's step alone: ``jax_bf16_aug`` on two device-resident synthetic batches."""
    model = shape.model
    batches = train_step.synthetic_batches(model, 2, seed)
    class_weights = np.ones(model.num_classes, np.float32)
    bench = train_step.JaxVariant("jax_bf16_aug", model, None, batches, class_weights)
    figures = bench.measure()
    images_per_s = model.batch_size / figures["timing"]["back_to_back_mean"]
    return {
        "variant": "jax_bf16_aug",
        "compile_s": figures["compile_s"],
        "timing": figures["timing"],
        "images_per_s": images_per_s,
        "views_per_s": images_per_s * model.num_views,
        "images_per_s_synchronised_median": (
            model.batch_size / figures["timing"]["per_step"]["median"]
        ),
        "process_cpu_s_per_step": figures["timing"]["process_cpu_s_per_step"],
    }


# --------------------------------------------------------------------------- harness


def measure_loop_in(shape: EndToEndShape, config: Any) -> dict[str, Any]:
    """:func:`measure_loop` in a temporary workdir (removed after)."""
    workdir = Path(tempfile.mkdtemp(prefix="protomask_end_to_end_run_"))
    try:
        return measure_loop(shape, config, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _ratio(loop: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    ratio = loop["images_per_s"] / step["images_per_s"]
    with_checkpoints = step["timing"]["back_to_back_mean"] / (
        loop["step_time_s"] + loop["checkpoint_s_per_step_amortised"]
    )
    return {
        "loop_over_step": ratio,
        "loop_over_step_with_checkpoints": with_checkpoints,
        "goal": 0.95,
        "meets_goal": ratio >= 0.95,
        "data_wait_share_of_loop_step": loop["data_wait_s_per_step"] / loop["step_time_s"],
        "cpu_s_per_step_loop_over_step": (
            loop["main_process_cpu_s_per_step"] / step["process_cpu_s_per_step"]
        ),
        "meaning": (
            "loop images/s over the step's back-to-back images/s; with_checkpoints adds the "
            "final checkpoint's time amortised over checkpoint_every_steps; "
            "data_wait_share: how much of a loop step was spent waiting for the host stream; "
            "cpu_s_per_step_loop_over_step: CPU seconds per step of the loop's process over "
            "the step alone's (on a CPU backend, where the step's compute is CPU time, the "
            "load-independent form of the ratio: the work the loop adds to its process)"
        ),
    }


PARTS = ("host", "loop", "step")
# Where each part's figures go in the JSON ("host" holds the machine's facts).
PART_KEYS = {"host": "host_pipeline", "loop": "loop", "step": "step"}


def run(
    shape_name: str,
    *,
    data_dir: Path | None = None,
    num_workers: int | None = None,
    out_dir: Path = common.RESULTS_DIR,
    seed: int = 0,
    parts: tuple[str, ...] = PARTS,
) -> Path:
    """Makes the records, runs ``parts`` and writes the JSON after each; returns its path.

    Args:
      shape_name: a key of ``SHAPES``.
      data_dir: where the JPEGs and records go (kept for later runs); default a folder in
        the temporary directory named after the shape.
      num_workers: grain workers of the loop; default half the cores (at least 1).
      out_dir: where the JSON goes.
      seed: seeds the images and the step's batches.
      parts: which of ``PARTS`` to run (in that order).
    """
    from protomask_jax.data import pipeline

    shape = SHAPES[shape_name]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    started = common.cpu_sample()
    load_at_start = common.load_average()
    cores = common.cpu_count() or 1
    num_workers = max(1, cores // 2) if num_workers is None else num_workers
    data_dir = data_dir or Path(tempfile.gettempdir()) / f"protomask_end_to_end_{shape_name}"
    device = common.device_facts()
    json_path = out_dir / f"end_to_end_{shape_name}_{common.device_slug(device['name'])}.json"
    payload: dict[str, Any] = {
        "benchmark": "end_to_end",
        "shape_name": shape_name,
        "shape": dataclasses.asdict(shape),
        "device": device,
        "versions": common.versions(with_torch=False),
        "git": common.git_revision(),
    }
    print(f"end_to_end --shape {shape_name} on {device['name']}, {cores} cores", flush=True)

    def write(complete: bool = False) -> Path:
        payload["host"] = {"load_average_at_start": load_at_start, **common.host_facts(started)}
        payload["complete"] = complete
        return common.write_json(json_path, payload)

    # Generation and export use every core; nothing else runs yet.
    images = cub_records.write_images(
        data_dir / "images", shape.images, shape.model.num_classes, workers=cores
    )
    config = loop_config(shape, data_dir, num_workers)
    exported = cub_records.export_records(config, workers=cores)
    payload["records"] = {**images, **exported, "records_dir": config.dataset.records_dir}
    print(
        f"  records: {images['images']} JPEGs (render {images['render_s']:.1f} s, export "
        f"{exported['export_s']:.1f} s)",
        flush=True,
    )
    write()

    measure = {
        "host": lambda: measure_host(
            shape,
            pipeline.RecordSet(config.dataset.records_dir, "train"),
            pipeline.PipelineSpec.from_config(config),
            batches=40,
            seed=seed,
        ),
        "loop": lambda: measure_loop_in(shape, config),
        "step": lambda: measure_step(shape, seed),
    }
    for part in (p for p in PARTS if p in parts):
        figures = payload[PART_KEYS[part]] = measure[part]()
        if "images_per_s" in figures:
            print(f"  {part}: {figures['images_per_s']:.1f} images/s", flush=True)
        if "loop" in payload and "step" in payload:
            payload["ratio"] = _ratio(payload["loop"], payload["step"])
            print(f"  loop / step = {payload['ratio']['loop_over_step']:.3f}", flush=True)
        write()
    return write(complete=True)


def _parts(value: str) -> tuple[str, ...]:
    return tuple(p for p in value.split(",") if p)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", dest="shape_name", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--data_dir", type=Path, default=None, help="JPEGs and records (kept)")
    parser.add_argument("--num_workers", type=int, default=None, help="grain workers of the loop")
    parser.add_argument("--parts", type=_parts, default=PARTS, help="subset of host,loop,step")
    return run(**common.parse_flags(parser, argv, grain=True))


if __name__ == "__main__":
    main()
