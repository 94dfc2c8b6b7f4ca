"""Pages that ``make docs`` generates at build time (run by mkdocs-gen-files, see mkdocs.yml).

- ``reference/``: one page per module of the package, found by walking ``mechintro/`` (so a module that moves
  or is added gets its page on the next build), grouped by layer, plus the public API: every name in
  ``mechintro.__all__``, linked to where it is defined. The navigation is ``reference/SUMMARY.md``
  (mkdocs-literate-nav).
- ``figures/``: the committed figures (``figures/*.png`` and the interactive ``*.html``), so the study pages
  can show and link them.

Nothing here imports mechintro: griffe reads the sources, as mkdocstrings does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import griffe
import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from docs_roles import SphinxRoles  # noqa: E402  (tools/ is not a package)

PACKAGE = ROOT / "mechintro"
FIGURES = ROOT / "figures"
# The layer order, lowest first (ARCHITECTURE.md; tests/test_layers.py checks it). A sub-package that is not
# named here still gets its pages, after these.
LAYERS = ("core", "behaviour", "mechanism", "attribution", "studies", "organism", "plots", "cli")


def module_names(root: Path = PACKAGE) -> list[str]:
    """Dotted names of the package's documented modules: every ``.py`` under ``root`` except package data,
    ``__main__`` and private modules (a leading underscore)."""
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if "data" in parts[1:2] or parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts):
            continue
        names.append(".".join(parts))
    return names


def group_of(name: str) -> str:
    """The layer a module belongs to: its first sub-package (``core`` for ``mechintro.core.models``), or the
    module itself for a top-level module such as ``mechintro.testing``."""
    return name.split(".")[1]


def group_order(groups: set[str]) -> list[str]:
    """Known layers in layer order, then any other groups (``testing``, new ones) alphabetically."""
    return [g for g in LAYERS if g in groups] + sorted(groups - set(LAYERS))


def page_of(name: str, packages: set[str]) -> str:
    """``mechintro.core.models`` -> ``core/models.md``; a package -> its ``index.md``."""
    parts = name.split(".")[1:]
    return "/".join(parts + ["index"] if name in packages else parts) + ".md"


def first_line(obj: griffe.Object | griffe.Alias) -> str:
    """The first line of an object's docstring, for the public-API table (pipes escaped)."""
    docstring = obj.docstring.value if obj.docstring else ""
    line = docstring.strip().split("\n\n")[0].replace("\n", " ")
    return line.replace("|", "\\|")


def public_api(package: griffe.Module) -> str:
    """The reference's front page: each name of ``mechintro.__all__`` with a link to its definition."""
    names = [n for n in (package.exports or []) if isinstance(n, str)]
    rows = []
    for name in sorted(names, key=str.lower):
        target = package[name].final_target if package[name].is_alias else package[name]
        module = target.module.path
        # objects with a docstring get their own anchor on their module's page; others link the module
        link = target.path if target.docstring else module
        where = f"(in [`{module}`][{module}])"
        rows.append(f"| [`mi.{name}`][{link}] | {' '.join(filter(None, [first_line(target), where]))} |")
    intro = (package.docstring.value.split("\n\n")[0] + "\n\n") if package.docstring else ""
    return (
        "# Public API\n\n"
        + intro
        + "`import mechintro as mi` gives these names (`mechintro.__all__`); their import path stays stable "
        "when modules move. Each links to its documentation on its module's page; the modules are listed by "
        "layer in the navigation.\n\n"
        "| name | what it is |\n|---|---|\n" + "\n".join(rows) + "\n"
    )


def write_reference() -> None:
    """One page per module (``::: dotted.name``), the public API page and the navigation."""
    names = module_names()
    packages = {n for n in names if (ROOT / Path(*n.split("."))).is_dir()}
    pages = {name: page_of(name, packages) for name in names if name != "mechintro"}
    for name, page in pages.items():
        with mkdocs_gen_files.open(f"reference/{page}", "w") as f:
            f.write(f"::: {name}\n")  # the module's own heading is the page's title
    package = griffe.load(
        "mechintro",
        search_paths=[str(ROOT)],
        docstring_parser="google",
        extensions=griffe.load_extensions(SphinxRoles),
    )
    with mkdocs_gen_files.open("reference/index.md", "w") as f:
        f.write(public_api(package))
    nav = ["* [Public API](index.md)"]
    for group in group_order({group_of(n) for n in pages}):
        members = [n for n in pages if group_of(n) == group]
        if members == [f"mechintro.{group}"] and f"mechintro.{group}" not in packages:
            nav.append(f"* [{group}]({pages[members[0]]})")  # a top-level module: one page, no section
            continue
        nav.append(f"* {group}")
        for name in members:
            label = "overview" if name == f"mechintro.{group}" else name.split(".", 2)[2]
            nav.append(f"    * [{label}]({pages[name]})")
    with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as f:
        f.write("\n".join(nav) + "\n")


def write_figures() -> None:
    """Copy the committed figures into the site (``figures/NAME.png``, ``figures/NAME.html``)."""
    for path in sorted(FIGURES.glob("*")):
        if path.suffix in {".png", ".html"}:
            with mkdocs_gen_files.open(f"figures/{path.name}", "wb") as f:
                f.write(path.read_bytes())


write_reference()
write_figures()
