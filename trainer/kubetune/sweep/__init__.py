"""FineTuneSweep: a FineTuneJob template, parameters to search, an objective (spec.py); the search with Optuna
(search.py); `kubetune sweep` on this machine (local.py); sweep.json and its plot (report.py). The operator's
controller (kubetune_operator/sweeps.py) runs the same resource on a cluster. Torch-free, like kubetune.spec."""
