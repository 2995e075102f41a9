"""Hardening (issue #16): optimizer state is input, numbers out of range, hand-edited caches and
model sizes that cannot fit. Each case must raise ValueError / TypeError saying what was wrong,
never crash, never change an argument when it raises, never OverflowError / IndexError /
AttributeError / ZeroDivisionError.

The cases reuse the input zoo of ``test_bad_input.py`` (its valid calls, ``SPECS``, and its
checked call, which asserts that a refused call changed no array), so every function there is
covered here too.
"""
from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
from test_bad_input import F32, F64, INF, NAN, SPECS, _name_re, call_spec, run_subcases, short_failures

import dselectk as dk
from dselectk import functional as F
from dselectk import optim

# ---------------------------------------------------------------------------------------------
# Optimizer state is input too (issue #16, item 2). NaN / Inf in every state slab is in the NaN
# zoo of test_bad_input.py; here: the sign of the slabs of squared gradients, what trusted_inputs
# skips, and the optimizer classes.
# ---------------------------------------------------------------------------------------------

# (spec, slab of squared gradients: v = a mean of g**2, accum = a sum of g**2)
SQUARED_STATE = [(f"{p}.{name}", arg) for p in ("F", "C")
                 for name, arg in (("adam_step", "v"), ("adagrad_step", "accum"), ("sparse_adam_step", "v"),
                                   ("sparse_adagrad_step", "accum"))]


@pytest.mark.parametrize("sid,arg", SQUARED_STATE, ids=[f"{s}-{a}" for s, a in SQUARED_STATE])
@short_failures
def test_negative_squared_state_is_refused(sid, arg):
    """A negative entry of v / accum (whose square root the step takes) -> ValueError naming it,
    and nothing changes; -0.0 is a valid zero."""
    spec = SPECS[sid]

    def case(value, dtype, where, match=">= 0"):
        kwargs = spec.build(dtype)
        a = kwargs[arg]
        a.reshape(-1)[where(a.size)] = value  # the sparse specs list the rows of flat 0, n // 2, n - 1
        call_spec(spec, kwargs, ValueError, _name_re(arg) + ".*" + match)

    def signed_zero(dtype):
        kwargs = spec.build(dtype)
        kwargs[arg].reshape(-1)[0] = -0.0
        call_spec(spec, kwargs)
    run_subcases([
        ("-0.5-float32-first", lambda: case(-0.5, F32, lambda n: 0)),
        ("-1e-30-float64-middle", lambda: case(-1e-30, F64, lambda n: n // 2)),
        ("-tiny-float32-last", lambda: case(-np.finfo(F32).tiny, F32, lambda n: n - 1)),
        ("-subnormal-float64-first", lambda: case(-5e-324, F64, lambda n: 0)),
        ("-subnormal-float32-middle", lambda: case(-1e-45, F32, lambda n: n // 2)),
        ("-max-float64-last", lambda: case(-np.finfo(F64).max, F64, lambda n: n - 1)),
        ("-inf-float64-last", lambda: case(-INF, F64, lambda n: n - 1, "NaN or Inf")),
        ("-0.0-valid-float32", lambda: signed_zero(F32)),
        ("-0.0-valid-float64", lambda: signed_zero(F64)),
    ])


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("size", [1, 3, 4095, 4096, 4097, 20_000])
def test_slab_check_finds_every_bad_entry(dtype, size):
    """The dense steps check params, grads and the state before anything changes: a bad entry
    anywhere in any slab, of any size (the scans work in blocks of 4096), is found and named with
    its first index; the first slab (in argument order) with a bad entry is the one named."""
    rng = np.random.default_rng(size)
    names = ("params", "grads", "m", "v")
    for slab, bad in [(j, b) for j in range(4) for b in (NAN, INF, -INF)] + [(3, -1.0)]:
        a = {n: rng.uniform(0.1, 1, size).astype(dtype) for n in names}
        where = int(rng.integers(size))
        a[names[slab]][where] = bad
        if where + 1 < size:
            a[names[slab]][size - 1] = NAN  # a later bad entry does not change the index reported
        if slab < 3:
            a["v"][0] = -2.0  # a later slab's bad entry does not change the slab reported
        kind = ">= 0" if bad == -1.0 else "NaN or Inf"
        with pytest.raises(ValueError, match=rf"'{names[slab]}' .*{kind}.*{where}"):
            F.adam_step(a["params"], a["grads"], a["m"], a["v"], 1)


def test_negative_state_message_names_the_entry():
    p, g, m, v = np.ones(5), np.ones(5), np.zeros(5), np.zeros(5)
    v[3] = -0.25
    with pytest.raises(ValueError, match=r"argument 'v' must hold values >= 0 .*v\[3\] = -0\.25"):
        F.adam_step(p, g, m, v, 1)
    table, accum = np.ones((4, 2)), np.zeros((4, 2))
    accum[2, 1] = -1.0
    with pytest.raises(ValueError, match=r"'accum' must hold values >= 0 .*accum\[2, 1\] = -1 .*rows\[1\]"):
        F.sparse_adagrad_step(table, accum, np.array([0, 2]), np.ones((2, 2)))


def test_sgd_velocity_is_checked_only_when_read():
    """velocity is not read (nor written) when momentum == 0: a NaN there is not an error then."""
    p, g, v = np.ones(4), np.ones(4), np.full(4, NAN)
    F.sgd_step(p, g, v, 0.1)
    assert np.array_equal(p, np.full(4, 0.9)) and np.isnan(v).all()
    with pytest.raises(ValueError, match="'velocity' contains NaN or Inf"):
        F.sgd_step(p, g, v, 0.1, momentum=0.9)


def _dense_state_calls():
    """(name, call, the state slab it corrupts) per dense step: the corrupted slab is the state's."""
    def sgd(state):
        F.sgd_step(np.ones(6), np.ones(6), state, 0.1, momentum=0.9)

    def adam(state):
        F.adam_step(np.ones(6), np.ones(6), state, np.ones(6), 2)

    def adagrad(state):
        F.adagrad_step(np.ones(6), np.ones(6), state)
    return [("sgd", sgd), ("adam", adam), ("adagrad", adagrad)]


@pytest.mark.parametrize("name,step", _dense_state_calls(), ids=[c[0] for c in _dense_state_calls()])
def test_trusted_inputs_skips_the_dense_state_scan(name, step):
    """The documented decision: inside trusted_inputs the O(N) value scans of a dense step's slabs
    are skipped, its state's included (the NaN then propagates); outside they run."""
    state = np.ones(6)
    state[4] = NAN
    with pytest.raises(ValueError, match="NaN or Inf"):
        step(state.copy())
    with F.trusted_inputs():
        step(state.copy())  # no error: the scan is skipped, the NaN propagates
    with pytest.raises(ValueError, match="NaN or Inf"):  # and checked again after the context
        step(state.copy())


def test_trusted_inputs_keeps_the_sparse_row_checks():
    """The sparse steps' row checks (cheap: the rows read) run inside trusted_inputs too."""
    table, accum, rows, g = np.ones((5, 2)), np.zeros((5, 2)), np.array([1, 3]), np.ones((2, 2))
    accum[3, 0] = NAN
    with F.trusted_inputs():
        with pytest.raises(ValueError, match="'accum' contains NaN or Inf in row 3"):
            F.sparse_adagrad_step(table, accum, rows, g)
        m, v = np.zeros((5, 2)), np.zeros((5, 2))
        v[1, 1] = -2.0
        with pytest.raises(ValueError, match="'v' must hold values >= 0"):
            F.sparse_adam_step(table, m, v, rows, g, 1)
    assert np.array_equal(table, np.ones((5, 2)))


def _optimizer(kind):
    params, grads = np.linspace(-1, 1, 8), np.linspace(0.5, -0.5, 8)
    if kind == "sgd":
        return optim.SGD(params, grads, momentum=0.9), "velocity"
    if kind == "adam":
        return optim.Adam(params, grads), "v"
    return optim.Adagrad(params, grads), "accum"


@pytest.mark.parametrize("kind", ["sgd", "adam", "adagrad"])
@pytest.mark.parametrize("bad", [NAN, INF, -1.0], ids=["nan", "inf", "negative"])
def test_optimizer_step_with_corrupted_state_changes_nothing(kind, bad):
    """opt.step() with a NaN / Inf (or, for v and accum, negative) state entry -> ValueError naming
    the slab; params, state and the step count are as before."""
    opt, slab = _optimizer(kind)
    opt.step()
    state = getattr(opt, slab)
    state[5] = bad
    if bad == -1.0 and kind == "sgd":  # a velocity may be negative
        opt.step()
        return
    before = (opt.params.copy(), state.copy(), getattr(opt, "step_count", None))
    with pytest.raises(ValueError, match=f"'{slab}'"):
        opt.step()
    assert np.array_equal(opt.params, before[0]) and np.array_equal(state, before[1], equal_nan=True)
    assert getattr(opt, "step_count", None) == before[2]


@pytest.mark.parametrize("kind", ["adam", "adagrad"])
def test_sparse_optimizer_with_corrupted_state_changes_nothing(kind):
    table = np.ones((6, 3))
    opt = optim.SparseAdam([table]) if kind == "adam" else optim.SparseAdagrad([table])
    state = opt.v[0] if kind == "adam" else opt.accum[0]
    state[4, 2] = -1.0
    grads = [(np.array([1, 4]), np.ones((2, 3)))]
    with pytest.raises(ValueError, match="must hold values >= 0"):
        opt.step(grads)
    assert np.array_equal(table, np.ones((6, 3))) and getattr(opt, "step_count", 0) == 0


@pytest.mark.parametrize("kind", ["adam", "adagrad"])
def test_load_state_dict_refuses_negative_squared_state(kind):
    opt, slab = _optimizer(kind)
    d = opt.state_dict()
    d[slab][2] = -0.5
    with pytest.raises(ValueError, match=f"state_dict\\['{slab}'\\] holds negative values"):
        opt.load_state_dict(d)
    assert not np.any(getattr(opt, slab) < 0)


# ---------------------------------------------------------------------------------------------
# Numbers out of range (issue #16, item 4): every number argument of every function of the input
# zoo (dselectk.functional and the raw bindings), systematically: a float beyond float64's range
# and an integer beyond 64 bits raise ValueError naming the argument, never OverflowError.
# ---------------------------------------------------------------------------------------------

def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _doc_defaults(fn):
    """{name: value} of the number defaults in the first line of a raw binding's docstring, e.g.
    'adam_step(params, grads, m, v, step, lr=0.001, beta1=0.9, ...) -> None'."""
    first = (fn.__doc__ or "").split("\n")[0]
    defaults = {}
    for name, text in re.findall(r"(\w+)=([-+]?[0-9][0-9.e+-]*)", first):
        defaults[name] = float(text) if any(c in text for c in ".e") else int(text)
    return defaults


def _number_args(spec):
    """{name: valid value} of the number arguments of a spec's function: those its valid call
    passes (ints, floats, tuples of ints) and those it leaves at a number default (from the
    signature of a Python function, the docstring of a raw binding)."""
    fn = getattr(spec.fn, "raw", spec.fn)
    kwargs = spec.build(F64)
    args = {k: v for k, v in kwargs.items()
            if _is_number(v) or (isinstance(v, tuple) and v and all(_is_number(x) for x in v))}
    try:
        defaults = {name: p.default for name, p in inspect.signature(fn).parameters.items()}
    except ValueError:  # a raw binding: no signature
        defaults = _doc_defaults(fn)
    for name, value in defaults.items():
        if name not in kwargs and _is_number(value):
            args[name] = value
    return args


HUGE_FLOATS = [10**400, -10**400]
HUGE_INTS = [10**400, -10**400, 2**64, -(2**63) - 1]
NUMBER_SPECS = [sid for sid in SPECS if _number_args(SPECS[sid])]


def _out_of_range_cases(valid):
    if isinstance(valid, tuple):
        return [(valid[0] * 0 + huge,) + valid[1:] for huge in HUGE_INTS]
    return HUGE_FLOATS if isinstance(valid, float) else HUGE_INTS


@pytest.mark.parametrize("sid", NUMBER_SPECS)
@short_failures
def test_number_out_of_range(sid):
    """Each number argument set to +-10**400 (and, for integers, 2**64 and -2**63 - 1) -> ValueError
    naming it; nothing changes."""
    spec = SPECS[sid]

    def case(name, bad):
        kwargs = spec.build(F64)
        kwargs[name] = bad
        info = call_spec(spec, kwargs, ValueError)
        assert re.search(rf"\b{re.escape(name)}\b", str(info.value)), f"the message does not name {name}: {info.value}"
    run_subcases([(f"{name}={str(bad)[:12]}", lambda name=name, bad=bad: case(name, bad))
                  for name, valid in _number_args(spec).items() for bad in _out_of_range_cases(valid)])


def test_number_arguments_are_all_covered():
    """Every number parameter of every function of dselectk.functional.__all__ is in the table."""
    covered = {(getattr(SPECS[sid].fn, "raw", SPECS[sid].fn), name) for sid in NUMBER_SPECS
               for name in _number_args(SPECS[sid])}
    missing = []
    for fname in F.__all__:
        fn = getattr(F, fname)
        for name, p in inspect.signature(fn).parameters.items():
            if _is_number(p.default) and (fn, name) not in covered and fn not in (F.conv2d_padding,):
                missing.append(f"{fname}({name})")
    assert not missing, f"number parameters without an out-of-range case: {missing}"


@pytest.mark.parametrize("bad", HUGE_INTS, ids=str)
def test_n_bits_and_padding_out_of_range(bad):
    with pytest.raises(ValueError, match=r"\bn\b"):
        F.n_bits(bad)
    with pytest.raises(ValueError, match="padding"):
        F.conv2d_forward(np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3)), padding=(bad, 0))


@pytest.mark.parametrize("bad", [2**31, 2**63, 2**64, 10**400, -(2**63) - 1])
def test_set_num_threads_out_of_range(bad):
    before = dk.get_num_threads()
    for fn in (dk.set_num_threads, dk._C.set_num_threads):
        with pytest.raises(ValueError, match="between 1 and 4096"):
            fn(bad)
    assert dk.get_num_threads() == before


def test_set_num_threads_takes_numpy_integers():
    before = dk.get_num_threads()
    try:
        dk.set_num_threads(np.int64(1))
        assert dk.get_num_threads() == 1
    finally:
        dk.set_num_threads(before)
    with pytest.raises(TypeError):
        dk.set_num_threads(np.float64(1))


@pytest.mark.parametrize("name,make", [
    ("lr", lambda v: optim.SGD(np.ones(3), np.ones(3), lr=v)),
    ("momentum", lambda v: optim.SGD(np.ones(3), np.ones(3), momentum=v)),
    ("eps", lambda v: optim.Adam(np.ones(3), np.ones(3), eps=v)),
    ("beta1", lambda v: optim.Adam(np.ones(3), np.ones(3), betas=(v, 0.9))),
    ("weight_decay", lambda v: optim.Adagrad(np.ones(3), np.ones(3), weight_decay=v)),
    ("initial_accumulator_value", lambda v: optim.Adagrad(np.ones(3), np.ones(3), initial_accumulator_value=v)),
    ("lr", lambda v: optim.SparseAdam([np.ones((2, 2))], lr=v)),
    ("eps", lambda v: optim.SparseAdagrad([np.ones((2, 2))], eps=v)),
])
def test_optimizer_hyperparameters_out_of_range_or_not_numbers(name, make):
    for bad in HUGE_FLOATS:
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            make(bad)
    for bad in ("0.1", None, [0.1], True):
        with pytest.raises(TypeError, match=rf"\b{name}\b"):
            make(bad)
    opt = optim.Adam(np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match=r"\blr\b"):
        opt.lr = 10**400


# ---------------------------------------------------------------------------------------------
# Hand-edited caches (issue #16, item 4): every function of dselectk.functional that takes a
# forward's cache, with every field of the cache corrupted in every way below, other caches and
# non-caches: TypeError / ValueError naming the field, never IndexError / AttributeError /
# ZeroDivisionError.
# ---------------------------------------------------------------------------------------------

CACHE_FUNCTIONS = [name for name in F.__all__ if "cache" in inspect.signature(getattr(F, name)).parameters]
CACHE_SPECS = [sid for sid in SPECS if getattr(SPECS[sid].fn, "__name__", "") in CACHE_FUNCTIONS
               and sid.startswith("F.")]


def _bad_arrays(a):
    """(how, replacement) for one array field of a cache."""
    other = F32 if a.dtype == F64 else F64
    wider = np.concatenate([a, a[..., :1]], axis=-1)
    longer = np.concatenate([a, a[:1]], axis=0)
    return [("list", a.tolist()), ("None", None), ("str", "r"), ("0-d", np.array(0.5)), ("fewer_dims", a[..., 0]),
            ("more_dims", a[None]), ("wider_last_axis", wider), ("longer_first_axis", longer),
            ("int64", a.astype(np.int64)), ("float16", a.astype(np.float16)), ("complex", a.astype(np.complex128)),
            ("other_float", a.astype(other)), ("object", a.astype(object)), ("bool", a > 0)]


# Corruptions that leave a consistent cache: P (B, k, n) alone says n in a SoftmaxSelectorCache, so
# one more expert is a valid cache (for another dw).
STILL_VALID = {("SoftmaxSelectorCache", "P", "wider_last_axis")}

BAD_SCALARS = {"float": ["1.0", None, -1.0, 0.0, NAN, INF, 10**400, -10**400, True, [1.0], np.array([1.0])],
               "bool": [1, 0, "True", None, 1.0, [True]]}


def _corrupted(cache, prefix="cache"):
    """(label, corrupted cache, structurally valid) for every field of cache (recursively)."""
    out = []
    arrays = []
    for field in cache._fields:
        label = f"{prefix}.{field}"
        v = getattr(cache, field)
        if hasattr(v, "_fields"):  # a nested cache (the per-example cache's .gate)
            out += [(lab, cache._replace(**{field: sub}), ok) for lab, sub, ok in _corrupted(v, label)]
            out += [(f"{label}=tuple", cache._replace(**{field: tuple(v)}), False),
                    (f"{label}=None", cache._replace(**{field: None}), False)]
        elif isinstance(v, np.ndarray):
            arrays.append(field)
            out += [(f"{label}:{how}", cache._replace(**{field: bad}), (type(cache).__name__, field, how) in STILL_VALID)
                    for how, bad in _bad_arrays(v)]
        else:
            kind = "bool" if isinstance(v, bool) else "float"
            out += [(f"{label}={bad!r}"[:40], cache._replace(**{field: bad}), False) for bad in BAD_SCALARS[kind]]
    for i, a in enumerate(arrays):  # fields swapped: valid exactly when the two look alike
        for b in arrays[i + 1:]:
            x, y = getattr(cache, a), getattr(cache, b)
            alike = x.shape == y.shape and x.dtype == y.dtype
            out.append((f"{prefix}.{a}<->{b}", cache._replace(**{a: y, b: x}), alike))
    return out


def _empty_batch(cache):
    """The cache with every batch-first array of it (and of its nested cache) cut to B = 0."""
    changes = {}
    for field in cache._fields:
        v = getattr(cache, field)
        if hasattr(v, "_fields"):
            changes[field] = _empty_batch(v)
        elif isinstance(v, np.ndarray) and field not in ("G", "W2", "U2"):
            changes[field] = v[:0]
    return cache._replace(**changes)


def _other_caches(dtype):
    a, Z = np.zeros((4, 3), dtype), np.zeros((4, 3, 3), dtype)
    return {"DSelectKCache": F.dselect_k_forward(a, Z, 8)[1],
            "SoftmaxSelectorCache": F.softmax_selector_forward(a, np.zeros((4, 3, 6), dtype))[1],
            "DSelectKPerExampleCache": F.dselect_k_per_example_forward(
                np.zeros((4, 5), dtype), np.zeros((3, 5), dtype), np.zeros(3, dtype), np.zeros((3, 3, 5), dtype),
                np.zeros((3, 3), dtype), 8)[1],
            "CometCache": F.comet_forward(np.zeros((4, 3, 8), dtype), np.zeros((4, 3, 7), dtype))[1],
            "CometPerExampleCache": F.comet_per_example_forward(
                np.zeros((4, 5), dtype), np.zeros((3, 8, 5), dtype), np.zeros((3, 8), dtype),
                np.zeros((3, 7, 5), dtype), np.zeros((3, 7), dtype))[1]}


def test_cache_functions_are_all_covered():
    assert {SPECS[sid].fn.__name__ for sid in CACHE_SPECS} == set(CACHE_FUNCTIONS)
    assert len(CACHE_FUNCTIONS) == 8, CACHE_FUNCTIONS  # DSelect-k 3, the ablation gate 2, COMET 3


@pytest.mark.parametrize("sid", CACHE_SPECS)
@short_failures
def test_hand_edited_cache(sid):
    """Every corruption of every field -> TypeError / ValueError naming the cache field (nothing
    changed); a swap of two fields alike in shape and dtype (sz and Z) is a valid cache (the
    values are the forward's, not re-scanned) and gives a result, as do the STILL_VALID ones."""
    spec = SPECS[sid]

    def case(bad, valid):
        kwargs = spec.build(F64)
        kwargs["cache"] = bad
        if valid:  # a result, or an error about the call's other argument (dw) that no longer fits
            try:
                call_spec(spec, kwargs)
            except ValueError as e:
                assert "'dw'" in str(e), e
            return
        info = call_spec(spec, kwargs, (TypeError, ValueError))
        assert "cache" in str(info.value), f"the message names no cache field: {info.value}"
    cache = spec.build(F64)["cache"]
    cases = [(label, lambda bad=bad, ok=ok: case(bad, ok)) for label, bad, ok in _corrupted(cache)]
    cases.append(("empty_batch", lambda: case(_empty_batch(cache), False)))
    for name, other in _other_caches(F64).items():
        if type(other) is not type(cache):
            cases.append((f"a {name}", lambda other=other: case(other, False)))
    for label, bad in (("None", None), ("dict", dict(cache._asdict())), ("tuple", tuple(cache)),
                       ("list", list(cache)), ("array", np.zeros(3))):
        cases.append((label, lambda bad=bad: case(bad, False)))
    run_subcases(cases)


def test_cache_from_another_forward_says_which():
    other = _other_caches(F64)["DSelectKPerExampleCache"]
    with pytest.raises(TypeError, match=r"must be the DSelectKCache that dselect_k_forward returns, got "
                                        r"DSelectKPerExampleCache \(from dselect_k_per_example_forward\)"):
        F.dselect_k_backward(np.zeros((4, 8)), other)
    with pytest.raises(ValueError, match=r"cache\.gate holds an empty batch"):
        F.dselect_k_per_example_backward(np.zeros((0, 8)), _empty_batch(other))


# ---------------------------------------------------------------------------------------------
# Model sizes that cannot fit (issue #16, item 4): refused before anything is built, with the
# memory they would need. The machine's physical memory is fixed to 16 GiB here, so the results
# do not depend on the machine.
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def sixteen_gib(monkeypatch):
    from dselectk import _memory
    monkeypatch.setattr(_memory, "physical_memory", lambda: 16 * 2**30)


@pytest.fixture
def no_layer_built(monkeypatch):
    """Fails the test if a Dense layer (the first thing an MLP allocates) or a gate (which draws
    its generator first) is built."""
    import importlib
    import pkgutil

    from dselectk import gates, layers

    def refuse(*args, **kwargs):
        raise AssertionError("a layer was built before the size check")
    monkeypatch.setattr(layers, "glorot_uniform", refuse)
    for info in pkgutil.iter_modules(gates.__path__):
        module = importlib.import_module(f"dselectk.gates.{info.name}")
        if hasattr(module, "_rng"):
            monkeypatch.setattr(module, "_rng", refuse)


NEED_RE = r"would need at least [0-9.]+ (GiB|TiB|PiB|EiB) .*more than the 16\.0 GiB of physical memory"


@pytest.mark.parametrize("make", [
    lambda: dk.MMoE(10, n_experts=2**31 - 1),
    lambda: dk.MMoE(10, n_experts=2**20, expert_units=(4096,)),
    lambda: dk.MMoE(10, expert_units=(10**6, 10**6)),
    lambda: dk.MMoE(input_shape=(1, 28, 28), expert="cnn", n_experts=2**31 - 1),
    lambda: dk.MoE(10, n_experts=2**31 - 1),
    lambda: dk.SharedBottom(5, bottom_units=(10**6, 10**6)),
    lambda: dk.DSelectKGate(2**31 - 1, 2),
    lambda: dk.DSelectKGate(2**31 - 1, 2, per_example=True, input_dim=4),
    lambda: dk.TopKGate(2**31 - 1, 2),
    lambda: dk.SoftmaxGate(2**31 - 1),
    lambda: dk.SoftmaxSelectorGate(2**31 - 1, 2),
], ids=["mmoe-n", "mmoe-n-wide", "mmoe-units", "mmoe-cnn", "moe", "shared-bottom", "dselect-k", "dselect-k-per-example", "top-k", "softmax", "softmax-selector"])
def test_sizes_that_cannot_fit_are_refused_up_front(make, sixteen_gib, no_layer_built):
    with pytest.raises(ValueError, match=NEED_RE):
        make()


def test_tower_that_cannot_fit_is_refused_before_it_allocates(sixteen_gib):
    """Each MLP is checked before it allocates: a tower too wide is refused with ValueError (the
    small bottom before it is built), not with numpy's MemoryError."""
    with pytest.raises(ValueError, match=NEED_RE):
        dk.SharedBottom(5, tower_units=(10**6, 10**6))


def test_size_message_states_the_need(sixteen_gib):
    with pytest.raises(ValueError, match=r"MMoE with n_experts = 2147483647 would need at least 11\.0 TiB "
                                         r"\(2147483647 experts of 704 parameters"):
        dk.MMoE(10, n_experts=2**31 - 1)
    with pytest.raises(ValueError, match=r"a gate over n_experts = 2147483647 would need at least 24\.0 GiB "
                                         r"\(3 values per expert"):
        dk.DSelectKGate(2**31 - 1, 2)  # float32: w (n,) and r (2, n) of one example


def test_sizes_that_fit_are_built(sixteen_gib):
    dk.MMoE(10, n_experts=64, expert_units=(32,))
    dk.DSelectKGate(2**20, 2)  # 16 MiB of weights per example: fits


@pytest.mark.parametrize("make", [
    lambda v: dk.DSelectKGate(8, 2, gamma=v),
    lambda v: dk.DSelectKGate(8, 2, entropy_reg=v),
    lambda v: dk.SoftmaxSelectorGate(8, 2, temperature=v),
    lambda v: dk.SoftmaxSelectorGate(8, 2, entropy_reg=v),
    lambda v: dk.gates.DSelectK(k=2, gamma=v),
    lambda v: dk.MMoE(4, gamma=v),
], ids=["dselect-k-gamma", "dselect-k-lambda", "selector-T", "selector-lambda", "spec-gamma", "mmoe-gamma"])
def test_gate_hyperparameters_out_of_range(make):
    for bad in HUGE_FLOATS:
        with pytest.raises(ValueError, match="must be a finite number"):
            make(bad)
    with pytest.raises(TypeError, match="must be a real number"):
        make("1.0")
