"""Embedding tables: the gather, its sparse gradient and the lazy optimizer steps against the
plain-NumPy twins of reference.py and against finite differences; the Embedding / EmbeddingInput
layers; models with an embedding input (gradients, training, save/load, input checks)."""
import numpy as np
import pytest

import dselectk as dk
import reference as ref
from fd import check_entries
from dselectk import functional as F
from dselectk import models as Mo
from dselectk import inputs as I
from dselectk import trainer as T
from dselectk.embedding import Embedding, EmbeddingInput
from dselectk.optim import SparseAdagrad, SparseAdam, make_sparse_optimizer

DTYPES = [np.float32, np.float64]
TOL = {np.float32: 1e-6, np.float64: 1e-13}


def _table(rng, V, d, dtype):
    return rng.standard_normal((V, d)).astype(dtype)


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("id_dtype", [np.int64, np.int32, np.uint16])
def test_forward_matches_reference(dtype, id_dtype):
    rng = np.random.default_rng(0)
    table = _table(rng, 11, 4, dtype)
    ids = rng.integers(0, 11, (9, 3)).astype(id_dtype)
    out = F.embedding_forward(table, ids)
    assert out.shape == (9, 12) and out.dtype == dtype
    np.testing.assert_array_equal(out, ref.embedding_lookup(table, ids))


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_into_a_column_block_leaves_the_other_columns(dtype):
    """Two tables and dense features concatenated into one (B, D) row without copies."""
    rng = np.random.default_rng(1)
    users, movies = _table(rng, 7, 3, dtype), _table(rng, 5, 2, dtype)
    uid, mid = rng.integers(0, 7, (6, 1)), rng.integers(0, 5, (6, 2))
    dense = rng.standard_normal((6, 2)).astype(dtype)
    X = np.full((6, 3 + 4 + 2), -9.0, dtype)
    assert F.embedding_forward(users, uid, out=X, offset=0) is X
    F.embedding_forward(movies, mid, out=X, offset=3)
    np.testing.assert_array_equal(X[:, 7:], -9.0)  # not touched
    X[:, 7:] = dense
    expected = np.concatenate([ref.embedding_lookup(users, uid), ref.embedding_lookup(movies, mid), dense], axis=1)
    np.testing.assert_array_equal(X, expected)
    # a column slice of a wider array is a valid out= too
    Y = np.zeros((6, 10), dtype)
    F.embedding_forward(movies, mid, out=Y[:, 5:9])
    np.testing.assert_array_equal(Y[:, 5:9], ref.embedding_lookup(movies, mid))
    assert not Y[:, :5].any() and not Y[:, 9:].any()


def test_forward_checks_only_the_rows_it_reads():
    table = np.ones((4, 2))
    table[3, 1] = np.nan
    np.testing.assert_array_equal(F.embedding_forward(table, np.array([[0, 2]])), np.ones((1, 4)))
    with pytest.raises(ValueError, match=r"'table' contains NaN or Inf in row 3 \(read for ids\[1, 0\]\)"):
        F.embedding_forward(table, np.array([[0, 2], [3, 1]]))


@pytest.mark.parametrize("bad,where", [(-1, "[1, 2]"), (10, "[1, 2]"), (2**40, "[1, 2]")])
def test_out_of_range_ids_name_value_and_position(bad, where):
    table = np.zeros((10, 3))
    ids = np.zeros((2, 3), np.int64)
    ids[1, 2] = bad
    with pytest.raises(ValueError, match=rf"'ids'.*\[0, 10\).*ids\[1, 2\] = {bad}"):
        F.embedding_forward(table, ids)
    with pytest.raises(ValueError, match=rf"'ids'.*ids\[1, 2\] = {bad}"):
        F.embedding_backward(np.zeros((2, 9)), ids, 10)


# --------------------------------------------------------------------------------------------
# backward: sparse gradient
# --------------------------------------------------------------------------------------------

def _densify(rows, grad_rows, V):
    g = np.zeros((V, grad_rows.shape[1]), grad_rows.dtype)
    g[rows] = grad_rows
    return g


def test_repeated_ids_are_summed():
    ids = np.array([[2, 2], [0, 2]])
    dout = np.array([[1.0, 2.0, 10.0, 20.0], [100.0, 200.0, 1000.0, 2000.0]])
    rows, grad = F.embedding_backward(dout, ids, 5)
    np.testing.assert_array_equal(rows, [0, 2])
    np.testing.assert_array_equal(grad, [[100.0, 200.0], [1011.0, 2022.0]])
    assert rows.dtype == np.int64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("id_dtype", [np.int64, np.int32])
def test_backward_matches_reference(dtype, id_dtype):
    rng = np.random.default_rng(2)
    V, d = 13, 5
    ids = rng.integers(0, V, (17, 3)).astype(id_dtype)
    dout = rng.standard_normal((17, 15)).astype(dtype)
    rows, grad = F.embedding_backward(dout, ids, V)
    np.testing.assert_array_equal(rows, np.unique(ids))
    assert grad.dtype == dtype and grad.shape == (rows.size, d)
    np.testing.assert_allclose(_densify(rows, grad, V), ref.embedding_dense_gradient(dout, ids, V), rtol=TOL[dtype],
                               atol=TOL[dtype])


def test_backward_reads_its_block_of_a_wider_gradient():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 6, (8, 2))
    dX = rng.standard_normal((8, 11))
    rows, grad = F.embedding_backward(dX, ids, 6, dim=3, offset=4)
    rows2, grad2 = F.embedding_backward(np.ascontiguousarray(dX[:, 4:10]), ids, 6)
    np.testing.assert_array_equal(rows, rows2)
    np.testing.assert_array_equal(grad, grad2)


def test_backward_sums_in_position_order_exactly():
    """float64 sums are added in ascending position order: equal bit for bit to the reference's
    loop (which adds in that order), here with many repeats and a multi-pass radix sort."""
    rng = np.random.default_rng(4)
    for V in (3, 5000, 2**40):
        ids = rng.choice(rng.integers(0, V, 40), size=(300, 4))  # 40 distinct values, repeated
        dout = rng.standard_normal((300, 8))
        rows, grad = F.embedding_backward(dout, ids, V)
        expected = {}
        for p, v in enumerate(ids.reshape(-1)):
            expected[int(v)] = expected.get(int(v), 0.0) + dout.reshape(-1, 2)[p]
        assert rows.tolist() == sorted(expected)
        np.testing.assert_array_equal(grad, np.array([expected[r] for r in sorted(expected)]))


def test_backward_does_not_depend_on_the_thread_count():
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 3000, (4096, 4))
    dout = rng.standard_normal((4096, 4 * 16)).astype(np.float32)
    threads = dk.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            dk.set_num_threads(n)
            results.append(F.embedding_backward(dout, ids, 3000))
    finally:
        dk.set_num_threads(threads)
    for rows, grad in results[1:]:
        np.testing.assert_array_equal(rows, results[0][0])
        np.testing.assert_array_equal(grad, results[0][1])


def test_backward_against_finite_differences():
    """float64: the densified sparse gradient of a nonlinear loss of the gathered rows, against
    central differences in every entry of the table (untouched rows: exactly 0 both ways)."""
    rng = np.random.default_rng(6)
    V, d = 7, 3
    table = rng.standard_normal((V, d))
    ids = np.array([[1, 4], [4, 4], [0, 6], [1, 2]])  # rows 3 and 5 untouched, row 4 three times
    c = rng.standard_normal((4, 2 * d))

    def loss():
        return float(np.sum(c * np.sin(F.embedding_forward(table, ids))))

    dout = c * np.cos(F.embedding_forward(table, ids))
    rows, grad = F.embedding_backward(dout, ids, V)
    analytic = _densify(rows, grad, V)
    numeric = ref.numerical_gradient(loss, table)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)
    assert not analytic[[3, 5]].any()


# --------------------------------------------------------------------------------------------
# lazy optimizer steps
# --------------------------------------------------------------------------------------------

def _sparse_problem(rng, dtype, V=9, d=4, U=5):
    table = rng.standard_normal((V, d)).astype(dtype)
    rows = rng.choice(V, U, replace=False)
    grad_rows = rng.standard_normal((U, d)).astype(dtype)
    return table, rows, grad_rows


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_adagrad_matches_reference_and_leaves_other_rows(dtype):
    rng = np.random.default_rng(7)
    table, rows, g = _sparse_problem(rng, dtype)
    accum = rng.uniform(0, 1, table.shape).astype(dtype)
    want_t, want_a = ref.sparse_adagrad(table, accum, rows, g, 0.1, 1e-10)
    before_t, before_a = table.copy(), accum.copy()
    F.sparse_adagrad_step(table, accum, rows, g, lr=0.1, eps=1e-10)
    np.testing.assert_allclose(table, want_t, rtol=TOL[dtype] * 10)
    np.testing.assert_allclose(accum, want_a, rtol=TOL[dtype] * 10)
    untouched = np.setdiff1d(np.arange(table.shape[0]), rows)
    np.testing.assert_array_equal(table[untouched], before_t[untouched])
    np.testing.assert_array_equal(accum[untouched], before_a[untouched])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_adam_matches_reference_and_is_lazy(dtype):
    """Three steps touching different rows: untouched rows keep their values AND moments (no decay),
    and the bias correction uses the global step (a row first touched at step 3 uses step 3)."""
    rng = np.random.default_rng(8)
    V, d = 9, 4
    table = rng.standard_normal((V, d)).astype(dtype)
    m, v = np.zeros_like(table), np.zeros_like(table)
    want = (table.copy(), m.copy(), v.copy())
    row7 = table[7].astype(np.float64)
    for step, rows in enumerate([np.array([0, 3, 5]), np.array([5, 1]), np.array([7, 0, 3])], start=1):
        g = rng.standard_normal((rows.size, d)).astype(dtype)
        g7 = g[0].astype(np.float64)
        before = (table.copy(), m.copy(), v.copy())
        want = ref.sparse_adam(*want, rows, g, step, 0.01, 0.9, 0.999, 1e-8)
        F.sparse_adam_step(table, m, v, rows, g, step, lr=0.01)
        for got, w in zip((table, m, v), want):
            np.testing.assert_allclose(got, w, rtol=TOL[dtype] * 10, atol=TOL[dtype])
        untouched = np.setdiff1d(np.arange(V), rows)
        for got, b in zip((table, m, v), before):
            np.testing.assert_array_equal(got[untouched], b[untouched])
    # row 7, first touched at step 3: m = 0.1 g, v = 0.001 g^2, and the step-3 bias corrections
    m_hat, v_hat = 0.1 * g7 / (1 - 0.9**3), 0.001 * g7**2 / (1 - 0.999**3)
    np.testing.assert_allclose(table[7], row7 - 0.01 * m_hat / (np.sqrt(v_hat) + 1e-8), rtol=TOL[dtype] * 10)
    assert np.all(m[[2, 4, 6, 8]] == 0) and np.all(v[[2, 4, 6, 8]] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_steps_equal_dense_steps_when_every_row_is_touched(dtype):
    rng = np.random.default_rng(9)
    V, d = 6, 5
    t_sparse = rng.standard_normal((V, d)).astype(dtype)
    t_dense = t_sparse.copy().reshape(-1)
    acc_s, acc_d = np.full((V, d), 0.1, dtype), np.full(V * d, 0.1, dtype)
    a_s, m_s, v_s = t_sparse.copy(), np.zeros((V, d), dtype), np.zeros((V, d), dtype)
    a_d, m_d, v_d = t_sparse.copy().reshape(-1), np.zeros(V * d, dtype), np.zeros(V * d, dtype)
    for step in range(1, 6):
        ids = np.concatenate([rng.permutation(V), rng.integers(0, V, 7)]).reshape(-1, 1)
        dout = rng.standard_normal((ids.shape[0], d)).astype(dtype)
        rows, g = F.embedding_backward(dout, ids, V)
        assert rows.tolist() == list(range(V))
        F.sparse_adagrad_step(t_sparse, acc_s, rows, g, lr=0.05)
        F.adagrad_step(t_dense, g.reshape(-1), acc_d, lr=0.05)
        F.sparse_adam_step(a_s, m_s, v_s, rows[::-1].copy(), g[::-1].copy(), step, lr=0.01)  # any row order
        F.adam_step(a_d, g.reshape(-1), m_d, v_d, step, lr=0.01)
    np.testing.assert_array_equal(t_sparse.reshape(-1), t_dense)
    np.testing.assert_array_equal(acc_s.reshape(-1), acc_d)
    np.testing.assert_array_equal(a_s.reshape(-1), a_d)
    np.testing.assert_array_equal(m_s.reshape(-1), m_d)
    np.testing.assert_array_equal(v_s.reshape(-1), v_d)


def test_sparse_step_refuses_repeated_rows_and_changes_nothing():
    table, accum = np.ones((5, 2)), np.zeros((5, 2))
    with pytest.raises(ValueError, match=r"'rows' must hold distinct.*rows\[1\] = rows\[3\] = 4"):
        F.sparse_adagrad_step(table, accum, np.array([0, 4, 2, 4]), np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"'rows'.*rows\[2\] = 5"):
        F.sparse_adagrad_step(table, accum, np.array([0, 4, 5]), np.ones((3, 2)))
    assert np.all(table == 1) and np.all(accum == 0)


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------

def test_embedding_input_concatenates_and_routes_gradients_back():
    rng = np.random.default_rng(10)
    front = EmbeddingInput([6, 4], [3, 2], n_dense=2, seed=1, dtype=np.float64)
    assert front.out_dim == 7 and front.offsets == [0, 3] and front.dense_offset == 5
    ids = np.array([[0, 1], [5, 1], [0, 3]])
    dense = rng.standard_normal((3, 2))
    X = front.forward({"ids": ids, "dense": dense})
    t0, t1 = (e.table for e in front.tables)
    np.testing.assert_array_equal(X, np.concatenate([t0[ids[:, 0]], t1[ids[:, 1]], dense], axis=1))
    dX = rng.standard_normal((3, 7))
    front.backward(dX)
    np.testing.assert_array_equal(front.tables[0].grad[0], [0, 5])
    np.testing.assert_allclose(front.tables[0].dense_grad(), ref.embedding_dense_gradient(dX[:, :3], ids[:, :1], 6))
    np.testing.assert_allclose(front.tables[1].dense_grad(), ref.embedding_dense_gradient(dX[:, 3:5], ids[:, 1:], 4))
    front.zero_grad()
    assert all(e.grad is None for e in front.tables)


def test_embedding_layer_accumulates_two_backwards():
    e = Embedding(5, 2, np.random.default_rng(0), np.float64)
    e.forward(np.array([[1], [3]]))
    e.backward(np.array([[1.0, 1.0], [2.0, 2.0]]))
    e.forward(np.array([[3], [4]]))
    e.backward(np.array([[10.0, 10.0], [20.0, 20.0]]))
    np.testing.assert_array_equal(e.grad[0], [1, 3, 4])
    np.testing.assert_array_equal(e.grad[1], [[1, 1], [12, 12], [20, 20]])


def test_sparse_optimizer_classes():
    tables = [np.ones((4, 2)), np.ones((3, 1), np.float32)]
    adam = make_sparse_optimizer("Adam", tables, lr=0.1, betas=(0.8, 0.9), weight_decay=0.5)
    assert isinstance(adam, SparseAdam) and adam.beta1 == 0.8
    adam.step([None, (np.array([2]), np.ones((1, 1), np.float32))])
    adam.step([(np.array([0]), np.ones((1, 2))), None])
    assert adam.step_count == 2  # global: counts steps where a table had no gradient
    np.testing.assert_allclose(tables[0][0], 1 - 0.1 * (0.2 / (1 - 0.8**2)) / (np.sqrt(0.1 / (1 - 0.9**2)) + 1e-8))
    assert np.all(tables[0][1:] == 1) and tables[1][2, 0] < 1 and np.all(tables[1][:2] == 1)
    ada = make_sparse_optimizer("adagrad", [np.ones((2, 2))], lr=0.5, initial_accumulator_value=3.0)
    assert isinstance(ada, SparseAdagrad) and np.all(ada.accum[0] == 3.0)
    with pytest.raises(ValueError, match="no lazy"):
        make_sparse_optimizer("sgd", tables)
    with pytest.raises(ValueError, match="one entry"):
        adam.step([None])
    with pytest.raises(ValueError, match="lr"):
        SparseAdagrad(tables, lr=0.0)


# --------------------------------------------------------------------------------------------
# models with an embedding input
# --------------------------------------------------------------------------------------------

EMB = dict(vocab_sizes=[6, 5], dims=[3, 2], n_dense=2)


def _emb_data(rng, N, n_dense=2, vocab=(6, 5)):
    ids = np.stack([rng.integers(0, V, N) for V in vocab], axis=1)
    X = {"ids": ids, "dense": rng.standard_normal((N, n_dense))} if n_dense else ids
    Y = [(rng.random(N) < 0.5).astype(float), rng.standard_normal(N)]
    return X, Y


def _fd_check_with_tables(model, X, Y, rng, W=None, n_entries=40):
    """The slab's gradient (a random subset plus every gate entry) and every entry of every table
    (densified sparse gradients) against central differences of the total objective."""
    Xc = I.check_X(model, X)
    Yc = I.check_Y(model, Y, Xc["ids"].shape[0])

    def objective():
        return model.loss(model.forward(Xc, training=True), Yc, W)[0]

    model.zero_grad()
    _, _, douts = model.loss(model.forward(Xc, training=True), Yc, W)
    model.backward(douts)
    checks = [(model.slab.data, model.slab.grad.copy(), rng.choice(model.slab.data.size, n_entries, replace=False))]
    for e in model.input_layer.tables:
        checks.append((e.table.reshape(-1), e.dense_grad().reshape(-1), np.arange(e.table.size)))
    for data, grad, idx in checks:
        check_entries(objective, data, grad, idx)


def _spread(model, rng):
    for g in model.gates:
        for name, v in g.params.items():
            if name == "Z":
                v[...] = rng.uniform(-0.4, 0.4, v.shape) * g.gamma
            elif name in ("W", "b_W"):
                v[...] = rng.uniform(-0.05, 0.05, v.shape) * g.gamma
            else:
                v[...] = rng.standard_normal(v.shape)
    for e in model.input_layer.tables:
        e.table[...] = rng.standard_normal(e.table.shape)


@pytest.mark.parametrize("kind", ["dselect_k", "dselect_k_pe", "top_k_pe", "softmax_pe", "moe_pe", "shared_bottom",
                                  "top_k_pe_sparse", "comet", "comet_pe", "hash"])
def test_embedding_model_gradient(kind):
    """The experts' and the per-example gates' input gradients reach the tables (also through the
    gather -> dense -> scatter path of sparse per-example gates: top_k_pe_sparse, 1 of 8 experts)."""
    rng = np.random.default_rng(11)
    common = dict(dtype="float64", seed=2, embeddings=EMB)
    if kind == "shared_bottom":
        model = Mo.SharedBottom(None, n_tasks=2, bottom_units=(6,), tower_units=(4,), task_losses=["bce", "mse"],
                                task_weights=[0.7, 0.3], **common)
    elif kind == "top_k_pe_sparse":
        model = Mo.MMoE(None, n_tasks=2, n_experts=8, expert_units=(5,), tower_units=(3,), task_losses=["bce", "mse"],
                        gate="top_k", k=1, per_example=True, **common)
    elif kind == "moe_pe":
        model = Mo.MoE(None, n_experts=4, expert_units=(5,), loss="mse", gate="dselect_k", k=2, per_example=True,
                       **common)
    else:
        gate, pe = kind.replace("_pe", ""), kind.endswith("_pe")
        spec = {"dselect_k": dk.gates.DSelectK(2, entropy_reg=0.1, per_example=pe),
                "top_k": dk.gates.TopK(2, per_example=pe), "softmax": dk.gates.Softmax(per_example=pe),
                "comet": dk.gates.Comet(2, entropy_reg=0.1, per_example=pe), "hash": dk.gates.Hash(hash_feature=1)}[gate]
        model = Mo.MMoE(None, n_tasks=2, n_experts=4, expert_units=(5,), tower_units=(3,), task_losses=["bce", "mse"],
                        task_weights=[0.7, 0.3], gate=spec, **common)
    _spread(model, rng)
    X, Y = _emb_data(rng, 9)
    if kind == "moe_pe":
        Y = Y[1:]
    W = [np.where(Y[0] > 0, 1.0, 0.0), None] if kind != "moe_pe" else None
    _fd_check_with_tables(model, X, Y, rng, W=W)
    if kind == "top_k_pe_sparse":
        assert model._cache[2] is not None  # the sparse path ran


def _two_task_problem(rng, N=600, n_users=30, n_items=25):
    """Ratings-like data: task 0 a binary label, task 1 a value defined on positives only."""
    u, v = rng.standard_normal(n_users), rng.standard_normal(n_items)
    ids = np.stack([rng.integers(0, n_users, N), rng.integers(0, n_items, N)], axis=1)
    score = u[ids[:, 0]] + v[ids[:, 1]]
    y0 = (score > 0).astype(np.float32)
    y1 = np.where(y0 > 0, 3 + score, 0).astype(np.float32)
    return ids, [y0, y1], [None, y0.copy()]


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
def test_fit_updates_tables_lazily_and_learns(optimizer):
    rng = np.random.default_rng(12)
    ids, Y, W = _two_task_problem(rng)
    unused = 29  # user 29 never appears in training: its row must not move
    keep = ids[:, 0] != unused
    ids, Y, W = ids[keep], [y[keep] for y in Y], [None, W[1][keep]]
    model = Mo.MMoE(None, n_tasks=2, n_experts=4, expert_units=(16,), tower_units=(8,), task_losses=["bce", "mse"],
                    task_weights=[0.5, 0.5], gate="dselect_k", k=2, embeddings=dict(vocab_sizes=[30, 25], dims=4),
                    seed=0)
    before = [t.copy() for t in model.embedding_tables()]
    slab_before = model.slab.data.copy()
    first = T.evaluate(model, ids, Y, sample_weights=W)
    T.fit(model, ids, Y, sample_weights=W, epochs=8, batch_size=32, optimizer=optimizer,
          lr=0.05 if optimizer == "adagrad" else 0.01, verbose=0)
    after = model.embedding_tables()
    np.testing.assert_array_equal(after[0][unused], before[0][unused])
    assert not np.array_equal(after[0][:unused], before[0][:unused]) and not np.array_equal(after[1], before[1])
    assert not np.array_equal(model.slab.data, slab_before)
    last = T.evaluate(model, ids, Y, sample_weights=W)
    assert last["loss"] < 0.5 * first["loss"], (first, last)
    assert last["task0_auc"] > 0.9, last


def test_fit_is_deterministic_and_predict_takes_dicts():
    rng = np.random.default_rng(13)
    X, Y = _emb_data(rng, 200)
    runs = []
    for _ in range(2):
        model = Mo.MMoE(None, n_tasks=2, n_experts=4, expert_units=(8,), tower_units=(4,), task_losses=["bce", "mse"],
                        gate="dselect_k", per_example=True, dropout=0.2, embeddings=EMB, seed=5)
        T.fit(model, X, Y, epochs=2, batch_size=16, optimizer="adagrad", verbose=0, seed=3)
        runs.append((model.slab.data.copy(), [t.copy() for t in model.embedding_tables()],
                     T.predict(model, X, batch_size=7)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1] + runs[0][2], runs[1][1] + runs[1][2]):
        np.testing.assert_array_equal(a, b)
    p = runs[0][2]
    assert p[0].shape == (200,) and np.all((p[0] > 0) & (p[0] < 1)) and p[1].shape == (200,)


def test_early_stopping_restores_the_tables_too():
    rng = np.random.default_rng(14)
    ids, Y, _ = _two_task_problem(rng, N=200)
    vids, vY, _ = _two_task_problem(rng, N=100)
    model = Mo.SharedBottom(None, n_tasks=2, bottom_units=(16,), tower_units=(8,), task_losses=["bce", "mse"],
                            embeddings=dict(vocab_sizes=[30, 25], dims=4), seed=0)
    snaps = {}

    class Snap:
        def on_epoch_end(self, epoch, logs, m):
            snaps[epoch] = (logs["val_loss"], [t.copy() for t in m.embedding_tables()])

    hist = T.fit(model, ids, Y, epochs=12, batch_size=16, optimizer="adam", lr=0.05, validation_data=(vids, vY),
                 early_stopping_patience=2, callbacks=[Snap()], verbose=0)
    for got, want in zip(model.embedding_tables(), snaps[hist.best_epoch][1]):
        np.testing.assert_array_equal(got, want)


def test_save_load_round_trip_with_tables(tmp_path):
    rng = np.random.default_rng(15)
    model = Mo.MMoE(None, n_tasks=2, n_experts=4, expert_units=(8,), tower_units=(4,), task_losses=["bce", "mse"],
                    gate="top_k", per_example=True, embeddings=EMB, seed=3)
    for t in model.embedding_tables():
        t += rng.standard_normal(t.shape).astype(np.float32)
    X, _ = _emb_data(rng, 20)
    dk.save(model, tmp_path / "m.npz")
    loaded = dk.load(tmp_path / "m.npz")
    assert loaded.config == model.config and loaded.config["embeddings"] == dict(vocab_sizes=[6, 5], dims=[3, 2],
                                                                                 n_dense=2)
    for a, b in zip(model.embedding_tables(), loaded.embedding_tables()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(T.predict(model, X), T.predict(loaded, X)):
        np.testing.assert_array_equal(a, b)
    import json
    with np.load(tmp_path / "m.npz") as z:
        assert json.loads(str(z["meta"][()]))["version"] == 3  # a gate spec in the config
        arrays = {k: z[k] for k in z.files}
    arrays["table_embedding1"] = arrays["table_embedding1"][:-1]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="embedding table"):
        dk.load(tmp_path / "bad.npz")
    plain = Mo.SharedBottom(4, seed=0)
    dk.save(plain, tmp_path / "plain.npz")
    with np.load(tmp_path / "plain.npz") as z:
        assert json.loads(str(z["meta"][()]))["version"] == 1 and sorted(z.files) == ["meta", "params"]


def test_embeddings_argument_checks():
    with pytest.raises(ValueError, match="input_dim = 9 does not match"):
        Mo.MMoE(9, embeddings=EMB)
    with pytest.raises(ValueError, match="keys"):
        Mo.MMoE(None, embeddings=dict(vocab=[3]))
    with pytest.raises(ValueError, match="dims has 1 entries"):
        Mo.SharedBottom(None, embeddings=dict(vocab_sizes=[3, 4], dims=[2]))
    with pytest.raises(ValueError, match="vocab_sizes"):
        EmbeddingInput([3, 0], 2)
    front = EmbeddingInput([3, 4], 2, n_dense=1, dtype=np.float64)
    model = Mo.MMoE(None, n_tasks=1, n_experts=2, embeddings=front, dtype="float64")
    assert model.input_layer is front and model.input_dim == 5
    with pytest.raises(ValueError, match="dtype"):
        Mo.MMoE(None, embeddings=front, dtype="float32")


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda X: dict(X, ids=X["ids"].astype(float)), TypeError, r"X\['ids'\] must have an integer dtype"),
    (lambda X: dict(X, ids=np.where(np.arange(40)[:, None] == 7, [0, 5], X["ids"])), ValueError,
     r"X\['ids'\]\[:, 1\] must hold ids in \[0, 5\).*got 5 at row 7"),
    (lambda X: dict(X, ids=np.where(np.arange(40)[:, None] == 3, [-2, 0], X["ids"])), ValueError,
     r"X\['ids'\]\[:, 0\].*got -2 at row 3"),
    (lambda X: dict(X, ids=X["ids"][:, :1]), ValueError, r"X\['ids'\] must have shape \(N, 2\)"),
    (lambda X: {"ids": X["ids"]}, ValueError, "lacks 'dense'"),
    (lambda X: X["ids"], TypeError, "must be a dict"),
    (lambda X: dict(X, dense=X["dense"][:, :1]), ValueError, r"X\['dense'\] must have shape \(N, n_dense\)"),
    (lambda X: dict(X, dense=np.where(np.arange(40)[:, None] == 4, np.nan, X["dense"])), ValueError,
     "NaN or Inf .*row 4"),
    (lambda X: dict(X, extra=1), ValueError, "unknown keys"),
    (lambda X: [X["ids"], X["dense"]], TypeError, "must be"),
    (lambda X: dict(X, ids=X["ids"][:0], dense=X["dense"][:0]), ValueError, "empty"),
])
def test_fit_rejects_bad_embedding_input_before_training(mutate, exc, match):
    rng = np.random.default_rng(16)
    X, Y = _emb_data(rng, 40)
    model = Mo.MMoE(None, n_tasks=2, n_experts=3, expert_units=(4,), tower_units=(3,), task_losses=["bce", "mse"],
                    embeddings=EMB, seed=0)
    before = model.slab.data.copy(), [t.copy() for t in model.embedding_tables()]
    with pytest.raises(exc, match=match):
        T.fit(model, mutate(X), Y, epochs=1, verbose=0)
    np.testing.assert_array_equal(model.slab.data, before[0])
    for a, b in zip(model.embedding_tables(), before[1]):
        np.testing.assert_array_equal(a, b)


def test_ids_only_models_and_optimizer_choice():
    rng = np.random.default_rng(17)
    X, Y = _emb_data(rng, 30, n_dense=0)
    model = Mo.MMoE(None, n_tasks=2, n_experts=3, expert_units=(4,), tower_units=(3,), task_losses=["bce", "mse"],
                    embeddings=dict(vocab_sizes=[6, 5], dims=2), seed=0)
    T.fit(model, X.astype(np.int32), Y, epochs=1, optimizer="adagrad", verbose=0)  # int32 ids, no copy needed
    T.fit(model, {"ids": X.astype(np.uint8)}, Y, epochs=1, verbose=0)
    with pytest.raises(TypeError, match="integer dtype"):
        T.fit(model, X.astype(np.float32), Y, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="no lazy"):
        T.fit(model, X, Y, epochs=1, optimizer="sgd", verbose=0)


def test_masked_task_weights_ignore_the_masked_targets():
    """Per-task sample weights: a weight-0 example does not count for that task, whatever its
    target (the rating task on sampled negatives)."""
    rng = np.random.default_rng(18)
    ids, Y, W = _two_task_problem(rng, N=64)
    model = Mo.MMoE(None, n_tasks=2, n_experts=3, expert_units=(4,), tower_units=(3,), task_losses=["bce", "mse"],
                    task_weights=[0.3, 0.7], embeddings=dict(vocab_sizes=[30, 25], dims=2), seed=0)
    Y2 = [Y[0], np.where(W[1] > 0, Y[1], 1e3).astype(np.float32)]
    r1, r2 = T.evaluate(model, ids, Y, sample_weights=W), T.evaluate(model, ids, Y2, sample_weights=W)
    assert r1 == r2
