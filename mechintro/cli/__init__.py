"""The ``mechintro`` command: dispatch (:mod:`~mechintro.cli.main`), what each subcommand does
(:mod:`~mechintro.cli.commands`), and what the command and the ``analyses/`` scripts share
(:mod:`~mechintro.cli.setup` and the per-study helpers)."""

from mechintro.cli.main import main

__all__ = ["main"]
