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


def _table(
    heading: str | None, columns: list[str], rows: list[list[str]], align: str | None = None
) -> list[str]:
    """A markdown table (under a ``####`` heading when given). ``align`` has one letter per
    column, ``l`` or ``r``; default: the first column left, the others right (numbers)."""
    align = align or "l" + "r" * (len(columns) - 1)
    return [
        *([f"#### {heading}", ""] if heading else []),
        "| " + " | ".join(columns) + " |",
        "|" + "".join("---|" if a == "l" else "---:|" for a in align),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


def _incomplete(payload: dict[str, Any]) -> list[str]:
    if payload.get("complete", True):
        return []
    return ["**Incomplete run** (stopped by a time limit): only the figures above were measured."]


def train_step_tables(results_dir: Path) -> list[str]:
    lines = []
    for name, payload in _load("train_step_*.json", results_dir):
        shape = payload["shape"]
        device = payload["device"]
        parity = payload["parity"]
        rows = []
        for variant, figures in payload["variants"].items():
            per_step = figures["timing"]["per_step"]
            rows.append(
                [
                    variant,
                    f"{per_step['median'] * 1e3:.1f}",
                    f"{per_step['p10'] * 1e3:.1f}–{per_step['p90'] * 1e3:.1f}",
                    f"{figures['crops_per_s']:.0f}",
                    f"{figures['images_per_s']:.1f}",
                    _num(figures.get("compile_s"), ".1f"),
                    _gib(figures.get("peak_memory_bytes")),
                    _num(figures.get("mfu"), ".1%"),
                ]
            )
        lines += _table(
            f"`{name}` — {device['name']}, {shape['backbone']}, B={shape['batch_size']} "
            f"images x K={shape['num_views']} views of {shape['view_size']}^2 "
            f"(canvas {shape['canvas_size']}^2), D={payload['config']['model']['prototype_dim']}, "
            f"P={shape['num_classes'] * shape['prototypes_per_class']}",
            [
                "variant",
                "median step (ms)",
                "p10–p90 (ms)",
                "crops/s",
                "images/s",
                "compile (s)",
                "peak memory (GiB)",
                "MFU",
            ],
            rows,
        )
        headline = payload["headline"]
        lines += _incomplete(payload)
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
                f"{_num(headline.get('speedup_with_jax_augmentation'), '.2f')}x; against "
                f"the reference-style forward "
                f"{_num(headline.get('speedup_vs_reference_style'), '.2f')}x."
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
        shape = payload["shape"]
        lines += _table(
            f"`{name}` — {payload['device']['name']}, {shape['model']['backbone']}, "
            f"{shape['num_images']} images x K={shape['model']['num_views']}, eval batch "
            f"{shape['eval_batch_size']}, P={payload['num_prototypes']}",
            ["pass", "median (s)", "images/s"],
            [
                [key, f"{row['seconds']['median']:.3f}", f"{row['images_per_s']:.1f}"]
                for key, row in payload["figures"].items()
            ],
        )
        lines += _incomplete(payload)
        lines += [
            f"push / eval pass = {_num(payload['push_over_eval'], '.2f')}; reference-style "
            f"host loop / push = {_num(payload['reference_style_over_push'], '.2f')}.",
            "",
        ]
    return lines


def end_to_end_tables(results_dir: Path) -> list[str]:
    lines = []
    for name, payload in _load("end_to_end_*.json", results_dir):
        model = payload["shape"]["model"]
        host = payload["host"]
        records = payload["records"]["params"]
        views = model["num_views"]
        rows = []
        loop, step = payload.get("loop"), payload.get("step")
        if loop:
            cpu = loop["cpu"]
            rows.append(
                [
                    f"training loop ({loop['num_workers']} grain workers)",
                    f"{loop['images_per_s']:.1f}",
                    f"{loop['views_per_s']:.0f}",
                    f"{loop['data_wait_s_per_step'] * 1e3:.1f}",
                    f"{_num(cpu['main_process_cores'], '.2f')} + "
                    f"{_num(cpu['children_cores'], '.2f')}",
                    f"{_num(cpu['host_utilisation'], '.0%')}",
                ]
            )
        if step:
            rows.append(
                [
                    f"step alone ({step['variant']})",
                    f"{step['images_per_s']:.1f}",
                    f"{step['views_per_s']:.0f}",
                    "–",
                    "–",
                    "–",
                ]
            )
        lines += _table(
            f"`{name}` — {payload['device']['name']}, {host['cpu_count']} host cores, "
            f"{model['backbone']}, B={model['batch_size']} x K={views} views of "
            f"{model['view_size']}^2, canvas {model['canvas_size']}^2; "
            f"{payload['records']['images']} JPEGs of {records['width']}x{records['height']}",
            [
                "what",
                "images/s",
                "views/s",
                "data wait (ms/step)",
                "cores: main + workers",
                "host CPU busy",
            ],
            rows,
        )
        lines += _incomplete(payload)
        ratio = payload.get("ratio")
        if ratio:
            lines.append(
                f"Loop / step = **{ratio['loop_over_step']:.2f}** (goal {ratio['goal']}); "
                f"with the final checkpoint amortised over "
                f"{loop['checkpoint_every_steps']} steps "
                f"{ratio['loop_over_step_with_checkpoints']:.2f} (one checkpoint: "
                f"{loop['final_checkpoint_s']:.1f} s). CPU seconds per step, loop process / "
                f"step alone: {_num(ratio.get('cpu_s_per_step_loop_over_step'), '.2f')}."
            )
        lines.append(
            f"Host load: average {_loads(host['load_average_at_start'])} (1 / 5 / 15 min) "
            f"at the start, {_loads(host['load_average'])} at the end, on "
            f"{host['os_cpu_count']} cores; busy {_num(host['host_utilisation'], '.0%')} of the "
            f"time during the run."
        )
        pipeline = payload.get("host_pipeline")
        if pipeline:
            lines += ["", *_host_pipeline_lines(pipeline)]
        lines.append("")
    return lines


def _loads(values: list[float] | None) -> str:
    return "–" if not values else " / ".join(f"{v:.1f}" for v in values)


def _host_pipeline_lines(pipeline: dict[str, Any]) -> list[str]:
    """The host side alone: the stream per worker count, the per-image costs, the cores a
    6,000 views/s step needs."""
    costs, target = pipeline["costs"], pipeline["target"]
    lines = _table(
        "Host pipeline alone (same records)",
        [
            "grain workers",
            "images/s",
            "images/s per worker",
            "cores: main + workers",
            "images per CPU second",
        ],
        [
            [
                str(row["num_workers"]),
                f"{row['images_per_s']:.0f}",
                _num(row.get("images_per_s_per_worker"), ".0f"),
                f"{_num(row['cpu']['main_process_cores'], '.2f')} + "
                f"{_num(row['cpu']['children_cores'], '.2f')}",
                _num(row.get("images_per_cpu_s"), ".0f"),
            ]
            for row in pipeline["streams"]
        ],
    )
    per_image = " + ".join(
        f"{part} {costs[f'{part}_s'] * 1e3:.2f}" for part in ("read", "parse", "decode", "fit")
    )
    lines.append(
        f"One image on one core: {per_image} ms; `fit_record` whole {costs['all_s'] * 1e3:.2f} "
        f"ms (stored already fitted to the canvas: {costs['prefitted_s'] * 1e3:.2f} ms). "
        f"{target['views_per_s']:,.0f} views/s = {target['images_per_s']:.0f} images/s needs "
        f"**{_num(target.get('cores_at_one_worker_cpu_cost'), '.1f')} cores** at the 1-worker "
        f"stream's CPU cost ({target['cores_at_single_core_cost']:.1f} at the single-core "
        f"cost of `fit_record`)."
    )
    return lines


def input_pipeline_tables(results_dir: Path) -> list[str]:
    lines = []
    for name, payload in _load("input_pipeline_*.json", results_dir):
        records = payload["records"]
        decode = payload["decode"]
        lines += _table(
            f"`{name}` — {payload['host']['cpu_count']} host cores, "
            f"{records['images']} {records['image_size']}^2 PNG records -> canvas "
            f"{records['canvas_size']}^2, K={records['num_views']}, batch {records['batch_size']}",
            ["grain workers", "first batch (s)", "images/s"],
            [
                [
                    str(row["num_workers"]),
                    f"{row['first_batch_s']:.2f}",
                    f"{row['images_per_s']:.0f}",
                ]
                for row in payload["streams"]
            ],
            align="rrr",
        )
        lines += [
            f"PIL decode per image: PNG {decode['png_decode_s_per_image'] * 1e3:.1f} ms, "
            f"JPEG q90 {decode['jpeg_q90_decode_s_per_image'] * 1e3:.1f} ms.",
            "",
        ]
    return lines


def export_tables(results_dir: Path) -> list[str]:
    lines = []
    for name, payload in _load("export_*.json", results_dir):
        images = payload["images"]
        lines += _table(
            f"`{name}` — torch on {payload['torch_device']}, {images['count']} "
            f"{images['image_size']}^2 parts-world images",
            ["segmenter", "images/s", "masks per image"],
            [
                [row["segmenter"], f"{row['images_per_s']:.2f}", f"{row['masks_per_image']:.1f}"]
                for row in payload["segmenters"]
            ],
        )
        lines += [payload["notes"], ""]
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
        ]
        lines += _table(
            None,
            ["devices", "global batch", "median step (ms)", "crops/s", "weak-scaling efficiency"],
            [
                [
                    str(row["devices"]),
                    str(row["global_batch_images"]),
                    f"{row['step_time_s'] * 1e3:.1f}",
                    f"{row['crops_per_s']:.0f}",
                    f"{row['weak_scaling_efficiency']:.2f}",
                ]
                for row in measured["rows"]
            ],
            align="rrrrr",
        )
        check = measured.get("sharded_vs_single_device_loss")
        if check:
            lines += [
                f"Sharded step vs one device, same global batch: relative loss difference "
                f"{check['relative_difference']:.1e} "
                f"(**{'passed' if check['passed'] else 'FAILED'}**).",
                "",
            ]
        model = payload["analytic_model"]
        lines += [
            f"Analytic model (CUB shape per GPU; single-GPU step: "
            f"{_num(model['single_device_step_s'], '.4f')} s from "
            f"{model['single_device_source']}; gradients all-reduced: "
            f"{model['gradient_bytes_total'] / 1e6:.1f} MB per step; "
            f"{model['batchnorm_layers']} BatchNorm layers):",
            "",
        ]
        rows = []
        for row in model["rows"]:
            step = row.get("step_time_s")
            rows.append(
                [
                    str(row["devices"]),
                    row["interconnect"] or "–",
                    f"{row['gradient_all_reduce_s'] * 1e3:.2f}",
                    f"{row['batchnorm_all_reduce_s'] * 1e3:.2f}",
                    _num(step * 1e3 if step else None, ".1f"),
                    _num(row.get("crops_per_s"), ".0f"),
                    _num(row.get("efficiency"), ".2f"),
                ]
            )
        lines += _table(
            None,
            [
                "GPUs",
                "interconnect",
                "grad all-reduce (ms)",
                "BN all-reduces (ms)",
                "step (ms)",
                "crops/s",
                "efficiency",
            ],
            rows,
            align="rlrrrrr",
        )
    return lines


def render(results_dir: Path = common.RESULTS_DIR) -> str:
    """All tables as one markdown block."""
    sections = [
        ("Training step", train_step_tables),
        ("Push", push_tables),
        ("End to end", end_to_end_tables),
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
