"""Optimizer steps (csrc/optim.c through dselectk.functional) and the classes of dselectk.optim.

The references are the textbook update rules of torch.optim.SGD / Adam / Adagrad written out in
NumPy, step by step; the kernels and classes must follow them for several steps, with momentum,
Nesterov momentum, weight decay and bias correction. Bad input raises, naming the argument.
"""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

import dselectk
from dselectk import functional as F
from dselectk import optim

F64, F32 = np.float64, np.float32
DTYPES = pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
NAN, INF = float("nan"), float("inf")


def tol(dtype):
    return dict(rtol=1e-12, atol=1e-14) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)


def slabs(n, dtype, seed=0, count=4):
    """params, then `count - 1` gradient arrays, one per step"""
    rng = np.random.default_rng(seed)
    return rng.normal(size=n).astype(dtype), [rng.normal(size=n).astype(dtype) for _ in range(count - 1)]


# ---------------------------------------------------------------------------------------------
# Textbook update rules (torch.optim's documented algorithms), in float64
# ---------------------------------------------------------------------------------------------

def ref_sgd(p, grads, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
    p, buf = p.astype(F64).copy(), None
    for g in grads:
        g = g.astype(F64) + weight_decay * p
        if momentum != 0:
            buf = g.copy() if buf is None else momentum * buf + g  # torch: the first buf is g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
    return p, buf


def ref_adam(p, grads, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    p = p.astype(F64).copy()
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.astype(F64) + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        # torch.optim.Adam adds eps to sqrt(v) / sqrt(1 - beta2^t), i.e. to sqrt(v_hat)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p, m, v


def ref_adagrad(p, grads, lr=0.01, eps=1e-10, weight_decay=0.0, init=0.0):
    p = p.astype(F64).copy()
    acc = np.full_like(p, init)
    for g in grads:
        g = g.astype(F64) + weight_decay * p
        acc = acc + g * g
        p = p - lr * g / (np.sqrt(acc) + eps)
    return p, acc


# ---------------------------------------------------------------------------------------------
# Functional steps against the references
# ---------------------------------------------------------------------------------------------

SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.05, weight_decay=0.01),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, nesterov=True),
    dict(lr=0.03, momentum=0.5, weight_decay=0.1, nesterov=True),
    dict(lr=0.03, momentum=1.5, weight_decay=0.2),
]


@DTYPES
@pytest.mark.parametrize("case", SGD_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sgd_step_matches_textbook(case, dtype):
    p0, grads = slabs(37, dtype, count=5)
    p = p0.copy()
    momentum = case.get("momentum", 0.0)
    vel = np.zeros_like(p) if momentum else None
    for g in grads:
        g_before = g.copy()
        F.sgd_step(p, g, vel, case["lr"], momentum, case.get("weight_decay", 0.0), case.get("nesterov", False))
        np.testing.assert_array_equal(g, g_before)  # grads are read only
    want_p, want_v = ref_sgd(p0, grads, **case)
    assert p.dtype == dtype
    np.testing.assert_allclose(p, want_p, **tol(dtype))
    if momentum:
        np.testing.assert_allclose(vel, want_v, **tol(dtype))


def test_sgd_momentum_zero_ignores_velocity():
    p0, grads = slabs(5, F64, count=2)
    p, vel = p0.copy(), np.full(5, 7.0)
    F.sgd_step(p, grads[0], vel, 0.1)
    np.testing.assert_allclose(p, p0 - 0.1 * grads[0], rtol=1e-15)
    np.testing.assert_array_equal(vel, 7.0)


ADAM_CASES = [
    dict(),
    dict(lr=0.01, weight_decay=0.1),
    dict(lr=0.002, beta1=0.5, beta2=0.9, eps=1e-6),
    dict(lr=0.1, beta1=0.0, beta2=0.0, eps=1e-3),
]


@DTYPES
@pytest.mark.parametrize("case", ADAM_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_adam_step_matches_textbook(case, dtype):
    p0, grads = slabs(41, dtype, seed=1, count=6)
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for t, g in enumerate(grads, start=1):
        F.adam_step(p, g, m, v, t, **case)
    want_p, want_m, want_v = ref_adam(p0, grads, **case)
    np.testing.assert_allclose(p, want_p, **tol(dtype))
    np.testing.assert_allclose(m, want_m, **tol(dtype))
    np.testing.assert_allclose(v, want_v, **tol(dtype))


def test_adam_first_step_moves_each_parameter_by_about_lr():
    # with bias correction the first step is lr * g / (|g| + eps): the sign of g times lr
    p, g = np.zeros(4), np.array([3.0, -0.001, 50.0, -2.0])
    F.adam_step(p, g, np.zeros(4), np.zeros(4), 1, lr=0.01)
    np.testing.assert_allclose(p, -0.01 * np.sign(g), rtol=1e-4)


def test_adam_bias_correction_uses_the_given_step():
    p0, grads = slabs(6, F64, seed=2, count=2)
    outs = []
    for step in (1, 10):
        p, m, v = p0.copy(), np.zeros(6), np.zeros(6)
        F.adam_step(p, grads[0], m, v, step)
        outs.append(p)
    assert not np.allclose(outs[0], outs[1])
    m = 0.1 * grads[0]
    v = 0.001 * grads[0] ** 2
    want = p0 - 1e-3 / (1 - 0.9**10) * m / (np.sqrt(v) / math.sqrt(1 - 0.999**10) + 1e-8)
    np.testing.assert_allclose(outs[1], want, rtol=1e-13)


ADAGRAD_CASES = [dict(), dict(lr=0.1, weight_decay=0.05), dict(lr=0.5, eps=1e-3)]


@DTYPES
@pytest.mark.parametrize("case", ADAGRAD_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
@pytest.mark.parametrize("init", [0.0, 0.1])
def test_adagrad_step_matches_textbook(case, init, dtype):
    p0, grads = slabs(29, dtype, seed=3, count=5)
    p, acc = p0.copy(), np.full_like(p0, init)
    for g in grads:
        F.adagrad_step(p, g, acc, **case)
    want_p, want_acc = ref_adagrad(p0, grads, init=init, **case)
    np.testing.assert_allclose(p, want_p, **tol(dtype))
    np.testing.assert_allclose(acc, want_acc, **tol(dtype))


def test_steps_on_a_large_slab_are_thread_independent():
    p0, grads = slabs(200_003, F64, seed=4, count=3)
    before = dselectk.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            dselectk.set_num_threads(n)
            p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
            for t, g in enumerate(grads, start=1):
                F.adam_step(p, g, m, v, t, lr=0.01, weight_decay=0.01)
            results.append(p)
    finally:
        dselectk.set_num_threads(before)
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_allclose(results[0], ref_adam(p0, grads, lr=0.01, weight_decay=0.01)[0], rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Classes
# ---------------------------------------------------------------------------------------------

@DTYPES
def test_sgd_class_matches_textbook(dtype):
    p0, grads = slabs(23, dtype, seed=5, count=5)
    params, g = p0.copy(), np.zeros_like(p0)
    opt = optim.SGD(params, g, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)
    for gi in grads:
        g[:] = gi
        opt.step()
    np.testing.assert_allclose(params, ref_sgd(p0, grads, 0.05, 0.9, 0.01, True)[0], **tol(dtype))
    assert opt.params is params and opt.grads is g  # slabs are kept by reference


@DTYPES
def test_adam_class_matches_textbook(dtype):
    p0, grads = slabs(23, dtype, seed=6, count=6)
    params, g = p0.copy(), np.zeros_like(p0)
    opt = optim.Adam(params, g, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)
    for gi in grads:
        g[:] = gi
        opt.step()
    assert opt.step_count == 5 and opt.betas == (0.8, 0.99)
    want_p, want_m, want_v = ref_adam(p0, grads, lr=0.01, beta1=0.8, beta2=0.99, weight_decay=0.1)
    np.testing.assert_allclose(params, want_p, **tol(dtype))
    np.testing.assert_allclose(opt.m, want_m, **tol(dtype))
    np.testing.assert_allclose(opt.v, want_v, **tol(dtype))


@DTYPES
def test_adagrad_class_matches_textbook(dtype):
    p0, grads = slabs(23, dtype, seed=7, count=4)
    params, g = p0.copy(), np.zeros_like(p0)
    opt = optim.Adagrad(params, g, lr=0.1, weight_decay=0.02, initial_accumulator_value=0.3)
    np.testing.assert_array_equal(opt.accum, np.full(23, 0.3, dtype))
    for gi in grads:
        g[:] = gi
        opt.step()
    want_p, want_acc = ref_adagrad(p0, grads, lr=0.1, weight_decay=0.02, init=0.3)
    np.testing.assert_allclose(params, want_p, **tol(dtype))
    np.testing.assert_allclose(opt.accum, want_acc, **tol(dtype))


def test_lr_is_settable_between_steps():
    p0, grads = slabs(9, F64, seed=8, count=3)
    params, g = p0.copy(), np.zeros(9)
    opt = optim.SGD(params, g, lr=0.1, momentum=0.5)
    g[:] = grads[0]
    opt.step()
    opt.lr = 0.01
    assert opt.lr == 0.01
    g[:] = grads[1]
    opt.step()
    v1 = grads[0]
    v2 = 0.5 * v1 + grads[1]
    np.testing.assert_allclose(params, p0 - 0.1 * v1 - 0.01 * v2, rtol=1e-14)
    for bad in (0.0, -1.0, NAN, INF):
        with pytest.raises(ValueError, match="lr"):
            opt.lr = bad
    assert opt.lr == 0.01


def test_zero_grad():
    params, g = np.ones(4), np.ones(4)
    optim.Adam(params, g).zero_grad()
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("name,kwargs", [
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("adam", dict(lr=0.01, betas=(0.7, 0.95))),
    ("adagrad", dict(lr=0.1, initial_accumulator_value=0.2)),
])
def test_state_dict_round_trip_continues_identically(name, kwargs, tmp_path):
    p0, grads = slabs(15, F64, seed=9, count=7)
    params, g = p0.copy(), np.zeros(15)
    opt = optim.make_optimizer(name, params, g, **kwargs)
    for gi in grads[:3]:
        g[:] = gi
        opt.step()
    state = opt.state_dict()
    for v in state.values():
        assert np.isscalar(v) or isinstance(v, np.ndarray)
    np.savez(tmp_path / "opt.npz", params=params, **state)
    loaded = dict(np.load(tmp_path / "opt.npz"))  # no pickling needed
    # a fresh optimizer with other hyperparameters, restored from the file
    params2, g2 = loaded.pop("params").copy(), np.zeros(15)
    opt2 = optim.make_optimizer(name, params2, g2, lr=0.5)
    opt2.load_state_dict(loaded)
    assert opt2.lr == opt.lr
    for gi in grads[3:]:
        g[:] = gi
        g2[:] = gi
        opt.step()
        opt2.step()
    np.testing.assert_array_equal(params2, params)
    # state_dict holds copies, not the live slabs
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            assert not np.shares_memory(v, getattr(opt, k))


def test_load_state_dict_rejects_mismatches():
    params, g = np.zeros(5), np.zeros(5)
    adam = optim.Adam(params, g)
    sd = adam.state_dict()
    with pytest.raises(ValueError, match="'adam'.*'sgd'"):
        optim.SGD(params, g).load_state_dict(sd)
    bad = dict(sd, m=np.zeros(4))
    with pytest.raises(ValueError, match="'m'"):
        adam.load_state_dict(bad)
    with pytest.raises(ValueError, match="'v'"):
        adam.load_state_dict({k: v for k, v in sd.items() if k != "v"})
    with pytest.raises(ValueError, match="beta1"):
        adam.load_state_dict(dict(sd, beta1=1.0))
    assert adam.beta1 == 0.9  # a rejected state changes nothing


def test_make_optimizer():
    params, g = np.zeros(3), np.zeros(3)
    assert isinstance(optim.make_optimizer("sgd", params, g), optim.SGD)
    assert isinstance(optim.make_optimizer("Adam", params, g, lr=0.1), optim.Adam)
    assert isinstance(optim.make_optimizer("adagrad", params, g), optim.Adagrad)
    for bad in ("rmsprop", "", None, 3):
        with pytest.raises(ValueError, match="'adagrad', 'adam', 'sgd'"):
            optim.make_optimizer(bad, params, g)
    with pytest.raises(TypeError):
        optim.make_optimizer("sgd", params, g, betas=(0.9, 0.99))


def test_defaults_are_documented_and_match_torch():
    # torch.optim's defaults (SGD's lr is this package's own choice, see the docstring)
    expected = {
        optim.SGD: dict(lr=0.01, momentum=0.0, weight_decay=0.0, nesterov=False),
        optim.Adam: dict(lr=0.001, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
        optim.Adagrad: dict(lr=0.01, eps=1e-10, weight_decay=0.0, initial_accumulator_value=0.0),
    }
    for cls, defaults in expected.items():
        sig = inspect.signature(cls)
        got = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
        assert got == defaults, cls
        doc = cls.__doc__
        assert "torch.optim" in doc and "Defaults:" in doc
        for k, v in defaults.items():
            short = str(v).replace("e-08", "e-8")
            assert f"{k}={short}" in doc, (cls, k)
    fsig = inspect.signature(F.adam_step).parameters
    assert (fsig["lr"].default, fsig["beta1"].default, fsig["beta2"].default, fsig["eps"].default) == \
        (0.001, 0.9, 0.999, 1e-8)
    asig = inspect.signature(F.adagrad_step).parameters
    assert (asig["lr"].default, asig["eps"].default) == (0.01, 1e-10)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def _ok(name, n=6, dtype=F64):
    rng = np.random.default_rng(0)
    p, g = rng.normal(size=n).astype(dtype), rng.normal(size=n).astype(dtype)
    if name == "sgd":
        return F.sgd_step, dict(params=p, grads=g, velocity=np.zeros(n, dtype), lr=0.1, momentum=0.9)
    if name == "adam":
        return F.adam_step, dict(params=p, grads=g, m=np.zeros(n, dtype), v=np.zeros(n, dtype), step=1)
    return F.adagrad_step, dict(params=p, grads=g, accum=np.zeros(n, dtype))


SLAB_ARGS = [("sgd", a) for a in ("params", "grads", "velocity")] + \
            [("adam", a) for a in ("params", "grads", "m", "v")] + [("adagrad", a) for a in ("params", "grads", "accum")]
INPLACE_ARGS = [(n, a) for n, a in SLAB_ARGS if a != "grads"]
IDS = lambda pairs: [f"{n}-{a}" for n, a in pairs]  # noqa: E731


def _call(name, **changes):
    fn, kw = _ok(name)
    kw.update(changes)
    return fn(**kw)


@pytest.mark.parametrize("name", ["sgd", "adam", "adagrad"])
def test_valid_calls_and_float32(name):
    for dtype in (F64, F32):
        fn, kw = _ok(name, dtype=dtype)
        p_before = kw["params"].copy()
        assert fn(**kw) is None
        assert kw["params"].dtype == dtype and not np.array_equal(kw["params"], p_before)


@pytest.mark.parametrize("name,arg", SLAB_ARGS, ids=IDS(SLAB_ARGS))
def test_mismatched_slab_length(name, arg):
    fn, kw = _ok(name)
    if arg == "params":  # params sets N, so a longer params is reported on the next slab, grads
        match = r"'grads'.*\(7,\).*\(6,\)"
    else:
        match = rf"'{arg}'.*\(6,\).*\(7,\)"
    with pytest.raises(ValueError, match=match):
        _call(name, **{arg: np.zeros(kw[arg].size + 1)})
    if arg != "params":
        with pytest.raises(ValueError, match=f"'{arg}'.*\\(6,\\).*\\(5,\\)"):
            _call(name, **{arg: np.zeros(5)})


@pytest.mark.parametrize("name,arg", SLAB_ARGS, ids=IDS(SLAB_ARGS))
def test_wrong_dtype_and_type(name, arg):
    fn, kw = _ok(name)
    with pytest.raises(TypeError, match=f"'{arg}'"):
        _call(name, **{arg: kw[arg].astype(np.int64)})
    with pytest.raises(TypeError, match=f"'{arg}'"):
        _call(name, **{arg: kw[arg].tolist()})
    if arg != "params":
        with pytest.raises(TypeError, match=f"'{arg}'.*float32.*float64"):
            _call(name, **{arg: kw[arg].astype(F32)})
    else:  # params sets the dtype: a float32 params against float64 state names the next slab
        with pytest.raises(TypeError, match="float64, expected float32"):
            _call(name, **{arg: kw[arg].astype(F32)})


@pytest.mark.parametrize("name,arg", SLAB_ARGS, ids=IDS(SLAB_ARGS))
def test_wrong_ndim(name, arg):
    fn, kw = _ok(name)
    with pytest.raises(ValueError, match=f"'{arg}'.*1-D"):
        _call(name, **{arg: kw[arg].reshape(2, 3)})


@pytest.mark.parametrize("name,arg", INPLACE_ARGS, ids=IDS(INPLACE_ARGS))
def test_in_place_slabs_must_be_contiguous_writeable(name, arg):
    fn, kw = _ok(name)
    noncontig = np.zeros(12)[::2]
    with pytest.raises(ValueError, match=f"'{arg}'.*C-contiguous"):
        _call(name, **{arg: noncontig})
    ro = kw[arg].copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=f"'{arg}'.*writeable"):
        _call(name, **{arg: ro})
    with pytest.raises(TypeError, match=f"'{arg}'.*byte order"):
        _call(name, **{arg: kw[arg].astype(">f8")})


def test_grads_may_be_non_contiguous_and_stay_untouched():
    fn, kw = _ok("adam")
    g_big = np.zeros(12)
    g_big[::2] = kw["grads"]
    p_ref = kw["params"].copy()
    F.adam_step(p_ref, kw["grads"], np.zeros(6), np.zeros(6), 1)
    p = kw["params"].copy()
    F.adam_step(p, g_big[::2], np.zeros(6), np.zeros(6), 1)
    np.testing.assert_array_equal(p, p_ref)
    assert np.all(g_big[1::2] == 0)


@pytest.mark.parametrize("name", ["sgd", "adam", "adagrad"])
def test_nonfinite_params_or_grads(name):
    for arg in ("params", "grads"):
        for bad in (NAN, INF):
            fn, kw = _ok(name)
            kw[arg][2] = bad
            p_before = kw["params"].copy()
            with pytest.raises(ValueError, match=f"'{arg}'.*NaN or Inf"):
                fn(**kw)
            np.testing.assert_array_equal(kw["params"], p_before)


@pytest.mark.parametrize("name", ["sgd", "adam", "adagrad"])
def test_overlapping_slabs(name):
    fn, kw = _ok(name)
    state = [a for a in kw if a not in ("params", "grads") and isinstance(kw[a], np.ndarray)]
    p_before = kw["params"].copy()
    with pytest.raises(ValueError, match=f"'{state[0]}'.*shares memory"):
        fn(**dict(kw, **{state[0]: kw["params"]}))
    with pytest.raises(ValueError, match="'grads'.*shares memory"):
        fn(**dict(kw, grads=kw["params"]))
    big = np.zeros(12)
    with pytest.raises(ValueError, match=f"'{state[0]}'.*shares memory"):
        fn(**dict(kw, params=big[:6], **{state[0]: big[5:11]}))  # partial overlap
    if len(state) == 2:
        with pytest.raises(ValueError, match="'v'.*shares memory"):
            fn(**dict(kw, v=kw["m"]))
    np.testing.assert_array_equal(kw["params"], p_before)


SCALAR_CASES = [
    ("sgd", "lr", 0.0), ("sgd", "lr", -0.1), ("sgd", "lr", NAN), ("sgd", "lr", INF),
    ("sgd", "momentum", -0.5), ("sgd", "momentum", NAN), ("sgd", "weight_decay", -1e-3),
    ("adam", "lr", 0.0), ("adam", "lr", -1.0), ("adam", "beta1", 1.0), ("adam", "beta1", -0.1),
    ("adam", "beta2", 1.0), ("adam", "beta2", NAN), ("adam", "eps", 0.0), ("adam", "eps", -1e-8),
    ("adam", "weight_decay", -0.1), ("adam", "step", 0), ("adam", "step", -3),
    ("adagrad", "lr", 0.0), ("adagrad", "lr", NAN), ("adagrad", "eps", 0.0), ("adagrad", "weight_decay", -2.0),
]


@pytest.mark.parametrize("name,arg,value", SCALAR_CASES, ids=[f"{n}-{a}={v}" for n, a, v in SCALAR_CASES])
def test_bad_scalars_name_the_argument(name, arg, value):
    fn, kw = _ok(name)
    p_before = kw["params"].copy()
    kw[arg] = value
    with pytest.raises(ValueError, match=arg):
        fn(**kw)
    np.testing.assert_array_equal(kw["params"], p_before)


def test_step_must_be_an_integer():
    for bad in (1.0, True, "1", None):
        with pytest.raises(TypeError, match="step"):
            _call("adam", step=bad)
    _call("adam", step=np.int64(3))  # numpy integers are fine


def test_sgd_velocity_rules():
    with pytest.raises(ValueError, match="'velocity'.*momentum"):
        _call("sgd", velocity=None, momentum=0.9)
    _call("sgd", velocity=None, momentum=0.0)
    with pytest.raises(ValueError, match="nesterov.*momentum"):
        _call("sgd", momentum=0.0, nesterov=True)


def test_class_constructor_checks():
    p, g = np.zeros(4), np.zeros(4)
    with pytest.raises(ValueError, match="'grads'"):
        optim.SGD(p, np.zeros(5))
    with pytest.raises(TypeError, match="'grads'"):
        optim.Adam(p, np.zeros(4, F32))
    with pytest.raises(TypeError, match="'params'"):
        optim.Adam([0.0] * 4, g)
    with pytest.raises(TypeError, match="'params'"):
        optim.Adam(np.zeros(4, np.int32), g)
    with pytest.raises(ValueError, match="'params'.*1-D"):
        optim.Adagrad(np.zeros((2, 2)), np.zeros((2, 2)))
    ro = np.zeros(4)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="'params'.*writeable"):
        optim.SGD(ro, g)
    with pytest.raises(ValueError, match="'params'"):
        optim.SGD(np.zeros(8)[::2], g)
    for kwargs, word in ((dict(lr=0), "lr"), (dict(betas=(0.9, 1.0)), "beta2"), (dict(betas=0.9), "betas"),
                         (dict(eps=0), "eps"), (dict(weight_decay=-1), "weight_decay")):
        with pytest.raises(ValueError, match=word):
            optim.Adam(p, g, **kwargs)
    with pytest.raises(ValueError, match="momentum"):
        optim.SGD(p, g, momentum=-0.1)
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD(p, g, nesterov=True)
    with pytest.raises(ValueError, match="initial_accumulator_value"):
        optim.Adagrad(p, g, initial_accumulator_value=-1.0)


def test_failed_class_step_does_not_advance():
    p, g = np.zeros(4), np.zeros(4)
    opt = optim.Adam(p, g)
    g[1] = NAN
    with pytest.raises(ValueError, match="'grads'"):
        opt.step()
    assert opt.step_count == 0
    g[1] = 1.0
    opt.step()
    assert opt.step_count == 1


# ---------------------------------------------------------------------------------------------
# The steps' value check (one pass over all slabs on the thread pool, then the update): a bad
# value anywhere in any slab raises before anything changes
# ---------------------------------------------------------------------------------------------

_STEPS = {  # name: (call, slab names in argument order, the slab that must be >= 0 or None)
    "sgd": (lambda s: F.sgd_step(s["params"], s["grads"], s["velocity"], 0.1, momentum=0.9),
            ("params", "grads", "velocity"), None),
    "adam": (lambda s: F.adam_step(s["params"], s["grads"], s["m"], s["v"], 3), ("params", "grads", "m", "v"), "v"),
    "adagrad": (lambda s: F.adagrad_step(s["params"], s["grads"], s["accum"]), ("params", "grads", "accum"), "accum"),
}
_N = 100_003  # several chunks of the pool


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(_STEPS))
def test_a_bad_value_anywhere_raises_and_changes_nothing(name, dtype, threads):
    import dselectk

    call, slabs, nonneg = _STEPS[name]
    rng = np.random.default_rng(0)
    before = dselectk.get_num_threads()
    dselectk.set_num_threads(threads)
    try:
        for slab in slabs:
            for where in (0, 16383, 16384, _N // 2, _N - 1):
                bads = [np.nan, np.inf, -np.inf] + ([-1e-30, -np.finfo(dtype).tiny / 2] if slab == nonneg else [])
                for bad in bads:
                    state = {k: np.abs(rng.standard_normal(_N)).astype(dtype) for k in slabs}
                    state[slab][where] = bad
                    snap = {k: v.copy() for k, v in state.items()}
                    with pytest.raises(ValueError, match=f"'{slab}'"):
                        call(state)
                    for k in slabs:
                        np.testing.assert_array_equal(state[k], snap[k], err_msg=f"{name}: {k} changed")
        ok = {k: np.abs(rng.standard_normal(_N)).astype(dtype) for k in slabs}
        if nonneg:
            ok[nonneg][7] = -0.0  # a negative zero is a sum of squares too
        call(ok)  # no error
    finally:
        dselectk.set_num_threads(before)
