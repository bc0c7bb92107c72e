r"""Writes the explanation report of a run: ``python -m protomask_jax.explain --config C
--workdir DIR [--images ID,ID,...] [--num_images N]``.

``DIR/report/index.html`` (open it from disk; no server needed) shows:

* a header with the run summary (test accuracy, explanation faithfulness when
  ``DIR/eval.json`` exists — run ``protomask_jax.evaluate`` first —, config, checkpoint);
* the evaluation metrics of eval.json;
* training curves from ``metrics.jsonl`` (loss and accuracies by step, phases shaded);
* the prototype gallery after push, by class: each prototype's source training image with
  its mask outlined, the view crop the network saw, its last-layer weight to its class and
  the largest weight to another class;
* "this looks like that" for test images: the prototypes contributing most to the predicted
  class's logit, each with the test image's matched view (its mask outlined) beside the
  prototype's source image and mask, the similarity, weight and contribution, and the
  prediction against the true class.

Pictures are PNGs under ``DIR/report/`` linked by relative paths; ``figures/`` holds one
self-contained picture per explained image (for papers and READMEs).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import shutil
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from protomask_jax import config_checks, logs
from protomask_jax import evaluate as evaluate_lib
from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib
from protomask_jax.report import html as html_lib

REPORT_DIR = "report"
DEFAULT_NUM_IMAGES = 12
DEFAULT_TOP_K = 3
# Display sizes (CSS pixels; pictures are rendered at twice this for sharp high-DPI output).
SIZES = {"source": 176, "view": 84, "whole": 230, "match": 150, "match_view": 72}
_PIXEL_DENSITY = 2
_OUTLINE_PX = 3  # mask outline width in rendered pixels
_DIM = 0.55  # brightness kept outside the outlined mask

RGB = tuple[int, int, int]


# ======================================================================== colours


def class_colours(num_classes: int) -> list[RGB]:
    """One distinct, stable colour per class (tab10 / tab20, then evenly spaced hues)."""
    import matplotlib

    if num_classes <= 10:
        colours = matplotlib.colormaps["tab10"].colors[:num_classes]
    elif num_classes <= 20:
        colours = matplotlib.colormaps["tab20"].colors[:num_classes]
    else:
        hsv = matplotlib.colors.hsv_to_rgb(
            np.stack(
                [
                    (np.arange(num_classes) * 0.618034) % 1.0,
                    np.full(num_classes, 0.65),
                    np.where(np.arange(num_classes) % 2, 0.75, 0.9),
                ],
                axis=1,
            )
        )
        colours = [tuple(c) for c in hsv]
    return [tuple(int(round(255 * v)) for v in colour[:3]) for colour in colours]


# ==================================================================== pictures


def fit_width(image: np.ndarray, width: int) -> np.ndarray:
    """Resizes ``[H, W, 3]`` uint8 so its width is ``width`` (aspect kept; Lanczos)."""
    height = max(1, int(round(image.shape[0] * width / image.shape[1])))
    return np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS))


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A bool mask at another size: box filter, then at least half covered."""
    image = Image.fromarray(np.asarray(mask, np.uint8) * 255, mode="L")
    return np.asarray(image.resize((width, height), Image.BOX)) >= 128


def mask_overlay(
    image: np.ndarray, mask: np.ndarray, colour: RGB, width: int, box: np.ndarray | None = None
) -> np.ndarray:
    """The image at ``width`` with ``mask`` outlined in ``colour`` and the rest dimmed.

    A mask too small to survive the resize is marked by its box (``box``: normalised yxyx)
    instead, so a tiny segment is never invisible.

    Args:
      image: uint8 ``[H, W, 3]``.
      mask: bool ``[H, W]``.
      colour: outline colour.
      width: output width in pixels.
      box: the mask's normalised yxyx box, for the fallback.

    Returns:
      uint8 ``[h, width, 3]``.
    """
    from scipy import ndimage

    shown = fit_width(image, width).astype(np.float32)
    height = shown.shape[0]
    region = resize_mask(mask, height, width)
    if not region.any() and box is not None:
        top, left, bottom, right = _pixel_box(box, height, width)
        region = np.zeros((height, width), bool)
        region[top:bottom, left:right] = True
    grey = shown.mean(axis=-1, keepdims=True)
    dimmed = _DIM * (0.6 * shown + 0.4 * grey)
    out = np.where(region[..., None], shown, dimmed)
    inner = ndimage.binary_erosion(region, iterations=_OUTLINE_PX, border_value=0)
    edge = region & ~inner
    halo = ndimage.binary_dilation(edge, iterations=1) & ~edge & ~region
    out[halo] = 255.0
    out[edge] = colour
    return np.clip(out, 0, 255).astype(np.uint8)


def _pixel_box(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """Normalised half-open yxyx -> pixel ``(top, left, bottom, right)``, at least 1 px."""
    y0, x0, y1, x1 = np.asarray(box, np.float64) * [height, width, height, width]
    top, left = min(int(np.floor(y0)), height - 1), min(int(np.floor(x0)), width - 1)
    return top, left, max(top + 1, int(np.ceil(y1))), max(left + 1, int(np.ceil(x1)))


def view_crop(image: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """The view of ``box`` (normalised yxyx, half-open) resized to ``size x size``, as the
    network sees it (the aspect ratio is not kept, as in the model's crop-and-resize)."""
    top, left, bottom, right = _pixel_box(box, *image.shape[:2])
    crop = image[top:bottom, left:right]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ============================================================ training curves


def plot_training_curves(rows: list[dict[str, Any]], path: Path) -> bool:
    """Loss and accuracies by step from ``metrics.jsonl`` rows, phases shaded and named.

    Args:
      rows: :func:`protomask_jax.logs.read_metrics` rows.
      path: PNG to write.

    Returns:
      False (and nothing written) when there is no training row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[np.ndarray, np.ndarray]:
        # A resumed run logs some steps twice: keep the last value per step.
        points = {row["step"]: row[key] for row in rows if key in row}
        steps = np.array(sorted(points), np.float64)
        return steps, np.array([points[s] for s in sorted(points)], np.float64)

    train_rows = sorted((r for r in rows if "train/loss" in r), key=lambda r: r["step"])
    if not train_rows:
        return False
    spans: list[list] = []  # [phase, first step, last step]
    previous_end = 0
    for row in train_rows:
        if not spans or spans[-1][0] != row["phase"]:
            spans.append([row["phase"], previous_end, row["step"]])
        spans[-1][2] = row["step"]
        previous_end = row["step"]

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(13, 3.9), dpi=110)
    shades = ("#eef2fb", "#fbf3e9", "#eef8f0", "#f6eefa")
    for axis in (loss_axis, accuracy_axis):
        for i, (phase, start, end) in enumerate(spans):
            axis.axvspan(start, end, color=shades[i % len(shades)], zorder=0)
            if i:
                axis.axvline(start, color="#8a94a6", lw=1, ls="--", zorder=1)
            axis.text(
                (start + end) / 2,
                1.01,
                phase,
                transform=axis.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=9,
                color="#5f6b7a",
            )
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.spines[["top", "right"]].set_visible(False)
        axis.set_xlim(0, spans[-1][2])
    for key, label, colour in (
        ("train/loss", "total loss", "#2f5db8"),
        ("train/ce", "cross-entropy", "#e07b39"),
    ):
        steps, values = series(key)
        if len(steps):
            loss_axis.plot(steps, values, color=colour, lw=1.8, label=label, marker=".", ms=4)
    loss_axis.set_ylabel("loss")
    loss_axis.legend(frameon=False, fontsize=9)
    for key, label, colour, style in (
        ("train/accuracy", "train", "#2f5db8", dict(lw=1.8, marker=".", ms=4)),
        ("val/accuracy", "validation", "#1a7f37", dict(lw=1.8, marker="o", ms=5)),
        ("val/accuracy_after_push", "validation after push", "#9c27b0", dict(ls="", marker="D")),
        ("test/accuracy", "test (reported)", "#c62828", dict(ls="", marker="*", ms=13)),
    ):
        steps, values = series(key)
        if len(steps):
            accuracy_axis.plot(steps, 100 * values, color=colour, label=label, **style)
    accuracy_axis.set_ylabel("accuracy (%)")
    accuracy_axis.set_ylim(0, 102)
    accuracy_axis.legend(frameon=False, fontsize=9, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return True


# ================================================================= the data


@dataclasses.dataclass
class DecodedImage:
    """A record's image and masks, decoded at full resolution."""

    record: records_lib.ImageRecord
    image: np.ndarray  # uint8 [H, W, 3]

    def mask(self, index: int) -> np.ndarray:
        return records_lib.decode_mask_png(self.record.mask_pngs[index])


class RecordImages:
    """Decoded images of a split by image id (a few kept in a cache)."""

    def __init__(self, record_set: pipeline.RecordSet):
        self.record_set = record_set
        self.index_of_id = {int(i): n for n, i in enumerate(record_set.image_ids)}

    @functools.lru_cache(maxsize=16)  # noqa: B019 (one object per report, small cache)
    def get(self, image_id: int) -> DecodedImage:
        index = self.index_of_id.get(int(image_id))
        if index is None:
            raise records_lib.RecordError(
                f"image id {image_id} is not in split '{self.record_set.split}' of "
                f"{self.record_set.records_dir}"
            )
        path, offset = self.record_set.reader.locate(index)
        where = f"{path} at byte offset {offset}"
        record = records_lib.ImageRecord.from_bytes(self.record_set.reader[index], where)
        if not record.mask_pngs:
            raise records_lib.RecordError(
                f"{where} (image id {image_id}): no mask images (masks/encoded) to show."
            )
        return DecodedImage(record, records_lib.decode_image(record.image_bytes, where))


@dataclasses.dataclass
class PrototypeSource:
    """Where a prototype was projected by push (None fields: it never was)."""

    image_id: int | None
    mask_index: int | None
    distance: float | None


def prototype_sources(meta: dict[str, Any], num_prototypes: int) -> list[PrototypeSource]:
    """The push gallery of the restored model, one entry per (possibly pruned) prototype.

    ``meta["push"]`` lists the prototypes as they were at push time; pruning happens after
    push and ``meta["kept_prototypes"]`` maps the pruned model's prototype ``j`` to gallery
    entry ``kept[j]``.
    """
    gallery = meta.get("push") if meta.get("pushed") else None
    if not gallery:
        return [PrototypeSource(None, None, None) for _ in range(num_prototypes)]
    kept = meta.get("kept_prototypes")
    entries = list(kept) if kept is not None else list(range(num_prototypes))
    if len(entries) != num_prototypes:
        raise ValueError(
            f"checkpoint metadata lists {len(entries)} kept prototypes but the model has "
            f"{num_prototypes}"
        )
    sources = []
    for entry in entries:
        image_id = int(gallery["image_id"][entry])
        distance = gallery["distance"][entry]
        if image_id < 0 or distance is None or not np.isfinite(distance):
            sources.append(PrototypeSource(None, None, None))
        else:
            sources.append(
                PrototypeSource(image_id, int(gallery["mask_index"][entry]), float(distance))
            )
    return sources


def select_images(
    record_set: pipeline.RecordSet, image_ids: Sequence[int] | None, num_images: int
) -> np.ndarray:
    """Record indices of the images to explain.

    Args:
      record_set: the split.
      image_ids: explicit ids (in this order); unknown ids are an error naming valid ones.
      num_images: otherwise, this many images taken round-robin over the classes (lowest
        ids first), so every class appears before any appears twice.

    Returns:
      int64 record indices.
    """
    ids = record_set.image_ids
    good_ids = ids[record_set.good]
    if image_ids:
        index_of_id = {int(ids[n]): int(n) for n in record_set.good}
        missing = [i for i in image_ids if int(i) not in index_of_id]
        if missing:
            raise ValueError(
                f"--images: ids {missing} are not in split '{record_set.split}' of "
                f"{record_set.records_dir} (it holds ids {good_ids.min()}..{good_ids.max()}, "
                f"e.g. {good_ids[:5].tolist()})"
            )
        return np.array([index_of_id[int(i)] for i in image_ids], np.int64)
    order = record_set.good[np.argsort(ids[record_set.good], kind="stable")]
    labels = record_set.labels[order]
    # Position of each image within its class, then sort by (position, class).
    within = np.zeros(len(order), np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        within[members] = np.arange(len(members))
    chosen = order[np.lexsort((labels, within))][:num_images]
    return chosen.astype(np.int64)


# ============================================================ the explanations


@dataclasses.dataclass
class Match:
    """One of the top prototypes of an image's prediction."""

    prototype: int
    view: int
    mask_index: int
    similarity: float
    weight: float
    contribution: float


def top_contributions(
    similarities: np.ndarray,
    last_layer: np.ndarray,
    predicted: int,
    winning_view: np.ndarray,
    num_masks: int,
    k: int,
) -> list[Match]:
    """The ``k`` prototypes contributing most to the predicted class's logit.

    The contribution of prototype ``j`` is ``s_j * W[pred, j]``; ties go to the lower index
    (as ``metrics.explanation_faithfulness`` ranks them).

    Args:
      similarities: ``[P]``.
      last_layer: ``W [C, P]``.
      predicted: the predicted class.
      winning_view: int ``[P]``.
      num_masks: masks the image's views showed.
      k: how many.

    Returns:
      ``k`` :class:`Match` entries, largest contribution first.
    """
    weights = last_layer[predicted]
    contributions = similarities.astype(np.float64) * weights
    order = np.argsort(-contributions, kind="stable")[:k]
    return [
        Match(
            prototype=int(j),
            view=int(winning_view[j]),
            mask_index=int(winning_view[j]) % int(num_masks),
            similarity=float(similarities[j]),
            weight=float(weights[j]),
            contribution=float(contributions[j]),
        )
        for j in order
    ]


def explanation_figure(
    path: Path,
    whole: np.ndarray,
    heading: str,
    correct: bool,
    details: str,
    rows: list[tuple[np.ndarray, np.ndarray | None, str, str]],
) -> None:
    """One self-contained picture of an explanation: the test image and its verdict, then per
    prototype the matched view on the test image (top: "this") above the prototype's source
    view (bottom: "looks like that").

    Args:
      path: PNG to write.
      whole: the test image.
      heading: the prediction (e.g. "predicted: red-round-head").
      correct: colours the heading green (right) or red (wrong).
      details: text under the heading (truth, probability).
      rows: ``(test view overlay, prototype source overlay or None, title, caption)`` per
        prototype, largest contribution first.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 1 + len(rows)
    figure, axes = plt.subplots(
        2,
        columns,
        figsize=(2.5 * columns, 5.6),
        dpi=130,
        squeeze=False,
        gridspec_kw=dict(hspace=0.42, wspace=0.1),
    )
    for axis in axes.ravel():
        axis.axis("off")
    axes[0, 0].imshow(whole)
    axes[0, 0].set_title("test image", fontsize=10)
    verdict_colour = "#1a7f37" if correct else "#c62828"
    axes[1, 0].text(
        0.0,
        1.0,
        ("\u2714 right" if correct else "\u2718 wrong"),
        color=verdict_colour,
        fontsize=12,
        fontweight="bold",
        va="top",
        transform=axes[1, 0].transAxes,
    )
    axes[1, 0].text(
        0.0,
        0.84,
        textwrap.fill(heading, 26, break_on_hyphens=False) + "\n\n" + details,
        fontsize=9,
        va="top",
        transform=axes[1, 0].transAxes,
        linespacing=1.35,
    )
    for column, (view, source, title, caption) in enumerate(rows, start=1):
        axes[0, column].imshow(view)
        axes[0, column].set_title(f"this\n{title}", fontsize=9.5)
        if source is not None:
            axes[1, column].imshow(source)
        else:
            axes[1, column].text(0.5, 0.5, "never projected", ha="center", va="center")
        axes[1, column].set_title("looks like that", fontsize=9.5)
        axes[1, column].text(
            0.5,
            -0.04,
            caption,
            ha="center",
            va="top",
            fontsize=8.5,
            transform=axes[1, column].transAxes,
            linespacing=1.3,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight", facecolor="white", pad_inches=0.15)
    plt.close(figure)


# ====================================================================== driver


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def _run_facts(config, workdir: Path, trained, config_name: str | None) -> list[tuple[str, str]]:
    facts = [
        ("dataset", config.dataset.name),
        ("config", config_name or "(given in code)"),
        ("checkpoint", trained.checkpoint),
        ("backbone", config.model.backbone),
        ("views per image", str(config.input.num_views)),
        ("workdir", str(workdir)),
    ]
    return facts


def _highlights(workdir: Path, eval_results: dict | None) -> list[tuple[str, str, str]]:
    highlights = []
    if eval_results:
        classification = eval_results.get("classification", {})
        if "top1_accuracy" in classification:
            highlights.append(
                (
                    f"{eval_results['split']} accuracy",
                    f"{classification['top1_accuracy']:.1f}%",
                    f"{eval_results['num_images']} images (eval.json)",
                )
            )
        faithfulness = eval_results.get("faithfulness")
        if faithfulness and faithfulness.get("rate") is not None:
            highlights.append(
                (
                    "explanations on the deciding part",
                    f"{faithfulness['rate']:.1f}%",
                    f"chance {faithfulness['chance_rate']:.1f}% (top-{faithfulness['k']})",
                )
            )
    else:
        results_path = workdir / "results.json"
        if results_path.exists():
            import json

            results = json.loads(results_path.read_text())
            if "test_accuracy" in results:
                highlights.append(
                    ("test accuracy", f"{100 * results['test_accuracy']:.1f}%", "results.json")
                )
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
    """Writes ``workdir/report/index.html`` and its pictures; returns the HTML path.

    Args:
      config: the run's config.
      workdir: the run's output folder.
      image_ids: test images to explain (ids); default: ``num_images`` round-robin over
        classes.
      num_images: see ``image_ids``.
      top_k: prototypes shown per explained image.
      split: the split the explained images come from.
      checkpoint: ``"best"`` or ``"latest"`` (see ``trainer.restore_trained``).
      config_name: shown in the header (e.g. the config file's path).
      progress: show a progress bar while rendering.

    Returns:
      Path of ``index.html``.
    """
    from protomask_jax import trainer

    evaluate_lib.require_single_label(config)
    workdir = Path(workdir)
    records_dir = config.dataset.records_dir
    info = records_lib.load_dataset_info(records_dir)
    config_checks.check_dataset_info(config, info)
    num_classes = config.dataset.num_classes
    class_names = list(info.get("class_names") or [f"class {c}" for c in range(num_classes)])
    colours = class_colours(num_classes)

    trained = trainer.restore_trained(config, workdir, which=checkpoint)
    arrays = evaluate_lib.model_arrays(trained)
    num_prototypes = arrays.last_layer.shape[1]
    top_k = max(1, min(top_k, num_prototypes))
    skip = config.input.skip_bad_records
    test_set = pipeline.RecordSet(records_dir, split, skip_bad_records=skip)
    chosen = select_images(test_set, image_ids, num_images)
    outputs = evaluate_lib.run_model(trained, test_set, chosen, progress=progress)
    out_dir = workdir / REPORT_DIR
    index = out_dir / "index.html"
    if jax.process_index() != 0:
        return index  # every process joins the forward pass above; process 0 writes
    sources = prototype_sources(trained.meta, num_prototypes)
    pushed = any(s.image_id is not None for s in sources)
    train_images = (
        RecordImages(pipeline.RecordSet(records_dir, "train", skip_bad_records=skip))
        if pushed
        else None
    )
    test_images = RecordImages(test_set)

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    px = {name: size * _PIXEL_DENSITY for name, size in SIZES.items()}
    bar = tqdm(
        total=num_prototypes + len(chosen) + 1,
        desc="rendering report",
        unit="picture",
        disable=not progress,
    )

    # ------------------------------------------------------------ training curves
    curves_src = (
        "curves.png"
        if plot_training_curves(logs.read_metrics(workdir), out_dir / "curves.png")
        else None
    )
    bar.update(1)

    # ------------------------------------------------------------------- gallery
    prototype_pictures: dict[int, tuple[str | None, str | None]] = {}
    cards_by_class: dict[int, list[html_lib.PrototypeCard]] = {c: [] for c in range(num_classes)}
    for j in range(num_prototypes):
        own = int(arrays.prototype_class[j])
        weights = arrays.last_layer[:, j]
        others = np.delete(np.arange(num_classes), own)
        strongest_other = int(others[np.argmax(weights[others])]) if len(others) else None
        lines = [f"weight to own class {weights[own]:+.3f}"]
        if strongest_other is not None:
            lines.append(
                f"largest other {weights[strongest_other]:+.3f} ({class_names[strongest_other]})"
            )
        source = sources[j]
        source_src = view_src = None
        if source.image_id is not None:
            decoded = train_images.get(source.image_id)
            box = decoded.record.boxes[source.mask_index]
            source_src = f"prototypes/p{j:04d}_source.png"
            view_src = f"prototypes/p{j:04d}_view.png"
            _save_png(
                mask_overlay(
                    decoded.image, decoded.mask(source.mask_index), colours[own], px["source"], box
                ),
                out_dir / source_src,
            )
            _save_png(view_crop(decoded.image, box, px["view"]), out_dir / view_src)
            source_label = int(np.atleast_1d(decoded.record.label)[0])
            lines.append(
                f"source: train image {source.image_id} ({class_names[source_label]}), "
                f"mask {source.mask_index}"
            )
            lines.append(f"push distance {source.distance:.3g}")
        prototype_pictures[j] = (source_src, view_src)
        cards_by_class[own].append(html_lib.PrototypeCard(j, source_src, view_src, lines))
        bar.update(1)
    groups = [
        html_lib.ClassGroup(c, class_names[c], colours[c], cards)
        for c, cards in cards_by_class.items()
        if cards
    ]

    # -------------------------------------------------------- this looks like that
    panels = []
    for n in range(len(chosen)):
        image_id = int(outputs.image_ids[n])
        decoded = test_images.get(image_id)
        logits = outputs.logits[n]
        predicted, true = int(np.argmax(logits)), int(outputs.labels[n])
        matches = top_contributions(
            outputs.similarities[n],
            arrays.last_layer,
            predicted,
            outputs.winning_view[n],
            int(outputs.num_masks[n]),
            top_k,
        )
        stem = f"images/{image_id}"
        _save_png(fit_width(decoded.image, px["whole"]), out_dir / f"{stem}.png")
        rows, figure_rows = [], []
        for rank, match in enumerate(matches, start=1):
            own = int(arrays.prototype_class[match.prototype])
            box = decoded.record.boxes[match.mask_index]
            overlay = mask_overlay(
                decoded.image, decoded.mask(match.mask_index), colours[own], px["match"], box
            )
            mask_src, view_src = f"{stem}_r{rank}_mask.png", f"{stem}_r{rank}_view.png"
            _save_png(overlay, out_dir / mask_src)
            _save_png(view_crop(decoded.image, box, px["match_view"]), out_dir / view_src)
            source_src, source_view_src = prototype_pictures[match.prototype]
            logit = float(logits[predicted])
            rows.append(
                html_lib.MatchRow(
                    rank=rank,
                    prototype=match.prototype,
                    class_name=class_names[own],
                    colour=colours[own],
                    mask_src=mask_src,
                    view_src=view_src,
                    source_src=source_src,
                    source_view_src=source_view_src,
                    similarity=match.similarity,
                    weight=match.weight,
                    contribution=match.contribution,
                    share=(
                        match.contribution / logit if logit > 0 and match.contribution > 0 else None
                    ),
                )
            )
            source_picture = (
                np.asarray(Image.open(out_dir / source_src)) if source_src is not None else None
            )
            figure_rows.append(
                (
                    overlay,
                    source_picture,
                    f"#{rank}: prototype {match.prototype}",
                    textwrap.fill(class_names[own], 24, break_on_hyphens=False)
                    + f"\nsimilarity {match.similarity:.2f}\n"
                    f"x weight {match.weight:.2f} = {match.contribution:.2f}",
                )
            )
        correct = predicted == true
        figure_href = f"figures/explanation_{image_id}.png"
        probability = float(_softmax(logits)[predicted])
        explanation_figure(
            out_dir / figure_href,
            fit_width(decoded.image, px["whole"]),
            f"predicted: {class_names[predicted]}",
            correct,
            textwrap.fill(f"true: {class_names[true]}", 26, break_on_hyphens=False)
            + f"\nprobability {100 * probability:.1f}%\ntest image {image_id}",
            figure_rows,
        )
        panels.append(
            html_lib.ImagePanel(
                image_id=image_id,
                image_src=f"{stem}.png",
                true_name=class_names[true],
                true_colour=colours[true],
                predicted_name=class_names[predicted],
                predicted_colour=colours[predicted],
                correct=correct,
                probability=probability,
                logit=float(logits[predicted]),
                rows=rows,
                figure_href=figure_href,
            )
        )
        bar.update(1)
    bar.close()

    # ------------------------------------------------------------------- the page
    eval_results = evaluate_lib.load_eval(workdir)
    notes = {
        "metrics": (
            f"From eval.json ({eval_results['split']} split, {eval_results['checkpoint']}, "
            f"mask frame {eval_results['resolution']} px). See docs/explanations.md."
            if eval_results
            else "No eval.json yet: run `python -m protomask_jax.evaluate --config ... "
            f"--workdir {workdir}` and re-run this report to see the metrics here."
        ),
        "curves": "" if curves_src else "metrics.jsonl holds no training rows.",
        "prototypes": (
            "Each prototype is the embedding of one training view (push). Left: the source "
            "image, the view's mask outlined in the prototype's class colour; right: the "
            "view as the network sees it (the mask's box, resized)."
            if pushed
            else "The prototypes were not projected onto training views (no push in this "
            "checkpoint), so they have no source image."
        ),
        "explanations": (
            f"For each test image: the {top_k} prototypes that add most to the predicted "
            "class's score (similarity x last-layer weight). Left of the arrow: the view of "
            "the test image that matched the prototype best (its mask outlined); right: the "
            "prototype's own source view."
        ),
    }
    report = html_lib.Report(
        title=f"ProtoMask explanations: {config.dataset.name}",
        facts=_run_facts(config, workdir, trained, config_name),
        highlights=_highlights(workdir, eval_results),
        metric_sections=evaluate_lib.table_rows(eval_results) if eval_results else [],
        curves_src=curves_src,
        groups=groups,
        panels=panels,
        notes=notes,
    )
    generated = (
        f"generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by protomask_jax.explain"
    )
    index.write_text(html_lib.render(report, SIZES, generated), encoding="utf-8")
    return index


# ========================================================================== CLI


def main(argv: list[str]) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if flags.FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config configs/demo.py")
    if not flags.FLAGS.workdir:
        raise app.UsageError("--workdir is required (the training run's output folder)")
    from protomask_jax.logs import setup_cli_logging

    setup_cli_logging()
    try:
        image_ids = [int(i) for i in flags.FLAGS.images if i.strip()]
    except ValueError:
        raise app.UsageError(f"--images takes integer ids, got {flags.FLAGS.images}") from None
    try:
        index = explain(
            flags.FLAGS.config,
            flags.FLAGS.workdir,
            image_ids=image_ids or None,
            num_images=flags.FLAGS.num_images,
            top_k=flags.FLAGS.top_k,
            split=flags.FLAGS.split,
            checkpoint=flags.FLAGS.checkpoint,
            config_name=config_flags.get_config_filename(flags.FLAGS["config"]),
        )
    except (config_checks.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {index.resolve()}")
    return 0


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config file of the run, e.g. configs/demo.py.", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "The training run's output folder.")
    flags.DEFINE_list("images", [], "Ids of the test images to explain (default: see num_images).")
    flags.DEFINE_integer(
        "num_images", DEFAULT_NUM_IMAGES, "Without --images: explain this many test images."
    )
    flags.DEFINE_integer("top_k", DEFAULT_TOP_K, "Prototypes shown per explained image.")
    flags.DEFINE_enum("split", "test", ["test", "train"], "Split of the explained images.")
    flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Checkpoint to explain.")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
