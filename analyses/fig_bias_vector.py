"""Figure 16 on the organism (logic in mechintro.cli.elicitation): a trained bias vector at one MLP output,
against the paper's released sweeps.

Trains bias vectors on the training concepts (every model weight frozen) and measures them on held-out
concepts at the model's default layer and strength (``spec_for(model).strength``, never a literal):

1. ``headline`` -- TPR, FPR, introspection and forced identification with and without the bias (one bias per
   label rule in ``--labels``), on held-out and on training concepts, with Wilson / Newcombe intervals,
   beside the paper's text (+74.7% detection, +21.9% forced identification, +54.7% introspection, 0% FPR);
2. ``dose`` -- the no-bias TPR against strength, and each bias's dose-equivalent gain;
3. ``layers`` -- the bias layer swept over every layer (Figure 16 left), with the paper's fig2 rows;
4. ``injection`` -- injection layers swept with the bias at ``--arm-layers`` (Figure 16 right), with fig3.

Trained biases are cached in ``--artifacts`` (reused only when every setting and the model's weights match),
and each arm's trials go to their own store there, so a re-run resumes. Everything the README needs is
printed at the end.

    python analyses/fig_bias_vector.py                                   # make reproduce sizes
    python analyses/fig_bias_vector.py --parts headline,dose             # what `mechintro elicit` runs
    python analyses/fig_bias_vector.py --model tiny --labels injected --sweep-labels injected \\
        --concepts Bread,Oceans --train-eval Dust,Trees --n-trials 1 --epoch-size 16 --max-new-tokens 6
"""

from mechintro.cli.elicitation import main

if __name__ == "__main__":
    main(doc=__doc__)
