"""Hyperparameter sweeps: the paper's tuning protocol (random grid search with repetitions).

Hazimeh et al. tune every method the same way: sample a number of configurations at random from a
grid of hyperparameters, train each chosen configuration several times with different seeds, keep
the configuration with the best mean validation metric (discarding, for DSelect-k, the values of
lambda for which S(Z) did not become binary), and report the mean and standard error of the test
metrics over the repetitions. :class:`Sweep` runs that protocol for any trial function::

    from dselectk.sweep import Sweep, summarize

    def train_mmoe(config, seed):            # a module-level function, so worker processes can import it
        X, Y, Xv, Yv, Xt, Yt = load_data()
        model = dk.MMoE(X.shape[1], n_tasks=2, n_experts=8, gate="dselect_k", k=2, gamma=config["gamma"],
                        entropy_reg=config["lam"], seed=seed)
        history = dk.fit(model, X, Y, lr=config["lr"], validation_data=(Xv, Yv), seed=seed, verbose=0,
                         early_stopping_patience=3)
        return {"val_loss": min(history["val_loss"]),
                "binary": float(all(s is not None for s in history.binary_step)),
                "test_loss": dk.evaluate(model, Xt, Yt)["loss"]}

    sweep = Sweep(train_mmoe, {"lr": [1e-4, 1e-3, 1e-2], "lam": [0, 0.1, 1, 10], "gamma": [0.1, 1, 10]},
                  n_trials=20, repetitions=5, constraint=lambda m: m["binary"] == 1.0,
                  results_path="dselectk_sweep.jsonl", name="dselect_k")
    result = sweep.run()                    # executor="process": one process per core
    result.best_config                      # {'lr': 0.001, 'lam': 1, 'gamma': 1}
    print(result.to_markdown())             # one row per configuration: "0.123 ± 0.004"

* Every finished trial is appended to ``results_path`` as one JSON line (flushed and fsync'ed), and
  running the same sweep again with the same file skips the trials already recorded, so an
  interrupted sweep loses only the trials that were running.
* Executors: ``"serial"`` (in this process), ``"process"`` (a spawn-started process pool, with the
  threads of OpenMP, OpenBLAS and dselectk divided among the workers), or a Dask cluster
  (``dask.distributed.Client`` or a scheduler address; needs ``pip install "dselectk[sweep]"``).
* :func:`summarize` turns records (of one sweep or of several) into mean ± standard error tables,
  e.g. per method for the paper's final tables; :func:`load_records` reads a results file.

The package: ``_space`` (grid checks, configuration sampling, trial seeds and keys), ``_store`` (the
results file), ``_executors`` (serial, process pool, Dask), ``_report`` (tables, results, progress)
and ``_runner`` (:class:`Sweep`).
"""
from __future__ import annotations

from ._executors import _THREAD_ENV_VARS, _available_cpus
from ._report import SummaryTable, SweepResult, summarize
from ._runner import Sweep, TrialError
from ._store import _RECORD_FIELDS, _ResultsFile, load_records

__all__ = ["Sweep", "SweepResult", "SummaryTable", "TrialError", "summarize", "load_records"]
