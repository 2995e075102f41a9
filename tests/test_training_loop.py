"""The training loop people expect (#14): callbacks (the Callback base, EarlyStopping on a metric,
learning-rate schedules, clear errors for what fit cannot call), progress with ETA, verbose as
Keras, the optimizer continued across fits, loss / reg_loss / val_loss on one footing,
model.summary(), History, unknown metric names."""
import io
import sys
import warnings

import numpy as np
import pytest

import dselectk as dk
from dselectk import callbacks as C
from dselectk import trainer as T


def _data(rng, N=96, p=4):
    X = rng.standard_normal((N, p)).astype(np.float32)
    return X, [(X[:, 0] > 0).astype(np.float32), (X[:, 1] * 2 - X[:, 2]).astype(np.float32)]


def _model(**kw):
    args = dict(n_tasks=2, n_experts=4, expert_units=(8,), tower_units=(4,), task_losses=["bce", "mse"], seed=0)
    args.update(kw)
    return dk.MMoE(4, **args)


class Recorder(dk.callbacks.Callback):
    def __init__(self):
        self.calls = []

    def on_train_begin(self, logs=None):
        self.calls.append(("train_begin", self.params["epochs"], self.params["steps"]))

    def on_epoch_begin(self, epoch, logs=None):
        self.calls.append(("epoch_begin", epoch))

    def on_batch_end(self, batch, logs=None):
        self.calls.append(("batch_end", batch, logs["step"], logs["size"]))

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(("epoch_end", epoch, sorted(logs)))
        if epoch == 2:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.calls.append(("train_end",))


def test_callback_hooks_in_order_and_stop_training():
    rng = np.random.default_rng(0)
    X, Y = _data(rng)
    rec = Recorder()
    hist = T.fit(_model(), X, Y, epochs=5, batch_size=40, verbose=0, callbacks=[rec], validation_data=(X, Y))
    assert rec.calls[0] == ("train_begin", 5, 3) and rec.calls[-1] == ("train_end",)
    assert rec.calls[1:5] == [("epoch_begin", 1), ("batch_end", 0, 1, 40), ("batch_end", 1, 2, 40),
                              ("batch_end", 2, 3, 16)]
    keys = rec.calls[5][2]
    assert {"loss", "reg_loss", "task0_loss", "task1_loss", "val_loss", "val_task0_auc", "lr", "time"} <= set(keys)
    assert len(hist.epochs) == 2 and rec.model.train_state.epoch == 2 and rec.model.train_state.step == 6


class KerasLike(dk.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        pass


class WrongSignature(dk.callbacks.Callback):
    def on_epoch_end(self, epoch, logs, model):
        pass


class Unrelated:
    def on_epoch_end(self, epoch, logs=None):  # two arguments: neither protocol
        pass


def test_callbacks_fit_cannot_call_are_refused_clearly():
    rng = np.random.default_rng(1)
    X, Y = _data(rng)
    model = _model()
    before = model.slab.data.copy()
    with pytest.raises(TypeError, match=r"defines \['on_train_batch_end'\], which fit never calls.*on_batch_end"):
        T.fit(model, X, Y, epochs=1, verbose=0, callbacks=[KerasLike()])
    with pytest.raises(TypeError, match=r"WrongSignature.on_epoch_end\(epoch, logs, model\) cannot be called as "
                                        r"on_epoch_end\(epoch, logs\).*self.model"):
        T.fit(model, X, Y, epochs=1, verbose=0, callbacks=[WrongSignature()])
    with pytest.raises(TypeError, match=r"Unrelated is neither a dselectk.callbacks.Callback nor of the step protocol"):
        T.fit(model, X, Y, epochs=1, verbose=0, callbacks=[Unrelated()])
    fake_keras = type("EarlyStopping", (), {"__module__": "keras.src.callbacks", "on_epoch_end": lambda s, e, l=None: 0})
    with pytest.raises(TypeError, match="is a Keras callback.*dselectk.callbacks has EarlyStopping"):
        T.fit(model, X, Y, epochs=1, verbose=0, callbacks=[fake_keras()])
    with pytest.raises(TypeError, match="callbacks must be a list"):
        T.fit(model, X, Y, epochs=1, verbose=0, callbacks=Recorder())
    np.testing.assert_array_equal(model.slab.data, before)


def test_early_stopping_on_a_metric_restores_its_best_epoch():
    rng = np.random.default_rng(2)
    X, Y = _data(rng, N=120)
    Xv, Yv = _data(rng, N=80)
    seen = {}

    class Snap(dk.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen[epoch] = (logs["val_task0_auc"], self.model.slab.data.copy())

    stop = C.EarlyStopping(monitor="val_task0_auc", patience=2, restore_best_weights=True)
    assert stop.tracker.mode == "max"
    model = _model()
    hist = T.fit(model, X, Y, epochs=30, batch_size=16, lr=0.05, verbose=0, validation_data=(Xv, Yv),
                 callbacks=[Snap(), stop])
    best = max(seen, key=lambda e: (seen[e][0], -e))
    assert hist.best_epoch == best == stop.best_epoch
    np.testing.assert_array_equal(model.slab.data, seen[best][1])
    assert len(hist.epochs) == 30 or len(hist.epochs) == best + 2  # stopped after 2 epochs without a better AUC
    with pytest.raises(ValueError, match="monitors 'val_nothing', which is not in the logs"):
        T.fit(_model(), X, Y, epochs=2, verbose=0, validation_data=(Xv, Yv),
              callbacks=[C.EarlyStopping(monitor="val_nothing")])


def test_early_stopping_warns_when_its_best_epoch_predates_binary_gates():
    """DSelect-k with a strong entropy push: S(Z) becomes binary during training; a best epoch
    from before that gives back a gate that is not sparse, and a warning says so."""
    rng = np.random.default_rng(3)
    X, Y = _data(rng, N=256)
    model = dk.MoE(4, n_experts=8, expert_units=(8,), loss="mse", gate="dselect_k", k=2, gamma=0.5, entropy_reg=1.0,
                   seed=0)
    # the training loss falls, so its "best" in max mode is epoch 1, before S(Z) is binary
    stop = C.EarlyStopping(monitor="loss", mode="max", patience=100, restore_best_weights=True)
    with pytest.warns(UserWarning, match=r"restored the weights of epoch 1 .*before S\(Z\) became binary for task0"):
        hist = T.fit(model, X, Y[1], epochs=8, batch_size=32, lr=0.01, verbose=0, callbacks=[stop], shuffle=False)
    assert hist.binary_step[0] is not None and hist.binary_step[0] > hist.epoch_steps[0]


def test_learning_rate_schedules():
    rng = np.random.default_rng(4)
    X, Y = _data(rng)
    sched = C.LearningRateScheduler(lambda epoch, lr: 0.01 / epoch)
    hist = T.fit(_model(), X, Y, epochs=3, verbose=0, callbacks=[sched])
    assert hist["lr"] == pytest.approx([0.01, 0.005, 0.01 / 3])
    plateau = C.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=1, min_delta=1e9, min_lr=1e-4)
    hist = T.fit(_model(), X, Y, epochs=6, lr=1e-3, verbose=0, callbacks=[plateau])
    # logs["lr"]: the rate of that epoch; epoch 1 sets the best, each later one is a plateau
    assert hist["lr"] == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4, 1e-4])
    with pytest.raises(ValueError, match="schedule returned lr = -1"):
        T.fit(_model(), X, Y, epochs=1, verbose=0, callbacks=[C.LearningRateScheduler(lambda e, lr: -1)])


def test_fit_again_continues_the_optimizer():
    """Two fits of 2 epochs (no shuffling) are the 4-epoch fit: Adam's moments and step count,
    and the dropout counters, carry over; another optimizer says it starts over."""
    rng = np.random.default_rng(5)
    X, Y = _data(rng)
    once, twice = _model(dropout=0.2), _model(dropout=0.2)
    T.fit(once, X, Y, epochs=4, batch_size=32, shuffle=False, verbose=0)
    T.fit(twice, X, Y, epochs=2, batch_size=32, shuffle=False, verbose=0)
    opt = twice.optimizer
    assert opt.name == "adam" and opt.step_count == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T.fit(twice, X, Y, epochs=2, batch_size=32, shuffle=False, verbose=0)
    assert twice.optimizer is opt and opt.step_count == 12
    np.testing.assert_array_equal(once.slab.data, twice.slab.data)
    T.fit(twice, X, Y, epochs=1, lr=1e-4, verbose=0)  # a new lr: the same optimizer
    assert twice.optimizer is opt and opt.lr == 1e-4
    with pytest.warns(UserWarning, match="replaces the model's Adam.*starts over"):
        T.fit(twice, X, Y, epochs=1, optimizer="adagrad", verbose=0)
    assert twice.optimizer.name == "adagrad"
    with pytest.warns(UserWarning, match="starts over"):
        T.fit(twice, X, Y, epochs=1, optimizer_kwargs=dict(eps=1e-6), verbose=0)
    twice.optimizer = None  # starts over quietly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T.fit(twice, X, Y, epochs=1, verbose=0)


def test_training_and_validation_loss_on_one_footing():
    """With the parameters (almost) still, the training loss of an epoch is the validation loss on
    the same data, and the regularizer is reported apart."""
    rng = np.random.default_rng(6)
    X, Y = _data(rng)
    model = _model(gate="dselect_k", k=2, entropy_reg=0.5, task_weights=[0.3, 0.7])
    hist = T.fit(model, X, Y, epochs=1, batch_size=24, lr=1e-30, optimizer="sgd", verbose=0, validation_data=(X, Y))
    e = hist.epochs[0]
    assert e["loss"] == pytest.approx(e["val_loss"], rel=1e-5)
    assert e["task0_loss"] == pytest.approx(e["val_task0_loss"], rel=1e-5)
    assert e["loss"] == pytest.approx(0.3 * e["task0_loss"] + 0.7 * e["task1_loss"], rel=1e-6)
    assert e["reg_loss"] == pytest.approx(model.regularization(), rel=1e-5) and e["reg_loss"] > 0


def test_unknown_metric_names_raise_before_training():
    rng = np.random.default_rng(7)
    X, Y = _data(rng)
    model = _model()
    before = model.slab.data.copy()
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        T.fit(model, X, Y, epochs=1, verbose=0, validation_data=(X, Y), metrics=[["f1"], ["mse"]])
    with pytest.raises(ValueError, match="unknown metric 'aucc'"):
        T.evaluate(model, X, Y, metrics={"task0": ["aucc"]})
    np.testing.assert_array_equal(model.slab.data, before)
    r = T.evaluate(model, X, Y, metrics={"task0": ["log_loss"], "task1": ["r2", "mae"]})
    assert {"task0_log_loss", "task1_r2", "task1_mae"} <= set(r)


def test_summary_and_num_parameters_count_the_tables():
    model = dk.MMoE(None, n_tasks=2, n_experts=3, expert_units=(5,), tower_units=(2,), task_losses=["bce", "mse"],
                    task_names=["watch", "rating"], gate="top_k", per_example=True,
                    embeddings=dict(columns={"user": 4, "movie": 3}, vocab_sizes={"user": 50, "movie": 20}))
    assert model.num_parameters() == len(model.slab) + 50 * 4 + 20 * 3
    text = model.summary(print_fn=None)
    for piece in ["Embedding(50x4) of user", "(B, 4)", "expert2", "Dense(7->5) -> ReLU", "TopKGate for rating",
                  "(B, 3)", "(watch: bce)", f"Total parameters: {model.num_parameters():,}", "embedding tables 260"]:
        assert piece in text, piece
    lines = []
    dk.MoE(3, n_experts=2).summary(print_fn=lines.append)
    assert "(2,)" in lines[0] and "Total parameters" in lines[0]


def test_history_repr_and_keras_dict():
    rng = np.random.default_rng(8)
    X, Y = _data(rng)
    hist = T.fit(_model(), X, Y, epochs=3, verbose=0, validation_data=(X, Y))
    d = hist.history
    assert d["val_loss"] == hist["val_loss"] and len(d["loss"]) == 3 and d["epoch"] == [1, 2, 3]
    r = repr(hist)
    assert r.startswith("History(3 epochs, 3 steps") and "val_loss" in r and "reg_loss" in r
    assert repr(T.History(2)) == "History(no epochs)"


# --- progress -------------------------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_verbose_1_draws_a_tqdm_bar_per_epoch(monkeypatch):
    pytest.importorskip("tqdm")
    rng = np.random.default_rng(9)
    X, Y = _data(rng)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    T.fit(_model(), X, Y, epochs=2, batch_size=32, verbose=1)
    text = term.getvalue()
    assert "epoch 1/2" in text and "epoch 2/2" in text and "3/3" in text and "loss" in text


def test_without_tqdm_a_plain_line_with_eta(monkeypatch):
    rng = np.random.default_rng(10)
    X, Y = _data(rng)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    T.fit(_model(), X, Y, epochs=2, batch_size=32, verbose=1)
    text = term.getvalue()
    assert "\repoch 1/2  3/3 [" in text and "ETA" in text and "\repoch 2/2  loss" in text


def test_verbose_2_and_logs_print_one_line_per_epoch(monkeypatch):
    rng = np.random.default_rng(11)
    X, Y = _data(rng)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    T.fit(_model(), X, Y, epochs=2, batch_size=32, verbose=2)
    lines = term.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2  loss") and "reg_loss" in lines[0]
    log = io.StringIO()  # not a terminal: no bar, the summary lines only
    monkeypatch.setattr(sys, "stderr", log)
    T.fit(_model(), X, Y, epochs=2, batch_size=32, verbose=1)
    assert len(log.getvalue().splitlines()) == 2
    with pytest.raises(ValueError, match="verbose must be"):
        T.fit(_model(), X, Y, epochs=1, verbose=3)
