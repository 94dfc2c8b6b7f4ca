"""The one look of every figure: the style dataclass, the rate labels, and small color helpers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import plotly.graph_objects as go
from plotly.colors import sample_colorscale

__all__ = ["METRICS", "STYLE", "Style", "apply_style", "rgba", "strength_colors"]

METRICS: dict[str, str] = {
    "tpr": "TPR: P(detect | injected)",
    "fpr": "FPR: P(detect | control)",
    "introspection": "Introspection: P(detect & identify | injected)",
    "forced_id": "Forced identification",
}
"""The rates the figures show (columns of detection_metrics) and their axis labels."""


@dataclass(frozen=True)
class Style:
    """The look shared by every figure."""

    template: str = "plotly_white"
    """plotly template."""
    font: str = "Helvetica, Arial, sans-serif"
    """Font family."""
    font_size: int = 13
    """Base font size."""
    colorscale: str = "Viridis"
    """Sequential colorscale for strengths (low strength = dark)."""
    bar_colors: tuple[str, str] = ("#1f77b4", "#d62728")
    """TPR and FPR bar colors."""
    band_opacity: float = 0.18
    """Opacity of CI bands."""
    panel_height: int = 230
    """Height in px of one row of panels."""
    width: int = 1100
    """Width in px of static exports (PNG, SVG, PDF: :func:`mechintro.plots.save.save_figure`). On screen a
    figure has no fixed width: it fills its container (plotly's ``autosize``, responsive), so it fits a
    notebook's output area or a browser window of any size."""


STYLE = Style()


def apply_style(fig: go.Figure, *, title: str, height: int, top: int = 90, style: Style = STYLE) -> go.Figure:
    """The shared look: template, title, size, font and margins (``top``: room for the title and legend)."""
    fig.update_layout(
        template=style.template,
        title={"text": title, "x": 0.01},
        height=height,
        autosize=True,
        font={"family": style.font, "size": style.font_size},
        legend={"tracegroupgap": 2},
        margin={"l": 70, "r": 30, "t": top, "b": 60},
    )
    return fig


def rgba(color: str, alpha: float) -> str:
    """A plotly color string ("rgb(...)" or "#rrggbb") with opacity ``alpha``."""
    if color.startswith("#"):
        r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    else:
        r, g, b = (int(float(v)) for v in color[color.index("(") + 1 : color.index(")")].split(",")[:3])
    return f"rgba({r}, {g}, {b}, {alpha})"


def strength_colors(strengths: Sequence[float], style: Style = STYLE) -> dict[float, str]:
    """One color per strength, evenly spaced along the colorscale (darkest = weakest)."""
    values = sorted(set(strengths))
    if len(values) == 1:
        return {values[0]: sample_colorscale(style.colorscale, [0.35])[0]}
    return dict(
        zip(
            values,
            sample_colorscale(style.colorscale, [0.9 * i / (len(values) - 1) for i in range(len(values))]),
            strict=True,
        )
    )
