"""The ``mechintro`` command."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONCEPT_SETS = ("original", "new", "all", "training", "held-out", "baseline")
JUDGE_CHOICES = ("rule", "logit", "llm:<model>", "openai:<model>", "anthropic:<model>")
DEFAULT_STORE = "runs/trials.sqlite"
"""Where the analyses scripts keep their trials, and where ``mechintro figures`` reads them."""
TINY = "tiny"
"""``--model tiny``: a random tiny Gemma 3 (mechintro.testing), for smoke tests and benchmarks."""


def _demo(args: argparse.Namespace) -> int:
    """Concept injection end to end on a tiny random Gemma 3 (no weights needed)."""
    import torch

    from mechintro.concepts import concept_vectors
    from mechintro.models import load_model, spec_for
    from mechintro.prompts import left_pad, trial_prompt
    from mechintro.sampling import sample
    from mechintro.steering import inject
    from mechintro.testing import save_tiny_gemma3

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
        yes, no = list(spec.yes_ids), list(spec.no_ids)
        gap = lambda lg: lg[:, yes].logsumexp(-1) - lg[:, no].logsumexp(-1)  # noqa: E731
        print(
            "Yes-No logit gap, clean -> injected:",
            [f"{a:.3f} -> {b:.3f}" for a, b in zip(gap(clean).tolist(), gap(steered).tolist(), strict=True)],
        )
        print("sampled (random weights, so gibberish):", out.texts(model.tokenizer))
    return 0


# The figure scripts `make reproduce` runs, in order, with their settings (sampled trials are store-backed).
REPRODUCE_SCRIPTS = (
    "fig_organism_profile.py",
    "fig_layer_sweep.py",
    "fig_variants.py",
    "fig_personas.py",
    "fig_patching.py",
    "fig_gates.py",
    "fig_gate_curves.py",
    "fig_carriers.py",
    "fig_carrier_ablation.py",
    "fig_base_vs_instruct.py",
)
REPRODUCE_ARGS = ("--model", "organism", "--n-trials", "4", "--max-new-tokens", "40", "--batch-size", "128")
# Sweeps over many cells use fewer concepts so that `make reproduce` stays in minutes on a laptop CPU.
REPRODUCE_EXTRA = {
    "fig_layer_sweep.py": ("--concepts", "held-out:25", "--n-trials", "2"),
    "fig_variants.py": ("--concepts", "held-out:50", "--n-trials", "2"),
    "fig_personas.py": ("--concepts", "held-out:50", "--n-trials", "2"),
}


def analyses_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "analyses"


def run_script(name: str, argv: Sequence[str]) -> None:
    """Run ``analyses/<name>`` as ``__main__`` with ``argv`` (the scripts import their shared
    ``_mechanism``)."""
    import runpy

    path = analyses_dir() / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: the analyses/ scripts come with the repository checkout")
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv, sys.path[:0] = [str(path), *argv], [str(path.parent)]
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


SCRIPT_COMMANDS = {
    "gates": ("top gate candidates by DLA and the top gate's inverted-V", ("fig_gates.py",)),
    "carriers": ("evidence carriers and suppressors of a gate", ("fig_carriers.py",)),
    "curves": (
        "progressive gate ablation/patching curves and carrier-ablation curves",
        ("fig_gate_curves.py", "fig_carrier_ablation.py"),
    ),
}


def _script_command(args: argparse.Namespace) -> int:
    for name in SCRIPT_COMMANDS[args.command][1]:
        run_script(name, args.script_args)
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    """The main job on the organism: its measured report, a fresh evaluation, then every figure script."""
    from mechintro.models import data_dir

    if not (data_dir() / "organism" / "config.json").exists():
        print("The model organism is not trained yet; running the tiny random Gemma 3 demo instead.")
        return _demo(args)
    report = data_dir() / "organism_report.md"
    if report.exists():
        print(f"== the organism's report, as written by `mechintro organism train` ({report})\n")
        print(report.read_text())
    store = str(Path(args.store))
    print(f"== evaluation on held-out concepts (store {store})")
    _evaluate(
        build_parser().parse_args(
            [
                "evaluate",
                "--store",
                store,
                "--n-trials",
                str(args.n_trials),
                "--forced",
                "--max-new-tokens",
                "40",
                "--batch-size",
                "128",
            ]
        )
    )
    for name in args.only or REPRODUCE_SCRIPTS:
        argv = [*REPRODUCE_ARGS, "--store", store, "--out", args.out, *REPRODUCE_EXTRA.get(name, ())]
        print(f"== analyses/{name} {' '.join(argv)}", flush=True)
        run_script(name, argv)
    print(f"figures written to {args.out}/")
    return 0


# ----------------------------------------------------------------------------------------------- helpers


def load_cli_model(name: str, *, device: str | None = None) -> Any:
    """``load_model(name)``; ``"tiny"`` is a random tiny Gemma 3 saved once in the temp folder."""
    from mechintro.models import load_model

    if name == TINY:
        name = str(tiny_model_folder())
    return load_model(name, device=device)


def tiny_model_folder() -> Path:
    """A fixed folder holding the random tiny Gemma 3 (seed 0), created on first use (atomically)."""
    from mechintro.testing import save_tiny_gemma3

    folder = Path(tempfile.gettempdir()) / "mechintro-tiny-gemma3"
    if not (folder / "config.json").exists():
        staging = Path(tempfile.mkdtemp(prefix="mechintro-tiny-"))
        save_tiny_gemma3(staging)
        try:
            os.rename(staging, folder)
        except OSError:  # another process won the race
            pass
    return folder


def parse_concepts(text: str) -> list[str]:
    """A concept-set name (original, new, all, training, held-out, baseline), optionally ``name:N`` for its
    first N concepts, or a comma-separated list."""
    from mechintro.concepts import all_concepts, baseline_words, concept_set

    name, _, count = text.partition(":")
    if name in CONCEPT_SETS and (not count or count.isdigit()):
        words = concept_set(name)
        return words[: int(count)] if count else words
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words or ("," not in text and words[0] not in {*all_concepts(), *baseline_words()}):
        raise ValueError(
            f"--concepts {text!r} is neither a concept set {list(CONCEPT_SETS)} nor a comma-separated "
            "list of concepts (a single word must be one of the 500 concepts or the baseline words)"
        )
    return words


def parse_judge(text: str) -> Any:
    """A judge from ``rule``, ``logit``, ``llm:<model>`` / ``openai:<model>`` or ``anthropic:<model>``.

    LLM judges read their API key from OPENAI_API_KEY / ANTHROPIC_API_KEY and fail here without one.
    """
    from mechintro.judges import LLMJudge, LogitJudge, RuleJudge

    kind, _, model = text.partition(":")
    if text == "rule":
        return RuleJudge()
    if text == "logit":
        return LogitJudge()
    backend = {"llm": "openai", "openai": "openai", "anthropic": "anthropic"}.get(kind)
    if backend is None or (":" in text and not model):
        raise ValueError(f"unknown judge {text!r}; valid: {', '.join(JUDGE_CHOICES)}")
    return LLMJudge(backend=backend, model=model or None)


def _numbers(text: str, cast: type) -> list:
    try:
        return [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {cast.__name__}s, got {text!r}") from None


def int_list(text: str) -> list[int]:
    return _numbers(text, int)


def float_list(text: str) -> list[float]:
    return _numbers(text, float)


def name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


METRIC_COLUMNS = ("tpr", "fpr", "introspection", "forced_id")


def format_metrics(metrics: Any, *, by: Sequence[str]) -> str:
    """A plain-text table: the group columns, counts, and each rate as ``0.42 [0.33, 0.51]``."""
    import math

    def rate(row: Any, name: str) -> str:
        if math.isnan(row[name]):
            return "-"
        return f"{row[name]:.2f} [{row[name + '_lo']:.2f}, {row[name + '_hi']:.2f}]"

    table = metrics[[*by, "n_injection", "n_control", "n_forced", "n_errors"]].copy()
    for name in METRIC_COLUMNS:
        table[name] = [rate(row, name) for _, row in metrics.iterrows()]
    return table.to_string(index=False)


# ----------------------------------------------------------------------------------------------- commands


def prepare_run(args: argparse.Namespace) -> tuple[Any, list[str], Any, Any]:
    """(judge, concepts, model, spec) from the run options; the judge is checked first, so a missing API
    key fails before anything is loaded."""
    import torch

    from mechintro.models import spec_for
    from mechintro.trials import check_judge

    if args.threads:
        torch.set_num_threads(args.threads)
    judge = parse_judge(args.judge)
    check_judge(judge)
    concepts = parse_concepts(args.concepts)
    model = load_cli_model(args.model, device=args.device)
    return judge, concepts, model, spec_for(model)


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword settings of run_trials / sweep given by the run options."""
    return {
        "n_trials": args.n_trials,
        "forced": args.forced,
        "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "store": args.store,
        "progress": not args.quiet,
    }


def _evaluate(args: argparse.Namespace) -> int:
    """Trials at one layer and strength (defaults: the model's spec); print detection metrics."""
    from mechintro.metrics import detection_metrics
    from mechintro.trials import run_trials

    judge, concepts, model, spec = prepare_run(args)
    layer = spec.injection_layer if args.layer is None else args.layer
    strength = spec.strength if args.strength is None else args.strength
    df = run_trials(
        model,
        concepts,
        layer=layer,
        strength=strength,
        judge=judge,
        variant=args.variant,
        persona=args.persona,
        **run_settings(args),
    )
    by = ("layer", "strength", "variant", "persona")
    print(f"{spec.name}: {len(concepts)} concepts, {len(df)} trials, judge {judge.name}")
    print(format_metrics(detection_metrics(df, by=by), by=by))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    """Trials over layers x strengths (x variants x personas); print detection metrics."""
    from mechintro.metrics import detection_metrics
    from mechintro.trials import sweep

    judge, concepts, model, spec = prepare_run(args)
    df = sweep(
        model,
        concepts,
        layers=args.layers or [spec.injection_layer],
        strengths=args.strengths or list(spec.strength_sweep),
        judge=judge,
        variants=args.variants or ["original"],
        personas=args.personas or ["standard_assistant"],
        **run_settings(args),
    )
    by = ("layer", "strength", "variant", "persona")
    print(f"{spec.name}: {len(concepts)} concepts, {len(df)} trials, judge {judge.name}")
    print(format_metrics(detection_metrics(df, by=by), by=by))
    return 0


def _one_value(df: Any, column: str, wanted: str | None) -> Any:
    """Rows of ``df`` whose ``column`` is ``wanted`` (or its only value); raise naming the choices."""
    values = sorted(df[column].astype(str).unique())
    if wanted is None and len(values) > 1:
        raise ValueError(f"the store holds several {column}s {values}; pick one with --{column}")
    if wanted is not None and wanted not in values:
        raise ValueError(f"no trials with {column} {wanted!r} in the store; it has {values}")
    return df if wanted is None else df[df[column] == wanted]


def _figures(args: argparse.Namespace) -> int:
    """Build every figure the store has data for (the paper panel always) and save them."""
    from mechintro import plots
    from mechintro.metrics import detection_metrics
    from mechintro.store import TrialStore

    df = None
    if Path(args.store).exists():
        with TrialStore(args.store) as store:
            df = store.load()
    if df is None or df.empty:
        print(f"no trials in {args.store}: the layer figure shows the paper's series only")
        ours, label = detection_metrics(_empty_trials(), by=("layer", "strength")), "no trials"
        written = plots.save_figure(
            plots.layer_sweep_figure(ours, model_name=label), "layer_sweep", args.out, formats=args.formats
        )
        print("\n".join(str(p) for p in written))
        return 0
    df = _one_value(_one_value(df, "model", args.model), "judge", args.judge)
    written = []
    for name, fig in _store_figures(df, plots=plots, metrics=detection_metrics):
        written += plots.save_figure(fig, name, args.out, formats=args.formats)
    print("\n".join(str(p) for p in written))
    return 0


def _empty_trials() -> Any:
    import pandas as pd

    from mechintro.store import COLUMNS

    return pd.DataFrame(columns=list(COLUMNS))


def _store_figures(df: Any, *, plots: Any, metrics: Any) -> list[tuple[str, Any]]:
    """(name, figure) for each figure the trials support."""
    base = df[(df["variant"] == "original") & (df["persona"] == "standard_assistant")]
    out = []
    if len(base):
        model = str(base["model"].iloc[0])
        out.append(
            (
                "layer_sweep",
                plots.layer_sweep_figure(
                    metrics(base, by=("layer", "strength")), model_name=Path(model).name or model
                ),
            )
        )
    for column, builder, other, default in (
        ("variant", plots.variants_figure, "persona", "standard_assistant"),
        ("persona", plots.personas_figure, "variant", "original"),
    ):
        rows = df[df[other] == default]
        if rows[column].nunique() > 1:
            layer, strength = _widest_setting(rows, column)
            rows = rows[(rows["layer"] == layer) & rows["strength"].isin([strength, 0.0])]
            out.append((f"{column}s", builder(metrics(rows, by=(column,)))))
    return out


def _widest_setting(rows: Any, column: str) -> tuple[int, float]:
    """The (layer, strength) whose injection trials cover the most values of ``column`` (then: most
    trials)."""
    injected = rows[rows["condition"] == "injection"].groupby(["layer", "strength"])
    score = injected[column].nunique() * 10**9 + injected.size()
    layer, strength = score.idxmax()
    return int(layer), float(strength)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of every command that runs trials (also used by the analyses scripts)."""
    p.add_argument(
        "--model",
        default="organism",
        help="organism, organism-base, an HF id, a local folder, or 'tiny' (random, for smoke tests)",
    )
    p.add_argument(
        "--concepts",
        default="held-out",
        help=f"a concept set {list(CONCEPT_SETS)} or a comma-separated list (default held-out)",
    )
    p.add_argument("--judge", default="rule", help=f"one of {', '.join(JUDGE_CHOICES)} (default rule)")
    p.add_argument("--store", default=None, help="SQLite trial store (resumable); default: none")
    p.add_argument("--n-trials", type=int, default=10, help="trials per concept and condition (paper: 100)")
    p.add_argument("--forced", action="store_true", help="also run forced-identification trials")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def _organism_train(args: argparse.Namespace) -> int:
    from mechintro.models import data_dir
    from mechintro.organism import build
    from mechintro.organism.evaluate import EvalConfig
    from mechintro.organism.train import OrganismConfig

    out = Path(args.out) if args.out else data_dir()
    cfg = OrganismConfig.quick(seed=args.seed) if args.quick else OrganismConfig(seed=args.seed)
    eval_cfg = EvalConfig.quick() if args.quick else EvalConfig()
    print(f"training the organism ({'quick' if args.quick else 'full'}, seed {args.seed}) into {out}")
    report = build(out, cfg=cfg, evaluate=not args.no_eval, eval_cfg=eval_cfg)
    if (out / "organism_report.md").exists() and not args.no_eval:
        print((out / "organism_report.md").read_text())
    t = report["timings"]
    print(f"training took {t['seconds_training_total'] / 60:.1f} min; artifacts in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechintro", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="concept injection on a tiny random Gemma 3").set_defaults(func=_demo)
    rp = sub.add_parser("reproduce", help="the main job on the embedded default model (the organism)")
    rp.add_argument("--store", default="runs/reproduce.sqlite", help="trial store (resumable)")
    rp.add_argument("--n-trials", type=int, default=10, help="trials per held-out concept and condition")
    rp.add_argument("--out", default="figures", help="figure folder")
    rp.add_argument(
        "--only",
        type=lambda t: [x.strip() for x in t.split(",")],
        default=None,
        help=f"a comma list of scripts to run (default: {', '.join(REPRODUCE_SCRIPTS)})",
    )
    rp.set_defaults(func=_reproduce)

    ev = sub.add_parser("evaluate", help="introspection trials at one layer and strength; prints metrics")
    add_run_options(ev)
    ev.add_argument("--layer", type=int, default=None, help="injection layer (default: the model's spec)")
    ev.add_argument("--strength", type=float, default=None, help="injection strength (default: the spec's)")
    ev.add_argument("--variant", default="original", help="prompt variant (default original)")
    ev.add_argument(
        "--persona", default="standard_assistant", help="persona variant (default standard_assistant)"
    )
    ev.set_defaults(func=_evaluate)

    sw = sub.add_parser(
        "sweep", help="trials over layers x strengths (x variants x personas); prints metrics"
    )
    add_run_options(sw)
    sw.add_argument("--layers", type=int_list, default=None, help="e.g. 0,1,2 (default: the spec's layer)")
    sw.add_argument(
        "--strengths", type=float_list, default=None, help="e.g. 1,2,4,8 (default: the spec's sweep)"
    )
    sw.add_argument("--variants", type=name_list, default=None, help="comma-separated prompt variants")
    sw.add_argument("--personas", type=name_list, default=None, help="comma-separated persona variants")
    sw.set_defaults(func=_sweep)

    fg = sub.add_parser("figures", help="figures from a trial store (plus the paper's series)")
    fg.add_argument("--store", default=DEFAULT_STORE, help=f"trial store (default {DEFAULT_STORE})")
    fg.add_argument("--out", default="figures", help="output folder (default figures)")
    fg.add_argument("--model", default=None, help="model name as stored, when the store holds several")
    fg.add_argument("--judge", default=None, help="judge name as stored, when the store holds several")
    fg.add_argument(
        "--formats", type=name_list, default=["html", "png"], help="comma-separated (default html,png)"
    )
    fg.set_defaults(func=_figures)

    for command, (text, scripts) in SCRIPT_COMMANDS.items():
        sc = sub.add_parser(
            command, help=f"{text} (runs analyses/{', '.join(scripts)}; see its --help)", add_help=False
        )
        sc.add_argument("script_args", nargs=argparse.REMAINDER)
        sc.set_defaults(func=_script_command)

    org = sub.add_parser("organism", help="the model organism").add_subparsers(
        dest="organism_command", required=True
    )
    tr = org.add_parser("train", help="regenerate the organism, its transcoders and its report from a seed")
    tr.add_argument("--out", default=None, help="output folder (default: the project's data/)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--quick", action="store_true", help="the few-minute version the tests run")
    tr.add_argument("--no-eval", action="store_true", help="skip the measurements")
    tr.set_defaults(func=_organism_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; errors in the arguments (unknown judge, layer out of range...) exit with status 2."""
    from mechintro.judges import MissingAPIKeyError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if (
        argv and argv[0] in SCRIPT_COMMANDS
    ):  # everything after the command goes to the script, --help included
        args = argparse.Namespace(command=argv[0], script_args=argv[1:], func=_script_command)
    else:
        args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, MissingAPIKeyError, FileNotFoundError) as err:
        if os.environ.get("MECHINTRO_DEBUG"):
            raise
        parser.exit(2, f"mechintro {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
