"""The paper's experiments as importable functions: each trains the models of one experiment and
returns the metrics the paper reports, so that tests (fast variants), sweeps and the scripts under
``benchmarks/`` all run the same code.

* :mod:`dselectk.experiments.synthetic` -- Appendix C.2 (multi-task synthetic data, 16-128 tasks,
  DSelect-k vs Top-k vs the softmax-selector ablations) and Appendix C.3.2 (gate recovery).
"""
