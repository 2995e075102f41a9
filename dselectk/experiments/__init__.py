"""Experiments of the DSelect-k paper as plain functions (no plotting, no files written).

* :mod:`dselectk.experiments.movielens` -- the MovieLens recommender (Appendix D.1): MMoE with
  DSelect-k, Top-k and softmax gates and the shared-bottom baseline on the two tasks of
  :func:`dselectk.movielens.movielens_multitask`.

The full-protocol runs are pytest tests marked ``paper`` (``pytest --paper``), skipped by default.
"""
