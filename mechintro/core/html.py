"""Rich notebook display: one small HTML card (a title, key facts, tables) for the main result objects.

Jupyter calls an object's ``_repr_html_``; the result classes build theirs with :func:`card`.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

MAX_ROWS = 12
"""Rows shown per table in a card (the full frames stay on the object)."""

DIGITS = 4
"""Significant digits of the numbers a card shows (for reading; the objects keep full precision)."""


def _number(value: Any) -> str:
    """``value`` for reading: floats to :data:`DIGITS` significant digits, anything else as ``str``."""
    if isinstance(value, float):
        return f"{value:.{DIGITS}g}"
    return str(value)


def _fact(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{_number(k)}: {_number(v)}" for k, v in value.items())
    if isinstance(value, list | tuple) and len(value) > 8:
        head = ", ".join(_number(v) for v in value[:8])
        return f"{len(value)}: {head}, …"
    if isinstance(value, list | tuple):
        return ", ".join(_number(v) for v in value)
    return _number(value)


def card(
    title: str,
    facts: Mapping[str, Any],
    tables: Sequence[tuple[str, pd.DataFrame]] = (),
    *,
    max_rows: int = MAX_ROWS,
) -> str:
    """HTML: ``title``, a two-column table of ``facts``, then each ``(caption, frame)`` (first ``max_rows``
    rows, with the total row count when cut)."""
    rows = "".join(
        f"<tr><th style='text-align:left'>{html.escape(str(k))}</th><td style='text-align:left'>"
        f"{html.escape(_fact(v))}</td></tr>"
        for k, v in facts.items()
    )
    parts = [f"<div class='mechintro-card'><b>{html.escape(title)}</b>", f"<table>{rows}</table>"]
    for caption, frame in tables:
        shown = frame.head(max_rows)
        more = f" (first {max_rows} of {len(frame)} rows)" if len(frame) > max_rows else ""
        parts.append(f"<p><i>{html.escape(caption)}{more}</i></p>")
        parts.append(shown.to_html(index=False, float_format=lambda x: f"{x:.{DIGITS}g}", border=0))
    parts.append("</div>")
    return "\n".join(parts)
