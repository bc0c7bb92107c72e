"""Report section "Prototypes after push": by class, each prototype's source training image
with its mask outlined, the view crop the network saw, and its last-layer weights.

Push records the training view each prototype was projected onto (checkpoint metadata
``push``: image id, mask index, distance per prototype at push time); pruning after push keeps
the entries ``kept_prototypes``. Prototypes projected onto one view (``duplicate_groups``) get
a warning card at the top of the page and a line on their cards. Pictures:
``prototypes/p{j:04d}_source.png`` and ``_view.png``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from protomask_jax import push as push_lib
from protomask_jax.report import html, pictures
from protomask_jax.report.html import e
from protomask_jax.report.names import html_name


class _Html(str):
    """A caption line that is HTML already."""


@dataclasses.dataclass
class PrototypeSource:
    """Where push projected a prototype (all None: it never was)."""

    image_id: int | None = None
    mask_index: int | None = None
    distance: float | None = None


def prototype_sources(meta: dict[str, Any], num_prototypes: int) -> list[PrototypeSource]:
    """One source per prototype of the restored (possibly pruned) model."""
    gallery = meta.get("push") if meta.get("pushed") else None
    if not gallery:
        return [PrototypeSource() for _ in range(num_prototypes)]
    kept = meta.get("kept_prototypes")
    entries = list(range(num_prototypes)) if kept is None else list(kept)
    if len(entries) != num_prototypes:
        raise ValueError(
            f"checkpoint metadata lists {len(entries)} kept prototypes but the model has "
            f"{num_prototypes}"
        )
    sources = []
    for entry in entries:
        image_id, distance = int(gallery["image_id"][entry]), gallery["distance"][entry]
        if image_id < 0 or distance is None or not np.isfinite(distance):
            sources.append(PrototypeSource())  # no training image of its class
        else:
            mask_index = int(gallery["mask_index"][entry])
            sources.append(PrototypeSource(image_id, mask_index, float(distance)))
    return sources


def duplicate_groups(sources: list[PrototypeSource], prototypes: np.ndarray) -> list[list[int]]:
    """``push.duplicate_groups`` of the model's prototypes (``[P, D]``) and their sources."""
    image_id = [-1 if s.image_id is None else s.image_id for s in sources]
    mask_index = [-1 if s.mask_index is None else s.mask_index for s in sources]
    return push_lib.duplicate_groups(image_id, mask_index, prototypes)


def duplicates_warning(groups: list[list[int]], sources: list[PrototypeSource]) -> str:
    """The warning card of ``groups`` (empty without any)."""
    if not groups:
        return ""
    members = sum(map(len, groups))
    views = "one view" if len(groups) == 1 else f"{len(groups)} views"
    items = []
    for group in groups:
        links = ", ".join(f'<a href="#prototype-{j}">{j}</a>' for j in group)
        projected = [sources[j] for j in group if sources[j].image_id is not None]
        shared = sorted({(s.image_id, s.mask_index) for s in projected})
        where = "; ".join(f"train image {i}, mask {m}" for i, m in shared)
        items.append(f"<li>prototypes {links}: {e(where or 'identical vectors')}</li>")
    return (
        f'<div class="warning" id="duplicate-prototypes"><b>Duplicate prototypes: {members} of '
        f"{len(sources)} share {views}, so {members - len(groups)} of them add nothing.</b>"
        "<p>Push projected each group onto the same training view: its prototypes compute "
        "one similarity. A class with fewer distinct views than prototypes, or prototypes "
        "that collapsed in training, does this; a larger <code>loss.diversity</code> keeps a "
        f"class's prototypes apart.</p><ul>{''.join(items)}</ul></div>"
    )


def _card(j: int, pictures_j, lines: list[str], colour) -> str:
    source, view = pictures_j
    sizes = pictures.SIZES
    source_img = html.img(
        source,
        f"prototype {j}: source image",
        sizes["source"],
        "never projected onto a training view",
    )
    view_img = html.img(view, f"prototype {j}: view", sizes["view"]) if view else ""
    caption = "<br>".join(line if isinstance(line, _Html) else e(line) for line in lines)
    return (
        f'<div class="card" id="prototype-{j}" data-prototype="{j}" style="--cls: '
        f'{html.rgb(colour)}; width: {sizes["source"] + sizes["view"] + 30}px">'
        f'<div class="pics">{source_img}{view_img}</div>'
        f'<div class="caption"><b>prototype {j}</b><br>{caption}</div></div>'
    )


def _caption(canvas, weights: np.ndarray, own: int) -> list[str]:
    lines = [f"weight to own class {weights[own]:+.3f}"]
    others = np.delete(np.arange(len(weights)), own)
    if len(others):
        other = int(others[np.argmax(weights[others])])
        name = html_name(canvas.class_names[other], lines=1)
        lines.append(_Html(f"largest other {weights[other]:+.3f}: {name}"))
    return lines


def section(
    canvas: pictures.Canvas,
    arrays,
    sources: list[PrototypeSource],
    train_images: pictures.RecordImages | None,
    tick: Callable[[], Any],
    only: set[int] | None = None,
    duplicates: list[list[int]] = (),
) -> tuple[html.Section, dict[int, tuple[str | None, str | None]]]:
    """The section and, per prototype, its ``(source, view)`` pictures (None: never pushed);
    ``only``: the prototypes to draw (default: all); ``duplicates``: :func:`duplicate_groups`.
    """
    group_of = {j: group for group in duplicates for j in group}
    drawn: dict[int, tuple[str | None, str | None]] = {}
    cards: dict[int, list[str]] = {c: [] for c in range(len(canvas.class_names))}
    for j, source in enumerate(sources):
        if only is not None and j not in only:
            continue
        own = int(arrays.prototype_class[j])
        lines = _caption(canvas, arrays.last_layer[:, j], own)
        drawn[j] = (None, None)
        if source.image_id is not None:
            decoded = train_images.get(source.image_id)
            overlay = decoded.overlay(source.mask_index, canvas.colours[own], "source")
            drawn[j] = (
                canvas.save(overlay, f"prototypes/p{j:04d}_source.png"),
                canvas.save(
                    decoded.view(source.mask_index, "view"), f"prototypes/p{j:04d}_view.png"
                ),
            )
            label = int(np.atleast_1d(decoded.record.label)[0])
            lines.append(f"source: train image {source.image_id}, mask {source.mask_index}")
            lines.append(_Html(html_name(decoded.file_name, "file", lines=1)))
            lines.append(_Html(f"its class: {html_name(canvas.class_names[label], lines=1)}"))
            lines.append(f"push distance {source.distance:.3g}")
        if j in group_of:
            others = [str(i) for i in group_of[j] if i != j]
            which = f"prototype{'s' if len(others) > 1 else ''} {', '.join(others)}"
            lines.append(_Html(f'<span class="duplicate">same view as {which}</span>'))
        cards[own].append(_card(j, drawn[j], lines, canvas.colours[own]))
        tick()
    groups = "".join(
        f'<div class="class-group"><h3 id="class-{c}">{html.chip(canvas.colours[c])}'
        f"class {c}: {html_name(canvas.class_names[c])}</h3>"
        f'<div class="gallery">{"".join(class_cards)}</div></div>'
        for c, class_cards in cards.items()
        if class_cards
    )
    pushed = any(s.image_id is not None for s in sources)
    note = (
        "Each prototype is the embedding of one training view (push). Left: the source "
        "image, the view's mask outlined in the prototype's class colour; right: the "
        "view as the network sees it (the mask's box, resized)."
        if pushed
        else "The prototypes were not projected onto training views (no push in this "
        "checkpoint), so they have no source image."
    )
    body = f'<div class="classes">{groups}</div>'
    warning = duplicates_warning(list(duplicates), sources)
    section = html.Section("prototypes", "Prototypes", "Prototypes after push", note, body, warning)
    return section, drawn
