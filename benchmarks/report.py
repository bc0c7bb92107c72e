"""Markdown tables from the committed benchmark JSONs, for ``benchmarks/README.md``.

    python -m benchmarks.report            # prints every table
    python -m benchmarks.report --update   # rewrites the README's generated section

Nothing is measured here; every number comes from ``benchmarks/results/*.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks import common

README = common.REPO_ROOT / "benchmarks" / "README.md"
BEGIN = "<!-- results:begin (python -m benchmarks.report --update) -->"
END = "<!-- results:end -->"


def _load(pattern: str, results_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted(results_dir.glob(pattern))]


def _gib(value: float | None) -> str:
    return "–" if not value else f"{value / 2**30:.2f}"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def train_step_tables(results_dir: Path) -> list[str]:
    lines = []
    for name, payload in _load("train_step_*.json", results_dir):
        shape = payload["shape"]
        device = payload["device"]
        parity = payload["parity"]
        lines += [
            f"#### `{name}` — {device['name']}, {shape['backbone']}, B={shape['batch_size']} "
            f"images x K={shape['num_views']} views of {shape['view_size']}^2 "
            f"(canvas {shape['canvas_size']}^2), D={payload['config']['model']['prototype_dim']}, "
            f"P={shape['num_classes'] * shape['prototypes_per_class']}",
            "",
            "| variant | median step (ms) | p10–p90 (ms) | crops/s | images/s | compile (s) "
            "| peak memory (GiB) | MFU |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for variant, figures in payload["variants"].items():
            per_step = figures["timing"]["per_step"]
            lines.append(
                f"| {variant} | {per_step['median'] * 1e3:.1f} "
                f"| {per_step['p10'] * 1e3:.1f}–{per_step['p90'] * 1e3:.1f} "
                f"| {figures['crops_per_s']:.0f} | {figures['images_per_s']:.1f} "
                f"| {_num(figures.get('compile_s'), '.1f')} "
                f"| {_gib(figures.get('peak_memory_bytes'))} "
                f"| {_num(figures.get('mfu'), '.1%')} |"
            )
        headline = payload["headline"]
        lines.append("")
        if not payload.get("complete", True):
            lines.append(
                "**Incomplete run** (stopped before every requested variant was timed): "
                "only the variants above were measured."
            )
        if parity.get("checked"):
            diffs = ", ".join(f"{d:.1e}" for d in parity["relative_difference"])
            lines.append(
                f"Parity (jax_fp32 vs torch_eager_fp32, same weights and batch, loss before / "
                f"after one Adam step): relative difference {diffs} "
                f"(tolerance {parity['tolerance'][0]:.0e} / {parity['tolerance'][1]:.0e}): "
                f"**{'passed' if parity['passed'] else 'FAILED'}**."
            )
        if headline.get("available"):
            lines.append(
                f"Headline: jax_bf16 is **{headline['speedup']:.2f}x** the best torch variant "
                f"({headline['best_torch_variant']}); with on-device augmentation "
                f"{headline.get('speedup_with_jax_augmentation', float('nan')):.2f}x; against "
                f"the reference-style forward "
                f"{headline.get('speedup_vs_reference_style', float('nan')):.2f}x."
            )
        flops = payload["flops"]
        ratio = flops.get("xla_over_analytic")
        lines.append(
            f"FLOPs per step: {flops['per_step_used_for_mfu'] / 1e12:.3f} TFLOP "
            f"({flops['source']}; XLA / analytic 3 x forward = {_num(ratio, '.2f')}). "
            f"MFU against {_num(device.get('peak_bf16_flops'), '.3g')} FLOP/s "
            f"({device.get('peak_source') or 'no peak known for this device'})."
        )
        lines.append("")
    return lines


def push_tables(results_dir: Path) -> list[str]:
    lines = []
    for name, payload in _load("push_*.json", results_dir):
        figures = payload["figures"]
        shape = payload["shape"]
        lines += [
            f"#### `{name}` — {payload['device']['name']}, {shape['model']['backbone']}, "
            f"{shape['num_images']} images x K={shape['model']['num_views']}, eval batch "
            f"{shape['eval_batch_size']}, P={payload['num_prototypes']}",
            "",
            "| pass | median (s) | images/s |",
            "|---|---:|---:|",
        ]
        for key, row in figures.items():
            lines.append(f"| {key} | {row['seconds']['median']:.3f} | {row['images_per_s']:.1f} |")
        lines += [
            "",
            f"push / eval pass = {payload['push_over_eval']:.2f}; reference-style host loop / "
            f"push = {payload['reference_style_over_push']:.2f}.",
            "",
        ]
    return lines


def input_pipeline_tables(results_dir: Path) -> list[str]:
    lines = []
    for name, payload in _load("input_pipeline_*.json", results_dir):
        records = payload["records"]
        decode = payload["decode"]
        lines += [
            f"#### `{name}` — {payload['host']['cpu_count']} host cores, "
            f"{records['images']} {records['image_size']}^2 PNG records -> canvas "
            f"{records['canvas_size']}^2, K={records['num_views']}, batch {records['batch_size']}",
            "",
            "| grain workers | first batch (s) | images/s |",
            "|---:|---:|---:|",
        ]
        for row in payload["streams"]:
            lines.append(
                f"| {row['num_workers']} | {row['first_batch_s']:.2f} | {row['images_per_s']:.0f} |"
            )
        lines += [
            "",
            f"PIL decode per image: PNG {decode['png_decode_s_per_image'] * 1e3:.1f} ms, "
            f"JPEG q90 {decode['jpeg_q90_decode_s_per_image'] * 1e3:.1f} ms.",
            "",
        ]
    return lines


def export_tables(results_dir: Path) -> list[str]:
    lines = []
    for name, payload in _load("export_*.json", results_dir):
        images = payload["images"]
        lines += [
            f"#### `{name}` — torch on {payload['torch_device']}, {images['count']} "
            f"{images['image_size']}^2 parts-world images",
            "",
            "| segmenter | images/s | masks per image |",
            "|---|---:|---:|",
        ]
        for row in payload["segmenters"]:
            lines.append(
                f"| {row['segmenter']} | {row['images_per_s']:.2f} | {row['masks_per_image']:.1f} |"
            )
        lines += ["", payload["notes"], ""]
    return lines


def scaling_tables(results_dir: Path) -> list[str]:
    lines = []
    for name, payload in _load("scaling_*.json", results_dir):
        measured = payload["measured_weak_scaling"]
        shape = measured["per_device_shape"]
        lines += [
            f"#### `{name}` — measured on {payload['device']['count']} x "
            f"{payload['device']['name']} ({payload['measured_note']})",
            "",
            f"Per device: {shape['backbone']}, {shape['batch_size']} images x "
            f"{shape['num_views']} views of {shape['view_size']}^2.",
            "",
            "| devices | global batch | median step (ms) | crops/s | weak-scaling efficiency |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in measured["rows"]:
            lines.append(
                f"| {row['devices']} | {row['global_batch_images']} "
                f"| {row['step_time_s'] * 1e3:.1f} | {row['crops_per_s']:.0f} "
                f"| {row['weak_scaling_efficiency']:.2f} |"
            )
        check = measured.get("sharded_vs_single_device_loss")
        if check:
            lines += [
                "",
                f"Sharded step vs one device, same global batch: relative loss difference "
                f"{check['relative_difference']:.1e} "
                f"(**{'passed' if check['passed'] else 'FAILED'}**).",
            ]
        model = payload["analytic_model"]
        lines += [
            "",
            f"Analytic model (CUB shape per GPU; single-GPU step: "
            f"{_num(model['single_device_step_s'], '.4f')} s from "
            f"{model['single_device_source']}; gradients all-reduced: "
            f"{model['gradient_bytes_total'] / 1e6:.1f} MB per step; "
            f"{model['batchnorm_layers']} BatchNorm layers):",
            "",
            "| GPUs | interconnect | grad all-reduce (ms) | BN all-reduces (ms) "
            "| step (ms) | crops/s | efficiency |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for row in model["rows"]:
            step = row.get("step_time_s")
            lines.append(
                f"| {row['devices']} | {row['interconnect'] or '–'} "
                f"| {row['gradient_all_reduce_s'] * 1e3:.2f} "
                f"| {row['batchnorm_all_reduce_s'] * 1e3:.2f} "
                f"| {_num(step * 1e3 if step else None, '.1f')} "
                f"| {_num(row.get('crops_per_s'), '.0f')} "
                f"| {_num(row.get('efficiency'), '.2f')} |"
            )
        lines.append("")
    return lines


def render(results_dir: Path = common.RESULTS_DIR) -> str:
    """All tables as one markdown block."""
    sections = [
        ("Training step", train_step_tables),
        ("Push", push_tables),
        ("Host input pipeline", input_pipeline_tables),
        ("Segmentation export", export_tables),
        ("Scaling", scaling_tables),
    ]
    lines = []
    for title, make in sections:
        body = make(results_dir)
        if body:
            lines += [f"### {title}", "", *body]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(results_dir: Path = common.RESULTS_DIR, readme: Path = README) -> None:
    """Replaces the text between the README's result markers with :func:`render`."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} lacks the markers {BEGIN!r} ... {END!r}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n\n{render(results_dir)}\n{END}{tail}")
    print(f"updated {readme}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite the README section")
    parser.add_argument("--results_dir", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.update:
        update_readme(args.results_dir)
    else:
        print(render(args.results_dir))


if __name__ == "__main__":
    main()
