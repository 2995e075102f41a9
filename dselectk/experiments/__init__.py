"""Experiments of the DSelect-k paper as functions that train models and return their results.

* :mod:`dselectk.experiments.multi_mnist` -- Multi-MNIST / Multi-Fashion-MNIST (Section 4.2,
  Appendix D.2): MMoE with CNN experts under the DSelect-k, Top-k and softmax gates, and the
  shared-bottom CNN baseline.

The full protocols take hours on a CPU; ``tests/test_experiment_*.py`` run small versions by
default and the full ones with ``pytest --paper``.
"""
