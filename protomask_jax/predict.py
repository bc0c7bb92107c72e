r"""Explains new images with a trained run: ``python -m protomask_jax.predict --workdir W
IMAGE_OR_FOLDER... [--out DIR] [--top_k 3] [--top_classes 5] [--nofigures]
[--segmenter slic|grid|sam|sam2] [--config.x=y]`` (docs/predict.md); the run's config comes
from ``cli.run_config``.

Each file: ``data.images.load_image`` (upright 8-bit RGB, at most ``MAX_SIDE`` px, with notes
on what decoding did; :func:`size_note` adds one for an image much smaller than the network's
input) -> the segmenter of the run's records (``dataset_info.json``) ->
``segmentation.export.build_record`` (masks post-processed and stored as the export does) ->
one temporary shard. One ``inference.run_model`` pass over it (the evaluation pipeline and
forward, in batches of ``input.eval_batch_size``) gives logits ``[N, C]``, similarities and
winning views ``[N, P]``. Softmax of the logits -> ``OUT/predictions.csv`` (the top classes
per file) and the table printed. Unless figures are off, ``report.panels`` draws each image's
top contributions, with PRP maps of the matched views unless ``explain.explanation_type`` is
``mask``, as ``figures/{file stem}.png`` (:func:`figure_names`), listed in ``OUT/index.html``.
``OUT/predictions.json`` holds everything. OUT is built beside itself and swapped in when
complete. A file that is not a readable image is skipped with its reason.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from protomask_jax import base, cli, config_checks, inference
from protomask_jax.data import images as images_lib
from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib
from protomask_jax.report import gallery, html, panels, pictures, relevance

PREDICTIONS = "predictions.json"
TABLE = "predictions.csv"
SPLIT = "predict"  # the temporary shard's split
# An image whose shorter side is under this fraction of input.view_size is mostly invented
# by upscaling: an 8x8 icon once came out at 99.4 % for one class, which it cannot support.
SMALL_FRACTION = 0.5
SHOWN_CLASSES = 3  # top classes in the printed table (the CSV has --top_classes)


class PredictError(base.UserError):
    """Nothing to explain, an output folder that is not predict's, ..."""


def collect_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The files named and every file under the folders named (sorted; hidden ones left out)."""
    files = []
    for given in map(Path, inputs):
        if not given.exists():
            raise PredictError(f"{given}: no such file or folder.")
        found = sorted(p for p in given.rglob("*") if p.is_file()) if given.is_dir() else [given]
        files += [p for p in found if not any(s[0] == "." for s in p.relative_to(given).parts)]
    if not files:
        raise PredictError(f"no files to explain in {', '.join(map(str, inputs))}.")
    return files


def segmentation_config(config, info: dict[str, Any], method: str | None):
    """``(config copy, note)``: its ``segmentation`` makes masks as the run's records were
    made (method, slic/grid parameters and post-processing of ``dataset_info.json``) or with
    ``method``; the note says why the records' method could not be used for a new image."""
    config = config.copy_and_resolve_references()
    config.unlock()
    seg, stored, note = config.segmentation, info["segmenter"], ""
    seg.update(info["postprocess"])
    seg.method = method or stored["method"]
    if seg.method == stored["method"] and seg.method in ("slic", "grid"):
        seg[seg.method].update(stored["params"])
    if seg.method == "gt":
        seg.method, seg.slic.n_segments = "slic", seg.max_masks
        note = (
            "the run was trained on the dataset's own masks (gt), which a new image does not "
            f"have: segmenting with slic, n_segments={seg.max_masks} (--segmenter to choose)."
        )
    return config, note


def size_note(size: tuple[int, int], view_size: int) -> str | None:
    """The note for an image of ``size`` ``(H, W)`` px (before any downscaling) whose shorter
    side is under ``SMALL_FRACTION`` of the network's input, else None. Every view is a box of
    the image resized to ``view_size`` square, so each is upscaled at least
    ``view_size / min(H, W)`` times along one side."""
    height, width = size
    limit = SMALL_FRACTION * view_size
    if min(height, width) >= limit:
        return None
    return (
        f"small image: {width}x{height} px, shorter side under {limit:g} px (half the "
        f"network's {view_size} px input): every view is upscaled at least "
        f"{view_size / min(height, width):.1f}x, so the probability rests on detail the "
        "image lacks"
    )


def figure_names(files: Sequence[Path]) -> list[str]:
    """A figure name per file (no folder, no extension): the file's stem, characters other
    than letters, digits and ``._-`` made ``_``. Stems that collide (ignoring case, as macOS
    and Windows do) get ``-`` and 6 hex digits of the SHA-1 of the absolute path, and a file
    named twice ``-2``, ``-3``: the same files get the same names in any order."""
    stems = [
        "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(f).stem) or "image"
        for f in files
    ]
    counts = collections.Counter(stem.lower() for stem in stems)
    names, taken = [], collections.Counter()
    for file, stem in zip(files, stems, strict=True):
        if counts[stem.lower()] > 1:
            stem += "-" + hashlib.sha1(os.path.abspath(file).encode()).hexdigest()[:6]
        taken[stem.lower()] += 1
        names.append(stem if taken[stem.lower()] == 1 else f"{stem}-{taken[stem.lower()]}")
    return names


def class_ranking(logits, names: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable classes (softmax of ``logits [C]``, float64), most first."""
    logits = np.asarray(logits, np.float64)
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    return [
        {"class_id": int(c), "name": names[c], "probability": float(probabilities[c])}
        for c in np.argsort(-probabilities, kind="stable")[:k]
    ]


def _segment(files, config, records_dir: Path, progress: bool, say):
    """Writes the readable files' records into one shard; ``(loaded images, skipped)``."""
    from PIL import Image

    from segmentation import export, segmenters, sources

    segmenter = segmenters.get_segmenter(config)
    loaded, skipped = [], []

    def serialized():
        for path in tqdm(files, desc="segmenting", unit="img", disable=not progress):
            try:
                image = images_lib.load_image(path)
            except images_lib.ImageError as e:
                skipped.append({"file": str(path), "reason": str(e)})
                say(f"skipped {e}")
                continue
            note = size_note(image.size, config.input.view_size)
            image.notes += [note] if note else []
            png = io.BytesIO()
            Image.fromarray(image.rgb).save(png, format="PNG", compress_level=1)
            item = sources.SourceItem(len(loaded), str(path), png.getvalue(), -1)
            loaded.append((path, image))
            yield export.build_record(item, segmenter, config, path.parent)[0].to_bytes()

    records_lib.write_shard(records_dir / records_lib.shard_name(SPLIT, 0, 1), serialized())
    return loaded, skipped


def _entry(n: int, loaded, outputs, arrays, record, names, top_k: int, out_dir: Path) -> dict:
    """Image ``n``'s entry of predictions.json; writes the PNGs of its matched masks."""
    path, image = loaded
    top5 = class_ranking(outputs.logits[n], names, 5)
    scores = (outputs.similarities[n], arrays.last_layer, top5[0]["class_id"])
    contributions = []
    for match in panels.top_contributions(
        *scores, outputs.winning_view[n], outputs.num_masks[n], top_k
    ):
        mask = out_dir / f"masks/{n}_m{match.mask_index}.png"
        mask.parent.mkdir(exist_ok=True)
        mask.write_bytes(record.mask_pngs[match.mask_index])
        own = int(arrays.prototype_class[match.prototype])
        contributions.append(
            dataclasses.asdict(match)
            | {"prototype_class": own, "prototype_class_name": names[own]}
            | {"view_box": record.boxes[match.mask_index].round(6).tolist()}
            | {"mask": str(mask.relative_to(out_dir))}
        )
    return {
        "file": str(path),
        "image_size": list(image.size),
        "notes": image.notes,
        "predicted": top5[0],
        "top5": top5,
        "logits": outputs.logits[n].tolist(),
        "contributions": contributions,
    }


def predict(
    config,
    workdir: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    top_k: int = 3,
    top_classes: int = 5,
    figures: bool = True,
    segmenter: str | None = None,
    checkpoint: str = "best",
    progress: bool = True,
    say=print,
) -> dict[str, Any]:
    """Explains the images among ``inputs`` with the ``checkpoint`` of the run in ``workdir``;
    writes ``out_dir`` and returns what its predictions.json holds. ``top_classes``: classes
    per file in predictions.csv (at most all); ``figures``: draw figures and index.html."""
    from segmentation import segmenters

    if config.dataset.multi_label:  # its panels name one true class per image
        raise config_checks.ConfigError(
            "config.dataset.multi_label: predict explains single-label runs only"
        )
    if top_classes < 1:
        raise PredictError(f"--top_classes={top_classes}: give at least 1 (the default is 5).")
    out_dir = _check_out_dir(Path(out_dir).absolute())
    files = collect_files(inputs)
    info = records_lib.load_dataset_info(config.dataset.records_dir)
    config_checks.check_dataset_info(config, info)
    names = list(info.get("class_names") or map(str, range(config.dataset.num_classes)))
    top_classes = min(top_classes, len(names))
    seg_config, note = segmentation_config(config, info, segmenter)
    if note:
        say(note)
    trained = inference.restore_trained(config, workdir, which=checkpoint)
    arrays = inference.model_arrays(trained)
    num_prototypes = arrays.last_layer.shape[1]
    top_k = max(1, min(top_k, num_prototypes))
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return round(clock[-1] - clock[-2], 3)

    try:
        with tempfile.TemporaryDirectory(dir=staging) as records_dir:
            loaded, skipped = _segment(files, seg_config, Path(records_dir), progress, say)
            seconds = {"segmentation": lap()}
            if not loaded:
                raise PredictError(f"none of the {len(files)} file(s) is a readable image.")
            record_set = pipeline.RecordSet(records_dir, SPLIT)
            outputs = inference.run_model(trained, record_set, progress=progress)
            seconds["model"] = lap()
            new_images = pictures.RecordImages(record_set)
            stems = figure_names([path for path, _ in loaded]) if figures else []
            figure_of = {n: f"figures/{stem}.png" for n, stem in enumerate(stems)}
            entries = [
                _entry(n, item, outputs, arrays, new_images.get(n).record, names, top_k, staging)
                | {"figure": figure_of.get(n)}
                for n, item in enumerate(loaded)
            ]
            if figures:
                used = {c["prototype"] for entry in entries for c in entry["contributions"]}
                new = (outputs, new_images, used, figure_of)
                sections = _draw(config, trained, arrays, names, new, top_k, staging, progress)
                seconds["pictures"] = lap()
        described = segmenters.segmenter_description(seg_config) | {"note": note}
        run = str(workdir) if base.is_remote(workdir) else str(Path(workdir).absolute())
        result = {"workdir": run, "checkpoint": trained.checkpoint}
        result |= {"segmenter": described, "top_classes": top_classes}
        result |= {"images": entries, "skipped": skipped, "seconds": seconds}
        base.write_json_atomic(staging / PREDICTIONS, result)
        base.write_text_atomic(staging / TABLE, predictions_csv(result, names))
        if figures:
            _write_page(staging, result, sections, config.dataset.name)
        _replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _replace_dir(new: Path, out_dir: Path) -> None:
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)  # an earlier output goes only once the new one is whole
    os.replace(new, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _check_out_dir(out_dir: Path) -> Path:
    if out_dir.is_file() or (
        out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / PREDICTIONS).exists()
    ):
        raise PredictError(
            f"--out {out_dir} exists and holds no {PREDICTIONS} of an earlier run of predict; "
            "choose another folder."
        )
    return out_dir


def _draw(config, trained, arrays, names, new, top_k: int, out_dir: Path, progress: bool):
    """The report's sections for ``new`` = (model outputs, RecordImages, prototypes used,
    figure names) of the new images: their panels, then the gallery of the prototypes used."""
    outputs, new_images, used, figure_paths = new
    canvas = pictures.Canvas(out_dir, names, pictures.class_colours(len(names)))
    sources = gallery.prototype_sources(trained.meta, arrays.last_layer.shape[1])
    train_images = pictures.RecordImages(pipeline.RecordSet(config.dataset.records_dir, "train"))
    explainer = inference.explainer(trained)
    heatmaps = None  # the matched views under their PRP maps, as the report shows them
    if explainer.kind == "prp":
        heatmaps = relevance.Heatmaps(explainer, canvas, sources, train_images)
    total = len(used) + len(outputs.logits)
    with tqdm(total=total, desc="drawing", unit="picture", disable=not progress) as bar:
        gallery_section, drawn = gallery.section(
            canvas, arrays, sources, train_images, bar.update, used
        )
        explanations = panels.section(
            canvas, outputs, arrays, new_images, drawn, top_k, bar.update, heatmaps, figure_paths
        )
    explanations.note = explanations.note.replace("test image", "image")
    return [explanations, gallery_section]


def _write_page(out_dir: Path, result: dict[str, Any], sections, dataset: str) -> None:
    skipped = result["skipped"]
    if skipped:
        items = "".join(f"<li>{html.e(s['reason'])}</li>" for s in skipped)
        note = "Files that are not readable images; the others were explained."
        sections.append(html.Section("skipped", "Skipped", "Skipped", note, f"<ul>{items}</ul>"))
    facts = [(key, result[key]) for key in ("workdir", "checkpoint")]
    facts += [("segmenter", result["segmenter"]["method"])]
    facts += [("images", f"{len(result['images'])} explained, {len(skipped)} skipped")]
    page = html.page(
        f"ProtoMask predictions: {dataset}", facts, [], sections, f"numbers: {PREDICTIONS}"
    )
    (out_dir / "index.html").write_text(page, encoding="utf-8")


def predictions_csv(result: dict[str, Any], names: Sequence[str]) -> str:
    """``file, class_1, probability_1, ..., class_k, probability_k, notes`` (k =
    ``result["top_classes"]``), one row per explained file, then one per skipped file with
    its reason as the note; notes joined by ``; ``."""
    k = result["top_classes"]
    header = ["file"]
    for i in range(1, k + 1):
        header += [f"class_{i}", f"probability_{i}"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*header, "notes"])
    for entry in result["images"]:
        ranked = class_ranking(entry["logits"], names, k)
        cells = [value for c in ranked for value in (c["name"], f"{c['probability']:.6f}")]
        writer.writerow([entry["file"], *cells, "; ".join(entry["notes"])])
    for skipped in result["skipped"]:
        reason = skipped["reason"].removeprefix(f"{skipped['file']}: ")
        writer.writerow([skipped["file"], *[""] * (2 * k), f"skipped: {reason}"])
    return buffer.getvalue()


def _short_names(files: Sequence[str]) -> list[str]:
    """Each file's name, or the path as given where two files share a name."""
    counts = collections.Counter(Path(f).name for f in files)
    return [Path(f).name if counts[Path(f).name] == 1 else f for f in files]


def _text_table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]  # fmt: skip


def summary(result: dict[str, Any], out_dir: Path) -> str:
    """A table of the most probable classes per image, the notes, the skipped files, the
    time taken and where the output is."""
    entries = result["images"]
    shown = min(SHOWN_CLASSES, result["top_classes"])
    labels = _short_names([entry["file"] for entry in entries])
    rows = [["file", *(f"class {i}" for i in range(1, shown + 1)), "notes"]]
    for label, entry in zip(labels, entries, strict=True):
        ranked = [f"{c['name']} {100 * c['probability']:.1f}%" for c in entry["top5"][:shown]]
        rows.append([label, *ranked, str(len(entry["notes"])) if entry["notes"] else ""])
    lines = _text_table(rows)
    noted = [(label, e["notes"]) for label, e in zip(labels, entries, strict=True) if e["notes"]]
    if noted:
        lines.append("notes:")
        lines += [f"  {label}: {note}" for label, notes in noted for note in notes]
    lines += [f"skipped {s['reason']}" for s in result["skipped"]]
    seconds, files = result["seconds"], len(entries) + len(result["skipped"])
    written = [out_dir / TABLE, out_dir / PREDICTIONS]
    pictures_time = "no figures"
    if "pictures" in seconds:
        pictures_time = f"pictures {seconds['pictures']:.1f} s"
        written.append(out_dir / "index.html")
    lines.append(
        f"segmentation {seconds['segmentation'] / files:.2f} s per file, model "
        f"{seconds['model']:.1f} s, {pictures_time}; written: {', '.join(map(str, written))}"
    )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from absl import flags

    from protomask_jax.logs import setup_cli_logging

    FLAGS, inputs = flags.FLAGS, argv[1:]
    if not FLAGS.workdir or not inputs:
        raise PredictError("usage: --workdir RUN_FOLDER [flags] IMAGE_OR_FOLDER...")
    setup_cli_logging()
    if base.is_remote(FLAGS.out or FLAGS.workdir):
        raise PredictError(
            f"--out {FLAGS.out or '(default: WORKDIR/predictions)'}: predictions are written to "
            "a local or mounted folder; give one with --out (the run may stay in its bucket)."
        )
    out_dir = Path(FLAGS.out or Path(FLAGS.workdir) / "predictions").absolute()
    result = predict(
        cli.run_config(FLAGS.workdir, FLAGS["config"]),
        FLAGS.workdir,
        inputs,
        out_dir,
        top_k=FLAGS.top_k,
        top_classes=FLAGS.top_classes,
        figures=FLAGS.figures,
        segmenter=FLAGS.segmenter,
        checkpoint=FLAGS.checkpoint,
        say=tqdm.write,
    )
    print(summary(result, out_dir))


if __name__ == "__main__":
    from absl import flags

    cli.define_config_flag(cli.DEFAULT_CONFIG, "Leave out: the run's own config.")
    flags.DEFINE_string("workdir", None, "The training run's output folder.")
    flags.DEFINE_string(
        "out", None, "Output folder (default: WORKDIR/predictions; a local folder)."
    )
    flags.DEFINE_integer("top_k", 3, "Prototypes shown per image.")
    flags.DEFINE_integer("top_classes", 5, "Most probable classes per file in predictions.csv.")
    flags.DEFINE_boolean(
        "figures", True, "Draw figures and index.html; --nofigures: only the CSV and JSON (fast)."
    )
    segmenters = ["slic", "grid", "sam", "sam2"]
    flags.DEFINE_enum("segmenter", None, segmenters, "Default: the one of the run's records.")
    flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Checkpoint to explain with.")
    cli.run(main)
