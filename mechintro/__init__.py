"""mechintro: concept injection, introspection trials and circuit analysis (arXiv 2603.21396).

The public API is re-exported here (see README.md for a tour and docs/ for the reference). The package is
layered, lowest first; a layer imports only the ones below it:

* :mod:`mechintro.core`: models and hook names, prompts, concepts, injection, sampling, the fast path,
  readouts, transcoders, argument checks, the weights fingerprint, settings;
* :mod:`mechintro.behaviour`: trial plans and batches, run_trials and sweep, executors, leases, the trial
  store, judges, metrics, the trial-dialogue loss;
* :mod:`mechintro.mechanism`: patching, feature scores, gates and carriers, interventions, directions, curves;
* :mod:`mechintro.attribution`: sites, metric, passes, result, graph, Neuronpedia export;
* :mod:`mechintro.studies`: the geometry experiments, the bias vector, the post-training conditions and
  checkpoint series;
* :mod:`mechintro.organism`: the model organism's tokenizer, corpus, training, transcoders and evaluation;
* :mod:`mechintro.plots`: one builder per figure, one style, one save;
* :mod:`mechintro.cli`: the ``mechintro`` command and what the ``analyses/`` scripts share.

:mod:`mechintro.testing` (tiny random models for your own tests) is imported by tests and users only.
"""

from mechintro.attribution.config import AttributionConfig, GraphConfig
from mechintro.attribution.graph import AttributionGraph, attribution_graph
from mechintro.attribution.metric import feature_metric, token_metric
from mechintro.attribution.passes import steering_attribution
from mechintro.attribution.result import SteeringAttribution, merge_attributions
from mechintro.attribution.sharded import sharded_steering_attribution
from mechintro.attribution.strengths import strength_grid
from mechintro.behaviour.executors import RayExecutor, release_ray_workers
from mechintro.behaviour.judges import LLMJudge, LogitJudge, RuleJudge
from mechintro.behaviour.metrics import detection_metrics
from mechintro.behaviour.plan import SweepConfig, TrialConfig
from mechintro.behaviour.store import StoreError, TrialStore
from mechintro.behaviour.trials import run_trials, sweep
from mechintro.core.concepts import (
    all_concepts,
    baseline_words,
    concept_vectors,
    heldout_concepts,
    new_concepts,
    original_concepts,
    training_concepts,
)
from mechintro.core.hooks import capture
from mechintro.core.models import HookNames, ModelSpec, load_model, spec_for
from mechintro.core.paper_models import PAPER_MODELS, PaperModel, paper_model
from mechintro.core.prompts import PERSONAS, VARIANTS, TrialPrompt, forced_prefill, left_pad, trial_prompt
from mechintro.core.sampling import sample
from mechintro.core.steering import inject
from mechintro.core.transcoders import encode_at, load_transcoders, replace_mlps
from mechintro.mechanism.directions import (
    ablate_directions,
    difference_of_means,
    gate_direction,
    random_direction,
)
from mechintro.mechanism.features import FeatureGridConfig, feature_grid, find_evidence_carriers, find_gates
from mechintro.mechanism.interventions import intervene, read_features
from mechintro.mechanism.orthogonalize import orthogonalize
from mechintro.mechanism.patching import PatchingConfig, component_patching
from mechintro.mechanism.sharded import sharded_feature_grid
from mechintro.studies.bias import BiasVector, bias_vector, load_bias_vector, train_bias_vector
from mechintro.studies.checkpoints import Checkpoint, compare_checkpoints, compare_gates, series
from mechintro.studies.posttrain import LoraSettings, PosttrainConfig, posttrain
from mechintro.studies.preferences import PreferencePair, load_pairs, select_pairs

__all__ = [
    "AttributionConfig",
    "AttributionGraph",
    "BiasVector",
    "Checkpoint",
    "GraphConfig",
    "FeatureGridConfig",
    "HookNames",
    "LLMJudge",
    "LogitJudge",
    "LoraSettings",
    "ModelSpec",
    "PAPER_MODELS",
    "PERSONAS",
    "PaperModel",
    "PosttrainConfig",
    "PreferencePair",
    "PatchingConfig",
    "RayExecutor",
    "RuleJudge",
    "SteeringAttribution",
    "StoreError",
    "SweepConfig",
    "TrialConfig",
    "TrialPrompt",
    "TrialStore",
    "VARIANTS",
    "ablate_directions",
    "all_concepts",
    "attribution_graph",
    "baseline_words",
    "bias_vector",
    "capture",
    "compare_checkpoints",
    "compare_gates",
    "component_patching",
    "concept_vectors",
    "detection_metrics",
    "difference_of_means",
    "encode_at",
    "feature_grid",
    "feature_metric",
    "find_evidence_carriers",
    "find_gates",
    "forced_prefill",
    "gate_direction",
    "heldout_concepts",
    "inject",
    "intervene",
    "left_pad",
    "load_bias_vector",
    "load_model",
    "load_pairs",
    "paper_model",
    "posttrain",
    "load_transcoders",
    "merge_attributions",
    "new_concepts",
    "original_concepts",
    "orthogonalize",
    "random_direction",
    "read_features",
    "release_ray_workers",
    "replace_mlps",
    "run_trials",
    "sample",
    "select_pairs",
    "series",
    "sharded_feature_grid",
    "sharded_steering_attribution",
    "spec_for",
    "steering_attribution",
    "strength_grid",
    "sweep",
    "token_metric",
    "train_bias_vector",
    "training_concepts",
    "trial_prompt",
]
