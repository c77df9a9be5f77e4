"""HTML building blocks of the report: escaping, number formatting, tables and inlined figures.

A leaf module (standard library only): every report part, in this package or a stage's,
builds its fragments from these, so the report frame and its parts never import each other.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import html
import math
import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Section:
    """One part of the page.

    Attributes:
        title: heading text (escaped when rendered).
        body: HTML body (already escaped by its builder).
        anchor: id of the heading, for links.
    """

    title: str
    body: str
    anchor: str = ""


def esc(value: Any) -> str:
    """HTML-escape ``str(value)`` (quotes included)."""
    return html.escape(str(value), quote=True)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)  # NumPy numbers too


def format_value(value: Any, digits: int = 3) -> str:
    """A metric value as text; ``n/a`` when missing or undefined."""
    return f"{value:.{digits}f}" if _is_number(value) else "n/a"


def format_metric(entry: dict[str, Any] | None, digits: int = 3) -> str:
    """``{"value": .812, "ci95": [.701, .903]}`` -> ``"0.812 [0.701, 0.903]"``."""
    if not entry:
        return "n/a"
    text = format_value(entry.get("value"), digits)
    interval = next((v for k, v in entry.items() if k.startswith("ci") and isinstance(v, list)), None)
    if text != "n/a" and interval and len(interval) == 2 and all(_is_number(x) for x in interval):
        text += f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    return text


def format_count(n: Any) -> str:
    return f"{int(n):,}" if _is_number(n) else "n/a"


def format_seconds(seconds: Any) -> str:
    """Seconds as ``42.0 s``, ``3 min 05 s`` or ``2 h 03 min``."""
    if not _is_number(seconds):
        return "n/a"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


_COLLECTED: contextvars.ContextVar[list[tuple[str, list[str], list[list[str]], str]] | None] = \
    contextvars.ContextVar("medvit_report_tables", default=None)


@contextlib.contextmanager
def collect_tables() -> Iterator[list[tuple[str, list[str], list[list[str]], str]]]:
    """Inside the block every :func:`html_table` also appends ``(caption, headers, rows,
    html)`` to the yielded list (the report exports them as CSV and LaTeX)."""
    tables: list[tuple[str, list[str], list[list[str]], str]] = []
    token = _COLLECTED.set(tables)
    try:
        yield tables
    finally:
        _COLLECTED.reset(token)


def html_table(headers: Sequence[str], rows: Iterable[Sequence[str]], caption: str = "",
               text_columns: Sequence[int] = (), table_class: str = "") -> str:
    """A table from plain-text cells (every cell and header is escaped here). Cells are
    right-aligned (numbers) except the first column and ``text_columns`` (indices); wide
    tables scroll with their first column fixed."""
    left = set(text_columns)
    rows = [list(map(str, r)) for r in rows]

    def cell(tag: str, j: int, value: Any) -> str:
        return f'<{tag} class="t">{esc(value)}</{tag}>' if j in left else f"<{tag}>{esc(value)}</{tag}>"

    head = "".join(cell("th", j, h) for j, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", j, c) for j, c in enumerate(row)) + "</tr>" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    cls = f' class="{esc(table_class)}"' if table_class else ""
    out = f"<table{cls}>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    collected = _COLLECTED.get()
    if collected is not None:
        collected.append((str(caption), [str(h) for h in headers], rows, out))
    return out


_LABELS = {"auroc": "AUROC", "ap": "AP", "accuracy": "accuracy", "balanced_accuracy": "balanced acc.",
           "sensitivity": "sensitivity", "specificity": "specificity", "f1": "F1", "kappa": "kappa",
           "dice": "Dice", "hd95": "HD95"}


def metric_label(name: str) -> str:
    """Column heading of a metric: ``auroc_macro`` -> ``AUROC (macro)``, ``auroc_nodule`` -> ``AUROC nodule``."""
    if name in _LABELS:
        return _LABELS[name]
    base, _, rest = name.partition("_")
    if base in _LABELS and rest:
        return f"{_LABELS[base]} (macro)" if rest == "macro" else f"{_LABELS[base]} {rest}"
    if name.endswith("_macro") and name[:-6] in _LABELS:
        return f"{_LABELS[name[:-6]]} (macro)"
    return name


def figure_html(caption: str, png: Path) -> str:
    """A PNG inlined as a data URI (the report makes no external request)."""
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")
