"""The behaviour layer: trial plans, the batch worker, ``run_trials`` and ``sweep``, executors (local, Ray),
leases,
the trial store, judges and detection metrics. It imports only :mod:`mechintro.core`."""
