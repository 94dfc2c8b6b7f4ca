"""The bias-vector analysis behind ``analyses/fig_bias_vector.py`` (the paper's Figure 16 on the organism).

Its parts (headline, dose, layers, injection), their settings and what they print are described once, in that
script's docstring (its ``--help``).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from mechintro.behaviour.metrics import detection_metrics
from mechintro.cli import setup as runs
from mechintro.core.concepts import training_concepts
from mechintro.core.fingerprint import weights_fingerprint
from mechintro.core.models import with_spec
from mechintro.plots.elicitation import (
    bias_injection_figure,
    bias_layer_figure,
    dose_figure,
    gains_figure,
)
from mechintro.studies import bias as el

PARTS = ("headline", "dose", "layers", "injection")
RATES = ("tpr", "fpr", "introspection", "forced_id")


def parser(doc: str | None = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    runs.add_run_options(p)
    p.add_argument("--parts", type=runs.name_list, default=list(PARTS), help=f"comma list of {PARTS}")
    p.add_argument(
        "--strength",
        type=runs.strength_arg,
        default=None,
        help="strength or operating point (default: the spec's)",
    )
    p.add_argument(
        "--bias-layer", type=int, default=None, help="the headline bias layer (default: the spec's)"
    )
    p.add_argument(
        "--labels", type=runs.name_list, default=["instruct", "injected"], help="headline label rules"
    )
    p.add_argument("--sweep-labels", default="injected", help="label rule of the sweeps' biases")
    p.add_argument(
        "--sweep-layers", type=runs.int_list, default=None, help="bias layers (default: every layer)"
    )
    p.add_argument("--arm-layers", type=runs.int_list, default=None, help="Figure 16 right's bias layers")
    p.add_argument("--sweep-concepts", default="held-out:30", help="concepts of the bias-layer sweep")
    p.add_argument("--injection-concepts", default="held-out:20", help="concepts of the injection sweep")
    p.add_argument("--train-eval", default="training:50", help="training concepts measured for comparison")
    p.add_argument(
        "--dose-multiples",
        type=runs.float_list,
        default=[0.75, 0.875, 1.0, 1.125, 1.25, 1.5],
        help="dose-curve strengths as multiples of the default strength",
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--epoch-size", type=int, default=1600, help="samples per epoch (200 steps of batch 8)")
    p.add_argument(
        "--sweep-epoch-size", type=int, default=800, help="samples per epoch of the sweeps' biases"
    )
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW lr (the function's default is 1e-3)")
    p.add_argument("--artifacts", default="runs/elicitation", help="cached biases and per-arm trial stores")
    p.add_argument("--out", default="figures", help="output folder")
    p.add_argument("--formats", type=runs.name_list, default=["html", "png"], help="figure formats")
    p.set_defaults(n_trials=2, max_new_tokens=24, batch_size=128, threads=1)
    return p


class Run:
    """The model, settings and caches shared by the parts."""

    def __init__(self, args: argparse.Namespace) -> None:
        bad = sorted(set(args.parts) - set(PARTS))
        if bad:
            raise SystemExit(f"unknown parts {bad}; valid: {list(PARTS)}")
        self.args = args
        self.judge, self.concepts, self.model, self.spec = runs.prepare_run(args)
        if args.strength is not None:  # another operating point (e.g. the saturated strength 4)
            self.spec = with_spec(self.model, strength=self.spec.resolve_strength(args.strength))
        self.layer, self.strength = self.spec.injection_layer, self.spec.strength
        self.n_layers = self.spec.n_layers
        self.digest = weights_fingerprint(self.model)[:12]
        self.folder = Path(args.artifacts)
        self.training = training_concepts()
        self.lines: list[str] = []

    def bias(self, layer: int, labels: str, *, epoch_size: int) -> el.BiasVector:
        a = self.args
        folder = self.folder / f"bias_L{layer}_{labels}_e{a.epochs}x{epoch_size}_b{a.train_batch}_lr{a.lr:g}"
        t0 = time.time()
        art = el.train_or_load_bias(
            folder,
            self.model,
            self.training,
            layer=layer,
            labels=labels,
            epochs=a.epochs,
            epoch_size=epoch_size,
            batch_size=a.train_batch,
            lr=a.lr,
            seed=a.seed,
            progress=not a.quiet,
        )
        last = art.log[-1] if art.log else {}
        print(
            f"bias L{layer} ({labels}): {art.settings.steps} steps, final loss "
            f"{last.get('loss', math.nan):.4f}, norm {float(art.vectors.norm()):.2f} "
            f"({time.time() - t0:.0f} s, {folder})"
        )
        return art

    def trials(
        self,
        concepts: list[str],
        bias: el.BiasVector | None,
        *,
        layers: Sequence[int] | None = None,
        strengths: Sequence[float] | None = None,
        forced: bool = True,
        arm: str | None = None,
    ) -> pd.DataFrame:
        store = self.folder / f"trials_{bias.digest() if bias else 'none-' + self.digest}.sqlite"
        store.parent.mkdir(parents=True, exist_ok=True)
        a = self.args
        return el.bias_trials(
            self.model,
            concepts,
            bias=bias,
            arm=arm,
            layers=layers,
            strengths=strengths,
            n_trials=a.n_trials,
            judge=self.judge,
            forced=forced,
            temperature=a.temperature,
            max_new_tokens=a.max_new_tokens,
            seed=a.seed,
            batch_size=a.batch_size,
            store=store,
            progress=not a.quiet,
        )

    def say(self, line: str = "") -> None:
        print(line)
        self.lines.append(line)


def _arm_name(labels: str, layer: int) -> str:
    return f"bias L{layer} ({labels})"


def _rate(row: pd.Series, name: str) -> str:
    if math.isnan(row[name]):
        return "-"
    return f"{row[name]:.3f} [{row[name + '_lo']:.3f}, {row[name + '_hi']:.3f}]"


def _gain(row: pd.Series, name: str) -> str:
    d, lo, hi = (100 * row[f"d_{name}{s}"] for s in ("", "_lo", "_hi"))
    return f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def headline(run: Run) -> tuple[pd.DataFrame, dict[str, el.BiasVector]]:
    a = run.args
    layer = a.bias_layer if a.bias_layer is not None else run.layer
    biases = {_arm_name(lab, layer): run.bias(layer, lab, epoch_size=a.epoch_size) for lab in a.labels}
    sets = {"held-out": run.concepts, "training": runs.parse_concepts(a.train_eval)}
    frames = []
    for name, concepts in sets.items():
        frames.append(run.trials(concepts, None).assign(concepts=name))
        for arm, bias in biases.items():
            frames.append(run.trials(concepts, bias, arm=arm).assign(concepts=name))
    df = pd.concat(frames, ignore_index=True)
    metrics = detection_metrics(df, by=("concepts", "arm"))
    gains = pd.concat(
        [el.arm_gains(metrics[metrics["concepts"] == n]).assign(concepts=n) for n in sets], ignore_index=True
    )
    run.say(
        f"== headline: injection layer {run.layer}, strength {run.strength:g} (the spec's default), bias at"
    )
    run.say(f"   layer {layer}; {a.n_trials} trials per concept and condition; judge {run.judge.name}")
    for _, row in metrics.iterrows():
        rates = ", ".join(f"{r} {_rate(row, r)}" for r in RATES)
        run.say(f"   {row['concepts']:9s} {row['arm']:24s} n={int(row['n_injection'])}: {rates}")
    run.say(
        "   change in points (bias minus none, Newcombe 95%); the paper's text: +74.7 detection, +21.9 forced"
    )
    run.say("   identification, +54.7 introspection, FPR 0% after (Gemma3-27B-IT, 100 held-out concepts)")
    for _, row in gains.iterrows():
        run.say(
            f"   {row['concepts']:9s} {row['arm']:24s} TPR {_gain(row, 'tpr')}, forced "
            f"{_gain(row, 'forced_id')}, introspection {_gain(row, 'introspection')}, FPR {_gain(row, 'fpr')}"
        )
    held = gains[gains["concepts"] == "held-out"]
    tables = [("bias_vector_headline", metrics)]
    runs.save(gains_figure(held, paper=el.PAPER_TEXT), "bias_vector_gains", a.out, tables, formats=a.formats)
    training = gains_figure(gains[gains["concepts"] == "training"])
    runs.save(training, "bias_vector_gains_training", a.out, formats=a.formats)
    return metrics, biases


def dose(run: Run, metrics: pd.DataFrame | None, biases: dict[str, el.BiasVector]) -> None:
    a = run.args
    strengths = sorted({round(run.strength * m, 6) for m in a.dose_multiples} | {run.strength})
    df = run.trials(run.concepts, None, strengths=strengths, forced=False)
    curve = detection_metrics(df, by=("strength",))
    curve = curve[curve["n_injection"] > 0]
    run.say(f"== dose: no-bias TPR on held-out against strength (default {run.strength:g})")
    run.say(
        "   " + ", ".join(f"{s:g}: {t:.3f}" for s, t in zip(curve["strength"], curve["tpr"], strict=True))
    )
    if metrics is None or not biases:
        return
    rows = []
    for arm in biases:
        hit = metrics[(metrics["concepts"] == "held-out") & (metrics["arm"] == arm)]
        if not len(hit):
            continue
        tpr = float(hit["tpr"].iloc[0])
        gain = el.dose_equivalent_gain(curve, tpr=tpr, strength=run.strength)
        s_eq = run.strength + gain
        rows.append({"arm": arm, "strength": run.strength, "tpr": tpr, "dose_strength": s_eq})
        note = " (beyond the no-bias peak: no dose gives it)" if s_eq == math.inf else ""
        run.say(
            f"   {arm}: TPR {tpr:.3f} = no-bias TPR at strength {s_eq:.3f}; dose-equivalent gain "
            f"{gain:+.3f} ({gain / run.strength * 100:+.0f}% of the default){note}"
        )
    at_default = curve.loc[curve["strength"] == run.strength, "tpr"]
    if len(at_default) and float(at_default.iloc[0]) >= 0.95:
        value = float(at_default.iloc[0])
        run.say(f"   no-bias TPR at the default {value:.3f}: saturated, nothing to elicit")
    if rows:
        runs.save(dose_figure(curve, pd.DataFrame(rows)), "bias_vector_dose", a.out, formats=a.formats)


def layer_sweep(run: Run) -> None:
    a = run.args
    concepts = runs.parse_concepts(a.sweep_concepts)
    layers = a.sweep_layers if a.sweep_layers is not None else list(range(run.n_layers))
    frames = [run.trials(concepts, None, forced=True)]
    for b in layers:
        bias = run.bias(b, a.sweep_labels, epoch_size=a.sweep_epoch_size)
        frames.append(run.trials(concepts, bias, forced=True, arm=f"bias L{b}"))
    metrics = detection_metrics(pd.concat(frames, ignore_index=True), by=("arm",))
    metrics["bias_layer"] = [-1 if arm == "none" else int(arm.split("L")[1]) for arm in metrics["arm"]]
    metrics["depth"] = [math.nan if b < 0 else b / run.n_layers for b in metrics["bias_layer"]]
    metrics = metrics.sort_values("bias_layer")
    paper = el.paper_bias_layer_sweep()
    run.say(
        f"== Figure 16 left: bias layer swept ({a.sweep_labels} labels), {len(concepts)} held-out concepts,"
    )
    run.say(f"   injection layer {run.layer}, strength {run.strength:g}")
    for _, row in metrics.iterrows():
        run.say(f"   bias {row['bias_layer']:>2} : " + ", ".join(f"{r} {row[r]:.3f}" for r in RATES))
    biased = metrics[metrics["bias_layer"] >= 0]
    if biased["tpr"].nunique() > 1:
        best = biased.sort_values("tpr", kind="stable").iloc[-1]
        run.say(f"   best bias layer by TPR: {int(best['bias_layer'])} (depth {best['depth']:.2f})")
    else:
        run.say(f"   every bias layer gives the same TPR ({biased['tpr'].iloc[0]:.3f}): no layer stands out")
    pbest = paper[paper["bias_layer"] >= 0].sort_values("tpr").iloc[-1]
    none = paper[paper["bias_layer"] < 0].iloc[0]
    run.say(
        f"   paper (fig2 rows meta_layer 0..61 x injection layers 30/40/50 x strengths 2/4, pooled; no bias ="
        f" meta_layer -1, TPR {none['tpr']:.3f}): best bias layer {int(pbest['bias_layer'])} "
        f"(depth {pbest['depth']:.2f}), TPR {pbest['tpr']:.3f}"
    )
    l29 = paper.set_index("bias_layer").loc[29]
    d = {r: 100 * (l29[r] - none[r]) for r in ("tpr", "forced_id", "introspection")}
    run.say(
        f"   paper, bias layer 29 minus no bias over those cells: TPR {d['tpr']:+.1f}, forced "
        f"{d['forced_id']:+.1f}, introspection {d['introspection']:+.1f}, FPR {l29['fpr']:.3f} (the text)"
    )
    fig = bias_layer_figure(
        metrics, paper, model_name=run.spec.name, injection_depth=run.layer / run.n_layers
    )
    runs.save(fig, "bias_vector_layers", a.out, [("bias_vector_layers", metrics)], formats=a.formats)


def injection_sweep(run: Run) -> None:
    a = run.args
    concepts = runs.parse_concepts(a.injection_concepts)
    arm_layers = a.arm_layers or sorted(
        {max(0, run.layer - 2), run.layer, min(run.n_layers - 1, run.layer + 2)}
    )
    layers = list(range(run.n_layers))
    frames = [run.trials(concepts, None, layers=layers, forced=True)]
    for b in arm_layers:
        bias = run.bias(b, a.sweep_labels, epoch_size=a.sweep_epoch_size)
        frames.append(run.trials(concepts, bias, layers=layers, forced=True, arm=f"bias L{b}"))
    metrics = detection_metrics(pd.concat(frames, ignore_index=True), by=("arm", "layer"))
    metrics = metrics.rename(columns={"layer": "injection_layer"})
    metrics["bias_layer"] = [-1 if arm == "none" else int(arm.split("L")[1]) for arm in metrics["arm"]]
    metrics["depth"] = metrics["injection_layer"] / run.n_layers
    paper = el.paper_bias_injection_sweep()
    run.say(
        f"== Figure 16 right: injection layers 0..{run.n_layers - 1} at strength {run.strength:g}, bias at"
    )
    run.say(f"   {arm_layers} ({a.sweep_labels} labels), {len(concepts)} held-out concepts; TPR per layer:")
    table = metrics.pivot(index="arm", columns="injection_layer", values="tpr")
    for arm, row in table.iterrows():
        run.say(f"   {arm:10s} " + " ".join(f"{v:.2f}" for v in row))
    none = metrics[metrics["arm"] == "none"].set_index("injection_layer")["tpr"]
    for b in arm_layers:
        rows = metrics[metrics["arm"] == f"bias L{b}"].set_index("injection_layer")["tpr"] - none
        before, after = rows[rows.index < b], rows[rows.index >= b]
        run.say(
            f"   bias L{b}: mean TPR gain at injection layers < {b}: {before.mean():+.3f}; at >= {b}: "
            f"{after.mean():+.3f}"
        )
    run.say("   paper (fig3 rows, its own baseline arm): TPR at injection layer 37, strength 4:")
    cell = paper[paper["injection_layer"] == 37].set_index("arm")["tpr"]
    run.say("   " + ", ".join(f"{arm} {tpr:.3f}" for arm, tpr in cell.items()))
    fig = bias_injection_figure(metrics, paper, model_name=run.spec.name)
    runs.save(fig, "bias_vector_injection", a.out, [("bias_vector_injection", metrics)], formats=a.formats)


def main(argv: Sequence[str] | None = None, *, doc: str | None = __doc__) -> None:
    """Run the parts the arguments ask for and print the README numbers."""
    torch.set_num_threads(1)
    args = parser(doc).parse_args(argv)
    t0 = time.time()
    run = Run(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    base = el.paper_default_baselines()
    run.say(f"== {run.spec.name}: default injection layer {run.layer}, strength {run.strength:g}")
    pooled = el.paper_bias_layer_sweep().set_index("bias_layer").loc[-1, "tpr"]
    run.say(
        "   the paper's no-bias TPR: at injection layer 37, strength 4, "
        + "; ".join(f"{r.source} {r.tpr:.3f}" for r in base.itertuples() if not math.isnan(r.tpr))
        + f"; fig2 pooled over layers 30/40/50 x strengths 2/4 (the text's baseline) {pooled:.3f}."
    )
    run.say(
        "   Figure 16 right compares with fig3's own baseline arm, Figure 16 left with fig2's pooled one."
    )
    metrics, biases = (None, {})
    if "headline" in args.parts:
        metrics, biases = headline(run)
    if "dose" in args.parts:
        dose(run, metrics, biases)
    if "layers" in args.parts:
        layer_sweep(run)
    if "injection" in args.parts:
        injection_sweep(run)
    print(f"\n==== README numbers ({time.time() - t0:.0f} s)\n" + "\n".join(run.lines))
    (Path(args.out) / "bias_vector_numbers.txt").write_text("\n".join(run.lines) + "\n")
