"""The paper's experiments as importable functions: each trains the models of one experiment and
returns the metrics the paper reports (no plotting), so that tests (fast variants), sweeps and the
scripts under ``benchmarks/`` all run the same code.

* :mod:`dselectk.experiments.synthetic` -- Appendix C.2 (multi-task synthetic data, 16-128 tasks,
  DSelect-k vs Top-k vs the softmax-selector ablations) and Appendix C.3.2 (gate recovery).
* :mod:`dselectk.experiments.movielens` -- the MovieLens recommender (Appendix D.1): MMoE with
  DSelect-k, Top-k and softmax gates and the shared-bottom baseline on the two tasks of
  :func:`dselectk.movielens.movielens_multitask`.
* :mod:`dselectk.experiments.multi_mnist` -- Multi-MNIST / Multi-Fashion MNIST (Section 4.2,
  Appendix D.2): MMoE with 8 CNN experts and the shared-bottom CNN baseline.

The full-protocol runs are pytest tests marked ``paper`` (``pytest --paper``), skipped by default.
"""
