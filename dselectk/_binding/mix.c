/* dselectk._C, mix family: mixing expert outputs by gate weights (csrc/gates.h) and the affine
 * maps (csrc/linear.h).
 * Converters and conventions: common.h. */
#include "common.h"

#include <string.h>

#include "gates.h"
#include "linear.h"

/* ---------------------------------------------------------------------------------------------
 * Mixing expert outputs
 */
static int parse_layout(const char *layout, int *bnd) {
    if (strcmp(layout, "nbd") == 0) *bnd = 0;
    else if (strcmp(layout, "bnd") == 0) *bnd = 1;
    else {
        PyErr_Format(PyExc_ValueError, "layout must be 'nbd' (f is (n, B, d)) or 'bnd' (f is (B, n, d)), got '%s'",
                     layout);
        return -1;
    }
    return 0;
}

/* Validates f (layout) and w ((n,) static or (B, n) per-example) and computes the active mask:
 * an expert is inactive when skip_zero and its weight is exactly 0 for every example. */
static int mix_inputs(PyObject *f_obj, PyObject *w_obj, const char *layout, int skip_zero, int *tn, Hold *h,
                      PyArrayObject **f, PyArrayObject **w, int *bnd, npy_intp *n, npy_intp *B, npy_intp *d,
                      int *per_example, unsigned char **active_out) {
    if (parse_layout(layout, bnd) < 0) return -1;
    npy_intp fdims[3] = {-1, -1, -1};
    if (!(*f = hold_from(h, f_obj, input_array(f_obj, "f", tn, 3, fdims, *bnd ? "(B, n, d)" : "(n, B, d)", 1)))) return -1;
    *n = *bnd ? fdims[1] : fdims[0];
    *B = *bnd ? fdims[0] : fdims[1];
    *d = fdims[2];
    if (check_batch(*B, "f") < 0) return -1;
    if (*n < 1) {
        PyErr_SetString(PyExc_ValueError, "argument 'f' holds no experts (n = 0)");
        return -1;
    }
    if (!PyArray_Check(w_obj)) {
        PyErr_Format(PyExc_TypeError, "argument 'w' must be a numpy.ndarray, got %s", Py_TYPE(w_obj)->tp_name);
        return -1;
    }
    *per_example = PyArray_NDIM((PyArrayObject *)w_obj) == 2;
    npy_intp wdims[2] = {*per_example ? *B : *n, *n};
    if (!(*w = hold_from(h, w_obj, input_array(w_obj, "w", tn, *per_example ? 2 : 1, *per_example ? wdims : wdims + 1,
                                  *per_example ? "(B, n)" : "(n,)", 1))))
        return -1;
    unsigned char *active = *active_out = PyMem_Malloc((size_t)*n);
    if (!active) {
        PyErr_NoMemory();
        return -1;
    }
    for (npy_intp j = 0; j < *n; j++) active[j] = 1;
    if (skip_zero) {
        for (npy_intp j = 0; j < *n; j++) active[j] = 0;
        const npy_intp rows = *per_example ? *B : 1;
        for (npy_intp b = 0; b < rows; b++)
            for (npy_intp j = 0; j < *n; j++) {
                const double v = *tn == NPY_FLOAT ? ((float *)DATA(*w))[b * *n + j] : ((double *)DATA(*w))[b * *n + j];
                if (v != 0) active[j] = 1;
            }
    }
    return 0;
}

PyDoc_STRVAR(mix_experts_forward_doc,
"mix_experts_forward(f, w, layout='nbd', skip_zero=True, out=None) -> y\n\n"
"y (B, d) = sum_j w_j f_j. f is (n, B, d) for layout 'nbd' or (B, n, d) for 'bnd'; w is (n,) for a\n"
"static gate or (B, n) per example. With skip_zero, experts whose weight is exactly 0 for the whole\n"
"batch are not read.");

static PyObject *py_mix_experts_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"f", "w", "layout", "skip_zero", "out", NULL};
    PyObject *f_obj, *w_obj, *out_obj = NULL, *result = NULL;
    const char *layout = "nbd";
    int skip_zero = 1, tn = NPY_NOTYPE, bnd, per_example;
    npy_intp n, B, d;
    unsigned char *active = NULL;
    PyArrayObject *f, *w;
    Hold h = {0};
    if (!parse_args(args, kw, "OO|spO", kwlist, &f_obj, &w_obj, &layout, &skip_zero, &out_obj))
        return NULL;
    if (mix_inputs(f_obj, w_obj, layout, skip_zero, &tn, &h, &f, &w, &bnd, &n, &B, &d, &per_example, &active) < 0)
        goto done;
    npy_intp ydims[2] = {B, d};
    PyArrayObject *y = hold(&h, output_array(out_obj, "out", tn, 2, ydims, &h));
    if (!y) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, mix_experts_forward, DATA(y), DATA(f), DATA(w), active, (long)n, (long)B, (long)d, bnd,
             per_example);
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)y);
done:
    PyMem_Free(active);
    release(&h);
    return result;
}

PyDoc_STRVAR(mix_experts_backward_doc,
"mix_experts_backward(dy, f, w, layout='nbd', skip_zero=True) -> (dw, df)\n\n"
"Gradients of <dy, y> for y = mix_experts_forward(f, w): dw like w, df like f. Experts skipped by\n"
"skip_zero (weight exactly 0 for the whole batch) get dw = 0 and df = 0 and are not read: the\n"
"gates of this package pass no gradient through an exact zero weight.");

static PyObject *py_mix_experts_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dy", "f", "w", "layout", "skip_zero", NULL};
    PyObject *dy_obj, *f_obj, *w_obj, *result = NULL;
    const char *layout = "nbd";
    int skip_zero = 1, tn = NPY_NOTYPE, bnd, per_example;
    npy_intp n, B, d;
    unsigned char *active = NULL;
    PyArrayObject *f, *w, *dy;
    Hold h = {0};
    if (!parse_args(args, kw, "OOO|sp", kwlist, &dy_obj, &f_obj, &w_obj, &layout, &skip_zero))
        return NULL;
    if (mix_inputs(f_obj, w_obj, layout, skip_zero, &tn, &h, &f, &w, &bnd, &n, &B, &d, &per_example, &active) < 0)
        goto done;
    npy_intp ydims[2] = {B, d};
    if (!(dy = hold_from(&h, dy_obj, input_array(dy_obj, "dy", &tn, 2, ydims, "(B, d)", 1)))) goto done;
    PyArrayObject *dw = hold(&h, new_array(tn, PyArray_NDIM(w), PyArray_DIMS(w)));
    PyArrayObject *df = hold(&h, new_array(tn, 3, PyArray_DIMS(f)));
    if (!dw || !df) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, mix_experts_backward, DATA(dw), DATA(df), DATA(dy), DATA(f), DATA(w), active, (long)n, (long)B,
             (long)d, bnd, per_example);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OO)", dw, df);
done:
    PyMem_Free(active);
    release(&h);
    return result;
}

/* Validates f (n, B, d) and w (T, B, n) of the multi-task mixing, in this order, and computes the
 * active mask over all tasks: with skip_zero an expert is inactive when its weight is exactly 0 for
 * every task and example; without it *active_out is NULL (all active). */
static int mix_many_inputs(PyObject *f_obj, PyObject *w_obj, int skip_zero, int *tn, Hold *h, PyArrayObject **f,
                           PyArrayObject **w, npy_intp *T, npy_intp *n, npy_intp *B, npy_intp *d,
                           unsigned char **active_out) {
    npy_intp fdims[3] = {-1, -1, -1};
    if (!(*f = hold_from(h, f_obj, input_array(f_obj, "f", tn, 3, fdims, "(n, B, d)", 1)))) return -1;
    *n = fdims[0];
    *B = fdims[1];
    *d = fdims[2];
    if (check_batch(*B, "f") < 0) return -1;
    if (*n < 1) {
        PyErr_SetString(PyExc_ValueError, "argument 'f' holds no experts (n = 0); expected f (n, B, d) with n >= 1");
        return -1;
    }
    npy_intp wdims[3] = {-1, *B, *n};
    if (!(*w = hold_from(h, w_obj, input_array(w_obj, "w", tn, 3, wdims, "(T, B, n)", 1)))) return -1;
    *T = wdims[0];
    if (*T < 1) {
        PyErr_SetString(PyExc_ValueError, "argument 'w' holds no tasks (T = 0); expected w (T, B, n) with T >= 1");
        return -1;
    }
    *active_out = NULL;
    if (!skip_zero) return 0;
    unsigned char *active = *active_out = PyMem_Malloc((size_t)*n);
    if (!active) {
        PyErr_NoMemory();
        return -1;
    }
    for (npy_intp j = 0; j < *n; j++) active[j] = 0;
    const npy_intp rows = *T * *B; /* the (task, example) rows of w */
    for (npy_intp r = 0; r < rows; r++)
        for (npy_intp j = 0; j < *n; j++) {
            const double v = *tn == NPY_FLOAT ? ((float *)DATA(*w))[r * *n + j] : ((double *)DATA(*w))[r * *n + j];
            if (v != 0) active[j] = 1;
        }
    return 0;
}

PyDoc_STRVAR(mix_experts_many_forward_doc,
"mix_experts_many_forward(f, w, skip_zero=True, out=None) -> y\n\n"
"The T mixtures of a multi-gate MoE at once: y (T, B, d), y[t, b] = sum_j w[t, b, j] f[j, b], for\n"
"f (n, B, d) and w (T, B, n) (one per-example gate per task). Each f[j, b] is read once for all T\n"
"tasks; terms with an exact zero weight are skipped, and with skip_zero an expert whose weight is\n"
"exactly 0 for every task and example is not read at all.");

static PyObject *py_mix_experts_many_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"f", "w", "skip_zero", "out", NULL};
    PyObject *f_obj, *w_obj, *out_obj = NULL, *result = NULL;
    int skip_zero = 1, tn = NPY_NOTYPE;
    npy_intp T, n, B, d;
    unsigned char *active = NULL;
    PyArrayObject *f, *w;
    Hold h = {0};
    if (!parse_args(args, kw, "OO|pO", kwlist, &f_obj, &w_obj, &skip_zero, &out_obj))
        return NULL;
    if (mix_many_inputs(f_obj, w_obj, skip_zero, &tn, &h, &f, &w, &T, &n, &B, &d, &active) < 0) goto done;
    npy_intp ydims[3] = {T, B, d};
    PyArrayObject *y = hold(&h, output_array(out_obj, "out", tn, 3, ydims, &h));
    if (!y) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, mix_experts_many_forward, DATA(y), DATA(f), DATA(w), active, (long)T, (long)n, (long)B, (long)d);
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)y);
done:
    PyMem_Free(active);
    release(&h);
    return result;
}

PyDoc_STRVAR(mix_experts_many_backward_doc,
"mix_experts_many_backward(dy, f, w, skip_zero=True, relu_mask=False) -> (dw, df)\n\n"
"Gradients of sum_t <dy[t], y[t]> for y = mix_experts_many_forward(f, w), dy (T, B, d): dw (T, B, n)\n"
"with dw[t, b, j] = <dy[t, b], f[j, b]> and df (n, B, d) with df[j, b] = sum_t w[t, b, j] dy[t, b].\n"
"With skip_zero an expert whose weight is exactly 0 for every task and example gets dw = 0 and\n"
"df = 0 and is not read; an expert used by some task gets its dw for every task. With relu_mask, f is\n"
"a ReLU's output and df is taken at the ReLU's input: 0 where f <= 0 (the ReLU backward, fused).");

static PyObject *py_mix_experts_many_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dy", "f", "w", "skip_zero", "relu_mask", NULL};
    PyObject *dy_obj, *f_obj, *w_obj, *result = NULL;
    int skip_zero = 1, relu_mask = 0, tn = NPY_NOTYPE;
    npy_intp T, n, B, d;
    unsigned char *active = NULL;
    PyArrayObject *f, *w, *dy;
    Hold h = {0};
    if (!parse_args(args, kw, "OOO|pp", kwlist, &dy_obj, &f_obj, &w_obj, &skip_zero, &relu_mask))
        return NULL;
    if (mix_many_inputs(f_obj, w_obj, skip_zero, &tn, &h, &f, &w, &T, &n, &B, &d, &active) < 0) goto done;
    npy_intp ydims[3] = {T, B, d};
    if (!(dy = hold_from(&h, dy_obj, input_array(dy_obj, "dy", &tn, 3, ydims, "(T, B, d)", 1)))) goto done;
    PyArrayObject *dw = hold(&h, new_array(tn, 3, PyArray_DIMS(w)));
    PyArrayObject *df = hold(&h, new_array(tn, 3, PyArray_DIMS(f)));
    if (!dw || !df) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, mix_experts_many_backward, DATA(dw), DATA(df), DATA(dy), DATA(f), DATA(w), active, (long)T,
             (long)n, (long)B, (long)d, relu_mask);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OO)", dw, df);
done:
    PyMem_Free(active);
    release(&h);
    return result;
}

/* ---------------------------------------------------------------------------------------------
 * Affine maps (BLAS)
 */
PyDoc_STRVAR(linear_forward_doc,
"linear_forward(x, W, b=None, out=None) -> y\n\n"
"y (B, o) = x (B, p) W^T + b, W (o, p), b (o,) or None. One SGEMM/DGEMM of the vendored OpenBLAS.");

static PyObject *py_linear_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "W", "b", "out", "relu", NULL};
    PyObject *x_obj, *W_obj, *b_obj = NULL, *out_obj = NULL, *result = NULL;
    int relu = 0;
    Hold h = {0};
    if (!parse_args(args, kw, "OO|OOp", kwlist, &x_obj, &W_obj, &b_obj, &out_obj, &relu)) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp xdims[2] = {-1, -1};
    PyArrayObject *x = hold_from(&h, x_obj, input_array(x_obj, "x", &tn, 2, xdims, "(B, p)", 1));
    if (!x) goto done;
    if (check_batch(xdims[0], "x") < 0) goto done;
    npy_intp wdims[2] = {-1, xdims[1]};
    PyArrayObject *W = hold_from(&h, W_obj, input_array(W_obj, "W", &tn, 2, wdims, "(o, p)", 1)), *b = NULL;
    if (!W) goto done;
    npy_intp bdims[1] = {wdims[0]};
    if (optional_input(b_obj, "b", &tn, 1, bdims, "(o,)", 1, &b) < 0) goto done;
    hold_from(&h, b_obj, b);
    if (check_blas_dims(xdims[0], xdims[1], wdims[0]) < 0) goto done;
    npy_intp ydims[2] = {xdims[0], wdims[0]};
    PyArrayObject *y = hold(&h, output_array(out_obj, "out", tn, 2, ydims, &h));
    if (!y) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, linear_forward, DATA(y), DATA(x), DATA(W), OPTDATA(b), (int)xdims[0], (int)xdims[1], (int)wdims[0]);
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)y);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(linear_backward_doc,
"linear_backward(dy, x, W, need_dx=True, need_db=True) -> (dx, dW, db)\n\n"
"Gradients of <dy, x W^T + b>: dx (B, p) (None unless need_dx), dW (o, p), db (o,) (None unless need_db).");

static PyObject *py_linear_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dy", "x", "W", "need_dx", "need_db", NULL};
    PyObject *dy_obj, *x_obj, *W_obj, *result = NULL;
    int need_dx = 1, need_db = 1;
    Hold h = {0};
    if (!parse_args(args, kw, "OOO|pp", kwlist, &dy_obj, &x_obj, &W_obj, &need_dx, &need_db))
        return NULL;
    int tn = NPY_NOTYPE;
    npy_intp xdims[2] = {-1, -1};
    PyArrayObject *x = hold_from(&h, x_obj, input_array(x_obj, "x", &tn, 2, xdims, "(B, p)", 1));
    if (!x) goto done;
    if (check_batch(xdims[0], "x") < 0) goto done;
    npy_intp wdims[2] = {-1, xdims[1]};
    PyArrayObject *W = hold_from(&h, W_obj, input_array(W_obj, "W", &tn, 2, wdims, "(o, p)", 1));
    if (!W) goto done;
    npy_intp ydims[2] = {xdims[0], wdims[0]}, bdims[1] = {wdims[0]};
    PyArrayObject *dy = hold_from(&h, dy_obj, input_array(dy_obj, "dy", &tn, 2, ydims, "(B, o)", 1));
    if (!dy) goto done;
    if (check_blas_dims(xdims[0], xdims[1], wdims[0]) < 0) goto done;
    PyArrayObject *dx = need_dx ? hold(&h, new_array(tn, 2, xdims)) : NULL;
    PyArrayObject *dW = hold(&h, new_array(tn, 2, wdims));
    PyArrayObject *db = need_db ? hold(&h, new_array(tn, 1, bdims)) : NULL;
    if ((need_dx && !dx) || !dW || (need_db && !db)) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, linear_backward, OPTDATA(dx), DATA(dW), OPTDATA(db), DATA(dy), DATA(x), DATA(W), (int)xdims[0],
             (int)xdims[1], (int)wdims[0]);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OOO)", dx ? (PyObject *)dx : Py_None, dW, db ? (PyObject *)db : Py_None);
done:
    release(&h);
    return result;
}

PyMethodDef dsk_mix_methods[] = {
    KW(mix_experts_forward),
    KW(mix_experts_backward),
    KW(mix_experts_many_forward),
    KW(mix_experts_many_backward),
    KW(linear_forward),
    KW(linear_backward),
    {NULL, NULL, 0, NULL},
};
