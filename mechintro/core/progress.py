"""One progress-bar factory for the long loops (tqdm.auto: a widget in Jupyter, text in a terminal)."""

from __future__ import annotations

from typing import Any


def progress_bar(*, total: int, desc: str, unit: str, enabled: bool) -> Any:
    """A tqdm bar of ``total`` steps, or a silent one when ``enabled`` is False (same interface)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled)
