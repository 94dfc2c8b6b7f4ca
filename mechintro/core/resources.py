"""Where mechintro's data lives: shipped inside the package, and a user's own folder that wins over it.

Everything the library reads ships as package data under ``mechintro/data`` (read through
:mod:`importlib.resources`): the model organism (both checkpoints with tokenizer, spec and transcoders), its
split and measured report, the paper's stimuli and its released metric tables. Installed from a wheel that
folder sits in site-packages, which mechintro never writes to.

A user's own organism (``mechintro organism train``, ``mechintro organism calibrate``) lives in
:func:`user_dir`: ``MECHINTRO_DATA`` when set, else the per-user data folder (``$XDG_DATA_HOME/mechintro``,
by default ``~/.local/share/mechintro``). Organisms are looked up there first and in the package second.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

ENV = "MECHINTRO_DATA"
"""The environment variable naming the user's data folder."""
STIMULI = "stimuli.json"
"""The paper's stimuli, relative to the package data."""
PAPER_METRICS = "paper_metrics"
"""The paper's released metric tables, relative to the package data."""


def package_data() -> Path:
    """The data folder shipped inside the installed package (read-only to mechintro)."""
    root = resources.files("mechintro") / "data"
    path = Path(str(root))
    if not path.is_dir():
        raise FileNotFoundError(
            f"mechintro's package data is missing ({root}); the package was installed without it, or from a "
            "zip that cannot hold model folders. Reinstall mechintro from its wheel or sdist."
        )
    return path


def user_dir() -> Path:
    """The user's data folder: ``MECHINTRO_DATA`` when set, else ``$XDG_DATA_HOME/mechintro`` (by default
    ``~/.local/share/mechintro``). Where commands that train or calibrate an organism write by default."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "mechintro"


def search_path() -> tuple[Path, ...]:
    """Folders searched for an organism, first match wins: the user's folder, then the package data."""
    return (user_dir(), package_data())


def organism_root(name: str = "organism") -> Path | None:
    """The folder holding organism ``name`` (``<root>/<name>/config.json``) and its split and report: the
    first of :func:`search_path` that has it, or None."""
    for root in search_path():
        if (root / name / "config.json").is_file():
            return root
    return None


def organism_file(filename: str, *, name: str = "organism") -> Path:
    """A file recorded beside organism ``name`` (e.g. ``organism_split.json``), from the root that holds
    that organism, so a user-trained organism comes with its own split and report."""
    root = organism_root(name)
    if root is None:
        raise FileNotFoundError(
            f"no model organism {name!r} in {[str(p) for p in search_path()]}; "
            "train one with `mechintro organism train`"
        )
    return root / filename


def reference(relative: str) -> Path:
    """A reference file shipped with the package (``stimuli.json``, ``paper_metrics/...``)."""
    path = package_data() / relative
    if not path.exists():
        raise FileNotFoundError(f"{relative} is not in mechintro's package data ({package_data()})")
    return path
