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


ORGANISMS: dict[str, tuple[str, str]] = {
    "organism": ("", "organism"),
    "organism-base": ("", "organism-base"),
    "organism-olmo": ("olmo", "organism"),
    "organism-olmo-base": ("olmo", "organism-base"),
}
"""Each registered organism name: (its subfolder of a data folder, its checkpoint folder in there). The
Gemma 3 organism sits at the top of the data folder, the OLMo 3 one in ``olmo/``, with the same file names
(``organism/``, ``organism-base/``, ``organism_split.json``, ``organism_report.json``, ...)."""

FAMILY_SUBFOLDERS = {"gemma3": "", "olmo3": "olmo"}
"""Where an organism of each family goes in a data folder (what ``mechintro organism train --family``
writes into by default)."""


def _layout(name: str) -> tuple[str, str]:
    if name not in ORGANISMS:
        raise ValueError(f"unknown organism {name!r}; valid: {list(ORGANISMS)}")
    return ORGANISMS[name]


def organism_root(name: str = "organism") -> Path | None:
    """The folder holding organism ``name`` (one of :data:`ORGANISMS`: ``<root>/<checkpoint>/config.json``)
    and its split and report: in the first of :func:`search_path` that has it, or None."""
    sub, checkpoint = _layout(name)
    for base in search_path():
        root = base / sub if sub else base
        if (root / checkpoint / "config.json").is_file():
            return root
    return None


def organism_checkpoint(name: str = "organism") -> Path | None:
    """The checkpoint folder of organism ``name`` (weights, tokenizer, spec, transcoders), or None."""
    root = organism_root(name)
    return None if root is None else root / _layout(name)[1]


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
