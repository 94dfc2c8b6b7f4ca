"""What the ``mechintro`` command and the ``analyses/`` scripts share: their options, parsing them, checking
them before any model is loaded, setting up the model, transcoders, concepts and store, and the feature grid
and gates that the mechanism scripts compute once and cache.

Defaults come from :mod:`mechintro.core.settings` (sampling, batching, trials) and from the model's
:class:`~mechintro.core.models.ModelSpec` (layer, strength).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mechintro.behaviour.executors import RayExecutor, resolve_executor
from mechintro.behaviour.judges import check_judge
from mechintro.behaviour.plan import RunConfig
from mechintro.behaviour.store import TrialStore
from mechintro.cli.options import (
    add_config_arguments,
    config_from_args,
    finite_float,
    float_list,
    int_list,
    name_list,
    non_negative_int,
    positive_float,
    positive_int,
    strength_arg,
)
from mechintro.core.models import Model, ModelSpec, Transcoders
from mechintro.core.settings import TRIALS

__all__ = [
    "CONCEPT_SETS",
    "DEFAULT_CONCEPTS",
    "DEFAULT_JUDGE",
    "DEFAULT_MODEL",
    "DEFAULT_STORE",
    "JUDGE_CHOICES",
    "RUN_FIELDS",
    "TINY",
    "FIGURE_FORMATS",
    "GRID_PREFIX",
    "Setup",
    "add_run_options",
    "add_setup_options",
    "analyses_dir",
    "behaviour",
    "add_carrier_options",
    "carrier_behaviour",
    "check_model_options",
    "check_run_options",
    "executor_from_args",
    "find_carriers",
    "finite_float",
    "float_list",
    "format_metrics",
    "grid_and_gates",
    "grid_config",
    "int_list",
    "load_named_model",
    "load_setup",
    "mechanism_parser",
    "name_list",
    "non_negative_int",
    "parse_concepts",
    "parse_judge",
    "positive_float",
    "positive_int",
    "prepare",
    "prepare_run",
    "run_script",
    "run_settings",
    "save",
    "strength_arg",
]

CONCEPT_SETS = ("original", "new", "all", "training", "held-out", "baseline")
JUDGE_CHOICES = ("rule", "logit", "llm:<model>", "openai:<model>", "anthropic:<model>")
DEFAULT_MODEL = "organism"
"""``--model``'s default: the embedded model organism."""
DEFAULT_CONCEPTS = "held-out"
"""``--concepts``' default: the organism's held-out concepts."""
DEFAULT_JUDGE = "rule"
"""``--judge``'s default: the rule judge (no API key)."""
DEFAULT_STORE = "runs/trials.sqlite"
"""Where the analyses scripts keep their trials, and where ``mechintro figures`` reads them."""
TINY = "tiny"
"""``--model tiny``: a random tiny Gemma 3 (mechintro.organism.tiny), for smoke tests and benchmarks."""
TINY_INJECTION_LAYER = 1
"""The tiny model's injection layer in the mechanism scripts: 1 of 4, so carriers (layer 2) can sit between
the injection and a gate (layer 3)."""


# ----------------------------------------------------------------------------------------------- parsing


def parse_concepts(text: str) -> list[str]:
    """A concept-set name (original, new, all, training, held-out, baseline), optionally ``name:N`` for its
    first N concepts, or a comma-separated list."""
    from mechintro.core.concepts import all_concepts, baseline_words, concept_set

    name, _, count = text.partition(":")
    if name in CONCEPT_SETS and (not count or count.isdigit()):
        words = concept_set(name)
        return words[: int(count)] if count else words
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words or ("," not in text and words[0] not in {*all_concepts(), *baseline_words()}):
        raise ValueError(
            f"--concepts {text!r} is neither a concept set {list(CONCEPT_SETS)} (optionally name:N) nor a "
            "comma-separated list of concepts (a single word must be one of the 500 concepts or the baseline "
            "words)"
        )
    return words


def parse_judge(text: str) -> Any:
    """A judge from ``rule``, ``logit``, ``llm:<model>`` / ``openai:<model>`` or ``anthropic:<model>``.

    LLM judges read their API key from OPENAI_API_KEY / ANTHROPIC_API_KEY and fail here without one.
    """
    from mechintro.behaviour.judges import LLMJudge, LogitJudge, RuleJudge

    kind, _, model = text.partition(":")
    if text == "rule":
        return RuleJudge()
    if text == "logit":
        return LogitJudge()
    backend = {"llm": "openai", "openai": "openai", "anthropic": "anthropic"}.get(kind)
    if backend is None or (":" in text and not model):
        raise ValueError(f"unknown judge {text!r}; valid: {', '.join(JUDGE_CHOICES)}")
    return LLMJudge(backend=backend, model=model or None)


# ----------------------------------------------------------------------------------------------- options


RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in ("controls", "trials"))
"""The :class:`~mechintro.behaviour.plan.RunConfig` fields every trial-running command has a flag for (the
trial numbers and controls keep their defaults on the command line)."""


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of every command that runs trials (also used by the analyses scripts): what to run on
    (model, concepts, judge, store, device, threads, Ray) and the flags of the shared trial settings,
    derived from :class:`~mechintro.behaviour.plan.RunConfig`'s fields (:mod:`mechintro.cli.options`)."""
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="organism, organism-base, organism-olmo, organism-olmo-base, an HF id, a local folder, or "
        "'tiny' (random, for smoke tests)",
    )
    p.add_argument(
        "--concepts",
        default=DEFAULT_CONCEPTS,
        help=f"a concept set {list(CONCEPT_SETS)} (name:N for the first N) or a comma-separated list",
    )
    p.add_argument(
        "--judge", default=DEFAULT_JUDGE, help=f"one of {', '.join(JUDGE_CHOICES)} (default {DEFAULT_JUDGE})"
    )
    p.add_argument("--store", default=None, help="SQLite trial store (resumable); default: none")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    add_config_arguments(p, RunConfig, only=RUN_FIELDS, defaults={"n_trials": TRIALS.n_trials})
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the batches on Ray actors (this process stays the store's one writer): a cluster address "
        "('auto', 'ray://head:10001'), or none for ray.init's default (RAY_ADDRESS, else a local instance)",
    )
    p.add_argument(
        "--ray-actors", type=positive_int, default=None, help="number of Ray actors (default: what fits)"
    )


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword settings of run_trials / sweep given by the run options: the flagged
    :class:`~mechintro.behaviour.plan.RunConfig` fields (checked by building the config), the store and the
    executor."""
    config = config_from_args(RunConfig, args, only=RUN_FIELDS)
    return {name: getattr(config, name) for name in RUN_FIELDS} | {
        "store": args.store,
        "executor": executor_from_args(args),
    }


def executor_from_args(args: argparse.Namespace) -> Any:
    """``--ray [ADDRESS]`` / ``--ray-actors N`` -> a RayExecutor; without ``--ray``, ``"local"``."""
    address = getattr(args, "ray", None)
    if address is None:
        if getattr(args, "ray_actors", None) is not None:
            raise ValueError("--ray-actors needs --ray")
        return "local"
    executor = RayExecutor(address=address or None, num_actors=getattr(args, "ray_actors", None))
    return resolve_executor(executor)


def _check_device(device: str | None) -> None:
    if device is None or device == "cpu":
        return
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine; valid here: cpu")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ValueError(
                f"--device {device}: valid CUDA devices are cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
        return
    if (
        device == "mps"
        and getattr(torch.backends, "mps", None) is not None
        and torch.backends.mps.is_available()
    ):
        return
    raise ValueError(f"unknown --device {device!r}; valid: cpu, cuda, cuda:N")


def _option_values(args: argparse.Namespace, name: str) -> list[Any]:
    """The values of ``--name`` and ``--names`` that ``args`` carries (None left out)."""
    values = [getattr(args, name, None), *(getattr(args, name + "s", None) or [])]
    return [v for v in values if v is not None]


def check_run_options(args: argparse.Namespace) -> None:
    """Check the options that do not need the model, before it is loaded: device, layers against the model's
    config, strengths, variants, personas, the store file (:func:`check_model_options`)."""
    check_model_options(
        args.model,
        device=getattr(args, "device", None),
        layers=_option_values(args, "layer"),
        strengths=_option_values(args, "strength"),
        variants=_option_values(args, "variant"),
        personas=_option_values(args, "persona"),
        store=getattr(args, "store", None),
    )


def check_model_options(
    model: str,
    *,
    device: str | None = None,
    layers: Sequence[int] = (),
    strengths: Sequence[float | str] = (),
    variants: Sequence[str] = (),
    personas: Sequence[str] = (),
    store: str | Path | None = None,
) -> None:
    """Check run settings against the model named ``model`` without loading it (its config and recorded
    operating points are read from disk): device, layers, strengths, variants, personas, the store file."""
    from mechintro.core.models import peek_n_layers, peek_operating_points
    from mechintro.core.prompts import PERSONAS, VARIANTS
    from mechintro.core.settings import check_choices

    _check_device(device)
    n_layers = peek_n_layers(tiny_model_folder() if model == TINY else model)
    for layer in layers:
        if n_layers is not None and not 0 <= layer < n_layers:
            raise ValueError(f"--layer {layer} does not exist in {model}: valid layers are 0..{n_layers - 1}")
    points = peek_operating_points(tiny_model_folder() if model == TINY else model) or {"default": None}
    for strength in strengths:
        if isinstance(strength, str):
            if strength not in points:
                raise ValueError(f"unknown operating point {strength!r} of {model}; valid: {sorted(points)}")
        elif not math.isfinite(strength):
            raise ValueError(f"strength must be a finite number, got {strength}")
    for value in variants:
        check_choices("prompt variant", value, VARIANTS)
    for value in personas:
        check_choices("persona", value, PERSONAS)
    if store:
        with TrialStore(store):  # a corrupt or foreign file fails here, naming the file
            pass


def prepare_run(args: argparse.Namespace) -> tuple[Any, list[str], Any, Any]:
    """(judge, concepts, model, spec) from the run options. Everything that can be checked without the model
    (the judge and its API key, concepts, device, layers, strengths, variants, the store, Ray) is checked
    first."""
    executor_from_args(args)  # --ray without Ray installed, or --ray-actors alone, fails before the model
    return prepare(
        model=args.model,
        judge=args.judge,
        concepts=args.concepts,
        device=args.device,
        threads=args.threads,
        check=lambda: check_run_options(args),
    )


def prepare(
    *,
    model: str = DEFAULT_MODEL,
    judge: str = DEFAULT_JUDGE,
    concepts: str = DEFAULT_CONCEPTS,
    device: str | None = None,
    threads: int | None = None,
    check: Callable[[], None] | None = None,
) -> tuple[Any, list[str], Any, Any]:
    """(judge, concepts, model, spec) from the run options' values: torch's threads set, the judge parsed and
    checked (its API key), the concepts parsed, ``check()`` run (the other settings), and only then the model
    loaded."""
    from mechintro.core.models import spec_for

    if threads:
        torch.set_num_threads(threads)
    parsed = parse_judge(judge)
    check_judge(parsed)
    words = parse_concepts(concepts)
    if check is not None:
        check()
    loaded = load_named_model(model, device=device)
    return parsed, words, loaded, spec_for(loaded)


def format_metrics(metrics: pd.DataFrame, *, by: Sequence[str]) -> str:
    """A plain-text table: the group columns, counts, and each rate as ``0.42 [0.33, 0.51]``."""

    def rate(row: Any, name: str) -> str:
        if math.isnan(row[name]):
            return "-"
        return f"{row[name]:.2f} [{row[name + '_lo']:.2f}, {row[name + '_hi']:.2f}]"

    table = metrics[[*by, "n_injection", "n_control", "n_forced", "n_errors"]].copy()
    for name in ("tpr", "fpr", "introspection", "forced_id"):
        table[name] = [rate(row, name) for _, row in metrics.iterrows()]
    return table.to_string(index=False)


# ----------------------------------------------------------------------------------------------- models


def _fixed_folder(name: str, make: Any) -> Path:
    """A fixed folder in the temp dir, created once (atomically: a race leaves one winner)."""
    folder = Path(tempfile.gettempdir()) / name
    if not folder.exists():
        staging = Path(tempfile.mkdtemp(prefix=name + "-"))
        make(staging)
        try:
            os.rename(staging, folder)
        except OSError:  # another process won the race
            pass
    return folder


def tiny_model_folder() -> Path:
    """A fixed folder holding the random tiny Gemma 3 (seed 0), created on first use."""
    from mechintro.organism.tiny import save_tiny_gemma3

    return _fixed_folder("mechintro-tiny-gemma3", save_tiny_gemma3)


def named_transcoders(model: Any, name: str) -> Any:
    """The transcoders of the model named ``name`` on the command line: the shared random ones for
    ``--model tiny``, else the model's own (:func:`mechintro.core.transcoders.load_transcoders`)."""
    from mechintro.core.transcoders import load_transcoders

    return load_transcoders(model, source=tiny_transcoders_folder() if name == TINY else None)


def named_model_and_transcoders(name: str, *, device: str | None = None) -> tuple[Any, Any]:
    """``(model, transcoders)`` for a ``--model`` name; the tiny model gets the tiny injection layer, as the
    scripts' setup gives it."""
    from mechintro.core.models import with_spec

    model = load_named_model(name, device=device)
    if name == TINY:
        with_spec(model, injection_layer=TINY_INJECTION_LAYER)
    return model, named_transcoders(model, name)


def tiny_transcoders_folder() -> Path:
    """A fixed folder of random transcoders for the tiny model (seed 0), created on first use."""
    from mechintro.organism.tiny import save_random_transcoders

    return _fixed_folder("mechintro-tiny-transcoders", save_random_transcoders)


def load_named_model(name: str, *, device: str | None = None) -> Any:
    """``load_model(name)``; ``"tiny"`` is a random tiny Gemma 3 saved once in the temp folder."""
    from mechintro.core.models import load_model

    return load_model(tiny_model_folder() if name == TINY else name, device=device)


# ----------------------------------------------------------------------------------------------- scripts


def analyses_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "analyses"


def run_script(name: str, argv: Sequence[str]) -> None:
    """Run ``analyses/<name>`` as ``__main__`` with ``argv``."""
    import runpy

    path = analyses_dir() / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the analyses/ scripts come with the repository checkout")
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv, sys.path[:0] = [str(path), *argv], [str(path.parent)]
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def mechanism_parser(doc: str | None) -> argparse.ArgumentParser:
    """The run options plus ``--layer``, ``--strength``, ``--k``, ``--out``, ``--cache`` and the feature
    grid's flags (derived from :class:`~mechintro.mechanism.features.FeatureGridConfig`), for the mechanism
    scripts."""
    from mechintro.cli.options import add_config_arguments
    from mechintro.mechanism.features import FeatureGridConfig

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p)
    add_setup_options(p)
    p.add_argument("--k", type=positive_int, default=200, help="number of gate candidates (default 200)")
    p.add_argument("--out", default="figures", help="output folder")
    p.add_argument(
        "--cache",
        default="runs/cache",
        help="folder of the cached feature grid and gates (computed once, reused by every script)",
    )
    grid = p.add_argument_group("feature grid (computed once per setting and cached)")
    add_config_arguments(grid, FeatureGridConfig, prefix=GRID_PREFIX)
    p.set_defaults(store=DEFAULT_STORE, forced=True, threads=1)
    return p


GRID_PREFIX = "grid_"
"""Where the feature grid's flags write in the parsed namespace (``args.grid_strengths``...), apart from any
script's own options."""


def add_setup_options(p: argparse.ArgumentParser) -> None:
    """``--layer`` and ``--strength``: the model's injection layer and default strength for the whole script
    (:func:`load_setup` records them in the model's spec)."""
    p.add_argument("--layer", type=int, default=None, help="injection layer (default: the model's)")
    p.add_argument(
        "--strength",
        type=strength_arg,
        default=None,
        help="strength or operating point (default: the model's)",
    )


def grid_config(s: Setup) -> Any:
    """The :class:`~mechintro.mechanism.features.FeatureGridConfig` of the grid flags, at the setup's
    injection layer and default strength, with ``--batch-size`` rows per forward."""
    from mechintro.cli.options import config_from_args
    from mechintro.mechanism.features import FeatureGridConfig

    return config_from_args(
        FeatureGridConfig,
        s.args,
        prefix=GRID_PREFIX,
        injection_layer=s.layer,
        default_strength=s.strength,
        batch_size=s.args.batch_size,
    )


@dataclass
class Setup:
    """Everything a figure script needs: the parsed options, the model and its spec (with ``--layer`` and
    ``--strength`` recorded), the concepts, their vectors at the injection layer, and the transcoders."""

    args: argparse.Namespace
    """The parsed options."""
    model: Model
    """The model (``--model``)."""
    spec: ModelSpec
    """Its spec, with the script's injection layer and default strength."""
    concepts: list[str]
    """The concepts (``--concepts``)."""
    vectors: torch.Tensor
    """Their vectors at the injection layer, ``[concept, d_model]``."""
    transcoders: Transcoders | None = None
    """The model's transcoders (None when the script does not load them)."""

    @property
    def layer(self) -> int:
        """The injection layer."""
        return self.spec.injection_layer

    @property
    def strength(self) -> float:
        """The default strength."""
        return self.spec.strength


def load_setup(args: argparse.Namespace, *, model_name: str | None = None, transcoders: bool = True) -> Setup:
    """Model (``--model`` or ``model_name``) with ``--layer`` and ``--strength`` recorded in its spec, its
    transcoders (unless ``transcoders=False``), the concepts and their vectors at the injection layer."""
    from mechintro.core.concepts import concept_vectors
    from mechintro.core.models import spec_for, with_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    name = model_name or args.model
    concepts = parse_concepts(args.concepts)
    check_run_options(args)
    model = load_named_model(name, device=args.device)
    layer = args.layer if args.layer is not None else (TINY_INJECTION_LAYER if name == TINY else None)
    strength = None if args.strength is None else spec_for(model).resolve_strength(args.strength)
    changes = {k: v for k, v in (("injection_layer", layer), ("strength", strength)) if v is not None}
    if changes:
        with_spec(model, **changes)
    tcs = named_transcoders(model, name) if transcoders else None
    spec = spec_for(model)
    if not spec.calibrated and not changes:
        print(f"note: {spec.describe()}", file=sys.stderr)
    vectors = concept_vectors(model, concepts, layer=spec.injection_layer)
    return Setup(args=args, model=model, spec=spec, concepts=concepts, vectors=vectors, transcoders=tcs)


def behaviour(s: Setup) -> pd.DataFrame:
    """Per-concept detection and forced-identification rates at the injection layer and default strength,
    from trials in the store (run now if missing; the store resumes)."""
    from mechintro.behaviour.trials import run_trials
    from mechintro.mechanism.features import concept_rates

    judge = parse_judge(s.args.judge)
    df = run_trials(
        s.model,
        s.concepts,
        layer=s.spec.injection_layer,
        strength=s.spec.strength,
        judge=judge,
        vectors=s.vectors,
        **run_settings(s.args),
    )
    return concept_rates(df)


def _cache_key(s: Setup, rates: pd.DataFrame | None, grid: Any) -> str:
    """What the grid and gates depend on: the model's weights, concepts, layer, strength, k, the rates and
    the grid's settings."""
    from mechintro.core.fingerprint import weights_fingerprint

    ident = {
        "grid": {k: v for k, v in asdict(grid).items() if k != "batch_size"},
        "model": s.spec.name,
        "fingerprint": weights_fingerprint(s.model),
        "concepts": s.concepts,
        "injection_layer": s.spec.injection_layer,
        "strength": s.spec.strength,
        "k": s.args.k,
        "rates": None if rates is None else rates.round(12).to_json(orient="split"),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def grid_and_gates(s: Setup, rates: pd.DataFrame | None) -> tuple[Any, pd.DataFrame]:
    """The (concept x strength) feature grid and the ranked gate candidates, computed once and cached as
    parquet under ``--cache`` (keyed by everything they depend on), so every mechanism script reads the
    same."""
    from mechintro.mechanism.features import feature_grid, find_gates, grid_from_frame

    cache = Path(s.args.cache) if getattr(s.args, "cache", None) else None
    config = grid_config(s)
    key = _cache_key(s, rates, config)
    grid_path = cache / f"feature_grid-{key}.parquet" if cache else None
    gates_path = cache / f"gates-{key}.parquet" if cache else None
    if grid_path is not None and grid_path.exists() and gates_path.exists():
        frame = pd.read_parquet(grid_path)
        meta = json.loads((cache / f"feature_grid-{key}.json").read_text())
        print(f"feature grid and gates from the cache ({grid_path})")
        return grid_from_frame(frame, **meta), pd.read_parquet(gates_path)
    grid = feature_grid(
        s.model, s.transcoders, s.concepts, vectors=s.vectors, config=config, progress=not s.args.quiet
    )
    gates = find_gates(s.model, s.transcoders, grid, behaviour=rates, k=s.args.k)
    if gates.empty:
        raise SystemExit("no gate candidates (no feature after the injection layer promotes 'No')")
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        frame = grid.to_frame()
        (cache / f"feature_grid-{key}.json").write_text(json.dumps(frame.attrs, default=str))
        frame.attrs = {}
        frame.to_parquet(grid_path, index=False)
        gates.to_parquet(gates_path, index=False)
    return grid, gates


def add_carrier_options(p: argparse.ArgumentParser) -> None:
    """``--gate`` and how carriers are found (the scripts that find a gate's evidence carriers share
    these)."""
    p.add_argument("--gate", default=None, help="e.g. 'L45 F1234' (default: the top gate)")
    p.add_argument(
        "--carrier-concept",
        default=None,
        help="find carriers for this one concept (the paper's per-(gate, concept) carriers); default: pooled",
    )
    p.add_argument(
        "--criteria",
        choices=["dose_behaviour", "sign"],
        default="dose_behaviour",
        help="carrier criteria: dose and behaviour filters (default) or the attribution sign alone (paper)",
    )
    p.add_argument("--correlation", choices=["spearman", "pearson"], default="spearman")


def find_carriers(s: Setup, grid: Any, gates: pd.DataFrame, rates: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """(the gate, its evidence carriers and suppressors) as the carrier options ask."""
    from mechintro.mechanism.features import find_evidence_carriers

    gate = s.args.gate or gates["feature"].iloc[0]
    carriers = find_evidence_carriers(
        s.model,
        s.transcoders,
        grid,
        gate,
        behaviour=carrier_behaviour(rates),
        concept=s.args.carrier_concept,
        criteria=s.args.criteria,
        correlation=s.args.correlation,
    )
    return gate, carriers


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


FIGURE_FORMATS = ("html", "png")
"""The figure formats :func:`save` writes by default."""


def save(
    fig: Any,
    name: str,
    out: str | Path,
    tables: Sequence[tuple[str, pd.DataFrame]] = (),
    *,
    formats: Sequence[str] = FIGURE_FORMATS,
    offline: bool = False,
) -> None:
    """Save the figure as ``<out>/<name>.<format>`` (PNG when a browser is available; ``offline`` writes
    plotly.js beside the HTML) and each ``(table_name, table)`` as ``<out>/<table_name>.csv`` (no index);
    print every path. ``fig=None`` saves the tables alone. Every script saves through this one function."""
    from mechintro.plots.save import save_figure

    if fig is not None:
        for path in save_figure(fig, name, out, formats=formats, offline=offline):
            print(path)
    Path(out).mkdir(parents=True, exist_ok=True)
    for table_name, table in tables:
        path = Path(out) / f"{table_name}.csv"
        table.to_csv(path, index=False)
        print(path)
