"""A griffe extension for the documentation site (mkdocs.yml loads it): the docstrings' Sphinx roles
(``:func:`run_trials```, ``:class:`~mechintro.behaviour.store.TrialStore```, ...) become code spans that link
to their target's documentation.

A role's target is resolved in the scope of the object whose docstring holds it (a bare ``Trial`` in
``mechintro.behaviour.trials`` is that module's ``Trial``), and an imported name is followed to where it is
defined. The links are optional cross-references: a target the site does not document (a private helper, a
name of another library) is shown as code without a link, and never fails the build; broken links between
pages and unresolved references written in the pages still do.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc|const):`(~?)([^`<>\s]+)`")


def objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    """``obj`` and every object defined under it (aliases left out: their docstrings are their targets')."""
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from objects(member)


def canonical(path: str, collection: griffe.ModulesCollection) -> str:
    """Where ``path`` is defined: an imported name's target, else ``path`` itself."""
    try:
        found = collection[path]
        return found.final_target.path if found.is_alias else found.path
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return path


def target_path(obj: griffe.Object, target: str) -> str:
    """The full path of a role's ``target`` as written in ``obj``'s docstring."""
    target = target.removesuffix("()")
    if target.split(".")[0] == obj.package.name:
        return canonical(target, obj.modules_collection)
    first, _, rest = target.partition(".")
    scope = obj if obj.is_class or obj.is_module else obj.parent
    try:
        base = scope.resolve(first) if scope is not None else first
    except griffe.NameResolutionError:
        return target
    return canonical(f"{base}.{rest}" if rest else base, obj.modules_collection)


def rewrite(obj: griffe.Object, text: str) -> str:
    """``text`` with every Sphinx role replaced by an optional cross-reference rendered as code."""

    def one(match: re.Match[str]) -> str:
        tilde, target = match.groups()
        shown = target.rsplit(".", 1)[-1] if tilde else target
        return f'<autoref identifier="{target_path(obj, target)}" optional>`{shown}`</autoref>'

    return ROLE.sub(one, text)


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of every docstring of a package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj, obj.docstring.value)
