"""The Multi-MNIST experiment (dselectk.experiments.multi_mnist; Section 4.2, Appendix D.2).

Default run (seconds): the whole pipeline -- IDX files, the overlay, CNN-expert MMoE models with
static DSelect-k / Top-k gates, Adam with batch 256, early stopping, test accuracy -- on a small
synthetic source written here (ten 10 x 10 "glyph" classes), asserting that learning happens
(accuracy far above the 10% of chance) and that each gate selects at most k experts; plus a short
run on the real Fashion-MNIST files when they are installed (skipped otherwise).

``pytest --paper``: the full protocol (100,000 / 20,000 / 20,000 examples, 8 CNN experts, every
model of the paper) on Multi-MNIST (``DSELECTK_MNIST_DIR`` = a directory of the MNIST IDX files)
and Multi-Fashion-MNIST. Hours on a CPU.
"""
import gzip
import math
import os

import numpy as np
import pytest

from dselectk import images as I
from dselectk.experiments import multi_mnist as E


def _write_glyph_source(directory, n_train=1200, n_test=300, seed=0):
    """Ten classes of 10 x 10 images: each class a fixed random stroke pattern (about 30% of the
    pixels), drawn with random intensities and 5% of the pixels flipped."""
    rng = np.random.default_rng(seed)
    patterns = rng.random((10, 10, 10)) < 0.3

    def draw(n):
        labels = rng.integers(0, 10, n)
        on = patterns[labels] ^ (rng.random((n, 10, 10)) < 0.05)
        return (on * rng.integers(150, 256, (n, 10, 10))).astype(np.uint8), labels.astype(np.uint8)

    os.makedirs(directory, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        imgs, labels = draw(n)
        for kind, array in (("images", imgs), ("labels", labels)):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            with gzip.open(os.path.join(directory, I.IDX_FILES[(split, kind)] + ".gz"), "wb") as f:
                f.write(header + array.tobytes())
    return directory


SMALL = dict(n_experts=4, k=2, expert_layers=1, units=24, tower_units=(16,), filters=(6, 12), kernel=3)


def test_small_synthetic_multi_mnist(tmp_path):
    """14 x 14 composites (no row or column lost to the pooling); batch 64 rather than the paper's
    256, for enough steps on a small set."""
    directory = _write_glyph_source(tmp_path / "glyphs")
    data = I.multi_mnist(directory, n_train=1536, n_val=256, n_test=512, seed=0, shift=2)
    assert data.input_shape == (1, 14, 14)
    results = E.run(data, models=("dselect_k", "top_k"), epochs=12, batch_size=64, lr=3e-3,
                    early_stopping_patience=4, entropy_reg=0.5, **SMALL)
    for name, r in results.items():
        assert all(acc > 0.6 for acc in r["test_accuracy"]), (name, r)  # chance: 0.1
        assert r["selected_experts"] is not None and all(1 <= s <= 2 for s in r["selected_experts"]), (name, r)


def test_small_synthetic_shared_bottom_and_softmax(tmp_path):
    directory = _write_glyph_source(tmp_path / "glyphs", n_train=600, n_test=200, seed=1)
    data = I.multi_mnist(directory, n_train=768, n_val=0, n_test=256, seed=1, shift=2)
    results = E.run(data, models=("softmax", "shared_bottom"), epochs=10, batch_size=64, lr=3e-3, **SMALL)
    assert results["softmax"]["selected_experts"] == [4, 4]  # the dense gate uses every expert
    assert results["shared_bottom"]["selected_experts"] is None
    for r in results.values():
        assert all(acc > 0.3 for acc in r["test_accuracy"]), results


def test_build_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown model 'mlp'"):
        E.build_model("mlp", (1, 36, 36))
    with pytest.raises(ValueError, match="dataset"):
        E.run(dataset="cifar")
    with pytest.raises(ValueError, match="path="):
        E.run(dataset="mnist")


def test_paper_models_have_the_paper_architecture():
    model = E.build_model("dselect_k", (1, 36, 36), expert_layers=3)
    assert model.n_experts == 8 and model.gates[0].k == 2 and not model.gates[0].per_example
    expert = model.experts[0]
    assert expert.feature_shape == (20, 6, 6) and expert.out_dim == 50
    assert [type(layer).__name__ for layer in expert.layers].count("Dense") == 3
    sb = E.build_model("shared_bottom", (1, 36, 36), expert_layers=5)
    assert [type(layer).__name__ for layer in sb.bottom.layers].count("Dense") == 5


FASHION = all(I._find(I.FASHION_MNIST_DIR, s, k) for s, k in I.IDX_FILES)


@pytest.mark.skipif(not FASHION, reason=f"Fashion-MNIST is not installed in {I.FASHION_MNIST_DIR}")
def test_small_real_multi_fashion_mnist():
    data = I.multi_fashion_mnist(n_train=768, n_val=0, n_test=384, seed=0)
    results = E.run(data, models=("dselect_k",), epochs=7, batch_size=64, lr=5e-3, early_stopping_patience=None,
                    n_experts=2, k=1, filters=(4, 8), units=24, tower_units=(16,), entropy_reg=1.0, gamma=0.5)
    r = results["dselect_k"]
    assert all(acc > 0.25 for acc in r["test_accuracy"]), r  # chance: 0.1; 84 steps of a tiny model
    assert r["selected_experts"] == [1, 1]


# ---------------------------------------------------------------------------------------------
# full protocol: pytest --paper
# ---------------------------------------------------------------------------------------------

def _datasets():
    out = []
    mnist = os.environ.get("DSELECTK_MNIST_DIR")
    out.append(pytest.param("mnist", mnist, marks=pytest.mark.skipif(
        not mnist, reason="set DSELECTK_MNIST_DIR to a directory with the MNIST IDX files")))
    out.append(pytest.param("fashion_mnist", None, marks=pytest.mark.skipif(
        not FASHION, reason="apt-get install dataset-fashion-mnist")))
    return out


@pytest.mark.paper
@pytest.mark.parametrize("dataset,path", _datasets())
def test_full_protocol(dataset, path):
    """Every model of the paper with 8 CNN experts on 100,000 / 20,000 / 20,000 examples. The paper
    reports about 92-93% (Multi-MNIST) and 80-83% (Multi-Fashion-MNIST) per-task accuracy for
    the gated MMoEs; the bounds here are loose."""
    results = E.run(dataset=dataset, path=path, verbose=1)
    floor = 0.85 if dataset == "mnist" else 0.72
    for name, r in results.items():
        print(name, r)
        assert all(acc > floor for acc in r["test_accuracy"]), (name, r)
        if name in ("dselect_k", "top_k"):
            assert all(s <= 2 for s in r["selected_experts"]), (name, r)


def _experiment_script():
    """benchmarks/multi_fashion_mnist_experiment.py as a module (benchmarks/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "mfm_experiment", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "multi_fashion_mnist_experiment.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_trial_function_and_experiment_script(tmp_path):
    """multi_mnist_trial's metrics, and benchmarks/multi_fashion_mnist_experiment.py end to end on
    the glyph source (tiny sizes; the script's --path reads any directory of IDX files)."""
    import json

    directory = str(_write_glyph_source(tmp_path / "glyphs", n_train=600, n_test=200, seed=2))
    metrics = E.multi_mnist_trial(dict(model="dselect_k", path=directory, n_train=256, n_val=128, n_test=128,
                                       epochs=1, batch_size=64, n_experts=4, k=2, filters=(4, 8), kernel=3), seed=0)
    assert 0 <= metrics["val_error"] <= 1 and metrics["val_error"] == pytest.approx(
        1 - (metrics["val_acc1"] + metrics["val_acc2"]) / 2)
    assert 1 <= metrics["experts"] <= 4 and metrics["epochs"] == 1
    assert 0 < metrics["expert_flops"] <= metrics["expert_flops_dense"]
    assert metrics["binary"] in (0.0, 1.0) and (metrics["binary"] == 1.0) == (not math.isnan(metrics["binary_pct"]))

    script = _experiment_script()
    out = tmp_path / "out"
    argv = ["--path", directory, "--models", "shared_bottom", "top_k", "--trials", "2", "--tune-train", "128",
            "--tune-val", "64", "--tune-epochs", "1", "--reps", "2", "--epochs", "1", "--n-train", "256", "--n-val",
            "64", "--n-test", "64", "--workers", "1", "--out", str(out), "--quiet"]
    script.main(argv)
    lines = (out / "trials.jsonl").read_text().splitlines()
    sweeps = [json.loads(line)["sweep"] for line in lines]
    assert sweeps.count("multi_fashion/top_k/tune") == 2 and sweeps.count("multi_fashion/top_k/final") == 2
    table = (out / "table2.md").read_text()
    assert "shared_bottom" in table and "top_k" in table and "83.78" in table  # beside the paper's numbers
    chosen = json.loads((out / "chosen_configs.json").read_text())
    assert chosen["top_k"]["config"]["n_train"] == 256 and chosen["top_k"]["config"]["k"] in (2, 4)
    script.main(argv)  # a rerun resumes: nothing is trained again
    assert (out / "trials.jsonl").read_text().splitlines() == lines
    # more tuning for one model: the other model's choice and table row stay
    script.main(argv[:2] + ["--models", "shared_bottom", "--trials", "3"] + argv[7:])
    chosen = json.loads((out / "chosen_configs.json").read_text())
    assert set(chosen) == {"shared_bottom", "top_k"}
    table = (out / "table2.md").read_text()
    assert "| top_k | 2 |" in table and "| shared_bottom | 2 |" in table  # the chosen configuration's 2 runs each


def test_comet_plus_trains_with_a_hardened_permutation(tmp_path):
    """COMET + local search (the script's comet+ row) on the glyph source: the soft phase ends inside
    training, each gate's permutation is hardened to a permutation per tree, recorded in the History,
    and the model still learns; then benchmarks/multi_fashion_mnist_experiment.py's comet+ row starts
    from comet's chosen configuration and differs from it only by ls_frac."""
    import json

    directory = str(_write_glyph_source(tmp_path / "glyphs", n_train=600, n_test=200, seed=3))
    data = I.multi_mnist(directory, n_train=1024, n_val=128, n_test=256, seed=3, shift=2)
    out = E.train_and_test(data, "comet", epochs=8, batch_size=64, lr=1e-2, ls_frac=0.25, return_model=True,
                           seed=0, **SMALL)  # soft phase: 2 of the 8 epochs (32 of 128 steps)
    model, history = out["model"], out["history"]
    assert [r["step"] for r in history.permutations] == [32, 32]
    for gate, record in zip(model.gates, history.permutations):
        perm = gate.permutation
        assert perm is not None and perm.shape == (SMALL["k"], SMALL["n_experts"])  # one per tree
        for row in perm:
            assert sorted(row.tolist()) == list(range(SMALL["n_experts"]))
        np.testing.assert_array_equal(perm, record["permutation"])
    assert all(acc > 0.3 for acc in out["test_accuracy"]), out  # chance: 0.1

    script = _experiment_script()
    argv = ["--path", directory, "--trials", "1", "--tune-train", "128", "--tune-val", "64", "--tune-epochs", "1",
            "--reps", "1", "--epochs", "2", "--n-train", "256", "--n-val", "64", "--n-test", "64", "--workers", "1",
            "--out", str(tmp_path / "out"), "--quiet"]
    with pytest.raises(SystemExit, match="run --models comet comet\\+"):
        script.main(argv + ["--models", "comet+"])  # comet+ needs comet's choice
    script.main(argv + ["--models", "comet", "comet+"])
    records = [json.loads(line) for line in (tmp_path / "out" / "trials.jsonl").read_text().splitlines()]
    assert [r["config"]["ls_frac"] for r in records if r["sweep"] == "multi_fashion/comet+/tune"] == [0.01, 0.03, 0.1]
    chosen = json.loads((tmp_path / "out" / "chosen_configs.json").read_text())
    plus = dict(chosen["comet+"]["config"])
    assert plus.pop("ls_frac") in (0.01, 0.03, 0.1) and plus == chosen["comet"]["config"]
    table = (tmp_path / "out" / "table2.md").read_text()
    assert "| comet | 1 |" in table and "| comet+ | 1 |" in table
