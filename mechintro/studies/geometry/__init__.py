"""Geometry of concept vectors: what separates the concepts a model detects from those it misses.

Everything starts from concept vectors ``V`` (``[concept, d_model]``) and per-concept rates from the trial
store (:func:`concept_outcomes`), and returns tidy DataFrames.

* :func:`partition` -- success/failure split: sweep a threshold on the detection (or detection-and-
  identification) rate, keep the one with the best mean macro-F1 of a 5-fold stratified LDA among those
  whose minority class holds more than 20% of the concepts; the unit mean-difference direction ``û`` (Δμ),
  cross-validated balanced accuracy, silhouette.
* :func:`swap_vectors` / :func:`swap_experiment` / :func:`paired_tests` -- write ``v = (v·û)û + r``; swap
  the projection (or the residual ``r``) with a partner from the other group, rescale to ``‖v‖``, rerun the
  trials, and test the change per concept (paired t, Wilcoxon).
* :func:`bidirectional_pairs` / :func:`bidirectional_experiment` -- steer with ``A − B`` and ``B − A`` for
  nearest-neighbour pairs within a group matched on their projection; a rule that is linear in one direction
  can never detect both (``f(x) = f(−x)`` is needed).
* :func:`concept_pca`, :func:`logit_lens`, :func:`verbalizability`, :func:`delta_pcs` /
  :func:`direction_sweep` -- concept-space structure.
* :func:`nested_ridge` / :func:`ridge_r2` -- per-concept detection regressed on predictors with nested
  cross-validation; transcoder features are ranked inside each training fold.
* :func:`noise_vectors` / :func:`noise_experiment` -- random vectors norm-matched to the concept vectors.

Experiments that steer take a ``detect`` callable (:data:`Detect`): labels and vectors in, rates out. On a
model that is a :class:`TrialDetector` (batched trials through :func:`mechintro.behaviour.trials.run_trials`
with explicit vectors, store-backed); in tests it is a planted rule.

One module per experiment (:mod:`.partitioning`, :mod:`.swaps`, :mod:`.bidirectional`, :mod:`.concept_space`,
:mod:`.ridge`, :mod:`.noise`) and one for what they share (:mod:`.common`: inputs, per-concept rates, the
trial runner and its judge wrapper); this package re-exports their public names.
"""

from mechintro.studies.geometry.bidirectional import (
    bidirectional_experiment,
    bidirectional_pairs,
    bidirectional_summary,
)
from mechintro.studies.geometry.common import (
    PAPER_TEXT,
    RATE_COLUMNS,
    Detect,
    TrialDetector,
    concept_outcomes,
    label_word,
    steer_trials,
)
from mechintro.studies.geometry.concept_space import (
    ConceptPCA,
    concept_pca,
    delta_pcs,
    direction_sweep,
    lens_logits,
    logit_lens,
    token_variants,
    verbalizability,
)
from mechintro.studies.geometry.noise import NOISE_KINDS, noise_experiment, noise_vectors
from mechintro.studies.geometry.partitioning import Partition, partition
from mechintro.studies.geometry.ridge import RIDGE_ALPHAS, nested_ridge, ridge_r2, transcoder_activations
from mechintro.studies.geometry.swaps import (
    PARTNER_RULES,
    SWAP_KINDS,
    paired_tests,
    swap_experiment,
    swap_partners,
    swap_vectors,
)

__all__ = [
    "NOISE_KINDS",
    "PAPER_TEXT",
    "PARTNER_RULES",
    "RATE_COLUMNS",
    "RIDGE_ALPHAS",
    "SWAP_KINDS",
    "ConceptPCA",
    "Detect",
    "Partition",
    "TrialDetector",
    "bidirectional_experiment",
    "bidirectional_pairs",
    "bidirectional_summary",
    "concept_outcomes",
    "concept_pca",
    "delta_pcs",
    "direction_sweep",
    "label_word",
    "lens_logits",
    "logit_lens",
    "nested_ridge",
    "noise_experiment",
    "noise_vectors",
    "paired_tests",
    "partition",
    "ridge_r2",
    "swap_experiment",
    "swap_partners",
    "steer_trials",
    "swap_vectors",
    "token_variants",
    "transcoder_activations",
    "verbalizability",
]
