"""dselectk.plots: the figures are written, and a missing matplotlib gives a clear ImportError."""
import os
import subprocess
import sys
import textwrap

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


def test_plots_leave_the_backend_and_pyplot_alone(tmp_path):
    # A session with a backend of its own (Jupyter's inline one, or here "svg"): importing
    # dselectk.plots and drawing keeps it, imports no pyplot, and leaves no figure open.
    pytest.importorskip("matplotlib")
    script = textwrap.dedent(f"""
        import sys
        import matplotlib
        matplotlib.use("svg")
        import numpy as np
        import dselectk.plots as plots
        fig = plots.plot_task_expert_heatmap(np.eye(3), {str(tmp_path / "h.png")!r})
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        assert "matplotlib.pyplot" not in sys.modules
        assert type(fig).__name__ == "Figure"
        import matplotlib.pyplot as plt
        assert plt.get_fignums() == []
        print("ok")
    """)
    # the child imports dselectk from where the tests do (not an unbuilt checkout in its cwd)
    env = dict(os.environ, MPLBACKEND="", PYTHONPATH=os.path.dirname(os.path.dirname(dk.__file__)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_expert_weight_plot_has_a_legend_of_every_expert(tmp_path):
    pytest.importorskip("matplotlib")

    class History:  # what plot_expert_weights reads of dk.History
        gate_steps = [0, 10, 20]
        gate_weights = np.random.default_rng(0).dirichlet(np.ones(5), size=(3, 2))  # (records, T, n)

    for highlight in ((), (1, 3)):
        fig = plots.plot_expert_weights(History(), tmp_path / "w.png", task=1, highlight=highlight)
        legend = fig.axes[0].get_legend()
        labels = [t.get_text() for t in legend.get_texts()]
        assert labels == [f"expert {j}" + (" (true)" if j in highlight else "") for j in range(5)]
