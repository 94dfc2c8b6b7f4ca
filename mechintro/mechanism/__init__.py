"""The mechanism layer: component patching (layers and heads), transcoder feature scores, gates and evidence
carriers, interventions (features and directions) and progressive curves."""
