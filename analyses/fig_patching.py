"""Figure: per-layer attention / MLP ablation (steered runs), patching (into unsteered runs) and forced-
identification ablation, with steered and unsteered baselines and 95% CIs across concepts.

    python analyses/fig_patching.py --model organism
    python analyses/fig_patching.py --model tiny --concepts Bread,Oceans,Dust
"""

from __future__ import annotations

from collections.abc import Sequence

from mechintro.behaviour.store import TrialStore
from mechintro.cli import setup as runs
from mechintro.core.readout import detection_weights
from mechintro.mechanism.patching import PatchingConfig, component_patching, summarize_patching
from mechintro.plots.mechanism import patching_figure


def main(argv: Sequence[str] | None = None) -> None:
    p = runs.mechanism_parser(__doc__)
    p.add_argument(
        "--trials", type=runs.int_list, default=[1], help="trial numbers (default 1; the paper's 1..10)"
    )
    p.add_argument(
        "--metric",
        choices=["gap", "log_odds"],
        default="gap",
        help="gap: Yes-No logit gap and P(concept) (default); log_odds: the paper's detection-weighted "
        "log-odds (weights from the judged trials in --store) and concept log-odds",
    )
    p.add_argument("--positions", default="from_start", choices=["from_start", "last"])
    args = p.parse_args(argv)
    s = runs.load_setup(args)
    cfg = PatchingConfig(
        trials=tuple(args.trials), positions=args.positions, batch_size=args.batch_size, metric=args.metric
    )
    detection = None
    if args.metric == "log_odds":
        runs.behaviour(s)  # judged trials at the default setting, in the store
        with TrialStore(args.store) as store:
            trials = store.load(layer=s.spec.injection_layer, strength=s.spec.strength)
        detection = detection_weights(s.model, trials)
        print(f"detection weights from {detection.source}: {len(detection.token_ids)} first tokens")
    df = component_patching(s.model, s.concepts, vectors=s.vectors, config=cfg, detection=detection)
    print(summarize_patching(df).to_string(index=False))
    runs.save(patching_figure(df), "patching", args.out, [("patching", df)])


if __name__ == "__main__":
    main()
