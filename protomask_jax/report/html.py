"""The report page: sections of HTML in, one self-contained document out.

The page links its pictures by relative paths and carries its style inline, so the report
folder opens from disk in any browser, with no server and nothing fetched from the network.
Each section (``curves``, ``gallery``, ``panels`` and the metrics below) draws its pictures
and returns a :class:`Section`; ``protomask_jax.explain`` puts them on the page.
"""

from __future__ import annotations

import dataclasses
import html

from protomask_jax import evaluate

RGB = tuple[int, int, int]


@dataclasses.dataclass
class Section:
    """``<section id=key>`` under the heading, linked from the navigation bar as ``nav``;
    its ``warning`` (HTML, a ``warning`` card) goes to the top of the page."""

    key: str
    nav: str
    heading: str
    note: str
    body: str = ""
    warning: str = ""


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
.metrics td.n { color: var(--muted); font-size: 13px; }
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
.panel.new { --verdict: var(--accent); }
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
.match .numbers { font-size: 13.5px; min-width: 210px; max-width: 280px; }
.match .numbers .proto { font-weight: 650; display: flex; align-items: center; gap: 6px;
                         margin-bottom: 3px; }
.match .numbers .cls { color: var(--muted); font-size: 12.5px; }
.match .numbers td { padding: 1px 10px 1px 0; }
.match .numbers td.v { text-align: right; font-variant-numeric: tabular-nums; font-weight: 600; }
.bar { height: 6px; background: var(--line); border-radius: 3px; margin-top: 5px; width: 180px; }
.bar span { display: block; height: 6px; border-radius: 3px; background: var(--accent); }
a.figure { font-size: 13px; color: var(--accent); }
.topk { display: flex; gap: 16px; align-items: flex-start; background: var(--card);
        border: 1px solid var(--line); border-radius: 10px; padding: 8px 12px; margin-bottom: 8px; }
.topk .proto { width: 130px; flex: none; font-size: 13px; color: var(--muted); }
.topk .proto a { font-weight: 650; }
.topk .split { font-size: 12.5px; color: var(--muted); }
.topk .tops { display: flex; gap: 6px; margin-top: 3px; }
.topk .top { font-size: 12px; text-align: center; }
.name-box { display: -webkit-inline-box; -webkit-box-orient: vertical; overflow: hidden;
            max-width: 100%; min-width: 0; overflow-wrap: normal; word-break: normal;
            vertical-align: top; }
.warning { background: #fff6e5; border: 1px solid #f0c36d; border-left: 6px solid #e69500;
           border-radius: 10px; padding: 10px 16px; margin-top: 18px; max-width: 980px; }
.warning b { color: #8a5a00; }
.warning p, .warning ul { margin: 6px 0 0; }
.card .caption .duplicate { color: #8a5a00; font-weight: 600; }
footer { color: var(--muted); font-size: 12.5px; padding: 20px 40px 30px; }
"""


def e(text: object) -> str:
    return html.escape(str(text), quote=True)


def rgb(colour: RGB) -> str:
    return f"rgb({colour[0]}, {colour[1]}, {colour[2]})"


def chip(colour: RGB) -> str:
    return f'<span class="chip" style="background: {rgb(colour)}"></span>'


def img(src: str | None, alt: str, width: int, missing: str = "") -> str:
    """A picture, or a placeholder box saying ``missing``."""
    if src is None:
        return f'<div class="missing" style="width: {width}px">{e(missing)}</div>'
    return f'<img src="{e(src)}" alt="{e(alt)}" width="{width}" loading="lazy">'


def metrics_section(eval_results: dict | None, workdir) -> Section:
    """The tables of eval.json (``evaluate.sections``; a family not computed shows why), or
    how to make it."""
    if not eval_results:
        note = (
            "No eval.json yet: run `python -m protomask_jax.evaluate --config ... "
            f"--workdir {workdir}` and re-run this report to see the metrics here."
        )
        return Section("metrics", "Metrics", "Evaluation", note)
    tables = []
    for title, rows, notes in evaluate.sections(eval_results):
        body = "".join(
            f'<tr><td>{e(label.strip())}</td><td class="v">{e(value)}</td>'
            f'<td class="u">{e(unit)}</td></tr>'
            for label, value, unit in rows
        ) + "".join(f'<tr><td class="n" colspan="3">{e(note)}</td></tr>' for note in notes)
        tables.append(f"<table><caption>{e(title)}</caption>{body}</table>")
    note = (
        f"From eval.json ({eval_results['split']} split, {eval_results['checkpoint']}, "
        f"mask frame {eval_results['resolution']} px). See docs/explanations.md."
    )
    return Section(
        "metrics", "Metrics", "Evaluation", note, f'<div class="metrics">{"".join(tables)}</div>'
    )


def page(title, facts, highlights, sections: list[Section], footer: str) -> str:
    """The document. ``facts``: ``(label, value)`` of the run; ``highlights``: ``(label,
    value, note)`` big numbers in the header."""
    facts = "".join(f"<span>{e(label)}: <b>{e(value)}</b></span>" for label, value in facts)
    highlights = "".join(
        f'<div class="highlight"><div class="label">{e(label)}</div>'
        f'<div class="value">{e(value)}</div><div class="sub">{e(note)}</div></div>'
        for label, value, note in highlights
    )
    nav = "".join(f'<a href="#{s.key}">{e(s.nav)}</a>' for s in sections)
    warnings = "".join(s.warning for s in sections)
    body = "\n".join(
        f'<section id="{s.key}"><h2>{e(s.heading)}</h2>'
        + (f'<p class="note">{e(s.note)}</p>' if s.note else "")
        + f"\n{s.body}</section>"
        for s in sections
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>{e(title)}</h1>
<div class="facts">{facts}</div>
<div class="highlights">{highlights}</div>
</header>
<nav>{nav}</nav>
<main>
{warnings}
{body}
</main>
<footer>{e(footer)}</footer>
</body>
</html>
"""
