"""The public API: every name the package exports resolves, ``from mechintro import *`` works, and the names
the README teaches stay (new names may be added; none may disappear)."""

import importlib

import mechintro

STABLE = """
AttributionGraph BiasVector HookNames LLMJudge LogitJudge ModelSpec PERSONAS PatchingConfig RayExecutor
RuleJudge SteeringAttribution StoreError TrialPrompt TrialStore VARIANTS ablate_directions all_concepts
attribution_graph baseline_words bias_vector capture component_patching concept_vectors detection_metrics
difference_of_means encode_at feature_grid feature_metric find_evidence_carriers find_gates forced_prefill
gate_direction heldout_concepts inject intervene left_pad load_bias_vector load_model load_transcoders
merge_attributions new_concepts original_concepts random_direction read_features release_ray_workers
replace_mlps run_trials sample sharded_feature_grid sharded_steering_attribution spec_for
steering_attribution strength_grid sweep token_metric train_bias_vector training_concepts trial_prompt
""".split()
CONFIGS = ["AttributionConfig", "FeatureGridConfig", "GraphConfig", "SweepConfig", "TrialConfig"]


def test_every_exported_name_resolves():
    assert [n for n in mechintro.__all__ if not hasattr(mechintro, n)] == []
    namespace: dict = {}
    exec("from mechintro import *", namespace)
    assert set(mechintro.__all__) <= set(namespace)


def test_the_stable_names_and_the_configs_are_exported():
    assert sorted(set(STABLE + CONFIGS) - set(mechintro.__all__)) == []


def test_the_configs_are_frozen_dataclasses_with_a_docstring_per_field():
    import dataclasses

    from mechintro.cli.options import field_docs

    for name in CONFIGS:
        cls = getattr(mechintro, name)
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, name
        undocumented = [f.name for f in dataclasses.fields(cls) if not field_docs(cls).get(f.name)]
        assert undocumented == [], (name, undocumented)


def test_each_exported_name_is_defined_in_a_layer():
    """The API re-exports; nothing is defined in the package's ``__init__``."""
    for name in mechintro.__all__:
        obj = getattr(mechintro, name)
        module = getattr(obj, "__module__", None)
        if module is not None and callable(obj):
            assert module.split(".")[1] in {"core", "behaviour", "mechanism", "attribution", "studies"}, name
            importlib.import_module(module)
