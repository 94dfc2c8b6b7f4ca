"""One progress-bar factory for the long loops (tqdm.auto: a widget in Jupyter, text in a terminal)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["progress_bar", "progress_steps"]


def progress_bar(*, total: int, desc: str, unit: str, enabled: bool, leave: bool = True) -> Any:
    """A tqdm bar of ``total`` steps, or a silent one when ``enabled`` is False (same interface);
    ``leave=False`` clears it when done."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=leave)


def progress_steps(n: int, *, desc: str, enabled: bool = True, unit: str = "step") -> Iterator[int]:
    """``range(n)`` with a bar that is cleared when the loop ends (training loops)."""
    with progress_bar(total=n, desc=desc, unit=unit, enabled=enabled, leave=False) as bar:
        for step in range(n):
            yield step
            bar.update(1)
