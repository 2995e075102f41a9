"""dselectk.plots: the figures are written, and a missing matplotlib gives a clear ImportError."""
import sys

import numpy as np
import pytest

import dselectk as dk
from dselectk import plots


def _records():
    rng = np.random.default_rng(0)
    return [{"config": {"method": m, "n_tasks": T},
             "metrics": {"test_mse": rng.random(), "jaccard_related": rng.random(), "jaccard_unrelated": rng.random()}}
            for m in ("dselect_k", "top_k") for T in (16, 32, 64) for _ in range(3)]


def test_missing_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install \"dselectk\[plot\]\""):
        plots.plot_metric_vs_tasks(_records(), tmp_path / "x.png")


def test_figures_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    plots.plot_metric_vs_tasks(_records(), tmp_path / "c4.png")
    model = dk.MMoE(3, n_tasks=2, n_experts=4, expert_units=(2,), tower_units=(), task_losses="mse", k=2)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((64, 3)).astype(np.float32)
    history = dk.fit(model, X, [X[:, 0], X[:, 1]], epochs=2, batch_size=16, verbose=0, record_gate_every=1)
    plots.plot_expert_weights(history, tmp_path / "c7.png", task=1, highlight=[0, 2], title="t")
    plots.plot_task_expert_heatmap(model.gate_weights(), tmp_path / "c3.png", title="heatmap")
    for name in ("c4.png", "c7.png", "c3.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match=r"\(T, n\)"):
        plots.plot_task_expert_heatmap(np.zeros(3), tmp_path / "bad.png")
