"""Writing a figure: interactive HTML always, static PNG/SVG/PDF through kaleido when a browser is found."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go

from mechintro.plots.browser import browser_path, warn_once
from mechintro.plots.style import STYLE

__all__ = ["save_figure"]


def save_figure(
    fig: go.Figure,
    name: str,
    out_dir: str | Path = "figures",
    *,
    formats: Sequence[str] = ("html", "png"),
    offline: bool = False,
) -> list[Path]:
    """Write ``fig`` as ``<out_dir>/<name>.html`` and ``.png`` (PNG through kaleido); return the paths
    written.

    ``offline=True`` writes plotly.js once into ``out_dir`` (``plotly.min.js``, about 4 MB, shared by every
    offline figure there) and points the HTML at it, so that it opens without network access as long as the
    two files stay together; otherwise the HTML loads plotly.js from its CDN.

    On screen the figures fill their container (no fixed width); static files are written at the figure's
    own ``width`` when it has one, else at :attr:`~mechintro.plots.style.Style.width` px (1,100), so their
    pixels do not depend on any screen.

    Static formats (png, svg, pdf) need a Chrome/Chromium (:mod:`mechintro.plots.browser`). Without one -- or
    with
    ``MECHINTRO_BROWSER=none`` -- the HTML is still written, the static files are skipped, and one message
    per process says how to get them.
    """
    valid = ("html", "png", "svg", "pdf")
    bad = [f for f in formats if f not in valid]
    if bad:
        raise ValueError(f"unknown figure formats {bad}; valid: {list(valid)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    static = [f for f in formats if f != "html"]
    browser = browser_path() if static else None
    for fmt in formats:
        path = out / f"{name}.{fmt}"
        if fmt == "html":
            fig.write_html(path, include_plotlyjs="directory" if offline else "cdn")
        elif browser is None:
            warn_once(f"{name} (and every later figure)")
            continue
        else:
            _write_static(fig, path, browser=browser)
        paths.append(path)
    return paths


def _write_static(fig: go.Figure, path: Path, *, browser: str) -> None:
    """PNG/SVG/PDF through kaleido with the given browser."""
    saved = os.environ.get("BROWSER_PATH")
    os.environ["BROWSER_PATH"] = browser
    try:
        fig.write_image(
            path,
            width=fig.layout.width or STYLE.width,
            height=fig.layout.height,
            scale=2 if path.suffix == ".png" else 1,
        )
    except Exception as err:  # kaleido and its browser raise many kinds
        raise RuntimeError(f"could not write {path} with the browser {browser}: {err}") from err
    finally:
        if saved is None:
            os.environ.pop("BROWSER_PATH", None)
        else:
            os.environ["BROWSER_PATH"] = saved
