/* dselectk._C, nn family: layers, dropout and losses (csrc/nn.h).
 * Converters and conventions: common.h. */
#include "common.h"

#include <math.h>

#include "nn.h"

/* Per-example loss weights (B,): optional, finite and >= 0. */
static int loss_weights(PyObject *obj, int *tn, npy_intp B, Hold *h, PyArrayObject **w) {
    npy_intp dims[1] = {B};
    if (optional_input(obj, "weights", tn, 1, dims, "(B,)", 1, w) < 0) return -1;
    hold(h, *w);
    return *w ? check_range(*w, "weights", 0, HUGE_VAL, ">= 0") : 0;
}

PyDoc_STRVAR(dense_forward_doc,
"dense_forward(x, W, b=None, out=None, relu=False, dropout_rate=0.0, dropout_seed=0, dropout_step=0,\n"
"              dropout_rows=None) -> y\n\n"
"y (B, o) = x (B, p) W (p, o) + b (o,); b may be None. W is (in, out), unlike linear_forward's\n"
"(out, in). One SGEMM/DGEMM of the vendored OpenBLAS, cut in tiles on the thread pool. relu=True\n"
"returns max(y, 0) instead, and dropout_rate > 0 then applies dropout_forward(., dropout_rate,\n"
"dropout_seed, dropout_step, rows=dropout_rows), both in each tile's epilogue while it is in cache (exactly\n"
"dropout_forward(relu_forward(dense_forward(x, W, b)), ...)).");

static PyObject *py_dense_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "W", "b", "out", "relu", "dropout_rate", "dropout_seed", "dropout_step",
                             "dropout_rows", NULL};
    PyObject *x_obj, *W_obj, *b_obj = NULL, *out_obj = NULL, *seed_obj = NULL, *step_obj = NULL, *rows_obj = Py_None;
    PyObject *result = NULL;
    int relu = 0;
    double rate = 0;
    unsigned long long seed = 0, step = 0;
    Hold h = {0};
    if (!parse_args(args, kw, "OO|OOpdOOO", kwlist, &x_obj, &W_obj, &b_obj, &out_obj, &relu, &rate, &seed_obj,
                    &step_obj, &rows_obj))
        return NULL;
    if (check_unit(rate, "dropout_rate") < 0 || (seed_obj && parse_count(seed_obj, "dropout_seed", 0, UINT64_MAX, &seed) < 0) ||
        (step_obj && parse_count(step_obj, "dropout_step", 0, UINT64_MAX, &step) < 0))
        return NULL;
    int tn = NPY_NOTYPE;
    npy_intp xdims[2] = {-1, -1};
    PyArrayObject *x = hold_from(&h, x_obj, input_array(x_obj, "x", &tn, 2, xdims, "(B, p)", 1)), *b = NULL;
    if (!x) goto done;
    if (check_batch(xdims[0], "x") < 0) goto done;
    npy_intp wdims[2] = {xdims[1], -1};
    PyArrayObject *W = hold_from(&h, W_obj, input_array(W_obj, "W", &tn, 2, wdims, "(p, o)", 1));
    if (!W) goto done;
    npy_intp bdims[1] = {wdims[1]};
    if (optional_input(b_obj, "b", &tn, 1, bdims, "(o,)", 1, &b) < 0) goto done;
    hold_from(&h, b_obj, b);
    if (check_blas_dims(xdims[0], xdims[1], wdims[1]) < 0) goto done;
    PyArrayObject *rows = NULL;
    if (rows_obj != Py_None) { /* rows[b] * o + o <= 2^63: every hashed index fits (as dropout_forward) */
        npy_intp rdims[1] = {xdims[0]};
        rows = hold(&h, index_array(rows_obj, "dropout_rows", "row positions", 1, rdims, "(B,)",
                                    (npy_intp)(INT64_MAX / (wdims[1] > 0 ? wdims[1] : 1)), "2**63 / o", 0));
        if (!rows) goto done;
    }
    npy_intp ydims[2] = {xdims[0], wdims[1]};
    PyArrayObject *y = hold(&h, output_array(out_obj, "out", tn, 2, ydims, &h));
    if (!y) goto done;
    const DskDropout drop = {rate, (uint64_t)seed, (uint64_t)step, rows ? (const int64_t *)DATA(rows) : NULL};
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, dense_forward, DATA(y), DATA(x), DATA(W), OPTDATA(b), (int)xdims[0], (int)xdims[1], (int)wdims[1],
             relu, rate > 0 ? &drop : NULL);
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)y);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(dense_backward_doc,
"dense_backward(dy, x, W, dW, db=None, need_dx=True, input_relu=False, input_dropout=0.0, out=None)\n"
"    -> dx or None\n\n"
"Backward of dense_forward for dy (B, o), x (B, p), W (p, o). ACCUMULATES in place:\n"
"dW (p, o) += x^T dy and db (o,) += dy summed over the batch (skipped when db is None); dW and db\n"
"must be C-contiguous, writeable arrays of the call's dtype and exact shape that share no memory\n"
"with the inputs (they are never copied). Returns dx = dy W^T (B, p), or None unless need_dx.\n"
"input_relu=True: x is a ReLU's output (then dropout_forward's with rate input_dropout, if > 0),\n"
"and dx is the gradient at that ReLU's input: relu_backward(dropout_backward(dy W^T, ...), x),\n"
"fused into the product's epilogue. out: an array (B, p) for dx (as dense_forward's out).");

static PyObject *py_dense_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dy", "x", "W", "dW", "db", "need_dx", "input_relu", "input_dropout", "out", NULL};
    PyObject *dy_obj, *x_obj, *W_obj, *dW_obj, *db_obj = Py_None, *out_obj = Py_None, *result = NULL;
    int need_dx = 1, input_relu = 0;
    double input_dropout = 0;
    Hold h = {0};
    if (!parse_args(args, kw, "OOOO|OppdO", kwlist, &dy_obj, &x_obj, &W_obj, &dW_obj, &db_obj, &need_dx,
                    &input_relu, &input_dropout, &out_obj))
        return NULL;
    if (check_unit(input_dropout, "input_dropout") < 0) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp xdims[2] = {-1, -1};
    PyArrayObject *x = hold_from(&h, x_obj, input_array(x_obj, "x", &tn, 2, xdims, "(B, p)", 1)), *db = NULL, *dx = NULL;
    if (!x) goto done;
    if (check_batch(xdims[0], "x") < 0) goto done;
    npy_intp wdims[2] = {xdims[1], -1};
    PyArrayObject *W = hold_from(&h, W_obj, input_array(W_obj, "W", &tn, 2, wdims, "(p, o)", 1));
    if (!W) goto done;
    npy_intp ydims[2] = {xdims[0], wdims[1]}, bdims[1] = {wdims[1]};
    PyArrayObject *dy = hold_from(&h, dy_obj, input_array(dy_obj, "dy", &tn, 2, ydims, "(B, o)", 1));
    if (!dy) goto done;
    if (check_blas_dims(xdims[0], xdims[1], wdims[1]) < 0) goto done;
    PyArrayObject *dW = inplace_array(dW_obj, "dW", &tn, 2, wdims, "(p, o)", &h, 0);
    if (!hold(&h, dW)) goto done;
    if (db_obj != Py_None && !(db = hold_from(&h, db_obj, inplace_array(db_obj, "db", &tn, 1, bdims, "(o,)", &h, 0))))
        goto done;
    if (need_dx && !(dx = hold(&h, output_array(out_obj, "out", tn, 2, xdims, &h)))) goto done;
    const double scale = input_relu ? 1 / (1 - input_dropout) : 0;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, dense_backward, OPTDATA(dx), DATA(dW), OPTDATA(db), DATA(dy), DATA(x), DATA(W), (int)xdims[0],
             (int)xdims[1], (int)wdims[1], scale);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(dx ? (PyObject *)dx : Py_None);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(relu_forward_doc, "relu_forward(x, out=None) -> y\n\ny = max(x, 0) for a 1-D array x.");

static PyObject *py_relu_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "out", NULL};
    PyObject *x_obj, *out_obj = NULL, *result = NULL;
    Hold h = {0};
    if (!parse_args(args, kw, "O|O", kwlist, &x_obj, &out_obj)) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp dims[1] = {-1};
    PyArrayObject *x = hold_from(&h, x_obj, input_array(x_obj, "x", &tn, 1, dims, "(N,)", 1));
    if (!x) goto done;
    PyArrayObject *y = hold(&h, output_array(out_obj, "out", tn, 1, dims, &h));
    if (!y) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, relu_forward, DATA(y), DATA(x), (long)dims[0]);
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)y);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(relu_backward_doc,
"relu_backward(dy, y) -> dx\n\ndx = dy where y > 0, else 0; dy and y (the forward's output) 1-D of one length.");

static PyObject *py_relu_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dy", "y", NULL};
    PyObject *dy_obj, *y_obj, *result = NULL;
    Hold h = {0};
    if (!parse_args(args, kw, "OO", kwlist, &dy_obj, &y_obj)) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp dims[1] = {-1};
    PyArrayObject *dy = hold_from(&h, dy_obj, input_array(dy_obj, "dy", &tn, 1, dims, "(N,)", 1));
    if (!dy) goto done;
    PyArrayObject *y = hold_from(&h, y_obj, input_array(y_obj, "y", &tn, 1, dims, "(N,)", 1));
    if (!y) goto done;
    PyArrayObject *dx = hold(&h, new_array(tn, 1, dims));
    if (!dx) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, relu_backward, DATA(dx), DATA(dy), DATA(y), (long)dims[0]);
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)dx);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(dropout_forward_doc,
"dropout_forward(x, rate, seed, step, training=True, rows=None) -> y\n\n"
"Inverted dropout of a 1-D x: each entry is kept with probability 1 - rate and scaled by\n"
"1 / (1 - rate). The mask is a counter-based hash of (seed, step, flat index) (csrc/nn.h): not\n"
"stored, the same in dropout_backward, independent of the thread count. 0 <= rate < 1; seed and\n"
"step are integers in [0, 2**64 - 1]. training=False or rate == 0 returns a copy of x.\n"
"rows: None, or the place in a larger batch of each of the B = len(rows) rows x holds (an\n"
"integer array (B,), values >= 0; B divides len(x), R = len(x) / B entries a row): entry j of\n"
"row b then hashes rows[b] * R + j instead of its flat index.");
PyDoc_STRVAR(dropout_backward_doc,
"dropout_backward(dy, rate, seed, step, training=True, rows=None) -> dx\n\n"
"dx = dy * mask / (1 - rate) with the mask of dropout_forward(x, rate, seed, step, training, rows).");

static PyObject *dropout(PyObject *args, PyObject *kw, int backward) {
    static char *kwlist_f[] = {"x", "rate", "seed", "step", "training", "rows", NULL};
    static char *kwlist_b[] = {"dy", "rate", "seed", "step", "training", "rows", NULL};
    PyObject *x_obj, *seed_obj, *step_obj, *rows_obj = Py_None, *result = NULL;
    double rate;
    int training = 1;
    unsigned long long seed, step;
    Hold h = {0};
    if (!parse_args(args, kw, "OdOO|pO", backward ? kwlist_b : kwlist_f, &x_obj, &rate, &seed_obj,
                    &step_obj, &training, &rows_obj))
        return NULL;
    if (check_unit(rate, "rate (the dropout probability)") < 0 ||
        parse_count(seed_obj, "seed", 0, UINT64_MAX, &seed) < 0 ||
        parse_count(step_obj, "step", 0, UINT64_MAX, &step) < 0)
        return NULL;
    int tn = NPY_NOTYPE;
    npy_intp dims[1] = {-1};
    PyArrayObject *x = hold_from(&h, x_obj, input_array(x_obj, backward ? "dy" : "x", &tn, 1, dims, "(N,)", 1));
    if (!x) goto done;
    PyArrayObject *rows = NULL;
    long R = 1;
    if (rows_obj != Py_None) {
        npy_intp rdims[1] = {-1};
        if (PyArray_Check(rows_obj) && PyArray_NDIM((PyArrayObject *)rows_obj) == 1) {
            const npy_intp B = PyArray_DIM((PyArrayObject *)rows_obj, 0);
            if (B == 0 || dims[0] % B) {
                PyErr_Format(PyExc_ValueError, "argument 'rows' must have one entry per row of x: its length B = %ld "
                             "must divide the %ld entries of x", (long)B, (long)dims[0]);
                goto done;
            }
            R = (long)(dims[0] / B);
        }
        /* rows[b] * R + R <= 2^63: every hashed index fits */
        rows = hold(&h, index_array(rows_obj, "rows", "row positions", 1, rdims, "(B,)", (npy_intp)(INT64_MAX / R),
                                    "2**63 / (entries per row)", 0));
        if (!rows) goto done;
    }
    PyArrayObject *y = hold(&h, new_array(tn, 1, dims));
    if (!y) goto done;
    const double r = training ? rate : 0;
    const int64_t *row_data = rows ? (const int64_t *)DATA(rows) : NULL;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, dropout_forward, DATA(y), DATA(x), (long)dims[0], row_data, R, r, (uint64_t)seed, (uint64_t)step);
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)y);
done:
    release(&h);
    return result;
}

static PyObject *py_dropout_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    return dropout(args, kw, 0);
}
static PyObject *py_dropout_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    return dropout(args, kw, 1);
}

PyDoc_STRVAR(bce_with_logits_doc,
"bce_with_logits(logits, targets, weights=None) -> (loss, dlogits)\n\n"
"Binary cross-entropy on logits z (B,) with targets t (B,) in [0, 1] and optional weights w (B,)\n"
"(finite, >= 0): loss = sum_b w_b l_b / B with l = max(z, 0) - z t + log(1 + exp(-|z|)) (stable);\n"
"dlogits (B,) is the gradient of that mean.");

static PyObject *py_bce_with_logits(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"logits", "targets", "weights", NULL};
    PyObject *z_obj, *t_obj, *w_obj = Py_None, *result = NULL;
    double loss = 0;
    Hold h = {0};
    if (!parse_args(args, kw, "OO|O", kwlist, &z_obj, &t_obj, &w_obj)) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp dims[1] = {-1};
    PyArrayObject *z = hold_from(&h, z_obj, input_array(z_obj, "logits", &tn, 1, dims, "(B,)", 1)), *w = NULL;
    if (!z) goto done;
    if (check_batch(dims[0], "logits") < 0) goto done;
    PyArrayObject *t = hold_from(&h, t_obj, input_array(t_obj, "targets", &tn, 1, dims, "(B,)", 1));
    if (!t || check_range(t, "targets", 0, 1, "in [0, 1]") < 0) goto done;
    if (loss_weights(w_obj, &tn, dims[0], &h, &w) < 0) goto done;
    PyArrayObject *dz = hold(&h, new_array(tn, 1, dims));
    if (!dz) goto done;
    Py_BEGIN_ALLOW_THREADS
    if (tn == NPY_FLOAT) loss = bce_with_logits_f32(DATA(dz), DATA(z), DATA(t), OPTDATA(w), (long)dims[0]);
    else loss = bce_with_logits_f64(DATA(dz), DATA(z), DATA(t), OPTDATA(w), (long)dims[0]);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(dO)", loss, dz);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(mse_doc,
"mse(pred, target, weights=None) -> (loss, dpred)\n\n"
"Squared error summed over the d outputs of each example, averaged over the batch: pred, target\n"
"(B, d), optional weights w (B,) (finite, >= 0); loss = sum_b w_b sum_c (pred - target)^2 / B.\n"
"dpred (B, d) is the gradient of that mean.");

static PyObject *py_mse(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"pred", "target", "weights", NULL};
    PyObject *p_obj, *t_obj, *w_obj = Py_None, *result = NULL;
    double loss = 0;
    Hold h = {0};
    if (!parse_args(args, kw, "OO|O", kwlist, &p_obj, &t_obj, &w_obj)) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp dims[2] = {-1, -1};
    PyArrayObject *pred = hold_from(&h, p_obj, input_array(p_obj, "pred", &tn, 2, dims, "(B, d)", 1)), *w = NULL;
    if (!pred) goto done;
    if (check_batch(dims[0], "pred") < 0) goto done;
    PyArrayObject *target = hold_from(&h, t_obj, input_array(t_obj, "target", &tn, 2, dims, "(B, d)", 1));
    if (!target) goto done;
    if (loss_weights(w_obj, &tn, dims[0], &h, &w) < 0) goto done;
    PyArrayObject *dp = hold(&h, new_array(tn, 2, dims));
    if (!dp) goto done;
    Py_BEGIN_ALLOW_THREADS
    if (tn == NPY_FLOAT)
        loss = mse_f32(DATA(dp), DATA(pred), DATA(target), OPTDATA(w), (long)dims[0], (long)dims[1]);
    else loss = mse_f64(DATA(dp), DATA(pred), DATA(target), OPTDATA(w), (long)dims[0], (long)dims[1]);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(dO)", loss, dp);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(softmax_cross_entropy_doc,
"softmax_cross_entropy(logits, labels, weights=None) -> (loss, dlogits)\n\n"
"Cross-entropy of softmax(logits) (B, C) against integer class labels (B,) (any integer dtype,\n"
"each in [0, C)), optional weights w (B,) (finite, >= 0): loss = sum_b w_b l_b / B with\n"
"l_b = logsumexp(logits_b) - logits_b[labels_b] (stable); dlogits (B, C) is its gradient.");

static PyObject *py_softmax_cross_entropy(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"logits", "labels", "weights", NULL};
    PyObject *z_obj, *l_obj, *w_obj = Py_None, *result = NULL;
    double loss = 0;
    Hold h = {0};
    if (!parse_args(args, kw, "OO|O", kwlist, &z_obj, &l_obj, &w_obj)) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp dims[2] = {-1, -1};
    PyArrayObject *z = hold_from(&h, z_obj, input_array(z_obj, "logits", &tn, 2, dims, "(B, C)", 1)), *w = NULL;
    if (!z) goto done;
    if (check_batch(dims[0], "logits") < 0) goto done;
    if (dims[1] < 1) {
        PyErr_SetString(PyExc_ValueError, "argument 'logits' must have at least one class (C >= 1)");
        goto done;
    }
    npy_intp ldims[1] = {dims[0]};
    PyArrayObject *labels = hold(&h, index_array(l_obj, "labels", "class indices", 1, ldims, "(B,)", dims[1],
                                                 "the number of classes C", 0));
    if (!labels) goto done;
    if (loss_weights(w_obj, &tn, dims[0], &h, &w) < 0) goto done;
    PyArrayObject *dz = hold(&h, new_array(tn, 2, dims));
    if (!dz) goto done;
    Py_BEGIN_ALLOW_THREADS
    if (tn == NPY_FLOAT)
        loss = softmax_cross_entropy_f32(DATA(dz), DATA(z), DATA(labels), OPTDATA(w), (long)dims[0], (long)dims[1]);
    else loss = softmax_cross_entropy_f64(DATA(dz), DATA(z), DATA(labels), OPTDATA(w), (long)dims[0], (long)dims[1]);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(dO)", loss, dz);
done:
    release(&h);
    return result;
}

PyMethodDef dsk_nn_methods[] = {
    KW(dense_forward),
    KW(dense_backward),
    KW(relu_forward),
    KW(relu_backward),
    KW(dropout_forward),
    KW(dropout_backward),
    KW(bce_with_logits),
    KW(mse),
    KW(softmax_cross_entropy),
    {NULL, NULL, 0, NULL},
};
