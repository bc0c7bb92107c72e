"""Report section "This looks like that": per test image, the prototypes adding most to the
predicted class's logit, each with the image's matched view beside the prototype's source.

Per image ``n`` (``inference.EvalOutputs`` row): the prototypes' contributions
``s_j W[pred, j]`` rank them (ties to the lower index, as the faithfulness metric); a
prototype's match is its winning view, whose mask is ``view % num_masks``. Pictures:
``images/{id}.png``, ``images/{id}_r{rank}_mask.png`` and ``_view.png`` (with PRP heatmaps
``_prp.png``, see ``relevance.py``), and one self-contained figure per image,
``figures/explanation_{id}.png`` unless the caller names the figures (predict names them by
file). An image whose label is -1 (a new image, ``protomask_jax.predict``) is named by its
file and gets no verdict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from protomask_jax.evaluators.chunk import top_indices
from protomask_jax.report import html, pictures, relevance
from protomask_jax.report.names import html_name, wrap_name


@dataclasses.dataclass
class Match:
    prototype: int
    mask_index: int
    similarity: float
    weight: float
    contribution: float


def top_contributions(similarities, last_layer, predicted: int, winning_view, num_masks, k):
    """The ``k`` :class:`Match` es of one image (``similarities``, ``winning_view [P]``)
    contributing most to class ``predicted``, largest first."""
    weights = last_layer[predicted]
    contributions = similarities.astype(np.float64) * weights
    order = top_indices(contributions[None], k)[0]
    numbers = (similarities, weights, contributions)
    return [
        Match(int(j), int(winning_view[j] % num_masks), *(float(x[j]) for x in numbers))
        for j in order
    ]


def shown_prototypes(outputs, arrays, top_k: int) -> list[int]:
    """The prototypes the panels of ``outputs`` show, by id."""
    shown = set()
    for n, logits in enumerate(outputs.logits):
        predicted = int(np.argmax(logits))
        contributions = outputs.similarities[n].astype(np.float64) * arrays.last_layer[predicted]
        shown.update(top_indices(contributions[None], top_k)[0].tolist())
    return sorted(shown)


def explanation_figure(path: Path, whole, heading: str, correct, details: str, rows):
    """One picture: the test image and its verdict (none if ``correct`` is None), then per
    ``(test view overlay, prototype source or None, title, caption)`` of ``rows`` the view
    ("this") above the source ("looks like that")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aspect = rows[0][0].shape[1] / rows[0][0].shape[0]  # wider with heatmaps beside masks
    grid = dict(hspace=0.42, wspace=0.1, width_ratios=[1] + [aspect] * len(rows))
    size = (2.5 * (1 + aspect * len(rows)), 5.6)
    figure, axes = plt.subplots(
        2, 1 + len(rows), figsize=size, dpi=130, squeeze=False, gridspec_kw=grid
    )
    for axis in axes.ravel():
        axis.axis("off")
    axes[0, 0].imshow(whole)
    axes[0, 0].set_title("image" if correct is None else "test image", fontsize=10)
    verdict, colour = ("\u2714 right", "#1a7f37") if correct else ("\u2718 wrong", "#c62828")
    text = dict(va="top", transform=axes[1, 0].transAxes)
    if correct is not None:
        axes[1, 0].text(0.0, 1.0, verdict, color=colour, fontsize=12, fontweight="bold", **text)
    heading = "\n".join(wrap_name(heading, 26, max_lines=3))
    axes[1, 0].text(0.0, 0.84, f"{heading}\n\n{details}", fontsize=9, linespacing=1.35, **text)
    for column, (view, source, title, caption) in enumerate(rows, start=1):
        top, bottom = axes[0, column], axes[1, column]
        top.imshow(view)
        top.set_title(f"this\n{title}", fontsize=9.5)
        if source is not None:
            bottom.imshow(source)
        else:
            bottom.text(0.5, 0.5, "never projected", ha="center", va="center")
        bottom.set_title("looks like that", fontsize=9.5)
        place = dict(ha="center", va="top", transform=bottom.transAxes, linespacing=1.3)
        bottom.text(0.5, -0.04, caption, fontsize=8.5, **place)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight", facecolor="white", pad_inches=0.15)
    plt.close(figure)


def _match_row(rank: int, match: Match, own: int, canvas, drawn, logit: float) -> str:
    """One "this looks like that" row; ``drawn``: its mask and view pictures, then the
    prototype's source and view (or None)."""
    mask, view, source, source_view = drawn
    sizes = pictures.SIZES
    j = match.prototype
    test_side = html.img(mask, "matched view on the test image", sizes["match"])
    test_side += html.img(view, "matched view", sizes["match_view"])
    prototype_side = html.img(
        source, f"prototype {j}: source image", sizes["match"], "prototype never projected"
    )
    if source_view:
        prototype_side += html.img(source_view, f"prototype {j}: view", sizes["match_view"])
    share_row = share_bar = ""
    if logit > 0 and match.contribution > 0:
        share = match.contribution / logit
        share_row = f'<tr><td>share of the score</td><td class="v">{share * 100:.0f}%</td></tr>'
        share_bar = (
            f'<div class="bar" title="share of the class score"><span style="width: '
            f'{min(1.0, share) * 100:.0f}%"></span></div>'
        )
    numbers = (
        ("similarity", match.similarity),
        ("weight to predicted class", match.weight),
        ("contribution", match.contribution),
    )
    table = "".join(f'<tr><td>{name}</td><td class="v">{v:.3f}</td></tr>' for name, v in numbers)
    return (
        f'<div class="match" data-prototype="{j}">'
        f'<div class="pair">{test_side}</div>'
        f'<div class="arrow"><b>&rarr;</b>looks like</div>'
        f'<div class="pair">{prototype_side}</div>'
        f'<div class="numbers"><div class="proto">#{rank} {html.chip(canvas.colours[own])}'
        f'<a href="#prototype-{j}">prototype {j}</a></div>'
        f'<div class="cls">{html_name(canvas.class_names[own])}</div><table>'
        f"{table}{share_row}</table>{share_bar}</div></div>"
    )


def _panel(canvas, image_id: int, name: str, predicted: int, true: int, logits, rows, figure):
    names, colours = canvas.class_names, canvas.colours
    correct = predicted == true
    probabilities = np.exp(logits - logits.max())
    probability = float(probabilities[predicted] / probabilities.sum())
    whole = html.img(f"images/{image_id}.png", name, pictures.SIZES["whole"])
    kind, verdict, truth = "new", "", ""  # a new image's class is unknown
    if true >= 0:
        kind = "right" if correct else "wrong"
        verdict = f'<div class="verdict">{"&#10004; right" if correct else "&#10008; wrong"}</div>'
        truth = f"<br>true {html.chip(colours[true])} "
        truth += f'<span class="name">{html_name(names[true])}</span>'
    return (
        f'<div class="panel {kind}" id="image-{image_id}" '
        f'data-image="{image_id}"><div class="whole">{whole}{verdict}'
        f'<div class="meta">{html_name(name, "file")}<br>'
        f"predicted {html.chip(colours[predicted])} "
        f'<span class="name">{html_name(names[predicted])}</span>{truth}'
        f"<br>probability {probability * 100:.1f}%, logit {logits[predicted]:.2f}</div>"
        f'<div><a class="figure" href="{html.e(figure)}">figure (PNG)</a>'
        f'</div></div><div class="matches">{"".join(rows)}</div></div>'
    ), probability


def _read(canvas, name: str | None) -> np.ndarray | None:
    return None if name is None else np.asarray(Image.open(canvas.out_dir / name).convert("RGB"))


def _explain_image(
    canvas, outputs, n, arrays, images, prototype_pictures, top_k, heatmaps, figure_names
):
    image_id, logits = int(outputs.image_ids[n]), outputs.logits[n]
    figure = (figure_names or {}).get(image_id, f"figures/explanation_{image_id}.png")
    decoded = images.get(image_id)
    predicted, true = int(np.argmax(logits)), int(outputs.labels[n])
    matches = top_contributions(
        outputs.similarities[n],
        arrays.last_layer,
        predicted,
        outputs.winning_view[n],
        outputs.num_masks[n],
        top_k,
    )
    name = decoded.file_name
    if true >= 0:
        name = f"test image {image_id}: {name}"
    whole = pictures.fit_width(decoded.image, pictures.rendered("whole"))
    canvas.save(whole, f"images/{image_id}.png")
    masks = [match.mask_index for match in matches]
    if heatmaps is None:
        views, kind = [decoded.view(m, "match_view") for m in masks], "view"
    else:
        ids = [match.prototype for match in matches]
        views, kind = heatmaps.views(decoded, masks, ids, "match_view"), "prp"
    rows, figure_rows = [], []
    for rank, (match, view) in enumerate(zip(matches, views, strict=True), start=1):
        j = match.prototype
        own = int(arrays.prototype_class[j])
        overlay = decoded.overlay(match.mask_index, canvas.colours[own], "match")
        source, source_view = prototype_pictures[j]
        if heatmaps is not None and source is not None:
            source_view = heatmaps.source(j)
        stem = f"images/{image_id}_r{rank}"
        mask_picture = canvas.save(overlay, f"{stem}_mask.png")
        drawn = (mask_picture, canvas.save(view, f"{stem}_{kind}.png"), source, source_view)
        rows.append(_match_row(rank, match, own, canvas, drawn, float(logits[predicted])))
        this, that = overlay, _read(canvas, source)
        if heatmaps is not None:  # the figure shows each outline beside its heatmap
            this = relevance.side_by_side(overlay, view)
            if that is not None:
                that = relevance.side_by_side(that, _read(canvas, source_view))
        caption = "\n".join(wrap_name(canvas.class_names[own], 24))
        caption += f"\nsimilarity {match.similarity:.2f}\n"
        caption += f"x weight {match.weight:.2f} = {match.contribution:.2f}"
        figure_rows.append((this, that, f"#{rank}: prototype {j}", caption))
    panel, probability = _panel(canvas, image_id, name, predicted, true, logits, rows, figure)
    file_lines = wrap_name(name, 26, max_lines=3, keep_underscores=True)
    details = "\n".join([f"probability {100 * probability:.1f}%", *file_lines])
    if true >= 0:
        truth = wrap_name(f"true: {canvas.class_names[true]}", 26, max_lines=3)
        details = "\n".join([*truth, details])
    explanation_figure(
        canvas.out_dir / figure,
        whole,
        f"predicted: {canvas.class_names[predicted]}",
        predicted == true if true >= 0 else None,
        details,
        figure_rows,
    )
    return panel


def section(
    canvas,
    outputs,
    arrays,
    images,
    prototype_pictures,
    top_k: int,
    tick: Callable[[], Any],
    heatmaps: relevance.Heatmaps | None = None,
    figure_names: Mapping[int, str] | None = None,
):
    """The panels of every image of ``outputs`` (``images``: their ``RecordImages``, or any
    object whose ``get(image_id)`` gives a ``pictures.DecodedImage``; ``prototype_pictures``:
    ``gallery.section``'s; ``heatmaps``: PRP maps drawn in the views, else plain crops;
    ``figure_names``: image id -> figure path under the output folder, where not the
    default ``figures/explanation_{id}.png``)."""
    panels = []
    for n in range(len(outputs.image_ids)):
        panels.append(
            _explain_image(
                canvas,
                outputs,
                n,
                arrays,
                images,
                prototype_pictures,
                top_k,
                heatmaps,
                figure_names,
            )
        )
        tick()
    view = "the view as the network saw it"
    if heatmaps is not None:
        view = "the view under its PRP map (which pixels make the prototype match it, docs/prp.md)"
    note = (
        f"For each test image: the {top_k} prototypes that add most to the predicted "
        "class's score (similarity x last-layer weight). Left of the arrow: the view of "
        "the test image that matched the prototype best, its mask outlined, and "
        f"{view}; right: the same for the prototype's own source view."
    )
    return html.Section(
        "explanations", "Explanations", "This looks like that", note, "".join(panels)
    )
