"""The report page: plain data in (what to show), one self-contained HTML string out.

The page links its pictures by relative paths and carries its style inline, so the report
folder opens from disk in any browser, with no server and nothing fetched from the network.
``protomask_jax.explain`` renders the pictures and fills these structures.
"""

from __future__ import annotations

import dataclasses
import html

RGB = tuple[int, int, int]


@dataclasses.dataclass
class PrototypeCard:
    """One prototype of the gallery.

    Attributes:
      index: prototype index in the model.
      source_src: picture of its source training image with the mask outlined (or None
        when the prototype was never projected onto a training view).
      view_src: the view crop as the network saw it (or None).
      lines: caption lines (plain text).
    """

    index: int
    source_src: str | None
    view_src: str | None
    lines: list[str]


@dataclasses.dataclass
class ClassGroup:
    """The gallery cards of one class."""

    class_id: int
    name: str
    colour: RGB
    cards: list[PrototypeCard]


@dataclasses.dataclass
class MatchRow:
    """One "this looks like that" row: a view of the test image and the prototype it matched.

    Attributes:
      rank: 1 = largest contribution to the predicted class.
      prototype: prototype index.
      class_name, colour: the prototype's class and its colour.
      mask_src, view_src: the test image with the matched view's mask outlined, and that
        view's crop.
      source_src, source_view_src: the prototype's source image with its mask, and its crop
        (None when it was never projected).
      similarity, weight, contribution: ``s_j``, ``W[pred, j]`` and their product.
      share: contribution as a fraction of the predicted logit (None when the logit <= 0).
    """

    rank: int
    prototype: int
    class_name: str
    colour: RGB
    mask_src: str
    view_src: str
    source_src: str | None
    source_view_src: str | None
    similarity: float
    weight: float
    contribution: float
    share: float | None


@dataclasses.dataclass
class ImagePanel:
    """The explanation of one test image's prediction."""

    image_id: int
    image_src: str
    true_name: str
    true_colour: RGB
    predicted_name: str
    predicted_colour: RGB
    correct: bool
    probability: float
    logit: float
    rows: list[MatchRow]
    figure_href: str | None = None


@dataclasses.dataclass
class Report:
    """Everything on the page.

    Attributes:
      title: page heading.
      facts: ``(label, value)`` pairs of the run (config, checkpoint, dataset, ...).
      highlights: ``(label, value, note)`` big numbers at the top (accuracy, faithfulness).
      metric_sections: ``(title, [(label, value, unit)])`` from eval.json, or empty.
      curves_src: training-curve picture, or None.
      groups: the prototype gallery by class.
      panels: the per-image explanations.
      notes: ``(section id, text)`` remarks shown at the top of a section.
    """

    title: str
    facts: list[tuple[str, str]]
    highlights: list[tuple[str, str, str]]
    metric_sections: list[tuple[str, list[tuple[str, str, str]]]]
    curves_src: str | None
    groups: list[ClassGroup]
    panels: list[ImagePanel]
    notes: dict[str, str] = dataclasses.field(default_factory=dict)


STYLE = """
:root { --ink: #1f2430; --muted: #5f6b7a; --line: #e3e7ee; --card: #ffffff; --page: #f4f6f9;
        --good: #1a7f37; --bad: #c62828; --accent: #2f5db8; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--page); color: var(--ink);
       font: 15px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background: #1f2a44; color: #fff; padding: 22px 40px 18px; }
header h1 { margin: 0 0 6px; font-size: 26px; font-weight: 650; letter-spacing: .2px; }
header .facts { display: flex; flex-wrap: wrap; gap: 6px 22px; color: #c9d3e6; font-size: 13.5px; }
header .facts b { color: #fff; font-weight: 600; }
nav { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid var(--line);
      padding: 9px 40px; display: flex; gap: 22px; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; font-weight: 600; }
main { padding: 8px 40px 40px; max-width: 1500px; }
section { margin-top: 26px; }
h2 { font-size: 21px; margin: 0 0 12px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 18px 0 8px; display: flex; align-items: center; gap: 8px; }
.note { color: var(--muted); margin: 0 0 12px; max-width: 980px; }
.highlights { display: flex; flex-wrap: wrap; gap: 14px; margin-top: 18px; }
.highlight { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
             padding: 12px 18px; min-width: 190px; box-shadow: 0 1px 2px rgba(0,0,0,.04); }
.highlight .value { font-size: 28px; font-weight: 700; color: var(--ink); }
.highlight .label { color: var(--muted); font-size: 13px; text-transform: uppercase;
                    letter-spacing: .4px; }
.highlight .sub { color: var(--muted); font-size: 13px; }
.metrics { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 14px; }
.metrics table { width: 100%; border-collapse: collapse; background: var(--card);
                 border: 1px solid var(--line); border-radius: 10px; overflow: hidden; }
.metrics caption { text-align: left; font-weight: 650; padding: 0 0 6px; font-size: 14px; }
.metrics td { padding: 5px 12px; border-top: 1px solid var(--line); font-size: 14px; }
.metrics td.v { text-align: right; font-variant-numeric: tabular-nums; font-weight: 600;
                white-space: nowrap; }
.metrics td.u { color: var(--muted); width: 1%; white-space: nowrap; }
img.curves { max-width: 100%; background: #fff; border: 1px solid var(--line);
             border-radius: 10px; }
.chip { display: inline-block; width: 14px; height: 14px; border-radius: 4px;
        border: 1px solid rgba(0,0,0,.25); flex: none; }
.classes { display: flex; flex-wrap: wrap; gap: 6px 22px; align-items: flex-start; }
.class-group h3 { margin-top: 10px; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 10px;
        border-top: 4px solid var(--cls); box-shadow: 0 1px 2px rgba(0,0,0,.04); }
.card .pics { display: flex; gap: 8px; align-items: flex-start; }
.card .pics img { display: block; border-radius: 6px; }
.card .caption { margin-top: 7px; font-size: 13px; color: var(--muted); }
.card .caption b { color: var(--ink); }
.missing { width: 200px; height: 120px; display: flex; align-items: center; justify-content: center;
           color: var(--muted); background: #fafbfc; border: 1px dashed var(--line);
           border-radius: 6px; font-size: 13px; text-align: center; padding: 8px; }
.panel { background: var(--card); border: 1px solid var(--line); border-radius: 12px;
         padding: 14px 16px; margin-bottom: 16px; display: flex; gap: 18px;
         border-left: 6px solid var(--verdict); box-shadow: 0 1px 2px rgba(0,0,0,.04); }
.panel.right { --verdict: var(--good); }
.panel.wrong { --verdict: var(--bad); }
.panel .whole { flex: none; width: 230px; }
.panel .whole img { display: block; border-radius: 8px; }
.verdict { font-weight: 700; margin: 8px 0 2px; font-size: 15px; }
.right .verdict { color: var(--good); }
.wrong .verdict { color: var(--bad); }
.panel .whole .meta { font-size: 13px; color: var(--muted); }
.panel .whole .meta span.name { color: var(--ink); font-weight: 600; }
.matches { flex: 1; display: flex; flex-direction: column; gap: 10px; }
.match { display: flex; align-items: center; gap: 10px; padding: 8px;
         border: 1px solid var(--line); border-radius: 10px; }
.match img { display: block; border-radius: 6px; }
.match .pair { display: flex; gap: 6px; align-items: flex-start; }
.match .arrow { color: var(--muted); font-size: 13px; text-align: center; width: 78px;
                line-height: 1.2; }
.match .arrow b { font-size: 20px; color: var(--ink); display: block; }
.match .numbers { font-size: 13.5px; min-width: 210px; }
.match .numbers .proto { font-weight: 650; display: flex; align-items: center; gap: 6px;
                         margin-bottom: 3px; }
.match .numbers .cls { color: var(--muted); font-size: 12.5px; }
.match .numbers td { padding: 1px 10px 1px 0; }
.match .numbers td.v { text-align: right; font-variant-numeric: tabular-nums; font-weight: 600; }
.bar { height: 6px; background: var(--line); border-radius: 3px; margin-top: 5px; width: 180px; }
.bar span { display: block; height: 6px; border-radius: 3px; background: var(--accent); }
a.figure { font-size: 13px; color: var(--accent); }
footer { color: var(--muted); font-size: 12.5px; padding: 20px 40px 30px; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _rgb(colour: RGB) -> str:
    return f"rgb({colour[0]}, {colour[1]}, {colour[2]})"


def _chip(colour: RGB) -> str:
    return f'<span class="chip" style="background: {_rgb(colour)}"></span>'


def _img(src: str | None, alt: str, width: int, missing: str) -> str:
    if src is None:
        return f'<div class="missing" style="width: {width}px">{_e(missing)}</div>'
    return f'<img src="{_e(src)}" alt="{_e(alt)}" width="{width}" loading="lazy">'


def _metrics(report: Report) -> str:
    if not report.metric_sections:
        return ""
    tables = []
    for title, rows in report.metric_sections:
        body = "".join(
            f'<tr><td>{_e(label.strip())}</td><td class="v">{_e(value)}</td>'
            f'<td class="u">{_e(unit)}</td></tr>'
            for label, value, unit in rows
        )
        tables.append(f"<table><caption>{_e(title)}</caption>{body}</table>")
    return f'<div class="metrics">{"".join(tables)}</div>'


def _card(card: PrototypeCard, colour: RGB, sizes: dict[str, int]) -> str:
    source = _img(
        card.source_src,
        f"prototype {card.index}: source image",
        sizes["source"],
        "never projected onto a training view",
    )
    view = _img(card.view_src, f"prototype {card.index}: view", sizes["view"], "")
    lines = "<br>".join(_e(line) for line in card.lines)
    return (
        f'<div class="card" id="prototype-{card.index}" data-prototype="{card.index}" '
        f'style="--cls: {_rgb(colour)}; width: {sizes["source"] + sizes["view"] + 30}px">'
        f'<div class="pics">{source}'
        f"{view if card.view_src else ''}</div>"
        f'<div class="caption"><b>prototype {card.index}</b><br>{lines}</div></div>'
    )


def _gallery(report: Report, sizes: dict[str, int]) -> str:
    groups = []
    for group in report.groups:
        cards = "".join(_card(card, group.colour, sizes) for card in group.cards)
        groups.append(
            f'<div class="class-group"><h3 id="class-{group.class_id}">{_chip(group.colour)}'
            f"class {group.class_id}: {_e(group.name)}</h3>"
            f'<div class="gallery">{cards}</div></div>'
        )
    return f'<div class="classes">{"".join(groups)}</div>'


def _match(row: MatchRow, sizes: dict[str, int]) -> str:
    test_side = _img(row.mask_src, "matched view on the test image", sizes["match"], "") + _img(
        row.view_src, "matched view", sizes["match_view"], ""
    )
    prototype_side = _img(
        row.source_src,
        f"prototype {row.prototype}: source image",
        sizes["match"],
        "prototype never projected",
    )
    if row.source_view_src:
        prototype_side += _img(
            row.source_view_src, f"prototype {row.prototype}: view", sizes["match_view"], ""
        )
    share_row = share_bar = ""
    if row.share is not None:
        share_row = f'<tr><td>share of the score</td><td class="v">{row.share * 100:.0f}%</td></tr>'
        share_bar = (
            f'<div class="bar" title="share of the class score"><span style="width: '
            f'{min(1.0, row.share) * 100:.0f}%"></span></div>'
        )
    return (
        f'<div class="match" data-prototype="{row.prototype}">'
        f'<div class="pair">{test_side}</div>'
        f'<div class="arrow"><b>&rarr;</b>looks like</div>'
        f'<div class="pair">{prototype_side}</div>'
        f'<div class="numbers"><div class="proto">#{row.rank} {_chip(row.colour)}'
        f'<a href="#prototype-{row.prototype}">prototype {row.prototype}</a></div>'
        f'<div class="cls">{_e(row.class_name)}</div><table>'
        f'<tr><td>similarity</td><td class="v">{row.similarity:.3f}</td></tr>'
        f'<tr><td>weight to predicted class</td><td class="v">{row.weight:.3f}</td></tr>'
        f'<tr><td>contribution</td><td class="v">{row.contribution:.3f}</td></tr>'
        f"{share_row}</table>{share_bar}</div></div>"
    )


def _panels(report: Report, sizes: dict[str, int]) -> str:
    parts = []
    for panel in report.panels:
        verdict = "&#10004; right" if panel.correct else "&#10008; wrong"
        figure = (
            f'<div><a class="figure" href="{_e(panel.figure_href)}">figure (PNG)</a></div>'
            if panel.figure_href
            else ""
        )
        rows = "".join(_match(row, sizes) for row in panel.rows)
        whole = _img(panel.image_src, f"test image {panel.image_id}", sizes["whole"], "")
        parts.append(
            f'<div class="panel {"right" if panel.correct else "wrong"}" '
            f'id="image-{panel.image_id}" data-image="{panel.image_id}">'
            f'<div class="whole">{whole}'
            f'<div class="verdict">{verdict}</div><div class="meta">'
            f"test image {panel.image_id}<br>"
            f'predicted {_chip(panel.predicted_colour)} <span class="name">'
            f"{_e(panel.predicted_name)}</span><br>"
            f'true {_chip(panel.true_colour)} <span class="name">{_e(panel.true_name)}</span><br>'
            f"probability {panel.probability * 100:.1f}%, logit {panel.logit:.2f}</div>"
            f"{figure}</div>"
            f'<div class="matches">{rows}</div></div>'
        )
    return "".join(parts)


def render(report: Report, sizes: dict[str, int], generated: str) -> str:
    """The report as one HTML document.

    Args:
      report: what to show.
      sizes: display widths in CSS pixels for ``source``, ``view`` (gallery), ``whole``
        (test image), ``match`` and ``match_view`` (explanation rows).
      generated: a line for the footer (e.g. the time and the command).

    Returns:
      The HTML text.
    """
    facts = "".join(
        f"<span>{_e(label)}: <b>{_e(value)}</b></span>" for label, value in report.facts
    )
    highlights = "".join(
        f'<div class="highlight"><div class="label">{_e(label)}</div>'
        f'<div class="value">{_e(value)}</div><div class="sub">{_e(note)}</div></div>'
        for label, value, note in report.highlights
    )

    def note(section: str) -> str:
        text = report.notes.get(section)
        return f'<p class="note">{_e(text)}</p>' if text else ""

    curves = (
        f'<img class="curves" src="{_e(report.curves_src)}" alt="training curves">'
        if report.curves_src
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(report.title)}</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>{_e(report.title)}</h1>
<div class="facts">{facts}</div>
<div class="highlights">{highlights}</div>
</header>
<nav><a href="#metrics">Metrics</a><a href="#curves">Training</a>
<a href="#prototypes">Prototypes</a><a href="#explanations">Explanations</a></nav>
<main>
<section id="metrics"><h2>Evaluation</h2>{note("metrics")}{_metrics(report)}</section>
<section id="curves"><h2>Training</h2>{note("curves")}{curves}</section>
<section id="prototypes"><h2>Prototypes after push</h2>{note("prototypes")}
{_gallery(report, sizes)}</section>
<section id="explanations"><h2>This looks like that</h2>{note("explanations")}
{_panels(report, sizes)}</section>
</main>
<footer>{_e(generated)}</footer>
</body>
</html>
"""
