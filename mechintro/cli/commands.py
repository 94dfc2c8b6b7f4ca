"""What each ``mechintro`` subcommand does (:mod:`mechintro.cli.main` only parses and dispatches).

Every command function takes the parsed ``argparse.Namespace`` and returns an exit status. The trial commands
build their config from the flags (:class:`~mechintro.behaviour.plan.TrialConfig`,
:class:`~mechintro.behaviour.plan.SweepConfig`), and ``reproduce`` calls the same :func:`run_evaluation` as
``evaluate`` with a config of its own.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mechintro.behaviour.plan import SweepConfig, TrialConfig
from mechintro.cli import setup as runs
from mechintro.cli.options import config_from_args

__all__ = [
    "EVALUATE_FIELDS",
    "REPRODUCE_STEPS",
    "SCRIPT_COMMANDS",
    "SWEEP_FIELDS",
    "Step",
    "run_config",
    "run_evaluation",
    "run_sweep",
]

EVALUATE_FIELDS = ("layer", "strength", "variant", "persona")
"""The :class:`~mechintro.behaviour.plan.TrialConfig` fields ``mechintro evaluate`` has flags for, besides the
run options' (:data:`mechintro.cli.setup.RUN_FIELDS`)."""
SWEEP_FIELDS = ("layers", "strengths", "variants", "personas")
"""The :class:`~mechintro.behaviour.plan.SweepConfig` fields ``mechintro sweep`` has flags for, besides the
run options'."""


# ----------------------------------------------------------------------------------------------- demo


def demo(args: argparse.Namespace) -> int:
    """Concept injection end to end on a tiny random Gemma 3 (no weights needed)."""
    import torch

    from mechintro.core.concepts import concept_vectors
    from mechintro.core.models import load_model, spec_for
    from mechintro.core.prompts import left_pad, trial_prompt
    from mechintro.core.readout import yes_no_gap
    from mechintro.core.sampling import sample
    from mechintro.core.steering import inject
    from mechintro.organism.tiny import save_tiny_gemma3

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_gemma3(tmp)
        model = load_model(folder, device="cpu")
        spec = spec_for(model)
        print(
            f"loaded a random tiny Gemma 3 from {folder} through TransformerBridge: {spec.n_layers} layers, "
            f"d_model {spec.d_model}; default injection layer {spec.injection_layer}, strength "
            f"{spec.strength}"
        )
        concepts = ["Bread", "Oceans", "Dust"]
        vecs = concept_vectors(model, concepts, layer=spec.injection_layer)
        print(
            "concept vector norms:",
            {c: round(float(v.norm()), 3) for c, v in zip(concepts, vecs, strict=True)},
        )
        prompts = [trial_prompt(model, trial=t) for t in (1, 2, 3)]
        batch = left_pad(prompts, pad_id=model.tokenizer.pad_token_id)
        after = model.tokenizer.decode(prompts[0].tokens[prompts[0].injection_start + 1 :][:3].tolist())
        print(
            f"trial prompt: {len(prompts[0].tokens)} tokens, injection starts at token "
            f"{prompts[0].injection_start} ({after!r}...)"
        )
        with torch.no_grad():
            clean = model(batch.tokens, attention_mask=batch.attention_mask)[:, -1]
            with inject(model, vecs, layer=spec.injection_layer, strength=spec.strength, start=batch.starts):
                steered = model(batch.tokens, attention_mask=batch.attention_mask)[:, -1]
                out = sample(model, batch, max_new_tokens=8, seeds=[0, 1, 2])
        gaps = zip(yes_no_gap(clean, spec).tolist(), yes_no_gap(steered, spec).tolist(), strict=True)
        print("Yes-No logit gap, clean -> injected:", [f"{a:.3f} -> {b:.3f}" for a, b in gaps])
        print("sampled (random weights, so gibberish):", out.texts(model.tokenizer))
    return 0


# ----------------------------------------------------------------------------------------------- trials


def evaluate(args: argparse.Namespace) -> int:
    """Trials at one layer and strength (defaults: the model's spec); print detection metrics."""
    config = config_from_args(TrialConfig, args, only=(*runs.RUN_FIELDS, *EVALUATE_FIELDS))
    return run_evaluation(config, **_target(args))


def sweep(args: argparse.Namespace) -> int:
    """Trials over layers x strengths (x variants x personas); print detection metrics."""
    config = config_from_args(SweepConfig, args, only=(*runs.RUN_FIELDS, *SWEEP_FIELDS))
    return run_sweep(config, **_target(args))


def _target(args: argparse.Namespace) -> dict[str, Any]:
    """What the run options say a run runs on, besides its config."""
    return {
        "model": args.model,
        "concepts": args.concepts,
        "judge": args.judge,
        "store": args.store,
        "device": args.device,
        "threads": args.threads,
        "executor": runs.executor_from_args(args),
    }


def run_evaluation(config: TrialConfig, **target: Any) -> int:
    """``mechintro evaluate``'s work: the trials of ``config`` on what ``target`` names as the command line
    does (:func:`run_config`); print the detection metrics."""
    from mechintro.behaviour.trials import run_trials

    return run_config(run_trials, config, layers=[config.layer], strengths=[config.strength], **target)


def run_sweep(config: SweepConfig, **target: Any) -> int:
    """``mechintro sweep``'s work, as :func:`run_evaluation` for a :class:`SweepConfig`."""
    from mechintro.behaviour.trials import sweep as run

    return run_config(
        run, config, layers=list(config.layers or []), strengths=list(config.strengths or []), **target
    )


def run_config(
    run: Any,
    config: TrialConfig | SweepConfig,
    *,
    layers: Sequence[Any] = (),
    strengths: Sequence[Any] = (),
    model: str = runs.DEFAULT_MODEL,
    concepts: str = runs.DEFAULT_CONCEPTS,
    judge: str = runs.DEFAULT_JUDGE,
    store: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    executor: Any = "local",
) -> int:
    """``run(model, concepts, config, ...)`` on the model, concepts and judge named as on the command line,
    checked before the model loads (the config's ``layers`` and ``strengths`` against the model's config
    on disk); print the metrics table. Exit status 1 when every judge call failed."""
    from mechintro.behaviour.metrics import detection_metrics

    def check() -> None:
        runs.check_model_options(
            model,
            device=device,
            layers=[la for la in layers if la is not None],
            strengths=[s for s in strengths if s is not None],
            store=store,
        )

    judge, words, loaded, spec = runs.prepare(
        model=model, judge=judge, concepts=concepts, device=device, threads=threads, check=check
    )
    df = run(loaded, words, config, judge=judge, store=store, executor=executor)
    return _report_trials(df, spec=spec, judge=judge, concepts=words, metrics=detection_metrics)


def _report_trials(df: Any, *, spec: Any, judge: Any, concepts: list[str], metrics: Any) -> int:
    """Print the metrics table; a run whose every judge call failed is an error (exit 1), never a success."""
    from mechintro.behaviour.judges import error_mask

    by = ("layer", "strength", "variant", "persona")
    print(f"{spec.name}: {len(concepts)} concepts, {len(df)} trials, judge {judge.name}")
    print(runs.format_metrics(metrics(df, by=by), by=by))
    errors = int(error_mask(df["judge_error"]).sum()) if len(df) else 0
    if errors:
        print(f"{errors} of {len(df)} trials have a judge error (not counted as 'No'; re-run to retry them)")
    if len(df) and errors == len(df):
        print("every judge call failed: nothing was judged")
        return 1
    return 0


def rejudge(args: argparse.Namespace) -> int:
    """Judge again the stored responses whose judge failed, without generating them again.

    The judge is part of a trial's identity, so only rows stored under the same judge name are re-judged.
    Batches are claimed in the store, so several rejudge processes can share the work. Exit status 1 when
    errors remain.
    """
    from mechintro.behaviour.batch import verdict_columns
    from mechintro.behaviour.judges import check_judge, judge_kind
    from mechintro.behaviour.leases import ClaimQueue
    from mechintro.behaviour.store import KEY_COLUMNS, TrialStore

    judge = runs.parse_judge(args.judge)
    check_judge(judge)
    if judge_kind(judge) != "text":
        raise ValueError(
            f"rejudge re-reads stored responses, which a {judge.name!r} scorer cannot; re-run those trials"
        )
    if not Path(args.store).exists():
        raise FileNotFoundError(f"no trial store at {args.store}")
    filters = {"judge": judge.name} | ({"model": args.model} if args.model else {})
    with TrialStore(args.store) as store:
        rows = store.error_rows(**filters)
        rows = rows[rows["response"].notna()]
        print(f"{len(rows)} stored responses with a judge error ({judge.name}) in {args.store}")
        keys = [tuple(r) for r in rows[list(KEY_COLUMNS)].itertuples(index=False)]
        by_key = dict(zip(keys, rows.itertuples(index=False), strict=True))
        batches = [keys[i : i + args.batch_size] for i in range(0, len(keys), args.batch_size)]
        with ClaimQueue(store, batches, ttl_s=args.lease_s) as queue:
            for claim in queue:
                part = [by_key[k] for k in claim.keys]
                verdicts = judge.judge(
                    responses=[r.response for r in part],
                    concepts=[r.concept for r in part],
                    forced=[r.condition == "forced" for r in part],
                )
                store.replace_verdicts(
                    [
                        dict(zip(KEY_COLUMNS, k, strict=True)) | verdict_columns(v)
                        for k, v in zip(claim.keys, verdicts, strict=True)
                    ]
                )
        left = store.count_errors(**filters)
    print(f"{len(rows) - left} re-judged; {left} still have a judge error")
    return 1 if left else 0


# ----------------------------------------------------------------------------------------------- figures


def _one_value(df: Any, column: str, wanted: str | None) -> Any:
    """Rows of ``df`` whose ``column`` is ``wanted`` (or its only value); raise naming the choices."""
    values = sorted(df[column].astype(str).unique())
    if wanted is None and len(values) > 1:
        raise ValueError(f"the store holds several {column}s {values}; pick one with --{column}")
    if wanted is not None and wanted not in values:
        raise ValueError(f"no trials with {column} {wanted!r} in the store; it has {values}")
    return df if wanted is None else df[df[column] == wanted]


def figures(args: argparse.Namespace) -> int:
    """Build every figure the store has data for and save them; refuse a missing or empty store (which would
    overwrite the committed figures with nothing)."""
    from mechintro.behaviour.metrics import detection_metrics
    from mechintro.behaviour.store import TrialStore
    from mechintro.plots import behaviour as plots

    if not Path(args.store).exists():
        raise FileNotFoundError(
            f"no trial store at {args.store}: run `mechintro evaluate --store {args.store}` (or sweep) first"
        )
    with TrialStore(args.store) as store:
        df = store.load()
    if df.empty:
        raise ValueError(f"the trial store {args.store} holds no trials; nothing to plot")
    df = _one_value(_one_value(df, "model", args.model), "judge", args.judge)
    for name, fig in _store_figures(df, plots=plots, metrics=detection_metrics):
        runs.save(fig, name, args.out, formats=args.formats)
    return 0


def _store_figures(df: Any, *, plots: Any, metrics: Any) -> list[tuple[str, Any]]:
    """(name, figure) for each figure the trials support."""
    base = df[(df["variant"] == "original") & (df["persona"] == "standard_assistant")]
    out = []
    if len(base):
        model = str(base["model"].iloc[0])
        ours = metrics(base, by=("layer", "strength"))
        out.append(("layer_sweep", plots.layer_sweep_figure(ours, model_name=Path(model).name or model)))
    for column, other, default in (
        ("variant", "persona", "standard_assistant"),
        ("persona", "variant", "original"),
    ):
        rows = df[df[other] == default]
        if rows[column].nunique() > 1:
            layer, strength = _widest_setting(rows, column)
            rows = rows[(rows["layer"] == layer) & rows["strength"].isin([strength, 0.0])]
            out.append((f"{column}s", plots.rate_bars_figure(metrics(rows, by=(column,)), axis=column)))
    return out


def _widest_setting(rows: Any, column: str) -> tuple[int, float]:
    """The (layer, strength) whose injection trials cover the most values of ``column`` (then: most
    trials)."""
    injected = rows[rows["condition"] == "injection"].groupby(["layer", "strength"])
    score = injected[column].nunique() * 10**9 + injected.size()
    layer, strength = score.idxmax()
    return int(layer), float(strength)


# ----------------------------------------------------------------------------------------------- scripts

GEOMETRY_SCRIPTS = (
    "fig_swaps.py",
    "fig_bidirectional.py",
    "fig_concept_space.py",
    "fig_ridge.py",
    "fig_noise_controls.py",
)
"""The geometry figures (the paper's Figures 6-8); they share their options."""

SCRIPT_COMMANDS = {
    "gates": ("top gate candidates by DLA and the top gate's inverted-V", ("fig_gates.py",)),
    "carriers": ("evidence carriers and suppressors of a gate", ("fig_carriers.py",)),
    "curves": (
        "progressive gate ablation/patching curves and carrier-ablation curves",
        ("fig_gate_curves.py", "fig_carrier_ablation.py"),
    ),
    "attribute": (
        "steering-attribution graphs: parquet frames, graph JSON, Neuronpedia JSON and the figure",
        ("fig_attribution_graph.py",),
    ),
    "elicit": (
        "train a bias vector on training concepts and measure it on held-out ones (the paper's Figure 16)",
        ("fig_bias_vector.py",),
    ),
    "ablate-direction": (
        "ablate a direction (the organism's gates' say-No one) during trials, against random directions",
        ("fig_direction_ablation.py",),
    ),
    "geometry": (
        "success/failure geometry of concept vectors: swaps, bidirectional steering, PCA, logit lens, "
        "verbalizability, delta-PCs, ridge, noise controls",
        GEOMETRY_SCRIPTS,
    ),
}
"""Subcommands that run analyses scripts, passing every argument on."""


def script_command(args: argparse.Namespace) -> int:
    for name in SCRIPT_COMMANDS[args.command][1]:
        runs.run_script(name, args.script_args)
    return 0


# ----------------------------------------------------------------------------------------------- reproduce


@dataclass(frozen=True)
class Step:
    """One analyses script of ``mechintro reproduce``, with its settings in the full and the quick run."""

    script: str
    """The script in ``analyses/``."""
    full: str = ""
    """Extra arguments in the full run (split on spaces)."""
    quick: str = ""
    """Extra arguments in the quick run, CI's ``make reproduce-quick`` (split on spaces; ``{out}`` is the
    quick run's folder)."""
    kind: Literal["table", "trials", "mechanism"] = "mechanism"
    """``"table"`` reads a table (only ``--out``); ``"trials"`` takes the run options; ``"mechanism"`` also
    the feature-grid ``--cache``."""

    def argv(self, *, quick: bool, out: str, store: str, cache: str, model: str = "organism") -> list[str]:
        """The script's command line (on the organism ``model``, one of :data:`REPRODUCE_MODELS`)."""
        chosen = ["--model", model] if model != "organism" else []
        if self.kind == "table":
            return [*chosen, "--out", out]
        own = (self.quick if quick else self.full).format(out=out).split()
        cached = ["--cache", cache] if self.kind == "mechanism" else []
        base = (QUICK_ARGS if quick else REPRODUCE_ARGS).replace("--model organism", f"--model {model}")
        return [
            *_without(base, own),
            "--store",
            store,
            *cached,
            "--out",
            out,
            *own,
        ]


def _without(base: str, own: Sequence[str]) -> list[str]:
    """The ``--flag value`` pairs of ``base`` whose flag the step does not set itself (so each flag appears
    once on the printed command line; argparse would take the step's, the last, either way)."""
    words, out = base.split(), []
    for i, word in enumerate(words):
        if word.startswith("--") and word in own:
            continue
        if not word.startswith("--") and i and words[i - 1] in own:
            continue
        out.append(word)
    return out


REPRODUCE_ARGS = "--model organism --n-trials 4 --max-new-tokens 40 --batch-size 128"
QUICK_ARGS = "--model organism --n-trials 2 --max-new-tokens 24 --batch-size 64 --quiet"
REPRODUCE_MODELS = ("organism", "organism-olmo")
"""The organisms ``mechintro reproduce --model`` runs on: the Gemma 3 one (default) and the OLMo 3 one."""
_QUICK_MECH = "--concepts held-out:6 --k 20"
_GEOMETRY_FULL = {
    "fig_swaps.py": "--n-trials 10",
    "fig_bidirectional.py": "--n-trials 10",
    "fig_noise_controls.py": "--n-trials 10",
    "fig_ridge.py": "--leaky",
}
_GEOMETRY_QUICK = "--concepts held-out:30 --rates-trials 4 --n-trials 2 --sweep-trials 2 --counts 1,5,20"

REPRODUCE_STEPS = (
    Step("fig_organism_profile.py", kind="table"),
    Step(
        "fig_layer_sweep.py",
        "--concepts held-out:25 --n-trials 2",
        "--concepts held-out:4 --n-trials 1 --layers 2,3,5 --strengths 2,4",
        kind="trials",
    ),
    Step(
        "fig_variants.py",
        "--axis variant --concepts held-out:50 --n-trials 2",
        "--axis variant --concepts held-out:4 --n-trials 1 --values original,skeptical",
        kind="trials",
    ),
    Step(
        "fig_variants.py",
        "--axis persona --concepts held-out:50 --n-trials 2",
        "--axis persona --concepts held-out:4 --n-trials 1 --values standard_assistant,simulated_user",
        kind="trials",
    ),
    Step("fig_patching.py", "--trials 1,2,3,4,5,6,7,8,9,10", "--concepts held-out:4"),
    Step("fig_gates.py", "", _QUICK_MECH),
    Step("fig_gate_curves.py", "", f"{_QUICK_MECH} --ks 0,1,5,20 --n-trials 1"),
    Step("fig_carriers.py", "", _QUICK_MECH),
    Step("fig_carrier_ablation.py", "", f"{_QUICK_MECH} --n-concepts 1"),
    Step("fig_base_vs_instruct.py", "", f"{_QUICK_MECH} --n-concepts 1"),
    *(
        Step(script, _GEOMETRY_FULL.get(script, ""), _GEOMETRY_QUICK, kind="trials")
        for script in GEOMETRY_SCRIPTS
    ),
    Step(
        "fig_posttrain.py",
        "--artifacts runs/posttrain",
        f"{_QUICK_MECH} --artifacts {{out}}/posttrain --n-pairs 16 --n-concepts 2 "
        "--rows dpo,positive-control",
    ),
    Step("fig_attribution_graph.py", "", f"{_QUICK_MECH} --n-graphs 1 --points 5 --depth 1 --top 5"),
    Step(
        "fig_bias_vector.py",
        "--n-trials 2 --max-new-tokens 24",
        "--parts headline,dose --concepts held-out:6 --train-eval training:4 --epoch-size 32 --n-trials 1 "
        "--artifacts {out}/elicitation",
        kind="trials",
    ),
    Step(
        "fig_direction_ablation.py",
        "--concepts held-out:50 --n-trials 2 --max-new-tokens 24",
        "--concepts held-out:6 --grid-concepts held-out:6 --n-random 1 --multiples 1 --n-trials 1 "
        "--artifacts {out}/elicitation",
        kind="trials",
    ),
)
"""The figure scripts ``make reproduce`` runs, in order."""


def reproduce(args: argparse.Namespace) -> int:
    """The main job on the organism: its measured report, a fresh evaluation, then every figure script.

    ``--quick`` runs the same pipeline with tiny settings into a temporary folder (never over the committed
    figures): CI's check that the whole job works on a fresh machine.
    """
    from mechintro.core import resources

    model = getattr(args, "model", "organism")
    if model not in REPRODUCE_MODELS:
        raise ValueError(f"unknown organism {model!r} to reproduce on; valid: {list(REPRODUCE_MODELS)}")
    root = resources.organism_root(model)
    if root is None and model == "organism":
        print("The model organism is not trained yet; running the tiny random Gemma 3 demo instead.")
        return demo(args)
    if root is None:
        raise FileNotFoundError(
            f"the organism {model!r} is in none of {[str(p) for p in resources.search_path()]}; "
            "train it with `mechintro organism train --family olmo`"
        )
    out, store, cache = _reproduce_paths(args)
    report = root / "organism_report.md"
    if report.exists() and not args.quick:
        print(f"== the organism's report, as written by `mechintro organism train` ({report})\n")
        print(report.read_text())
    print(f"== evaluation on held-out concepts (store {store})", flush=True)
    status = run_evaluation(
        _reproduce_evaluation(quick=args.quick, n_trials=args.n_trials),
        model=model,
        concepts="held-out:6" if args.quick else runs.DEFAULT_CONCEPTS,
        judge=runs.DEFAULT_JUDGE,
        store=store,
        device=None,
        threads=1,
        executor="local",
    )
    if status:
        return status
    steps = [s for s in REPRODUCE_STEPS if not args.only or s.script in args.only]
    for step in steps:
        argv = step.argv(quick=args.quick, out=out, store=store, cache=cache, model=model)
        print(f"== analyses/{step.script} {' '.join(argv)}", flush=True)
        runs.run_script(step.script, argv)
    print(f"figures written to {out}/")
    return 0


def _reproduce_evaluation(*, quick: bool, n_trials: int) -> TrialConfig:
    """The settings of reproduce's evaluation: forced trials, no progress bar; the quick run's are small."""
    if quick:
        return TrialConfig(n_trials=2, max_new_tokens=24, forced=True, progress=False)
    return TrialConfig(n_trials=n_trials, max_new_tokens=40, batch_size=128, forced=True, progress=False)


def _reproduce_paths(args: argparse.Namespace) -> tuple[str, str, str]:
    """(figure folder, store, cache folder); the quick run keeps everything in one temporary folder."""
    committed = (runs.analyses_dir().parent / "figures").resolve()
    if not args.quick:
        return args.out or "figures", args.store, args.cache
    if args.out is not None and Path(args.out).resolve() == committed:
        raise ValueError(f"--quick never writes over the committed figures ({committed}): pass another --out")
    out = Path(args.out) if args.out is not None else Path(tempfile.mkdtemp(prefix="mechintro-quick-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"quick reproduce into {out}")
    return str(out), str(out / "reproduce.sqlite"), str(out / "cache")


# ----------------------------------------------------------------------------------------------- organism


def organism_train(args: argparse.Namespace) -> int:
    from mechintro.core import resources
    from mechintro.organism import build
    from mechintro.organism.evaluate import EvalConfig
    from mechintro.organism.train import OrganismConfig

    family = ORGANISM_FAMILY_FLAGS[args.family]
    out = Path(args.out) if args.out else _family_dir(resources.user_dir(), family)
    cfg = (
        OrganismConfig.quick(seed=args.seed, family=family)
        if args.quick
        else OrganismConfig(seed=args.seed, family=family)
    )
    eval_cfg = EvalConfig.quick() if args.quick else EvalConfig()
    print(
        f"training the {family} organism ({'quick' if args.quick else 'full'}, seed {args.seed}) into {out}"
    )
    from mechintro.organism.calibrate import CalibrationConfig

    calibration = CalibrationConfig.quick() if args.quick else CalibrationConfig()
    report = build(out, cfg=cfg, evaluate=not args.no_eval, eval_cfg=eval_cfg, calibration=calibration)
    if (out / "organism_report.md").exists() and not args.no_eval:
        print((out / "organism_report.md").read_text())
    t = report["timings"]
    print(f"training took {t['seconds_training_total'] / 60:.1f} min; artifacts in {out}")
    if out.resolve() == _family_dir(resources.user_dir(), family).resolve():
        name = ORGANISM_MODEL_NAMES[family]
        print(f"load_model({name!r}) now loads this organism ({resources.ENV} / the per-user folder wins)")
    return 0


ORGANISM_FAMILY_FLAGS = {"gemma": "gemma3", "olmo": "olmo3"}
"""``mechintro organism --family``'s values and the architecture family each trains."""
ORGANISM_MODEL_NAMES = {"gemma3": "organism", "olmo3": "organism-olmo"}
"""The registered name of each family's organism (its base checkpoint adds ``-base``)."""


def _family_dir(data: Path, family: str) -> Path:
    """Where the organism of ``family`` lives in the data folder ``data``."""
    from mechintro.core import resources

    sub = resources.FAMILY_SUBFOLDERS[family]
    return data / sub if sub else data


def _writable_organism(family: str = "gemma3") -> Path:
    """The user's organism folder of ``family``, holding a copy of the shipped organism when the user has
    none (the package data is never written to)."""
    import shutil

    from mechintro.core import resources

    name = ORGANISM_MODEL_NAMES[family]
    mine = _family_dir(resources.user_dir(), family)
    shipped = resources.organism_root(name)
    if shipped == mine:
        return mine
    if shipped is None:
        raise FileNotFoundError("no model organism to calibrate; train one with `mechintro organism train`")
    print(f"calibrating a copy of the shipped organism in {mine} (it then wins over the shipped one)")
    mine.mkdir(parents=True, exist_ok=True)
    for name in ("organism", "organism-base"):
        shutil.copytree(shipped / name, mine / name, dirs_exist_ok=True, copy_function=shutil.copyfile)
    for path in shipped.glob("organism_*"):
        if path.is_file():
            shutil.copyfile(path, mine / path.name)  # not its read-only mode
    return mine


def organism_calibrate(args: argparse.Namespace) -> int:
    """Calibrate an organism's default strength on held-out concepts, check the requirements there, record."""
    import json

    from mechintro.core.models import load_model
    from mechintro.organism.calibrate import (
        CalibrationConfig,
        band_checks,
        calibrate,
        operating_point,
        record,
    )

    family = ORGANISM_FAMILY_FLAGS[getattr(args, "family", "gemma")]
    root = Path(args.folder) if args.folder else _writable_organism(family)
    cfg = CalibrationConfig.quick() if args.quick else CalibrationConfig()
    split = json.loads((root / "organism_split.json").read_text())
    model = load_model(root / "organism")
    store = root / "eval" / "calibration.sqlite"
    point = calibrate(model, split["heldout"], cfg=cfg, store=store, progress=not args.quiet)
    print("held-out TPR by strength:", {c["strength"]: round(c["tpr"], 3) for c in point.curve})
    print(f"default strength: {point.strength} (target TPR {point.target_tpr}); saturated: {point.saturated}")
    check = operating_point(
        model, split["heldout"], strength=point.strength, cfg=cfg, store=store, progress=not args.quiet
    )
    met = band_checks(check)
    for key, ok in met.items():
        print(f"  {'ok  ' if ok else 'MISS'} {key} = {check[key]}")
    if not args.dry_run:
        for name in ("organism", "organism-base"):
            record(root / name, point)
        (root / "organism_operating_point.json").write_text(
            json.dumps({"point": check, "met": met}, indent=1)
        )
        print(f"recorded in {root}/organism*/mechintro_spec.json")
    return 0 if all(met.values()) or args.quick else 1
