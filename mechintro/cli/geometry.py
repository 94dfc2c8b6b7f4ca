"""Shared setup of the geometry figure scripts (the paper's Figures 6-8): options, model and concept vectors,
per-concept rates from the trial store, the success/failure partition, and the trial detector that steers
with explicit vectors.

Two trial budgets: ``--rates-trials`` (default 20) trials per concept measure the per-concept rates the
partition is drawn on; ``--n-trials`` (default 10) trials per steered vector measure the reruns (swaps, pairs,
noise). The concept trials go to ``--store``; the steered trials (swapped vectors, differences, random
vectors, directions) to ``--steer-store`` (default: ``<store>.geometry.sqlite`` beside it), so that nothing
that reads the concept store (``mechintro figures``, per-concept rates) mixes them in. Both resume; the
scripts share them, so the rates are run once.

``--model tiny`` is a random tiny Gemma 3 (with random transcoders), for smoke tests.

The scripts in ``analyses/`` (fig_swaps, fig_bidirectional, fig_concept_space, fig_ridge, fig_noise_controls)
are thin: they parse with :func:`parser`, set up with :func:`mechintro.cli.setup.load_setup` (transcoders
only for the ridge), call these, and save with :func:`mechintro.cli.setup.save`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mechintro.cli import setup as runs
from mechintro.studies import geometry as geo


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The run options (:func:`mechintro.cli.setup.add_run_options`) plus the geometry options."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    runs.add_run_options(p)
    runs.add_setup_options(p)
    p.add_argument(
        "--rates-trials",
        type=runs.positive_int,
        default=20,
        help="trials per concept for the per-concept rates (default 20; the README numbers need >= 20)",
    )
    p.add_argument(
        "--rate",
        choices=geo.RATE_COLUMNS,
        default="detection_rate",
        help="partition on detection, or on detection and identification (default detection_rate)",
    )
    p.add_argument(
        "--steer-store",
        default=None,
        help="store of the steered trials (default: <store>.geometry.sqlite; in memory without --store)",
    )
    p.add_argument("--out", default="figures", help="output folder")
    _figure_options(p)
    p.add_argument(
        "--formats", type=runs.name_list, default=["html", "png"], help="figure formats (default html,png)"
    )
    p.set_defaults(store=runs.DEFAULT_STORE, threads=1)
    return p


def _figure_options(p: argparse.ArgumentParser) -> None:
    """Every figure's own options, accepted by every geometry script (so ``mechintro geometry`` can hand the
    same arguments to all of them)."""
    f6 = p.add_argument_group("swaps (fig_swaps.py)")
    f6.add_argument(
        "--partners",
        type=runs.name_list,
        default=list(geo.PARTNER_RULES),
        help="random,nearest (default both)",
    )
    f6.add_argument(
        "--no-swap-rescale", action="store_true", help="keep the swapped norm (default: rescale to ‖v‖)"
    )
    f7 = p.add_argument_group("bidirectional steering (fig_bidirectional.py)")
    f7.add_argument(
        "--tolerance",
        type=float,
        default=0.5,
        help="pairs' projections on Δμ differ by at most this many SDs (default 0.5)",
    )
    f7.add_argument(
        "--same-category",
        action="store_true",
        help="pair only concepts of the same stimuli category (only the original 50 concepts have one)",
    )
    f7.add_argument(
        "--no-pair-rescale",
        action="store_true",
        help="keep ‖A - B‖ (default: rescale to the mean concept norm)",
    )
    f8 = p.add_argument_group("concept space (fig_concept_space.py)")
    f8.add_argument("--direction", action="append", default=[], help="name=path of a [d_model] direction")
    f8.add_argument("--k-pcs", type=int, default=3, help="δPCs to steer along (default 3)")
    f8.add_argument(
        "--sweep-multiples",
        type=runs.float_list,
        default=[-1.0, -0.5, 0.5, 1.0, 1.5, 2.0],
        help="δPC steering norms in mean concept norms at the default strength (default -1,-0.5,0.5,1,1.5,2)",
    )
    f8.add_argument("--sweep-trials", type=int, default=20, help="trials per point of the δPC sweep")
    f8.add_argument("--lens-k", type=int, default=10, help="top/bottom tokens of the logit lens (default 10)")
    f8d = p.add_argument_group("ridge (fig_ridge.py)")
    f8d.add_argument(
        "--counts",
        type=lambda t: [int(v) for v in t.split(",") if v.strip()],
        default=[1, 2, 5, 10, 20, 50, 100, 200, 500],
        help="numbers of top transcoder features (default 1,2,5,10,20,50,100,200,500)",
    )
    f8d.add_argument("--folds", type=int, default=5, help="outer folds (default 5)")
    f8d.add_argument("--leaky", action="store_true", help="also rank features on all concepts (leaks)")
    fn = p.add_argument_group("noise controls (fig_noise_controls.py)")
    fn.add_argument(
        "--noise-multiples",
        type=runs.float_list,
        default=[1.0],
        help="multiples of the default strength (default 1)",
    )
    fn.add_argument("--repeats", type=int, default=1, help="random vectors per concept and kind (default 1)")


def run_settings(s: runs.Setup) -> dict[str, Any]:
    """temperature, max_new_tokens, seed, batch_size, progress from the run options."""
    a = s.args
    return {
        "temperature": a.temperature,
        "max_new_tokens": a.max_new_tokens,
        "seed": a.seed,
        "batch_size": a.batch_size,
        "progress": not a.quiet,
    }


def rates(s: runs.Setup) -> pd.DataFrame:
    """Per-concept detection and detection-and-identification rates at the injection layer and strength,
    from ``--rates-trials`` trials per concept in the store (run now if missing)."""
    from mechintro.behaviour.trials import run_trials

    df = run_trials(
        s.model,
        s.concepts,
        layer=s.layer,
        strength=s.strength,
        n_trials=s.args.rates_trials,
        judge=runs.parse_judge(s.args.judge),
        vectors=s.vectors,
        controls=False,
        store=s.args.store,
        **run_settings(s),
    )
    out = geo.concept_outcomes(df)
    norm = s.vectors.norm(dim=1).numpy()
    rho = stats.spearmanr(norm, out.set_index("concept").reindex(s.concepts)[s.args.rate]).statistic
    print(
        f"{s.spec.name}: layer {s.layer}, strength {s.strength:g}, {len(s.concepts)} concepts x "
        f"{s.args.rates_trials} trials: mean {s.args.rate} {out[s.args.rate].mean():.3f}; "
        f">= 0.7: {(out[s.args.rate] >= 0.7).sum()}, <= 0.2: {(out[s.args.rate] <= 0.2).sum()}; "
        f"Spearman(vector norm, rate) = {rho:.2f}"
    )
    return out


def partition(s: runs.Setup, table: pd.DataFrame) -> geo.Partition | None:
    """The success/failure partition, or None (with a note) when the rate does not vary enough."""
    try:
        part = geo.partition(s.vectors, s.concepts, table, rate=s.args.rate, seed=s.args.seed)
    except ValueError as err:
        print(f"note: no success/failure partition, so no geometry figure: {err}")
        return None
    row = part.summary().iloc[0]
    print(
        f"partition on {part.rate} >= {part.threshold:g}: {row['n_success']} success / "
        f"{row['n'] - row['n_success']} failure; LDA macro-F1 {row['macro_f1']:.2f}, balanced accuracy "
        f"{row['balanced_accuracy']:.2f} (one direction, Δμ: {row['projection_balanced_accuracy']:.2f}); "
        f"silhouette {row['silhouette']:.3f}; cos(Δμ, LDA) {row['cos_delta_mu_lda']:.2f}"
    )
    return part


def detector(s: runs.Setup, *, n_trials: int | None = None) -> geo.TrialDetector:
    """Steering by explicit vectors at the injection layer and strength, ``--n-trials`` trials each."""
    return geo.TrialDetector(
        s.model,
        runs.parse_judge(s.args.judge),
        n_trials=s.args.n_trials if n_trials is None else n_trials,
        layer=s.layer,
        strength=s.strength,
        store=steer_store(s.args),
        rate=s.args.rate,
        run=run_settings(s),
    )


def steer_store(args: argparse.Namespace) -> str | None:
    """``--steer-store``, else ``<store>.geometry.sqlite`` beside ``--store`` (None: in memory)."""
    if args.steer_store:
        return args.steer_store
    if args.store is None or args.store == ":memory:":
        return None
    path = Path(args.store)
    return str(path.with_name(f"{path.stem}.geometry.sqlite"))


def mean_norm(s: runs.Setup) -> float:
    return float(np.linalg.norm(s.vectors.numpy(), axis=1).mean())
