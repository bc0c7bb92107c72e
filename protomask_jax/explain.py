r"""Writes the explanation report of a run: ``python -m protomask_jax.explain --config C
--workdir DIR [--images ID,ID,...] [--num_images N] [--top_k K]``.

One evaluation forward over the chosen test images (``inference.run_model``), then the
sections of ``protomask_jax/report/`` draw their pictures under ``DIR/report/`` and return
their HTML: the metrics of ``DIR/eval.json`` (run ``protomask_jax.evaluate`` first), training
curves, the prototype gallery after push, and "this looks like that" per test image.
``DIR/report/index.html`` opens from disk; ``docs/explanations.md`` describes the page.
``DIR/report/summary.json`` holds what the page warns of, for scripts (prototypes push made
duplicates of each other).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from protomask_jax import base, cli, config_checks, inference
from protomask_jax import evaluate as evaluate_lib
from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib
from protomask_jax.report import curves, gallery, html, panels, pictures, relevance, topimages

REPORT_DIR = "report"
SUMMARY = "summary.json"
DEFAULT_NUM_IMAGES = 12
DEFAULT_TOP_K = 3


def select_images(
    record_set: pipeline.RecordSet, image_ids: Sequence[int] | None, num_images: int
) -> np.ndarray:
    """int64 record indices of ``image_ids`` (in that order; unknown ids are refused), or else
    of ``num_images`` images round-robin over the classes, lowest ids first, so every class
    appears before any appears twice."""
    ids = record_set.image_ids
    good_ids = ids[record_set.good]
    if image_ids:
        index_of_id = {int(ids[n]): int(n) for n in record_set.good}
        missing = [i for i in image_ids if int(i) not in index_of_id]
        if missing:
            raise base.UserError(
                f"--images: ids {missing} are not in split '{record_set.split}' of "
                f"{record_set.records_dir} (it holds ids {good_ids.min()}..{good_ids.max()}, "
                f"e.g. {good_ids[:5].tolist()})"
            )
        return np.array([index_of_id[int(i)] for i in image_ids], np.int64)
    order = record_set.good[np.argsort(ids[record_set.good], kind="stable")]
    labels = record_set.labels[order]
    within = np.zeros(len(order), np.int64)  # position of each image within its class
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        within[members] = np.arange(len(members))
    return order[np.lexsort((labels, within))][:num_images].astype(np.int64)


def _highlights(workdir: Path, eval_results: dict | None) -> list[tuple[str, str, str]]:
    """The header's big numbers: accuracy and faithfulness from eval.json, or results.json."""
    if not eval_results:
        path = workdir / "results.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        if "test_accuracy" not in results:
            return []
        return [("test accuracy", f"{100 * results['test_accuracy']:.1f}%", "results.json")]
    highlights = []
    group = eval_results.get("classification") or {}
    accuracy = group.get("top1_accuracy", group.get("subset_accuracy"))  # multi-label: exact
    if accuracy is not None:
        images = f"{eval_results['num_images']} images (eval.json)"
        highlights.append((f"{eval_results['split']} accuracy", f"{accuracy:.1f}%", images))
    faithfulness = eval_results.get("faithfulness") or {}
    if faithfulness.get("rate") is not None:
        rate = f"{faithfulness['rate']:.1f}%"
        chance = f"chance {faithfulness['chance_rate']:.1f}% (top-{faithfulness['k']})"
        highlights.append(("explanations on the deciding part", rate, chance))
    return highlights


def explain(
    config,
    workdir: str | Path,
    *,
    image_ids: Sequence[int] | None = None,
    num_images: int = DEFAULT_NUM_IMAGES,
    top_k: int = DEFAULT_TOP_K,
    split: str = "test",
    checkpoint: str = "best",
    config_name: str | None = None,
    progress: bool = True,
) -> Path:
    """Writes ``workdir/report/index.html`` and its pictures and returns its path: the
    ``top_k`` prototypes of ``image_ids`` of ``split`` (default: see :func:`select_images`)."""
    inference.check_explain_config(config)
    workdir, records_dir = base.as_path(workdir), config.dataset.records_dir
    info = records_lib.load_dataset_info(records_dir)
    config_checks.check_dataset_info(config, info)
    num_classes = config.dataset.num_classes
    class_names = list(info.get("class_names") or [f"class {c}" for c in range(num_classes)])
    trained = inference.restore_trained(config, workdir, which=checkpoint)
    arrays = inference.model_arrays(trained)
    skip = config.input.skip_bad_records
    test_set = pipeline.RecordSet(records_dir, split, skip_bad_records=skip)
    chosen = select_images(test_set, image_ids, num_images)
    outputs = inference.run_model(trained, test_set, chosen, progress=progress)
    if outputs.labels.ndim == 2:  # the panels name one true class: the prediction if held
        predicted = np.argmax(outputs.logits, axis=1)
        held = outputs.labels[np.arange(len(predicted)), predicted] > 0
        labels = np.where(held, predicted, np.argmax(outputs.labels, axis=1))
        outputs = dataclasses.replace(outputs, labels=labels)
    out_dir = workdir / REPORT_DIR
    if jax.process_index() != 0:
        return out_dir / "index.html"  # every process joins the forward pass; process 0 writes
    if base.is_remote(workdir):  # drawn here, then uploaded (matplotlib and PIL write files)
        with tempfile.TemporaryDirectory(prefix="protomask-report-") as local:
            index = _render(
                config, workdir, Path(local) / REPORT_DIR, trained, arrays, outputs, chosen,
                test_set, split, top_k, class_names, config_name, progress,
            )  # fmt: skip
            if out_dir.exists():  # an earlier report's pictures would linger beside the new
                out_dir.rmtree()
            base.upload_tree(index.parent, out_dir)
        return out_dir / index.name
    return _render(
        config, workdir, out_dir, trained, arrays, outputs, chosen, test_set, split, top_k,
        class_names, config_name, progress,
    )  # fmt: skip


def _render(
    config, workdir, out_dir: Path, trained, arrays, outputs, chosen, test_set, split: str,
    top_k: int, class_names, config_name, progress: bool,
) -> Path:  # fmt: skip
    """The report of :func:`explain` written into the local ``out_dir``."""
    records_dir, skip = config.dataset.records_dir, config.input.skip_bad_records
    num_classes, num_prototypes = config.dataset.num_classes, arrays.last_layer.shape[1]
    sources = gallery.prototype_sources(trained.meta, num_prototypes)
    duplicates = gallery.duplicate_groups(sources, arrays.prototypes)
    record_sets = {split: test_set}  # the train images are the prototypes' sources
    for other in {"train", "test"} - {split}:
        record_sets[other] = pipeline.RecordSet(records_dir, other, skip_bad_records=skip)
    images = {name: pictures.RecordImages(s) for name, s in record_sets.items()}
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    canvas = pictures.Canvas(out_dir, class_names, pictures.class_colours(num_classes))
    top_k = max(1, min(top_k, num_prototypes))
    explainer = inference.explainer(trained)
    heatmaps = None  # the mask alone explains: the panels show the plain views
    if explainer.kind == "prp":
        heatmaps = relevance.Heatmaps(explainer, canvas, sources, images["train"])
    total = num_prototypes + len(chosen) + 2
    with tqdm(total=total, desc="rendering report", unit="picture", disable=not progress) as bar:
        training = curves.section(workdir, out_dir)
        bar.update()
        prototypes, drawn = gallery.section(
            canvas, arrays, sources, images["train"], bar.update, duplicates=duplicates
        )
        explanations = panels.section(
            canvas, outputs, arrays, images[split], drawn, top_k, bar.update, heatmaps
        )
        shown = panels.shown_prototypes(outputs, arrays, top_k)
        top = topimages.section(canvas, workdir, shown, images, trained.checkpoint)
        bar.update()
    sections = [training, prototypes, explanations, top]
    summary = {
        "checkpoint": trained.checkpoint,
        "num_prototypes": num_prototypes,
        "duplicate_groups": duplicates,
        "num_redundant_prototypes": sum(len(group) - 1 for group in duplicates),
    }
    base.write_json_atomic(out_dir / SUMMARY, summary)
    return _write_page(config, workdir, out_dir, trained.checkpoint, config_name, sections)


def _write_page(config, workdir, out_dir, checkpoint: str, config_name, sections) -> Path:
    """``out_dir/index.html``: the run's facts, eval.json's metrics and ``sections``."""
    explained_by = "masks of the winning views"
    if config.explain.explanation_type == "prp":
        explained_by = f"PRP maps ({config.explain.prp_rule} rule)"
    facts = [
        ("dataset", config.dataset.name),
        ("config", config_name or "(given in code)"),
        ("checkpoint", checkpoint),
        ("backbone", config.model.backbone),
        ("views per image", str(config.input.num_views)),
        ("explanations", explained_by),
        ("workdir", str(workdir)),
    ]
    eval_results = evaluate_lib.load_eval(workdir)
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = html.page(
        f"ProtoMask explanations: {config.dataset.name}",
        facts,
        _highlights(workdir, eval_results),
        [html.metrics_section(eval_results, workdir), *sections],
        f"generated {now} by protomask_jax.explain",
    )
    index = out_dir / "index.html"
    tmp = index.with_name(index.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(index)
    return index


def _explain_tool(config, config_name: str) -> str:
    from absl import app, flags

    FLAGS = flags.FLAGS
    try:
        image_ids = [int(i) for i in FLAGS.images if i.strip()]
    except ValueError:
        raise app.UsageError(f"--images takes integer ids, got {FLAGS.images}") from None
    index = explain(
        config,
        FLAGS.workdir,
        image_ids=image_ids or None,
        num_images=FLAGS.num_images,
        top_k=FLAGS.top_k,
        split=FLAGS.split,
        checkpoint=FLAGS.checkpoint,
        config_name=config_name,
    )
    return f"report: {index if base.is_remote(index) else index.resolve()}"


if __name__ == "__main__":
    from absl import flags

    evaluate_lib.define_run_flags("explain")
    flags.DEFINE_list("images", [], "Ids of the test images to explain (default: see num_images).")
    flags.DEFINE_integer(
        "num_images", DEFAULT_NUM_IMAGES, "Without --images: explain this many test images."
    )
    flags.DEFINE_integer("top_k", DEFAULT_TOP_K, "Prototypes shown per explained image.")
    cli.run(lambda argv: evaluate_lib.run_tool(argv, _explain_tool))
