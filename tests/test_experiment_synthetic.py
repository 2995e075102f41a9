"""The paper's synthetic experiments (Appendix C.2 and C.3.2) as tests.

The fast variants run in the default test run: a reduced problem (32 tasks, 30,000 training rows,
5 epochs; gate recovery with 25 epochs), fixed configurations and fixed seeds, asserting the
direction of the paper's claims with margins that a broken gate (wrong gradient, wrong selector,
no sparsity) does not meet. The full protocol (tuning, 20 repetitions, all four task counts, both
ablations; gate recovery over 20 seeds) is ``benchmarks/synthetic_experiments.py``; the tests
marked ``paper`` run it and check the claims on its tables (``pytest --paper``, hours of CPU).
"""
import importlib.util
import os

import numpy as np
import pytest

from dselectk.experiments import synthetic as S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(n_tasks=32, n_samples=42_000, epochs=5)
FAST_CONFIGS = {
    "dselect_k": dict(method="dselect_k", gamma=10.0, lam=0.001, lr=0.1),
    "top_k": dict(method="top_k", lr=0.1),
    "ablation_annealing": dict(method="ablation_annealing", temperature=1e-3, lr=0.1),
}
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def fast_multitask():
    return {name: [S.synthetic_trial(dict(FAST, **cfg), seed) for seed in SEEDS]
            for name, cfg in FAST_CONFIGS.items()}


def _mean(runs, metric):
    return float(np.mean([r[metric] for r in runs]))


def test_fast_multitask_dselect_k_beats_top_k(fast_multitask):
    d, t = fast_multitask["dselect_k"], fast_multitask["top_k"]
    # Appendix C.2 / Figure C.4: lower test MSE, related tasks share more experts, unrelated fewer
    assert _mean(d, "test_mse") < 0.9 * _mean(t, "test_mse")
    assert _mean(d, "jaccard_related") > _mean(t, "jaccard_related")
    assert _mean(d, "jaccard_unrelated") < _mean(t, "jaccard_unrelated")
    assert all(r["selected"] <= 4 for r in d + t)


def test_fast_multitask_dselect_k_beats_the_annealing_ablation(fast_multitask):
    d, a = fast_multitask["dselect_k"], fast_multitask["ablation_annealing"]
    assert _mean(d, "test_mse") < 0.2 * _mean(a, "test_mse")
    assert _mean(d, "jaccard_related") > _mean(a, "jaccard_related")


def test_fast_multitask_metrics_are_consistent(fast_multitask):
    for runs in fast_multitask.values():
        for r in runs:
            assert 0 <= r["jaccard_unrelated"] <= 1 and 0 <= r["jaccard_related"] <= 1
            assert np.isfinite(r["test_mse"]) and r["test_mse"] > 0
            assert 1 <= r["selected"] <= 4


RECOVERY = {
    "dselect_k": dict(method="dselect_k", gamma=1.0, lam=0.0, lr=1e-2, epochs=25),
    "top_k": dict(method="top_k", lr=1e-2, epochs=25),
}


def test_fast_gate_recovery_dselect_k_weights_move_smoothly():
    """Appendix C.3.2, Figures C.6 / C.7: "The Top-k exhibits a sharp oscillatory behavior during
    training, whereas DSelect-k has smooth transitions." Measured on the expert weights recorded
    every 5 steps: total variation and the largest single jump, over 4 seeds. (How many true
    experts each gate recovers is left to the full protocol: on 12 seeds of this reduced setting
    the two gates tie, 2.67 of 4 each; see benchmarks/results/gate_recovery.)"""
    tv, jump = {}, {}
    for name, cfg in RECOVERY.items():
        for seed in range(4):
            _, _, history, _ = S.gate_recovery_trial(dict(cfg, record_every=5), seed, return_model=True)
            steps = np.abs(np.diff(history.gate_weights[:, 0, :], axis=0)).sum(axis=1)  # L1 change per record
            tv.setdefault(name, []).append(steps.sum())
            jump.setdefault(name, []).append(steps.max())
    assert np.mean(tv["dselect_k"]) < 0.7 * np.mean(tv["top_k"]), tv
    assert max(jump["dselect_k"]) < 0.3 < max(jump["top_k"]), jump


def test_gate_recovery_plants_exact_copies_and_freezes_them():
    metrics, model, history, true_positions = S.gate_recovery_trial(
        dict(RECOVERY["top_k"], epochs=1), seed=3, return_model=True)
    data = S._recovery_data(3)
    for i, j in enumerate(true_positions):
        np.testing.assert_array_equal(model.experts[j].layers[0].params["W"], data.expert_weights[i])
    assert set(metrics) >= {"recovered", "selected", "val_loss", "val_accuracy", "binary"}
    assert 0 <= metrics["recovered"] <= 4 and metrics["selected"] == 4


def test_selected_expert_sets_rules():
    """Nonzero weights, at most k = 4 (largest first); argmax per selector for the ablation gates."""
    import dselectk as dk

    model = dk.MMoE(3, n_tasks=2, n_experts=8, expert_units=(2,), expert_output="sum", tower_units=None,
                    gate="softmax_selector", k=4, seed=0)
    model.gates[0].params["beta"][...] = np.eye(8)[[1, 1, 5, 6]] * 10
    model.forward(np.zeros((1, 3), np.float32))
    assert S.selected_expert_sets(model)[0] == {1, 5, 6}
    model = dk.MMoE(3, n_tasks=1, n_experts=8, expert_units=(2,), expert_output="sum", tower_units=None,
                    gate="dselect_k", k=4, seed=0)
    model.forward(np.zeros((1, 3), np.float32))  # fresh gate: S(Z) fractional, every weight nonzero
    w = model.gate_weights()[0]
    assert S.selected_expert_sets(model)[0] == set(np.argsort(-w)[:4].tolist())


def _load_runner():
    spec = importlib.util.spec_from_file_location("synthetic_experiments",
                                                  os.path.join(REPO, "benchmarks", "synthetic_experiments.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def paper_multitask(tmp_path_factory):
    """Mean metrics per (method, n_tasks) of the full Appendix C.2 protocol (about an hour on 2 cores)."""
    from dselectk.sweep import load_records, summarize

    out = str(tmp_path_factory.mktemp("synthetic"))
    _load_runner().main(["multitask", "--out", out, "--quiet"])
    records = [r for r in load_records(os.path.join(out, "trials.jsonl")) if r["sweep"].endswith("/final")]
    return {(r["group"]["method"], r["group"]["n_tasks"]): r["mean"]
            for r in summarize(records, group_by=("method", "n_tasks"))}


@pytest.fixture(scope="module")
def paper_recovery(tmp_path_factory):
    """True experts recovered per seed of the full Appendix C.3.2 protocol, per gate."""
    from dselectk.sweep import load_records

    out = str(tmp_path_factory.mktemp("recovery"))
    _load_runner().main(["recovery", "--out", out, "--quiet", "--no-plots"])
    found = {}
    for r in load_records(os.path.join(out, "trials.jsonl")):
        if r["sweep"].endswith("/final"):
            found.setdefault(r["config"]["method"], []).append(r["metrics"]["recovered"])
    return found


@pytest.mark.paper
def test_paper_multitask_dselect_k_beats_top_k(paper_multitask):
    """Appendix C.2 / Figure C.4: DSelect-k beats Top-k in test MSE and related-task Jaccard from
    32 tasks on, by a wider MSE margin at 128 tasks than at 32, and beats the annealing ablation."""
    rows = paper_multitask
    for T in (32, 64, 128):
        assert rows["dselect_k", T]["test_mse"] < rows["top_k", T]["test_mse"]
        assert rows["dselect_k", T]["jaccard_related"] > rows["top_k", T]["jaccard_related"]
        assert rows["dselect_k", T]["test_mse"] < rows["ablation_annealing", T]["test_mse"]
    gain = {T: 1 - rows["dselect_k", T]["test_mse"] / rows["top_k", T]["test_mse"] for T in (32, 128)}
    assert gain[128] > gain[32]


@pytest.mark.paper
@pytest.mark.xfail(reason="did not reproduce in our run: the entropy ablation, whose weights are never exactly "
                          "zero, has the lowest test MSE (benchmarks/results/synthetic/README.md)", strict=False)
def test_paper_multitask_dselect_k_beats_the_entropy_ablation(paper_multitask):
    for T in (32, 64, 128):
        assert paper_multitask["dselect_k", T]["test_mse"] < paper_multitask["ablation_entropy", T]["test_mse"]


@pytest.mark.paper
@pytest.mark.xfail(reason="did not reproduce in our run: DSelect-k's selectors collapse once S(Z) is binary, "
                          "0.45 of 4 against Top-k's 2.6 (benchmarks/results/gate_recovery/README.md)", strict=False)
def test_paper_gate_recovery_dselect_k_recovers_more(paper_recovery):
    """Appendix C.3.2 over 20 seeds: DSelect-k recovers more true experts than Top-k (the paper:
    all 4 against 1)."""
    assert len(paper_recovery["dselect_k"]) >= 20 and len(paper_recovery["top_k"]) >= 20
    assert np.mean(paper_recovery["dselect_k"]) > np.mean(paper_recovery["top_k"])
