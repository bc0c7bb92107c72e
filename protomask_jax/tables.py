r"""Tables over runs: ``python -m protomask_jax.tables WORKDIR... [--out DIR]`` (globs allowed).

Each workdir contributes its ``eval.json`` metrics (the families' table rows) and
``results.json``'s test accuracy, time and prototype count. Runs are grouped by their
``config.json`` (the settings a resumed run may change left out, see
``checkpoint.config_fingerprint``) and how eval.json was made (split, frame, explanation
type, PRP rule, checkpoint kind): runs that differ only in ``seed`` form one group; a group is
named by the keys that differ between groups. Per group and metric: n, mean, sample standard
deviation (ddof 1, as the authors' pandas ``describe``), min and max. Printed as Markdown;
``--out`` also writes ``tables.md``, ``tables.tex`` (``mean \pm std`` cells, as the authors'
``paper_table.py``) and ``tables.json``.
"""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from protomask_jax import base, cli, evaluators

# The metrics of the first table, when present.
MAIN = (
    "classification.top1_accuracy classification.subset_accuracy "
    "classification.balanced_accuracy faithfulness.rate faithfulness.chance_rate "
    "faithfulness.relevance_mass "
    "compactness.global_explanation_size compactness.classification_sparsity "
    "contrastivity.vlc contrastivity.inter_prototype_distance complexity.object_overlap "
    "complexity.part_consistency"
).split()
RESULTS_ROWS = [
    ("test_accuracy", "%", "test accuracy"),
    ("num_prototypes", "", "prototypes"),
    ("train_time_s", "s", "training time"),
]


def _read_json(path: Path, fix: str) -> dict:
    if not path.is_file():
        raise base.UserError(f"{path.parent} has no {path.name}; {fix}")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise base.UserError(f"{path} is damaged ({e})") from None


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value
    return flat


def load_run(workdir: str | Path) -> dict[str, Any]:
    """``{"workdir", "seed", "settings" (dotted key -> value), "metrics" ("family.key" ->
    number), "evaluation" (eval.json)}``."""
    from protomask_jax import checkpoint

    workdir = base.as_path(workdir)
    if not workdir.is_dir():
        raise base.UserError(f"{workdir}: no such run folder")
    evaluate = f"run `python -m protomask_jax.evaluate --workdir {workdir}` first"
    evaluation = _read_json(workdir / "eval.json", evaluate)
    config = _read_json(workdir / cli.RUN_CONFIG, "it is not a training run")["config"]
    settings = _flat(checkpoint.config_fingerprint(config))
    settings.pop("seed", None)
    evaluated = ("split", "resolution", "explanation_type", "prp_rule")
    settings.update({f"eval.{k}": evaluation.get(k) for k in evaluated})
    settings["eval.checkpoint"] = str(evaluation.get("checkpoint", "")).split(" step")[0]
    results_path = workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    # the results' accuracy is a fraction, the families' are percent
    scaled = {k: results[k] * (100 if u == "%" else 1) for k, u, _ in RESULTS_ROWS if k in results}
    groups = {"results": scaled, **evaluation}
    metrics = {
        f"{name}.{key}": value
        for name, group in groups.items()
        if isinstance(group, dict)
        for key, value in group.items()
        if isinstance(value, int | float) or value is None
    }
    return dict(workdir=str(workdir), seed=config.get("seed"), settings=settings,
                metrics=metrics, evaluation=evaluation)  # fmt: skip


def group_runs(runs: list[dict]) -> list[dict]:
    """Groups of runs with equal settings, in order of first appearance, named by the keys
    whose values differ between groups (one group: its dataset)."""
    groups: dict[str, dict] = {}
    for run in runs:
        key = json.dumps(run["settings"], sort_keys=True, default=str)
        groups.setdefault(key, {"settings": run["settings"], "runs": []})["runs"].append(run)
    groups = list(groups.values())
    keys = sorted(set().union(*(g["settings"] for g in groups)))
    differing = [k for k in keys if len({str(g["settings"].get(k)) for g in groups}) > 1]
    for group in groups:
        name = ", ".join(f"{k}={group['settings'].get(k)}" for k in differing)
        group["name"] = name or str(group["settings"].get("dataset.name", "all runs"))
    return groups


def statistics(values: list[float]) -> dict[str, float | int | None]:
    """n, mean, sample std (None for one value), min, max of the finite ``values``."""
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if array.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    std = float(np.std(array, ddof=1)) if array.size > 1 else None
    return {"n": int(array.size), "mean": float(array.mean()), "std": std,
            "min": float(array.min()), "max": float(array.max())}  # fmt: skip


def _rows(runs: list[dict]) -> list[dict]:
    """``metric`` ("family.key"), ``title``, ``label``, ``unit`` of each metric some run has, in
    the families' order."""
    families = [("results", "Training (results.json)", RESULTS_ROWS)]
    for name, (title, family_rows) in evaluators.TABLES.items():
        group = next((r["evaluation"][name] for r in runs if r["evaluation"].get(name)), {})
        try:
            title = title.format(**group)
        except (KeyError, IndexError, ValueError):
            title = title.split(" (")[0]
        families.append((name, title, [row for row in family_rows if row[1] != "note"]))
    present, table = set().union(*(run["metrics"] for run in runs)), []  # "family.key"
    for name, title, rows in families:
        parent = ""
        for key, unit, label in rows:
            # an indented label qualifies the last unindented one: name both
            indented = label != label.lstrip()
            parent = parent if indented else label
            shown = f"{parent}: {label.strip()}" if indented else label
            if f"{name}.{key}" in present:
                table.append(dict(metric=f"{name}.{key}", title=title, label=shown, unit=unit))
    return table


def aggregate(workdirs: list[str | Path]) -> dict[str, Any]:
    """The groups of ``workdirs`` and each group's statistics per metric (tables.json)."""
    groups = group_runs([load_run(w) for w in workdirs])
    rows = _rows([run for group in groups for run in group["runs"]])
    summaries = [
        dict(
            name=group["name"],
            workdirs=[run["workdir"] for run in group["runs"]],
            seeds=[run["seed"] for run in group["runs"]],
            metrics={
                row["metric"]: statistics(
                    [run["metrics"].get(row["metric"]) for run in group["runs"]]
                )
                for row in rows
            },
        )
        for group in groups
    ]
    return {"groups": summaries, "rows": rows}


def _number(value, unit: str) -> str:
    return "n/a" if value is None else f"{value:.2f}" if unit in ("%", "s") else f"{value:.4g}"


def _cell(stats: dict, unit: str, latex: bool, spread: bool) -> str:
    if stats["n"] == 0:
        return "n/a"
    text = _number(stats["mean"], unit)
    if stats["std"] is not None:
        text += (r" \pm " if latex else " ± ") + _number(stats["std"], unit)
    if spread and stats["n"] > 1:
        text += f" ({_number(stats['min'], unit)} to {_number(stats['max'], unit)})"
    return f"${text}$" if latex else text


def _tex(text: str) -> str:
    return text.translate(str.maketrans({"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#"}))


def render(table: dict, latex: bool = False) -> str:
    """Markdown (a list of the groups, then tables) or LaTeX tabulars: the main metrics
    (mean ± std), then one table per family (Markdown adds min to max); a column per group."""
    groups, rows = table["groups"], table["rows"]
    by_metric = {row["metric"]: row for row in rows}
    sections = [
        ("Main metrics: mean ± std over runs", [by_metric[m] for m in MAIN if m in by_metric])
    ]
    spread = "" if latex else " (min to max)"
    for title in dict.fromkeys(row["title"] for row in rows):
        sections.append((f"{title}: mean ± std{spread}", [r for r in rows if r["title"] == title]))
    escape, lines = (_tex, []) if latex else (str, ["| group | runs | seeds |", "|---|---:|---|"])
    for g in groups if not latex else ():
        lines.append(f"| {g['name']} | {len(g['workdirs'])} | {', '.join(map(str, g['seeds']))} |")
    for number, (title, section) in enumerate(sections):
        header = ["metric", *(escape(g["name"]) for g in groups)]
        if latex:
            lines += [f"% {title}", f"\\begin{{tabular}}{{l{'r' * len(groups)}}}", "\\toprule",
                      " & ".join(header) + r" \\", "\\midrule"]  # fmt: skip
        else:
            lines += ["", f"### {title}", "", f"| {' | '.join(header)} |",
                      "|---|" + "---:|" * len(groups)]  # fmt: skip
        for row in section:
            unit = f" ({row['unit']})" if row["unit"] else ""
            cells = [escape(row["label"] + unit)]
            cells += [_cell(g["metrics"][row["metric"]], row["unit"], latex, number and not latex)
                      for g in groups]  # fmt: skip
            lines.append(" & ".join(cells) + r" \\" if latex else f"| {' | '.join(cells)} |")
        if latex:
            lines += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(lines) + "\n"


def expand(patterns: list[str]) -> list[str]:
    """The workdirs named or matched (sorted per pattern), each once; a pattern that matches
    nothing stays itself (and is refused as no such folder)."""
    found = [path for p in patterns for path in (sorted(glob.glob(p)) or [p])]
    return list(dict.fromkeys(found))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str]) -> None:
    from absl import app, flags

    if len(argv) < 2:
        raise app.UsageError("name the run folders (or a glob): WORKDIR...")
    table = aggregate(expand(argv[1:]))
    markdown = render(table)
    out = flags.FLAGS.out
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        _write(Path(out) / "tables.md", markdown)
        _write(Path(out) / "tables.tex", render(table, latex=True))
        base.write_json_atomic(Path(out) / "tables.json", table)
        markdown += f"\nwritten: {out}/tables.md, tables.tex, tables.json"
    print(markdown)


if __name__ == "__main__":
    from absl import flags

    flags.DEFINE_string("out", None, "Folder for tables.md, tables.tex and tables.json.")
    cli.run(main)
