"""PRP throughput: our batched relevance maps against the reference's per-pair algorithm.

Every evaluation of the reference explains the top prototypes of each image with PRP
(docs/reference.md §6, §7.7; docs/prp.md). Its code loops over (image, prototype) pairs and,
per pair, runs the backbone over all K views to find the winning view, then forward and
backward over that one view. ``protomask_jax.prp.relevance_maps`` does a batch in one jitted
call: one forward over the B*K views, one forward + backward over the B*J winning views.
This script times both on the same device, from the same weights (random, with randomised
BatchNorm statistics) and views, both in float32 (TF32 off on the torch side, HIGHEST
precision on ours), both including the paste into the image frame::

    python -m benchmarks.prp --shape cpu
    python -m benchmarks.prp --shape cub --out_dir $OUT   # ResNet-50, K=11, 224^2 (GPU)

* ``jax_batched``: ``relevance_maps`` + ``paste_into_frame`` on all B images x J prototypes;
* ``torch_reference``: ``benchmarks.torch_prp`` (the reference's algorithm, K + 1 backbone
  passes per pair) on the first ``torch_images`` images, timed per map; on a CPU also with
  one torch thread (``torch_reference_1thread``). ``speedup`` divides our maps/s by the
  faster torch figure.

The two sets of maps are compared on the images both computed (``parity``). Output:
``benchmarks/results/prp_<shape>_<device>.json``, written once the JAX figure exists and
again with the ratio.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common  # noqa: E402
from protomask_jax import prp  # noqa: E402
from protomask_jax.data.views import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from protomask_jax.models import convert, resnet  # noqa: E402
from protomask_jax.models import protomask as model_lib  # noqa: E402


@dataclasses.dataclass(frozen=True)
class PrpShape:
    """B images of K views (V x V), J prototypes explained per image, P = classes * 10."""

    backbone: str
    num_images: int
    num_views: int
    view_size: int
    prototypes_per_image: int
    prototype_dim: int
    num_classes: int
    torch_images: int  # images the (slow) torch reference explains
    repeats: int


SHAPES = {
    # The paper's setting: ResNet-50, CUB with SAM2 masks (K = 11), 224^2 views, D = 1280,
    # the top-5 prototypes of 16 images (one evaluation batch).
    "cub": PrpShape("resnet50", 16, 11, 224, 5, 1280, 200, torch_images=2, repeats=3),
    # ResNet-18 at 112^2 keeps its last map at 4x4 (off XLA's small-map cliff on CPU).
    "cpu": PrpShape("resnet18", 4, 5, 112, 5, 1280, 20, torch_images=2, repeats=2),
    "micro": PrpShape("resnet_micro", 2, 3, 32, 2, 16, 4, torch_images=1, repeats=1),
}


def make_inputs(shape: PrpShape, seed: int) -> dict[str, np.ndarray]:
    """Normalised views ``[B, K, V, V, 3]`` of uniform pixels, prototype ids ``[B, J]``
    (distinct per image), view boxes ``[B, K, 4]`` (normalised yxyx)."""
    rng = np.random.default_rng(seed)
    b, k, v = shape.num_images, shape.num_views, shape.view_size
    pixels = rng.uniform(0.0, 1.0, (b, k, v, v, 3))
    views = ((pixels - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    num_prototypes = shape.num_classes * 10
    ids = np.stack([rng.choice(num_prototypes, shape.prototypes_per_image, replace=False)
                    for _ in range(b)]).astype(np.int32)  # fmt: skip
    start = rng.uniform(0.0, 0.6, (b, k, 2))
    boxes = np.concatenate([start, start + rng.uniform(0.1, 0.4, (b, k, 2))], -1)
    return {"views": views, "ids": ids, "boxes": boxes.astype(np.float32)}


def _timed(fn, repeats: int) -> dict[str, Any]:
    with common.stopwatch() as first:
        fn()  # compiles (jax) / warms up (torch)
    seconds = []
    for _ in range(repeats):
        with common.stopwatch() as timed:
            fn()
        seconds.append(timed["seconds"])
    return {"first_call_s": first["seconds"], "seconds": common.percentiles(seconds)}


def run(shape_name: str, *, out_dir: Path = common.RESULTS_DIR, seed: int = 0) -> Path:
    """Times both implementations and writes the JSON (first with the JAX figure only)."""
    import torch

    from benchmarks import torch_prp

    shape = SHAPES[shape_name]
    spec = resnet.resnet_spec(shape.backbone)
    state_dict = torch_prp.random_state_dict(
        spec.block, spec.blocks_per_stage, spec.widths, stem_width=spec.stem_width,
        prototype_dim=shape.prototype_dim, num_prototypes=shape.num_classes * 10,
        num_classes=shape.num_classes, seed=seed,
    )  # fmt: skip
    model = model_lib.ProtoMask(
        shape.backbone, shape.num_classes, prototypes_per_class=10,
        prototype_dim=shape.prototype_dim, rngs=nnx.Rngs(seed),
    )  # fmt: skip
    state, _ = convert.protomask_state_from_torch(state_dict, model)
    nnx.update(model, state)
    canonical = jax.device_put(prp.canonize(model))
    inputs = make_inputs(shape, seed)
    views, ids = jax.device_put(inputs["views"]), jax.device_put(inputs["ids"])
    boxes = jax.device_put(inputs["boxes"])
    frame = shape.view_size
    pairs = shape.num_images * shape.prototypes_per_image
    print(
        f"prp --shape {shape_name}: {shape.backbone}, {shape.num_images} images x "
        f"{shape.prototypes_per_image} prototypes, K={shape.num_views}, V={shape.view_size}",
        flush=True,
    )

    outputs: dict[str, Any] = {}

    def ours():
        maps, winners = prp.relevance_maps(canonical, views, ids)
        chosen = jnp.take_along_axis(boxes, winners[..., None], axis=1)
        outputs.update(maps=maps, winners=winners)
        return jax.block_until_ready(prp.paste_into_frame(maps, chosen, frame))

    measured = {"jax_batched": _timed(ours, shape.repeats)}
    measured["jax_batched"]["maps_per_s"] = pairs / measured["jax_batched"]["seconds"]["median"]
    print(f"  jax_batched: {measured['jax_batched']['seconds']['median']:.3f} s", flush=True)

    device_facts = common.device_facts()
    payload = {
        "benchmark": "prp",
        "shape_name": shape_name,
        "shape": dataclasses.asdict(shape),
        "device": device_facts,
        "versions": common.versions(with_torch=True),
        "git": common.git_revision(),
        "figures": measured,
        "notes": (
            "Random weights (randomised BatchNorm statistics), uniform-pixel views, float32 on "
            "both sides. maps_per_s counts (image, prototype) maps, each pasted into the "
            "V x V image frame. torch_reference: benchmarks/torch_prp.py, the reference's "
            "per-pair loop (K + 1 backbone passes per map), on the first torch_images images."
        ),
    }
    path = out_dir / f"prp_{shape_name}_{common.device_slug(device_facts['name'])}.json"
    common.write_json(path, {**payload, "host_load_1min": os.getloadavg()[0]})

    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch_model = torch_prp.CanonicalTorchProtoMask(state_dict, device=torch_device)
    n = shape.torch_images
    torch_views = torch_prp.to_nchw(inputs["views"][:n]).to(torch_device)
    torch_ids = inputs["ids"][:n]

    def reference():
        maps, winners = torch_model.saliency_maps(torch_views, torch_ids)
        pasted = torch.stack([
            torch.stack([torch_prp.paste(maps[b, j], inputs["boxes"][b, w], frame)
                         for j, w in enumerate(row)])
            for b, row in enumerate(winners)
        ])  # fmt: skip
        if torch_device == "cuda":
            torch.cuda.synchronize()
        outputs.update(torch_maps=maps.cpu().numpy(), torch_winners=winners)
        return pasted

    torch_pairs = n * shape.prototypes_per_image
    # On a CPU, torch's default of one thread per core collapses when other processes share
    # the cores (OpenMP barriers spin: 17x slower forwards seen at load 5 on 2 cores), so it
    # is also timed on one thread; the speedup is against the faster of the two.
    thread_counts = {"torch_reference": torch.get_num_threads()}
    if torch_device == "cpu" and torch.get_num_threads() > 1:
        thread_counts["torch_reference_1thread"] = 1
    default_threads = torch.get_num_threads()
    for name, threads in thread_counts.items():
        torch.set_num_threads(threads)
        measured[name] = _timed(reference, max(1, shape.repeats - 1))
        measured[name].update(
            threads=threads, maps_per_s=torch_pairs / measured[name]["seconds"]["median"]
        )
        print(f"  {name}: {measured[name]['seconds']['median']:.3f} s for {torch_pairs} maps",
              flush=True)  # fmt: skip
    torch.set_num_threads(default_threads)
    fastest_torch = max(measured[name]["maps_per_s"] for name in thread_counts)

    ours_maps = np.asarray(outputs["maps"])[:n]
    scale = float(np.abs(outputs["torch_maps"]).max())
    payload.update(
        torch_device=torch_device,
        speedup=measured["jax_batched"]["maps_per_s"] / fastest_torch,
        parity={
            "winners_equal": bool(
                (np.asarray(outputs["winners"])[:n] == outputs["torch_winners"]).all()
            ),
            "max_abs_diff_over_max": float(np.abs(ours_maps - outputs["torch_maps"]).max()) / scale,
        },
    )
    print(f"  speedup: {payload['speedup']:.1f}x, parity {payload['parity']}", flush=True)
    return common.write_json(path, {**payload, "host_load_1min": os.getloadavg()[0]})


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--out_dir", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return run(args.shape, out_dir=args.out_dir, seed=args.seed)


if __name__ == "__main__":
    main()
