"""Push throughput: one streaming push over N training images against one evaluation pass.

Push (prototype projection, reference doc §5.4) needs, per training image, the embeddings and
distances of all K views; ``protomask_jax.push.run_push`` folds them into a running nearest
view per prototype on the device. Its cost should be one evaluation forward pass plus a
small reduction. This script measures, on the same device-resident batches::

    PYTHONUNBUFFERED=1 python -m benchmarks.push --shape cub   # ResNet-50, 2048 images
    python -m benchmarks.push --shape cpu

* ``eval_pass``: the jitted evaluation step (``steps.make_eval_step``) over every batch;
* ``push``: ``run_push`` with the same step returning per-view outputs, plus its jitted
  per-batch update and the final transfer of the result to the host;
* ``reference_style_push``: the reference's algorithm for comparison — per batch, copy the
  per-view distances and embeddings to the host and loop over the P prototypes in Python
  (with its per-batch reset of the running minimum, §9.1).

Output: ``benchmarks/results/push_<shape>_<device>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from benchmarks import common
from benchmarks.train_step import SHAPES, Shape, make_config
from protomask_jax import push as push_lib
from protomask_jax import steps as steps_lib
from protomask_jax.models import protomask as model_lib


@dataclasses.dataclass(frozen=True)
class PushShape:
    """Model shape (from ``train_step.SHAPES``), evaluation batch and training-set size."""

    model: Shape
    eval_batch_size: int
    num_images: int
    repeats: int


PUSH_SHAPES = {
    "cub": PushShape(SHAPES["cub"], eval_batch_size=64, num_images=2048, repeats=3),
    "cpu": PushShape(SHAPES["cpu"], eval_batch_size=16, num_images=64, repeats=2),
    "micro": PushShape(SHAPES["micro"], eval_batch_size=4, num_images=8, repeats=1),
}


def device_batches(shape: PushShape, seed: int) -> list[dict[str, jax.Array]]:
    """``num_images / eval_batch_size`` device batches with every key push reads.

    Two random canvases are shared by all batches (device memory stays small); labels,
    ids and boxes differ per batch.
    """
    model = shape.model
    rng = np.random.default_rng(seed)
    b, k, s = shape.eval_batch_size, model.num_views, model.canvas_size
    canvases = [
        jax.device_put(rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)) for _ in range(2)
    ]
    batches = []
    for index in range(shape.num_images // b):
        side = rng.uniform(0.2, 1.0, (b, k, 2))
        start = rng.uniform(0.0, 1.0 - side)
        host = {
            "boxes": np.concatenate([start, start + side], axis=-1).astype(np.float32),
            "label": rng.integers(0, model.num_classes, (b,)).astype(np.int32),
            "image_id": np.arange(index * b, (index + 1) * b, dtype=np.int64),
            "weight": np.ones((b,), np.float32),
            "valid": np.ones((b, k), bool),
            "num_masks": np.full((b,), k, np.int32),
        }
        batches.append({"canvas": canvases[index % 2], **jax.device_put(host)})
    return batches


def reference_style_push(
    forward: Any, batches: list[dict[str, jax.Array]], prototype_class: np.ndarray
) -> np.ndarray:
    """The reference's push loop (host side, per batch, per prototype; reset per batch).

    Returns:
      ``[P, D]`` the chosen embeddings (for a check that the work was done).
    """
    chosen = None
    for batch in batches:
        outputs = forward(batch)
        distances = np.asarray(outputs.view_distances)  # [B, K, P]
        embeddings = np.asarray(outputs.embeddings)  # [B, K, D]
        labels = np.asarray(batch["label"])
        if chosen is None:
            chosen = np.zeros((distances.shape[2], embeddings.shape[2]), np.float32)
        for j in range(distances.shape[2]):
            rows = np.flatnonzero(labels == prototype_class[j])
            if rows.size == 0:
                continue
            # The reference's running minimum starts at +inf in every batch (§9.1), so
            # this batch's nearest view always replaces the previous choice.
            own = distances[rows, :, j]
            image, view = divmod(int(np.argmin(own)), own.shape[1])
            chosen[j] = embeddings[rows[image], view]
    return chosen


def run(shape_name: str, *, out_dir: Path = common.RESULTS_DIR, seed: int = 0) -> Path:
    """Measures eval pass, push and the reference-style push; writes the JSON."""
    started = common.cpu_sample()
    shape = PUSH_SHAPES[shape_name]
    model_shape = shape.model
    config = make_config(model_shape, "bfloat16")
    model = model_lib.build_model(config, model_shape.num_classes, nnx.Rngs(params=seed))
    graphdef, params, batch_stats, constants = model_lib.split_model(model)
    step_config = steps_lib.StepConfig.from_config(config, model_shape.prototypes_per_class)
    eval_fn = jax.jit(steps_lib.make_eval_step(graphdef, step_config))
    views_fn = jax.jit(steps_lib.make_eval_step(graphdef, step_config, return_views=True))
    update_fn = jax.jit(push_lib.push_update, donate_argnums=0)
    prototypes = params["prototypes"][...]
    prototype_class = constants["prototype_class"][...]
    batches = device_batches(shape, seed)
    print(
        f"push --shape {shape_name}: {len(batches)} batches of {shape.eval_batch_size} "
        f"images, K={model_shape.num_views}, {model_shape.backbone}",
        flush=True,
    )

    def evaluate() -> Any:
        out = None
        for batch in batches:
            out = eval_fn(params, batch_stats, constants, batch)
        return jax.block_until_ready(out)

    def forward_views(batch):
        return views_fn(params, batch_stats, constants, batch)

    def push() -> push_lib.PushResult:
        return push_lib.run_push(
            forward_views, batches, prototypes, prototype_class, update_fn=update_fn
        )

    host_class = np.asarray(prototype_class)
    device_facts = common.device_facts()
    json_path = out_dir / f"push_{shape_name}_{common.device_slug(device_facts['name'])}.json"
    measured: dict[str, Any] = {}
    outputs: dict[str, Any] = {}

    def payload(complete: bool) -> dict[str, Any]:
        def ratio(numerator: str, denominator: str) -> float | None:
            if numerator not in measured or denominator not in measured:
                return None
            return (
                measured[numerator]["seconds"]["median"]
                / measured[denominator]["seconds"]["median"]
            )

        found = outputs.get("push")
        return {
            "benchmark": "push",
            "shape_name": shape_name,
            "shape": dataclasses.asdict(shape),
            "device": device_facts,
            "host": common.host_facts(started),
            "versions": common.versions(with_torch=False),
            "git": common.git_revision(),
            "figures": measured,
            "push_over_eval": ratio("push", "eval_pass"),
            "reference_style_over_push": ratio("reference_style_push", "push"),
            "prototypes_found": None if found is None else int(np.isfinite(found.distance).sum()),
            "num_prototypes": int(prototypes.shape[0]),
            "notes": (
                "Random weights and synthetic batches; bfloat16 backbone. eval_pass and push "
                "include every batch's forward; push adds the per-view outputs, the jitted "
                "update and one device->host transfer at the end."
            ),
            "complete": complete,
        }

    # Rewritten after every pass: a run cut short by a time limit keeps what it measured.
    for name, fn in (
        ("eval_pass", evaluate),
        ("push", push),
        ("reference_style_push", lambda: reference_style_push(forward_views, batches, host_class)),
    ):
        with common.stopwatch() as first:
            fn()  # compiles on the first call
        seconds = []
        for _ in range(shape.repeats):
            with common.stopwatch() as timed:
                outputs[name] = fn()
            seconds.append(timed["seconds"])
        stats = common.percentiles(seconds)
        measured[name] = {
            "first_call_s": first["seconds"],
            "seconds": stats,
            "images_per_s": shape.num_images / stats["median"],
        }
        print(f"  {name}: {stats['median']:.3f} s", flush=True)
        common.write_json(json_path, payload(complete=False))
    return common.write_json(json_path, payload(complete=True))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", dest="shape_name", choices=sorted(PUSH_SHAPES), default="cpu")
    return run(**common.parse_flags(parser, argv))


if __name__ == "__main__":
    main()
