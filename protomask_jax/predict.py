r"""Explains new images with a trained run: ``python -m protomask_jax.predict --workdir W
IMAGE_OR_FOLDER... [--out DIR] [--top_k 3] [--segmenter slic|grid|sam|sam2] [--config.x=y]``
(docs/predict.md).

Each file: ``data.images.load_image`` (upright 8-bit RGB, at most ``MAX_SIDE`` px) -> the
run's segmenter (``dataset_info.json`` of its records) -> ``segmentation.export.build_record``
(post-processing and the record exactly as the export makes them) -> a temporary shard. Then
one ``evaluate.run_model`` pass over that shard (the evaluation pipeline and forward, batches
of ``input.eval_batch_size``) gives logits ``[N, C]``, similarities and winning views ``[N, P]``;
``report.panels`` draws the top contributions of each image (``figures/explanation_{i}.png``)
and ``OUT/predictions.json`` and ``OUT/index.html`` describe them. OUT is built beside itself
and swapped in when complete. A file that is no readable image is skipped with its reason.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from protomask_jax import config_checks
from protomask_jax import evaluate as evaluate_lib
from protomask_jax.data import images as images_lib
from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib
from protomask_jax.report import gallery, html, panels, pictures

PREDICTIONS = "predictions.json"
SPLIT = "predict"  # the temporary shard's split name


class PredictError(ValueError):
    """A user's mistake: no image to explain, an output folder that is not ours, ..."""


def run_config(workdir: str | Path, overrides: Sequence[str] = ()):
    """The config the run stored with its latest checkpoint, with ``key.path=value``
    overrides (values parsed as Python literals, else taken as strings)."""
    import ast

    from ml_collections import ConfigDict

    from protomask_jax import checkpoint as ckpt

    manager = ckpt.manager(Path(workdir) / "checkpoints", max_to_keep=None)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{Path(workdir) / 'checkpoints'} holds no checkpoint of a run.")
    config = ConfigDict(ckpt.read_meta(manager, step)["config"])
    for override in overrides:
        key, _, text = override.partition("=")
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise PredictError(f"--config.{key}: no such key (valid: {', '.join(node.keys())}).")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        try:
            node[leaf] = value
        except TypeError as e:
            raise PredictError(f"--config.{key}: {e}") from None
    config.lock()
    return config


def collect_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The files named, and every file under the folders named (sorted, hidden ones left out)."""
    files = []
    for given in map(Path, inputs):
        if given.is_dir():
            found = sorted(p for p in given.rglob("*") if p.is_file())
            files += [
                p for p in found if not any(s.startswith(".") for s in p.relative_to(given).parts)
            ]
        elif given.is_file():
            files.append(given)
        else:
            raise PredictError(f"{given}: no such file or folder.")
    if not files:
        raise PredictError(f"no files to explain in {', '.join(map(str, inputs))}.")
    return files


def segmentation_config(config, info: dict[str, Any], method: str | None):
    """A copy of ``config`` whose ``segmentation`` section makes masks as the run's records
    were made (method, slic/grid parameters, post-processing from ``dataset_info.json``), or
    with ``method``; and a note when the records' masks cannot be made for a new image."""
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


@dataclasses.dataclass
class _Loaded:
    path: Path
    image: images_lib.LoadedImage


def _write_records(files, config, records_dir: Path, progress: bool, say):
    """Segments every readable file into one shard; returns ``(loaded, skipped)``."""
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
            item = sources.SourceItem(len(loaded), str(path), _png(image.rgb), -1)
            record, _ = export.build_record(item, segmenter, config, path.parent)
            loaded.append(_Loaded(path, image))
            yield record.to_bytes()

    records_lib.write_shard(records_dir / records_lib.shard_name(SPLIT, 0, 1), serialized())
    return loaded, skipped


def _png(rgb: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _image_entry(n: int, loaded: _Loaded, outputs, arrays, record, class_names, top_k, out_dir):
    """The predictions.json entry of image ``n``; writes its masks' PNGs."""
    logits = outputs.logits[n].astype(np.float64)
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    top = np.argsort(-probabilities, kind="stable")[:5]
    matches = panels.top_contributions(
        outputs.similarities[n],
        arrays.last_layer,
        int(top[0]),
        outputs.winning_view[n],
        outputs.num_masks[n],
        top_k,
    )
    contributions = []
    for rank, match in enumerate(matches, start=1):
        mask = f"masks/{n}_m{match.mask_index}.png"
        (out_dir / mask).parent.mkdir(exist_ok=True)
        (out_dir / mask).write_bytes(record.mask_pngs[match.mask_index])
        own = int(arrays.prototype_class[match.prototype])
        contributions.append(
            dict(
                rank=rank,
                prototype=match.prototype,
                prototype_class=own,
                prototype_class_name=class_names[own],
                similarity=match.similarity,
                weight=match.weight,
                contribution=match.contribution,
                view_box=[round(float(v), 6) for v in record.boxes[match.mask_index]],
                mask=mask,
            )
        )
    return dict(
        file=str(loaded.path),
        image_size=list(loaded.image.size),
        logits=[float(v) for v in outputs.logits[n]],
        notes=loaded.image.notes,
        predicted=dict(
            class_id=int(top[0]), name=class_names[top[0]], probability=float(probabilities[top[0]])
        ),
        top5=[
            dict(class_id=int(c), name=class_names[c], probability=float(probabilities[c]))
            for c in top
        ],
        figure=f"figures/explanation_{n}.png",
        contributions=contributions,
    )


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.is_file() or (
        out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / PREDICTIONS).exists()
    ):
        raise PredictError(
            f"--out {out_dir} exists and is not an earlier output of predict (no {PREDICTIONS}); "
            "choose another folder."
        )


def _publish(staging: Path, out_dir: Path) -> None:
    """Swaps the complete ``staging`` in for ``out_dir`` (an earlier output is removed last)."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def predict(
    config,
    workdir: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    top_k: int = 3,
    segmenter: str | None = None,
    checkpoint: str = "best",
    progress: bool = True,
    say=print,
) -> dict[str, Any]:
    """Explains the images among ``inputs`` (files and folders) with the ``checkpoint`` of the
    run in ``workdir``; writes ``out_dir`` and returns its predictions.json content."""
    from protomask_jax import trainer

    evaluate_lib.require_single_label(config)
    out_dir = Path(out_dir).absolute()
    _check_out_dir(out_dir)
    files = collect_files(inputs)
    info = records_lib.load_dataset_info(config.dataset.records_dir)
    config_checks.check_dataset_info(config, info)
    num_classes = config.dataset.num_classes
    class_names = list(info.get("class_names") or [f"class {c}" for c in range(num_classes)])
    seg_config, note = segmentation_config(config, info, segmenter)
    if note:
        say(note)
    trained = trainer.restore_trained(config, workdir, which=checkpoint)
    arrays = evaluate_lib.model_arrays(trained)
    num_prototypes = arrays.last_layer.shape[1]
    top_k = max(1, min(top_k, num_prototypes))
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    seconds = {}
    try:
        with tempfile.TemporaryDirectory(dir=staging) as records_dir:
            started = time.perf_counter()
            loaded, skipped = _write_records(files, seg_config, Path(records_dir), progress, say)
            seconds["segmentation"] = time.perf_counter() - started
            if not loaded:
                raise PredictError(f"none of the {len(files)} file(s) is a readable image.")
            record_set = pipeline.RecordSet(records_dir, SPLIT)
            started = time.perf_counter()
            outputs = evaluate_lib.run_model(trained, record_set, progress=progress)
            seconds["model"] = time.perf_counter() - started
            started = time.perf_counter()
            test_images = pictures.RecordImages(record_set)
            entries = [
                _image_entry(
                    n, item, outputs, arrays, test_images.get(n).record, class_names, top_k, staging
                )
                for n, item in enumerate(loaded)
            ]
            used = {c["prototype"] for entry in entries for c in entry["contributions"]}
            canvas = pictures.Canvas(staging, class_names, pictures.class_colours(num_classes))
            sources = gallery.prototype_sources(trained.meta, num_prototypes)
            train_set = pipeline.RecordSet(config.dataset.records_dir, "train")
            with tqdm(
                total=len(used) + len(loaded), desc="drawing", unit="picture", disable=not progress
            ) as bar:
                prototypes, drawn = gallery.section(
                    canvas, arrays, sources, pictures.RecordImages(train_set), bar.update, used
                )
                explanations = panels.section(
                    canvas, outputs, arrays, test_images, drawn, top_k, bar.update
                )
            seconds["pictures"] = time.perf_counter() - started
        explanations.note = (
            f"For each image: the {top_k} prototypes that add most to the predicted class's "
            "score (similarity x last-layer weight); left of the arrow the view of the image "
            "that matched the prototype best (its mask outlined), right the prototype's source."
        )
        segmenter_info = segmenters_description(seg_config, note)
        result = dict(
            workdir=str(Path(workdir).absolute()),
            checkpoint=trained.checkpoint,
            segmenter=segmenter_info,
            images=entries,
            skipped=skipped,
            seconds={key: round(value, 3) for key, value in seconds.items()},
        )
        records_lib.write_json_atomic(staging / PREDICTIONS, result)
        _write_page(staging, result, [explanations, prototypes], config)
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def segmenters_description(config, note: str) -> dict[str, Any]:
    from segmentation import segmenters

    return {**segmenters.segmenter_description(config), "note": note}


def _write_page(out_dir: Path, result: dict[str, Any], sections, config) -> None:
    skipped = result["skipped"]
    if skipped:
        rows = "".join(f"<li>{html.e(s['reason'])}</li>" for s in skipped)
        note = "Files that are not readable images; the others were explained."
        sections.append(
            html.Section("skipped", "Skipped", "Skipped files", note, f"<ul>{rows}</ul>")
        )
    facts = [
        ("workdir", result["workdir"]),
        ("checkpoint", result["checkpoint"]),
        ("segmenter", result["segmenter"]["method"]),
        ("images", f"{len(result['images'])} explained, {len(skipped)} skipped"),
    ]
    page = html.page(
        f"ProtoMask predictions: {config.dataset.name}",
        facts,
        [],
        sections,
        f"written by protomask_jax.predict; the numbers are in {PREDICTIONS}",
    )
    (out_dir / "index.html").write_text(page, encoding="utf-8")


def summary(result: dict[str, Any], out_dir: Path) -> str:
    entries, seconds = result["images"], result["seconds"]
    lines = [
        f"{Path(e['file']).name}: {e['predicted']['name']} "
        f"({100 * e['predicted']['probability']:.1f}%)"
        for e in entries
    ]
    lines += [f"skipped {s['reason']}" for s in result["skipped"]]
    per_image = seconds["segmentation"] / max(1, len(entries) + len(result["skipped"]))
    lines.append(
        f"explained {len(entries)} image(s), skipped {len(result['skipped'])}; segmentation "
        f"{per_image:.2f} s per file, model {seconds['model']:.1f} s, pictures "
        f"{seconds['pictures']:.1f} s"
    )
    lines.append(f"written: {out_dir / PREDICTIONS}, {out_dir / 'index.html'}")
    return "\n".join(lines)


def _parse_flags(argv: list[str]):
    """absl flags, with the ``--config.x=y`` overrides set aside; a bad flag is one line."""
    from absl import flags

    overrides = [a[len("--config.") :] for a in argv[1:] if a.startswith("--config.")]
    try:
        rest = flags.FLAGS([a for a in argv if not a.startswith("--config.")])
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return rest[1:], overrides


def main(parsed) -> None:
    from absl import flags

    from protomask_jax.logs import setup_cli_logging

    inputs, overrides = parsed
    FLAGS = flags.FLAGS
    setup_cli_logging()
    try:
        if not FLAGS.workdir:
            raise PredictError("--workdir is required (the training run's output folder).")
        if not inputs:
            raise PredictError("name the images or folders to explain after the flags.")
        config = run_config(FLAGS.workdir, overrides)
        out_dir = Path(FLAGS.out or Path(FLAGS.workdir) / "predictions")
        result = predict(
            config,
            FLAGS.workdir,
            inputs,
            out_dir,
            top_k=FLAGS.top_k,
            segmenter=FLAGS.segmenter,
            checkpoint=FLAGS.checkpoint,
            say=tqdm.write,
        )
    except (FileNotFoundError, ValueError) as e:  # PredictError, ConfigError, RecordError, ...
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(summary(result, out_dir.absolute()))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "The training run's output folder.")
    flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/predictions).")
    flags.DEFINE_integer("top_k", 3, "Prototypes shown per image.")
    flags.DEFINE_enum(
        "segmenter", None, ["slic", "grid", "sam", "sam2"], "Default: the run's records'."
    )
    flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Checkpoint to explain with.")
    app.run(main, flags_parser=_parse_flags)
