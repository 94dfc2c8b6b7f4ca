"""Figure (logic in mechintro.cli.attribution): steering-attribution graphs (injection -> features -> Yes/No)
of a few held-out concepts, with
every number the README reports about them.

For each graph concept: the attribution over the strength grid (default 21 points from 0 to the model's
strength s*), the graph (depth 2, both hop directions), its figure (offline HTML + PNG), its JSON and its
Neuronpedia / circuit-tracer JSON, and the parquet frames of the attribution. Then:

* the fundamental-theorem check: ∫ dL/dα over the grid against L(s*) - L(0);
* per layer, how much of that layer's total the graph's features explain (``Σ_kept ISA / ∫ total``);
* beside find_gates / find_evidence_carriers (on the grid of ``--concepts``): is the top gate in the graph,
  and which carriers of it are on the path;
* a causal check: for the top features by ISA, the measured change of L at s* when each is patched back
  to its unsteered (α = 0) activation at its position, against its ISA (Spearman; reported, not asserted).

    python analyses/fig_attribution_graph.py --model organism
    python analyses/fig_attribution_graph.py --concept Bread --strengths 0,0.5,1,1.5,2 --depth 2
    python analyses/fig_attribution_graph.py --model tiny --concepts Bread,Oceans,Dust --judge logit \
        --n-trials 1
"""

from mechintro.cli.attribution import main

if __name__ == "__main__":
    main(doc=__doc__)
