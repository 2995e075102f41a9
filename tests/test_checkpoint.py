"""Checkpoints and resume (#14): dk.save keeps the optimizer, counters, RNG states, History and
callback states; fit(resume_from=) continues bit for bit, also in a new process; ModelCheckpoint
saves atomically; divergence restores the last finite (or best) weights; save / predict refuse
non-finite parameters; paths without extension; missing files."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import dselectk as dk
from dselectk import callbacks as C
from dselectk import trainer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# where the dselectk these tests import lives, for child processes: the in-place build of a
# checkout, or site-packages when installed (then ROOT's unbuilt dselectk/ must not shadow it)
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(dk.__file__)))

CONFIGS = {
    # dropout masks (step counters), noisy Top-k (a Generator), embeddings (the lazy Adam state)
    "noisy_topk_embeddings": dict(kind="emb", model=dict(gate="top_k", k=2, per_example=True, noisy=True,
                                                         dropout=0.3), fit=dict(optimizer="adam", lr=0.01)),
    # per-example DSelect-k, Adagrad, a schedule and early stopping whose state must carry over
    "dselect_k_adagrad": dict(kind="dense", model=dict(gate="dselect_k", k=2, per_example=True, entropy_reg=0.1,
                                                       dropout=0.2), fit=dict(optimizer="adagrad", lr=0.05)),
}


def _problem(kind, seed=0, N=160):
    rng = np.random.default_rng(seed)
    if kind == "emb":
        ids = np.stack([rng.integers(0, 9, N), rng.integers(0, 7, N)], axis=1)
        X = {"ids": ids, "dense": rng.standard_normal((N, 2)).astype(np.float32)}
        signal = ids[:, 0] - ids[:, 1] + X["dense"][:, 0]
    else:
        X = rng.standard_normal((N, 5)).astype(np.float32)
        signal = X[:, 0] - X[:, 1]
    return X, [(signal > 0).astype(np.float32), (0.5 * signal).astype(np.float32)]


def _build(name):
    cfg = CONFIGS[name]
    emb = dict(embeddings=dict(vocab_sizes=[9, 7], dims=[3, 2], n_dense=2)) if cfg["kind"] == "emb" else {}
    return dk.MMoE(None if emb else 5, n_tasks=2, n_experts=4, expert_units=(8,), tower_units=(4,),
                   task_losses=["bce", "mse"], seed=3, **emb, **cfg["model"])


class Count(C.Callback):
    """The epochs this fit ran and its steps: a resumed run runs only the rest."""

    def __init__(self):
        self.epochs, self.steps = [], 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)

    def on_batch_end(self, batch, logs=None):
        self.steps += 1


def _callbacks(path_pattern=None):
    cbs = [C.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1, min_delta=0.0)]
    if path_pattern:
        cbs.append(C.ModelCheckpoint(path_pattern))
    return cbs


def _fit(name, model, epochs, **kw):
    X, Y = _problem(CONFIGS[name]["kind"])
    Xv, Yv = _problem(CONFIGS[name]["kind"], seed=1, N=60)
    args = dict(batch_size=32, validation_data=(Xv, Yv), early_stopping_patience=50, verbose=0, seed=5,
                **CONFIGS[name]["fit"])
    args.update(kw)
    return T.fit(model, X, Y, epochs=epochs, **args)


def _assert_same_run(a, b, ha, hb):
    np.testing.assert_array_equal(a.slab.data, b.slab.data)
    for x, y in zip(a.embedding_tables(), b.embedding_tables()):
        np.testing.assert_array_equal(x, y)
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    strip = lambda h: [{k: v for k, v in e.items() if k != "time"} for e in h.epochs]
    assert strip(ha) == strip(hb)
    assert ha.binary_step == hb.binary_step and ha.epoch_steps == hb.epoch_steps and ha.best_epoch == hb.best_epoch
    np.testing.assert_array_equal(ha.gate_weights, hb.gate_weights)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resume_is_bit_identical_to_the_uninterrupted_run(tmp_path, name):
    whole = _build(name)
    h_whole = _fit(name, whole, 5, callbacks=_callbacks(str(tmp_path / "ckpt-{epoch}.npz")))
    assert sorted(os.listdir(tmp_path)) == [f"ckpt-{e}.npz" for e in range(1, 6)]  # no temporary files left
    resumed, count = _build(name), Count()
    h_resumed = _fit(name, resumed, 5, callbacks=_callbacks() + [count], resume_from=tmp_path / "ckpt-2.npz")
    assert count.epochs == [3, 4, 5] and count.steps == 3 * 5
    _assert_same_run(whole, resumed, h_whole, h_resumed)
    assert resumed.train_state.epoch == 5 and len(h_resumed.epochs) == 5


RUN = textwrap.dedent("""
    import os, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import dselectk as dk
    from dselectk import callbacks as C
    import test_checkpoint as tc
    mode, folder = sys.argv[1], sys.argv[2]

    class DieAfter(C.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 3:
                os._exit(17)  # killed: the checkpoint of epoch 2 is all that is left

    model = tc._build("noisy_topk_embeddings")
    if mode == "first":
        tc._fit("noisy_topk_embeddings", model, 5, callbacks=tc._callbacks(folder + "/ckpt-{{epoch}}.npz") + [DieAfter()])
    else:
        count = tc.Count()
        tc._fit("noisy_topk_embeddings", model, 5, callbacks=tc._callbacks() + [count],
                resume_from=folder + "/ckpt-2.npz")
        dk.save(model, folder + "/final.npz")
        print(count.epochs, count.steps)
""")


def test_resume_across_a_process_restart(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN.format(tests=os.path.join(ROOT, "tests")))
    env = dict(os.environ, DSELECTK_NUM_THREADS=str(dk.get_num_threads()), PYTHONPATH=PACKAGE_PARENT)
    first = subprocess.run([sys.executable, str(script), "first", str(tmp_path)], env=env, capture_output=True,
                           text=True)
    assert first.returncode == 17, first.stderr
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("ckpt")) == ["ckpt-1.npz", "ckpt-2.npz"]
    second = subprocess.run([sys.executable, str(script), "resume", str(tmp_path)], env=env, capture_output=True,
                            text=True)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "[3, 4, 5] 15"
    whole = _build("noisy_topk_embeddings")
    h_whole = _fit("noisy_topk_embeddings", whole, 5, callbacks=_callbacks())
    final = dk.load(tmp_path / "final.npz")
    _assert_same_run(whole, final, h_whole, final.history)


KILL_MID_SAVE = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import dselectk as dk
    model = dk.load(sys.argv[1])
    model.slab.data[...] += 1.0
    os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # dies with the new bytes written, unrenamed
    dk.save(model, sys.argv[1])
""")


def test_a_kill_mid_save_leaves_the_old_file_intact(tmp_path):
    model = dk.MoE(3, n_experts=2, seed=0)
    T.fit(model, np.ones((16, 3), np.float32), np.ones(16, np.float32), epochs=1, verbose=0)
    path = tmp_path / "model.npz"
    dk.save(model, path)
    before = path.read_bytes()
    script = tmp_path / "kill.py"
    script.write_text(KILL_MID_SAVE)
    out = subprocess.run([sys.executable, str(script), str(path)], env=dict(os.environ, PYTHONPATH=PACKAGE_PARENT),
                         capture_output=True, text=True)
    assert out.returncode == -9, out.stderr
    assert path.read_bytes() == before
    np.testing.assert_array_equal(dk.load(path).slab.data, model.slab.data)
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".model.npz.")]
    assert len(leftovers) == 1  # the dead writer's temporary file, never the target


def test_save_keeps_the_optimizer_and_history(tmp_path):
    X, Y = _problem("emb")
    model = _build("noisy_topk_embeddings")
    T.fit(model, X, Y, epochs=2, verbose=0, optimizer="adam")
    dk.save(model, tmp_path / "m.npz")
    loaded = dk.load(tmp_path / "m.npz")
    assert loaded.optimizer.step_count == model.optimizer.step_count == 4  # 2 epochs of 2 batches
    for a, b in zip(loaded.sparse_optimizer.m + loaded.sparse_optimizer.v, model.sparse_optimizer.m +
                    model.sparse_optimizer.v):
        np.testing.assert_array_equal(a, b)
    assert loaded.sparse_optimizer.step_count == 4
    assert loaded.history["loss"] == model.history["loss"] and loaded.train_state.step == 4
    dk.save(model, tmp_path / "light.npz", include_optimizer=False)
    assert dk.load(tmp_path / "light.npz").optimizer is None
    assert os.path.getsize(tmp_path / "light.npz") < os.path.getsize(tmp_path / "m.npz")
    with pytest.raises(ValueError, match="no training state"):
        T.fit(_build("noisy_topk_embeddings"), X, Y, epochs=3, verbose=0, resume_from=tmp_path / "light.npz")


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    name = "dselect_k_adagrad"
    model = _build(name)
    _fit(name, model, 2, callbacks=[C.ModelCheckpoint(str(tmp_path / "c.npz"))])
    with pytest.raises(ValueError, match="saved after epoch 2; epochs=2 leaves nothing to train"):
        _fit(name, _build(name), 2, resume_from=tmp_path / "c.npz")
    other = dk.MMoE(5, n_tasks=2, n_experts=3, task_losses=["bce", "mse"])
    with pytest.raises(ValueError, match="another model"):
        _fit(name, other, 4, resume_from=tmp_path / "c.npz")
    with pytest.warns(UserWarning, match="other settings than the saved run.*batch_size"):
        _fit(name, _build(name), 3, batch_size=16, resume_from=tmp_path / "c.npz")


def test_model_checkpoint_every_n_and_on_best(tmp_path):
    name = "dselect_k_adagrad"
    every = C.ModelCheckpoint(str(tmp_path / "e{epoch}.npz"), every=2)
    best = C.ModelCheckpoint(str(tmp_path / "best.npz"), monitor="val_loss", save_best_only=True)
    seen = []

    class Vals(C.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(logs["val_loss"])

    _fit(name, _build(name), 5, callbacks=[every, best, Vals()])
    assert every.saved == [str(tmp_path / f"e{e}.npz") for e in (2, 4)]
    improving = [e + 1 for e, v in enumerate(seen) if v < min(seen[:e], default=np.inf)]
    assert len(best.saved) == len(improving)
    assert dk.load(tmp_path / "best.npz").train_state.epoch == improving[-1]


class Poison(C.Callback):
    def __init__(self, at):
        self.at, self.starts = at, {}

    def on_epoch_begin(self, epoch, logs=None):
        self.starts[epoch] = self.model.slab.data.copy()

    def on_batch_end(self, batch, logs=None):
        if logs["step"] == self.at:
            self.model.slab.data[:5] = np.inf


def test_divergence_restores_the_last_finite_weights():
    X, Y = _problem("dense")
    model = _build("dselect_k_adagrad")
    poison = Poison(at=7)  # in epoch 2 (5 steps per epoch)
    with pytest.raises(FloatingPointError, match=r"epoch 2, step 3 of 5.*restored to its last finite weights, those "
                                                 r"at the start of epoch 2.*optimizer state was dropped"):
        T.fit(model, X, Y, epochs=4, batch_size=32, verbose=0, callbacks=[poison])
    np.testing.assert_array_equal(model.slab.data, poison.starts[2])
    assert model.optimizer is None
    T.predict(model, X)  # finite again
    T.fit(model, X, Y, epochs=1, verbose=0)  # and trains on, with a new optimizer


def test_divergence_restores_the_best_weights_early_stopping_kept():
    X, Y = _problem("dense")
    model = _build("dselect_k_adagrad")
    stop = C.EarlyStopping(patience=10, restore_best_weights=True)
    with pytest.raises(FloatingPointError, match=r"restored to the best weights early stopping kept \(epoch \d\)"):
        T.fit(model, X, Y, epochs=5, batch_size=32, verbose=0, validation_data=(X, Y),
              callbacks=[stop, Poison(at=17)])
    np.testing.assert_array_equal(model.slab.data, stop.best_weights[0])


def test_save_and_predict_refuse_non_finite_parameters(tmp_path):
    X, _ = _problem("emb")
    model = _build("noisy_topk_embeddings")
    model.parameters()["gate1.A"][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"save.*parameter 'gate1.A' holds NaN or Inf"):
        dk.save(model, tmp_path / "m.npz")
    assert not os.path.exists(tmp_path / "m.npz")
    with pytest.raises(ValueError, match=r"predict: the model's parameter 'gate1.A' holds NaN or Inf"):
        T.predict(model, X)
    model.parameters()["gate1.A"][0, 0] = 0
    model.embedding_tables()[1][X["ids"][4, 1], 0] = np.inf
    with pytest.raises(ValueError, match="embedding table 'embedding1' holds NaN or Inf"):
        dk.save(model, tmp_path / "m.npz")
    with pytest.raises(ValueError, match="embedding table 1 holds NaN or Inf in rows this batch reads"):
        T.predict(model, X)


def test_paths_without_extension_and_missing_files(tmp_path):
    model = dk.MoE(3, n_experts=2, seed=1)
    dk.save(model, tmp_path / "noext")
    assert os.path.exists(tmp_path / "noext") and not os.path.exists(tmp_path / "noext.npz")
    np.testing.assert_array_equal(dk.load(tmp_path / "noext").slab.data, model.slab.data)
    np.savez(tmp_path / "old", params=np.zeros(1))  # np.savez adds .npz: load("old") finds it (then refuses it)
    with pytest.raises(ValueError, match="old.npz"):
        dk.load(tmp_path / "old")
    with pytest.raises(FileNotFoundError, match="missing"):
        dk.load(tmp_path / "missing.npz")


def _rewrite(path, out, change):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"][()]))
    change(meta, arrays)
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(out, **arrays)


@pytest.mark.parametrize("change,match", [
    (lambda m, a: m["training"]["state"].update(epoch=-1), "training.state.epoch"),
    (lambda m, a: m["training"].update(extra=1), "unknown fields"),
    (lambda m, a: m["training"]["random"].pop(), "training.random"),
    (lambda m, a: m["training"]["state"].update(rng="x"), "training.state.rng"),
    (lambda m, a: a.update(train_opt_accum=a["train_opt_accum"][:-1]), "accum"),
    (lambda m, a: a.update(train_opt_accum=np.full_like(a["train_opt_accum"], np.nan)), "NaN"),
    (lambda m, a: m["training"]["history"].update(binary_step=[1]), "binary_step"),
    (lambda m, a: m["training"]["history"]["epochs"][0].update(loss="low"), "objects of numbers"),
])
def test_a_corrupted_training_state_is_a_value_error(tmp_path, change, match):
    model = _build("dselect_k_adagrad")
    _fit("dselect_k_adagrad", model, 1)
    dk.save(model, tmp_path / "m.npz")
    _rewrite(tmp_path / "m.npz", tmp_path / "bad.npz", change)
    with pytest.raises(ValueError, match=match):
        dk.load(tmp_path / "bad.npz")


def test_saved_early_stopping_weights_must_fit_the_model(tmp_path):
    name = "dselect_k_adagrad"
    _fit(name, _build(name), 2, callbacks=[C.ModelCheckpoint(str(tmp_path / "c.npz"))])
    _rewrite(tmp_path / "c.npz", tmp_path / "bad.npz",
             lambda m, a: a.update(train_cb0_weights0=a["train_cb0_weights0"][:-3]))
    with pytest.raises(ValueError, match="EarlyStopping does not fit it.*best weights do not fit the model"):
        _fit(name, _build(name), 4, resume_from=tmp_path / "bad.npz")
