"""Class and file names as the report shows them: broken only between words, cut with "…"
when too long, never spilling out of their box.

Class names show their underscores as spaces (CUB's "001.Black_footed_Albatross" reads
"001.Black footed Albatross"); file names keep theirs but may break after one. Figures get
lines of characters (:func:`wrap_name`); the page gets a ``<span>`` the browser wraps at
those places and clamps to a number of lines, the full name in its tooltip (:func:`html_name`).
"""

from __future__ import annotations

import html
import re

ELLIPSIS = "\u2026"


def display_class(name: str) -> str:
    """``name`` with each run of underscores and spaces as one space."""
    return re.sub(r"[_ ]+", " ", name).strip()


def _words(name: str, keep_underscores: bool) -> list[tuple[str, str]]:
    """``(glue, word)``: the words of ``name`` and what joins each to the one before."""
    if not keep_underscores:
        return [(" ", word) for word in display_class(name).split()]
    # "a_b c" -> "a_", "b", "c": a line may end after an underscore, joined back without space
    return [
        ("" if m.start() and name[m.start() - 1] == "_" else " ", m.group())
        for m in re.finditer(r"[^_\s]*_+|[^_\s]+", name)
    ]


def _cut(text: str, width: int) -> str:
    """``text`` ending in the ellipsis, ``width`` characters at most."""
    return text[: width - 1].rstrip() + ELLIPSIS


def wrap_name(name: str, width: int, max_lines: int = 2, keep_underscores: bool = False):
    """``name`` as at most ``max_lines`` lines of at most ``width`` characters, broken only
    between words (class names: underscores are spaces; ``keep_underscores``, for file names:
    a line may end after an underscore). A word longer than a line is cut with "…", and so is
    the last line when the name needs more lines."""
    lines: list[str] = []
    for glue, word in _words(name, keep_underscores):
        if len(word) > width:
            word = _cut(word, width)
        joined = f"{lines[-1]}{glue}{word}" if lines else ""
        if lines and len(joined) <= width:
            lines[-1] = joined
        else:
            lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        lines = lines[: max_lines - 1] + [
            last + ELLIPSIS if len(last) < width else _cut(last, width)
        ]
    return lines


def html_name(name: str, kind: str = "class", lines: int = 2) -> str:
    """``name`` (``kind`` "class" or "file") in a ``<span class="name-box">`` of at most
    ``lines`` lines, cut with "…" by the browser, the full name as its title."""
    if kind == "class":
        shown = html.escape(display_class(name))
    else:
        shown = html.escape(name).replace("_", "_<wbr>")
    return (
        f'<span class="name-box" style="-webkit-line-clamp: {lines}; line-clamp: {lines}" '
        f'title="{html.escape(name, quote=True)}">{shown}</span>'
    )
