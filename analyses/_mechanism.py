"""Shared setup of the mechanism figure scripts: options, model, transcoders, concept vectors, behaviour.

``--model tiny`` is a random tiny Gemma 3 with random transcoders, for smoke tests: its injection layer is
moved to 1 (of 4) so that carriers (layer 2) can sit between the injection and a gate (layer 3).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mechintro import cli
from mechintro.concepts import concept_vectors
from mechintro.features import FeatureGrid, concept_rates, feature_grid, find_gates
from mechintro.models import ModelSpec, spec_for, with_spec
from mechintro.transcoders import load_transcoders

TINY_INJECTION_LAYER = 1


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The run options of :mod:`mechintro.cli` plus ``--layer``, ``--out`` and ``--k``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_run_options(p)
    p.add_argument("--layer", type=int, default=None, help="injection layer (default: the model's)")
    p.add_argument("--k", type=int, default=200, help="number of gate candidates (default 200)")
    p.add_argument("--out", default="figures", help="output folder")
    p.set_defaults(store=cli.DEFAULT_STORE, forced=True, threads=1)
    return p


def tiny_transcoders_folder() -> Path:
    """A fixed folder of random transcoders for the tiny model (seed 0), created on first use."""
    from mechintro.testing import save_random_transcoders

    folder = Path(tempfile.gettempdir()) / "mechintro-tiny-transcoders"
    if not (folder / "layer_3" / "params.safetensors").exists():
        staging = Path(tempfile.mkdtemp(prefix="mechintro-tiny-tc-"))
        save_random_transcoders(staging)
        try:
            os.rename(staging, folder)
        except OSError:  # another process won the race
            pass
    return folder


@dataclass
class Setup:
    """Everything a mechanism script needs."""

    args: argparse.Namespace
    model: Any
    spec: ModelSpec
    transcoders: dict[int, Any]
    concepts: list[str]
    vectors: torch.Tensor


def load(args: argparse.Namespace, *, model_name: str | None = None) -> Setup:
    """Model (``--model`` or ``model_name``), its transcoders, the concepts and their vectors."""
    if args.threads:
        torch.set_num_threads(args.threads)
    name = model_name or args.model
    model = cli.load_cli_model(name, device=args.device)
    layer = args.layer if args.layer is not None else (TINY_INJECTION_LAYER if name == cli.TINY else None)
    if layer is not None:
        with_spec(model, injection_layer=layer)
    source = tiny_transcoders_folder() if name == cli.TINY else None
    transcoders = load_transcoders(model, source=source)
    spec = spec_for(model)
    concepts = cli.parse_concepts(args.concepts)
    vectors = concept_vectors(model, concepts, layer=spec.injection_layer)
    return Setup(args, model, spec, transcoders, concepts, vectors)


def behaviour(s: Setup) -> pd.DataFrame:
    """Per-concept detection and forced-identification rates at the injection layer and default strength,
    from trials in the store (run now if missing; the store resumes)."""
    from mechintro.trials import run_trials

    judge = cli.parse_judge(s.args.judge)
    df = run_trials(
        s.model,
        s.concepts,
        layer=s.spec.injection_layer,
        strength=s.spec.strength,
        judge=judge,
        vectors=s.vectors,
        **cli.run_settings(s.args),
    )
    return concept_rates(df)


def grid_and_gates(s: Setup, rates: pd.DataFrame | None) -> tuple[FeatureGrid, pd.DataFrame]:
    """The (concept x strength) feature grid and the ranked gate candidates."""
    grid = feature_grid(s.model, s.transcoders, s.concepts, vectors=s.vectors, batch_size=s.args.batch_size)
    gates = find_gates(s.model, s.transcoders, grid, behaviour=rates, k=s.args.k)
    if gates.empty:
        raise SystemExit("no gate candidates (no feature after the injection layer promotes 'No')")
    return grid, gates


def carrier_behaviour(rates: pd.DataFrame) -> pd.DataFrame | None:
    """The rates, or None (carrier criteria without behaviour) when detection does not vary across
    concepts."""
    varies = (
        rates["detection_rate"].nunique(dropna=True) > 1 and rates["forced_id_rate"].nunique(dropna=True) > 1
    )
    if not varies:
        print(
            "note: detection or forced identification does not vary across concepts; carriers are selected "
            "without the behaviour-correlation criteria"
        )
    return rates if varies else None


def save(fig: Any, name: str, out: str, tables: Sequence[tuple[str, pd.DataFrame]] = ()) -> None:
    """Save the figure (HTML and PNG) and any tables (CSV) under ``out``; print the paths."""
    from mechintro.plots import save_figure

    for path in save_figure(fig, name, out):
        print(path)
    for table_name, table in tables:
        path = Path(out) / f"{table_name}.csv"
        table.to_csv(path, index=False)
        print(path)
