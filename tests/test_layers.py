"""The package's layers: every import between mechintro's modules, including imports inside functions, points
down the layer order, and no chain of imports comes back to where it started.

The layer order, lowest first, is ``core``, ``behaviour``, ``mechanism``, ``attribution``, ``studies``,
``organism``, ``plots``, ``cli``; the package's ``__init__`` (the public API) sits on top. ``testing.py`` is
for tests and users: no module of the library imports it.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

import mechintro

PACKAGE = Path(mechintro.__file__).resolve().parent
LAYERS = ("core", "behaviour", "mechanism", "attribution", "studies", "organism", "plots", "cli")


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (package data left out)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if "data" in parts[1:2]:
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``target`` that is a module of the package."""
    while target not in modules and "." in target:
        target = target.rsplit(".", 1)[0]
    return target if target in modules else None


def imports_of(name: str, source: str, modules: dict[str, Path], *, is_package: bool) -> set[str]:
    """The package's modules that ``source`` (module ``name``) imports anywhere: at the top, inside functions
    and classes, and through ``importlib.import_module("mechintro...")`` with a literal name."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import sub`` imports the submodule when there is one, else a name of ``pkg``
            targets = [
                f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names
            ]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            targets = [node.args[0].value]
        for target in targets:
            if target.split(".")[0] == "mechintro":
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != name:
                    found.add(resolved)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in its source)."""
    modules = module_files(root)
    return {
        name: imports_of(name, path.read_text(), modules, is_package=path.name == "__init__.py")
        for name, path in modules.items()
    }


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted: the circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(name: str) -> int | None:
    """The rank of a module's layer (0 = core); the package itself ranks above every layer; ``None`` for
    ``testing`` (outside the order) and the top-level helper modules."""
    parts = name.split(".")
    if len(parts) == 1:
        return len(LAYERS)
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every import of a module ``b`` of a higher layer than ``a``'s, or of ``testing``."""
    bad = []
    for a, targets in graph.items():
        for b in sorted(targets):
            if b == "mechintro.testing" and a != "mechintro.testing":
                bad.append(f"{a} -> {b} (the library never imports testing.py)")
            elif b.startswith(a + ".") or a == "mechintro.testing":
                continue  # a package's __init__ re-exporting its own modules; testing may use any layer
            elif (la := layer_of(a)) is not None and (lb := layer_of(b)) is not None and lb > la:
                bad.append(f"{a} -> {b} ({LAYERS[la]} below {LAYERS[lb] if lb < len(LAYERS) else 'the API'})")
    return bad


def test_every_module_is_in_a_layer():
    """No module sits loose at the top of the package: only the API, ``testing`` and the layers' folders."""
    loose = [n for n in module_files() if layer_of(n) is None and n != "mechintro.testing"]
    assert loose == []


def test_the_package_has_no_import_circles():
    assert circles(import_graph()) == []


def test_no_layer_imports_an_upper_one():
    assert upward_imports(import_graph()) == []


# ------------------------------------------------------------------------ the checker checks what it claims


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "mechintro" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "mechintro"


@pytest.fixture
def planted(tmp_path):
    """A small package with a circle hidden in a function body and an upward import, both deferred."""
    return _write(
        tmp_path,
        {
            "__init__.py": "from mechintro.core.a import f\n",
            "core/__init__.py": "",
            "core/a.py": "def f():\n    from mechintro.behaviour import b\n    return b\n",
            "behaviour/__init__.py": "",
            "behaviour/b.py": "from mechintro.core.a import f\n",
            "behaviour/c.py": (
                "from . import b\nimport importlib\nimportlib.import_module('mechintro.testing')\n"
            ),
            "testing.py": "",
        },
    )


def test_a_deferred_circle_and_upward_import_are_found(planted):
    graph = import_graph(planted)
    assert graph["mechintro.core.a"] == {"mechintro.behaviour.b"}
    assert graph["mechintro.behaviour.c"] == {"mechintro.behaviour.b", "mechintro.testing"}
    assert circles(graph) == [["mechintro.behaviour.b", "mechintro.core.a"]]
    bad = upward_imports(graph)
    assert any(b.startswith("mechintro.core.a -> mechintro.behaviour.b") for b in bad)
    assert any("testing" in b for b in bad)
