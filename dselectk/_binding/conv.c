/* dselectk._C, conv family: convolution and max pooling, NCHW (csrc/conv.h).
 * Converters and conventions: common.h. */
#include "common.h"

#include "conv.h"
#include "dsk.h"

/* Largest kernel size, stride, padding or pooling input size accepted: keeps every product of
 * the geometry far from overflowing. */
#define DSK_MAX_GEOMETRY (1L << 30)

/* An int (the same value for every entry) or a tuple / list of ints, each in
 * [minimum, DSK_MAX_GEOMETRY]: the counts a kernel size, a stride or a padding is given by.
 * Returns how many values were given (1 for an int) or -1 with an exception set; `form` says what
 * is accepted, for messages. */
static int parse_ints(PyObject *obj, const char *name, const char *form, long minimum, long *vals, int maxn) {
    PyObject *items[4];
    int n;
    if (PyTuple_Check(obj) || PyList_Check(obj)) {
        n = (int)PySequence_Fast_GET_SIZE(obj);
        if (n < 1 || n > maxn) {
            PyErr_Format(PyExc_ValueError, "%s must be %s, got a sequence of %d", name, form, n);
            return -1;
        }
        for (int i = 0; i < n; i++) items[i] = PySequence_Fast_GET_ITEM(obj, i);
    } else {
        n = 1;
        items[0] = obj;
    }
    for (int i = 0; i < n; i++) {
        if (PyBool_Check(items[i]) || !PyIndex_Check(items[i])) {
            PyErr_Format(PyExc_TypeError, "%s must be %s, got %s", name, form, Py_TYPE(items[i])->tp_name);
            return -1;
        }
        PyObject *index = PyNumber_Index(items[i]);
        if (!index) return -1;
        int overflow = 0;
        const long long v = PyLong_AsLongLongAndOverflow(index, &overflow);
        Py_DECREF(index);
        if (v == -1 && !overflow && PyErr_Occurred()) return -1;
        if (overflow || v < minimum || v > DSK_MAX_GEOMETRY) {
            PyErr_Format(PyExc_ValueError, "%s must be %s, each in [%ld, %ld], got %S", name, form, minimum,
                         DSK_MAX_GEOMETRY, obj);
            return -1;
        }
        vals[i] = (long)v;
    }
    return n;
}

/* (a, b) from an int or a pair: a kernel size, a stride, an input size. */
static int parse_pair(PyObject *obj, const char *name, long minimum, long *a, long *b) {
    long v[2];
    const int n = parse_ints(obj, name, "an int or a pair of ints", minimum, v, 2);
    if (n < 0) return -1;
    *a = v[0];
    *b = n == 2 ? v[1] : v[0];
    return 0;
}

/* The geometry of a convolution of x (B, C, H, W) with weights (F, C, KH, KW) at the given stride
 * and padding (int, (ph, pw) or (top, bottom, left, right)), with its checks. */
static int conv_geometry(const npy_intp *xdims, const npy_intp *wdims, PyObject *stride_obj, PyObject *pad_obj,
                         DskConv2d *g) {
    long pad[4];
    if (parse_pair(stride_obj, "stride", 1, &g->sh, &g->sw) < 0) return -1;
    const int np_ = parse_ints(pad_obj, "padding", "an int, a pair (ph, pw) or a 4-tuple (top, bottom, left, right) "
                               "of ints", 0, pad, 4);
    if (np_ < 0) return -1;
    if (np_ == 3) {
        PyErr_SetString(PyExc_ValueError, "padding must be an int, a pair (ph, pw) or a 4-tuple (top, bottom, left, "
                        "right) of ints, got a sequence of 3");
        return -1;
    }
    if (np_ == 1) pad[1] = pad[2] = pad[3] = pad[0];
    if (np_ == 2) {
        pad[2] = pad[3] = pad[1];
        pad[1] = pad[0];
    }
    g->B = xdims[0], g->C = xdims[1], g->H = xdims[2], g->W = xdims[3];
    g->F = wdims[0], g->KH = wdims[2], g->KW = wdims[3];
    g->pt = pad[0], g->pl = pad[2];
    if (g->C < 1 || g->H < 1 || g->W < 1) {
        PyErr_Format(PyExc_ValueError, "argument 'x' must have at least one channel, row and column (C, H, W >= 1), "
                     "got (B, C, H, W) = (%ld, %ld, %ld, %ld)", g->B, g->C, g->H, g->W);
        return -1;
    }
    if (g->F < 1 || g->KH < 1 || g->KW < 1) {
        PyErr_Format(PyExc_ValueError, "argument 'W' must have at least one filter and a kernel of at least 1 x 1 "
                     "(F, KH, KW >= 1), got (F, C, KH, KW) = (%ld, %ld, %ld, %ld)", g->F, g->C, g->KH, g->KW);
        return -1;
    }
    if (pad[0] >= g->KH || pad[1] >= g->KH || pad[2] >= g->KW || pad[3] >= g->KW) {
        PyErr_Format(PyExc_ValueError, "padding (top, bottom, left, right) = (%ld, %ld, %ld, %ld) must be smaller "
                     "than the kernel (KH, KW) = (%ld, %ld) on each side", pad[0], pad[1], pad[2], pad[3], g->KH, g->KW);
        return -1;
    }
    const long Hp = g->H + pad[0] + pad[1], Wp = g->W + pad[2] + pad[3];
    if (g->KH > Hp || g->KW > Wp) {
        PyErr_Format(PyExc_ValueError, "the kernel (KH, KW) = (%ld, %ld) of argument 'W' is larger than the padded "
                     "input (H + top + bottom, W + left + right) = (%ld, %ld) of argument 'x'", g->KH, g->KW, Hp, Wp);
        return -1;
    }
    g->OH = (Hp - g->KH) / g->sh + 1;
    g->OW = (Wp - g->KW) / g->sw + 1;
    return check_blas_dims(g->F, g->C * g->KH * g->KW, conv2d_group(g) * g->OH * g->OW);
}

/* The inputs x (B, C, H, W), W (F, C, KH, KW) of a convolution, converted and checked. */
static int conv_inputs(PyObject *x_obj, PyObject *W_obj, PyObject *stride_obj, PyObject *pad_obj, int *tn, Hold *h,
                       PyArrayObject **x, PyArrayObject **Wt, DskConv2d *g) {
    npy_intp xdims[4] = {-1, -1, -1, -1};
    if (!(*x = hold_from(h, x_obj, input_array(x_obj, "x", tn, 4, xdims, "(B, C, H, W)", 1)))) return -1;
    if (check_batch(xdims[0], "x") < 0) return -1;
    npy_intp wdims[4] = {-1, xdims[1], -1, -1};
    if (!(*Wt = hold_from(h, W_obj, input_array(W_obj, "W", tn, 4, wdims, "(F, C, KH, KW)", 1)))) return -1;
    return conv_geometry(xdims, wdims, stride_obj, pad_obj, g);
}

PyDoc_STRVAR(conv2d_forward_doc,
"conv2d_forward(x, W, b=None, stride=1, padding=0, out=None) -> y\n\n"
"2-D convolution (cross-correlation), NCHW: x (B, C, H, W), W (F, C, KH, KW), b (F,) or None ->\n"
"y (B, F, OH, OW), y[b, f, oh, ow] = b[f] + sum_{c,i,j} W[f, c, i, j] x[b, c, oh sh - top + i, ow sw - left + j]\n"
"with zeros outside x. stride: int or (sh, sw), >= 1. padding: int, (ph, pw) or (top, bottom, left,\n"
"right), each >= 0 and smaller than the kernel; OH = (H + top + bottom - KH) // sh + 1, OW likewise.\n"
"im2col and one GEMM of the vendored BLAS per group of examples. relu=True returns max(y, 0) instead\n"
"(exactly relu_forward(conv2d_forward(...)), without a second array).");

static PyObject *py_conv2d_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "W", "b", "stride", "padding", "out", "relu", NULL};
    PyObject *x_obj, *W_obj, *b_obj = NULL, *stride_obj = NULL, *pad_obj = NULL, *out_obj = NULL, *result = NULL;
    PyObject *one = PyLong_FromLong(1), *zero = PyLong_FromLong(0);
    int relu = 0;
    Hold h = {0};
    if (!one || !zero) goto done;
    if (!parse_args(args, kw, "OO|OOOOp", kwlist, &x_obj, &W_obj, &b_obj, &stride_obj, &pad_obj,
                    &out_obj, &relu))
        goto done;
    int tn = NPY_NOTYPE;
    PyArrayObject *x, *Wt, *b = NULL;
    DskConv2d g;
    if (conv_inputs(x_obj, W_obj, stride_obj ? stride_obj : one, pad_obj ? pad_obj : zero, &tn, &h, &x, &Wt, &g) < 0)
        goto done;
    npy_intp bdims[1] = {g.F};
    if (optional_input(b_obj, "b", &tn, 1, bdims, "(F,)", 1, &b) < 0) goto done;
    hold_from(&h, b_obj, b);
    const int slots = dsk_get_num_threads();
    npy_intp ydims[4] = {g.B, g.F, g.OH, g.OW}, cdims[1] = {(npy_intp)conv2d_col_size(&g) * slots};
    PyArrayObject *y = hold(&h, output_array(out_obj, "out", tn, 4, ydims, &h));
    if (!y) goto done;
    PyArrayObject *col = hold(&h, new_array(tn, 1, cdims));
    if (!col) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, conv2d_forward, DATA(y), DATA(col), slots, DATA(x), DATA(Wt), OPTDATA(b), relu, &g);
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)y);
done:
    Py_XDECREF(one);
    Py_XDECREF(zero);
    release(&h);
    return result;
}

/* The outputs and workspaces of a convolution's backward (conv.h), all held by h: dW (F, C, KH, KW)
 * and db (F,) (db_obj None: skipped), accumulated in place; dx (B, C, H, W), new, when need_dx
 * (else NULL); col, one workspace per thread of the pool (slots of them); acc and part, the
 * partial bias and weight gradients of the batch's slices. -1 with an exception set. */
typedef struct {
    PyArrayObject *dW, *db, *dx, *col, *acc, *part;
    int slots;
} ConvGrads;

static int conv_grads(PyObject *dW_obj, PyObject *db_obj, int need_dx, int *tn, const DskConv2d *g, Hold *h,
                      ConvGrads *c) {
    npy_intp wdims[4] = {g->F, g->C, g->KH, g->KW}, bdims[1] = {g->F}, xdims[4] = {g->B, g->C, g->H, g->W};
    c->db = c->dx = NULL;
    if (!(c->dW = hold(h, inplace_array(dW_obj, "dW", tn, 4, wdims, "(F, C, KH, KW)", h, 0)))) return -1;
    if (db_obj != Py_None && !(c->db = hold_from(h, db_obj, inplace_array(db_obj, "db", tn, 1, bdims, "(F,)", h, 0))))
        return -1;
    if (need_dx && !(c->dx = hold(h, new_array(*tn, 4, xdims)))) return -1;
    c->slots = dsk_get_num_threads();
    const npy_intp S = conv2d_slices(g);
    npy_intp cdims[1] = {(npy_intp)conv2d_col_size(g) * c->slots}, adims[1] = {S * g->F},
             pdims[1] = {S * g->F * g->C * g->KH * g->KW};
    c->col = hold(h, new_array(*tn, 1, cdims));
    c->acc = hold(h, new_array(NPY_DOUBLE, 1, adims));
    c->part = hold(h, new_array(*tn, 1, pdims));
    return c->col && c->acc && c->part ? 0 : -1;
}

PyDoc_STRVAR(conv2d_backward_doc,
"conv2d_backward(dy, x, W, dW, db=None, stride=1, padding=0, need_dx=True) -> dx or None\n\n"
"Backward of conv2d_forward for dy (B, F, OH, OW), x (B, C, H, W), W (F, C, KH, KW), stride and\n"
"padding as there. ACCUMULATES in place, as dense_backward: dW (F, C, KH, KW) += d<dy, y>/dW and\n"
"db (F,) += dy summed over the batch and the output plane (skipped when db is None); dW and db must\n"
"be C-contiguous, writeable arrays of the call's dtype and exact shape that share no memory with the\n"
"inputs. Returns dx (B, C, H, W), or None unless need_dx.");

static PyObject *py_conv2d_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dy", "x", "W", "dW", "db", "stride", "padding", "need_dx", NULL};
    PyObject *dy_obj, *x_obj, *W_obj, *dW_obj, *db_obj = Py_None, *stride_obj = NULL, *pad_obj = NULL, *result = NULL;
    PyObject *one = PyLong_FromLong(1), *zero = PyLong_FromLong(0);
    int need_dx = 1;
    Hold h = {0};
    if (!one || !zero) goto done;
    if (!parse_args(args, kw, "OOOO|OOOp", kwlist, &dy_obj, &x_obj, &W_obj, &dW_obj, &db_obj,
                    &stride_obj, &pad_obj, &need_dx))
        goto done;
    int tn = NPY_NOTYPE;
    PyArrayObject *x, *Wt;
    DskConv2d g;
    if (conv_inputs(x_obj, W_obj, stride_obj ? stride_obj : one, pad_obj ? pad_obj : zero, &tn, &h, &x, &Wt, &g) < 0)
        goto done;
    npy_intp ydims[4] = {g.B, g.F, g.OH, g.OW};
    PyArrayObject *dy = hold_from(&h, dy_obj, input_array(dy_obj, "dy", &tn, 4, ydims, "(B, F, OH, OW)", 1));
    if (!dy) goto done;
    ConvGrads c;
    if (conv_grads(dW_obj, db_obj, need_dx, &tn, &g, &h, &c) < 0) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, conv2d_backward, OPTDATA(c.dx), DATA(c.dW), OPTDATA(c.db), DATA(c.col), c.slots, DATA(c.part),
             DATA(c.acc), DATA(dy), DATA(x), DATA(Wt), &g);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(c.dx ? (PyObject *)c.dx : Py_None);
done:
    Py_XDECREF(one);
    Py_XDECREF(zero);
    release(&h);
    return result;
}

/* The pooling of conv2d_relu_pool_*: pool (int or pair) and pool_stride (None: the pool) over the
 * convolution's output plane of g; the windows must fit it and hold at most 256 entries. */
static int pool_geometry(PyObject *pool_obj, PyObject *stride_obj, const DskConv2d *g, DskPool2d *p) {
    if (parse_pair(pool_obj, "pool", 1, &p->KH, &p->KW) < 0) return -1;
    p->sh = p->KH, p->sw = p->KW;
    if (stride_obj && stride_obj != Py_None && parse_pair(stride_obj, "pool_stride", 1, &p->sh, &p->sw) < 0) return -1;
    if (p->KH * p->KW > 256) {
        PyErr_Format(PyExc_ValueError, "pool windows of at most 256 entries are supported (their positions are "
                     "bytes), got (%ld, %ld)", p->KH, p->KW);
        return -1;
    }
    if (p->KH > g->OH || p->KW > g->OW) {
        PyErr_Format(PyExc_ValueError, "the pool window (%ld, %ld) is larger than the convolution's output plane "
                     "(OH, OW) = (%ld, %ld)", p->KH, p->KW, g->OH, g->OW);
        return -1;
    }
    p->OH = (g->OH - p->KH) / p->sh + 1;
    p->OW = (g->OW - p->KW) / p->sw + 1;
    return 0;
}

PyDoc_STRVAR(conv2d_relu_pool_forward_doc,
"conv2d_relu_pool_forward(x, W, b=None, stride=1, padding=0, pool=2, pool_stride=None) -> (y, code)\n\n"
"max_pool2d_forward(relu_forward(conv2d_forward(x, W, b, stride, padding)), pool, pool_stride) in one\n"
"pass, without the convolution's output: y (B, F, POH, POW) and code (B, F, POH, POW) uint8, the\n"
"position i * PW + j of each output's maximum in its window (for conv2d_relu_pool_backward).\n"
"Windows of at most 256 entries.");

static PyObject *py_conv2d_relu_pool_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "W", "b", "stride", "padding", "pool", "pool_stride", NULL};
    PyObject *x_obj, *W_obj, *b_obj = NULL, *stride_obj = NULL, *pad_obj = NULL, *pool_obj = NULL, *pst_obj = NULL;
    PyObject *one = PyLong_FromLong(1), *zero = PyLong_FromLong(0), *two = PyLong_FromLong(2), *result = NULL;
    Hold h = {0};
    if (!one || !zero || !two) goto done;
    if (!parse_args(args, kw, "OO|OOOOO", kwlist, &x_obj, &W_obj, &b_obj, &stride_obj, &pad_obj, &pool_obj, &pst_obj))
        goto done;
    int tn = NPY_NOTYPE;
    PyArrayObject *x, *Wt, *b = NULL;
    DskConv2d g;
    DskPool2d p;
    if (conv_inputs(x_obj, W_obj, stride_obj ? stride_obj : one, pad_obj ? pad_obj : zero, &tn, &h, &x, &Wt, &g) < 0)
        goto done;
    if (pool_geometry(pool_obj ? pool_obj : two, pst_obj, &g, &p) < 0) goto done;
    npy_intp bdims[1] = {g.F};
    if (optional_input(b_obj, "b", &tn, 1, bdims, "(F,)", 1, &b) < 0) goto done;
    hold_from(&h, b_obj, b);
    const int slots = dsk_get_num_threads();
    npy_intp ydims[4] = {g.B, g.F, p.OH, p.OW}, cdims[1] = {(npy_intp)conv2d_col_size(&g) * slots};
    PyArrayObject *y = hold(&h, new_array(tn, 4, ydims)), *code = hold(&h, new_array(NPY_UINT8, 4, ydims));
    PyArrayObject *col = hold(&h, new_array(tn, 1, cdims));
    if (!y || !code || !col) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, conv2d_relu_pool_forward, DATA(y), DATA(code), DATA(col), slots, DATA(x), DATA(Wt), OPTDATA(b), &g,
             &p);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OO)", y, code);
done:
    Py_XDECREF(one);
    Py_XDECREF(zero);
    Py_XDECREF(two);
    release(&h);
    return result;
}

PyDoc_STRVAR(conv2d_relu_pool_backward_doc,
"conv2d_relu_pool_backward(dy, code, y, x, W, dW, db=None, stride=1, padding=0, pool=2, pool_stride=None,\n"
"                          need_dx=True) -> dx or None\n\n"
"Backward of conv2d_relu_pool_forward for dy (B, F, POH, POW), with its outputs y and code and its\n"
"inputs x, W: ACCUMULATES dW and db (as conv2d_backward) and returns dx (B, C, H, W), or None unless\n"
"need_dx. Equal to conv2d_backward(relu_backward(max_pool2d_backward(dy, ...), relu output), ...).\n"
"code must be uint8, each value < the window's size.");

static PyObject *py_conv2d_relu_pool_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dy", "code", "y", "x", "W", "dW", "db", "stride", "padding", "pool", "pool_stride",
                             "need_dx", NULL};
    PyObject *dy_obj, *code_obj, *y_obj, *x_obj, *W_obj, *dW_obj, *db_obj = Py_None, *stride_obj = NULL,
             *pad_obj = NULL, *pool_obj = NULL, *pst_obj = NULL;
    PyObject *one = PyLong_FromLong(1), *zero = PyLong_FromLong(0), *two = PyLong_FromLong(2), *result = NULL;
    int need_dx = 1;
    Hold h = {0};
    if (!one || !zero || !two) goto done;
    if (!parse_args(args, kw, "OOOOOO|OOOOOp", kwlist, &dy_obj, &code_obj, &y_obj, &x_obj, &W_obj, &dW_obj, &db_obj,
                    &stride_obj, &pad_obj, &pool_obj, &pst_obj, &need_dx))
        goto done;
    int tn = NPY_NOTYPE;
    PyArrayObject *x, *Wt;
    DskConv2d g;
    DskPool2d p;
    if (conv_inputs(x_obj, W_obj, stride_obj ? stride_obj : one, pad_obj ? pad_obj : zero, &tn, &h, &x, &Wt, &g) < 0)
        goto done;
    if (pool_geometry(pool_obj ? pool_obj : two, pst_obj, &g, &p) < 0) goto done;
    npy_intp ydims[4] = {g.B, g.F, p.OH, p.OW};
    PyArrayObject *dy = hold_from(&h, dy_obj, input_array(dy_obj, "dy", &tn, 4, ydims, "(B, F, POH, POW)", 1));
    if (!dy) goto done;
    npy_intp y2dims[4] = {g.B, g.F, p.OH, p.OW};
    PyArrayObject *y = hold_from(&h, y_obj, input_array(y_obj, "y", &tn, 4, y2dims, "(B, F, POH, POW)", 1));
    if (!y) goto done;
    if (!PyArray_Check(code_obj) || PyArray_TYPE((PyArrayObject *)code_obj) != NPY_UINT8) {
        PyErr_Format(PyExc_TypeError, "argument 'code' must be the uint8 array conv2d_relu_pool_forward returns, got %s",
                     PyArray_Check(code_obj) ? PyArray_DESCR((PyArrayObject *)code_obj)->typeobj->tp_name
                                             : Py_TYPE(code_obj)->tp_name);
        goto done;
    }
    PyArrayObject *code = hold_from(&h, code_obj, (PyArrayObject *)PyArray_FROM_OTF(code_obj, NPY_UINT8, NPY_ARRAY_IN_ARRAY));
    if (!code) goto done;
    char got[128], want[128];
    if (PyArray_NDIM(code) != 4 || !PyArray_CompareLists(PyArray_DIMS(code), ydims, 4)) {
        format_shape(got, sizeof got, PyArray_NDIM(code), PyArray_DIMS(code));
        format_shape(want, sizeof want, 4, ydims);
        PyErr_Format(PyExc_ValueError, "argument 'code' must have the shape of dy %s, got %s", want, got);
        goto done;
    }
    const uint8_t *cv = DATA(code);
    const npy_intp ncodes = PyArray_SIZE(code);
    for (npy_intp i = 0; i < ncodes; i++)
        if (cv[i] >= p.KH * p.KW) {
            PyErr_Format(PyExc_ValueError, "argument 'code' must hold window positions < %ld (the pool's size), got "
                         "code.flat[%ld] = %d", p.KH * p.KW, (long)i, (int)cv[i]);
            goto done;
        }
    ConvGrads c;
    if (conv_grads(dW_obj, db_obj, need_dx, &tn, &g, &h, &c) < 0) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, conv2d_relu_pool_backward, OPTDATA(c.dx), DATA(c.dW), OPTDATA(c.db), DATA(c.col), c.slots,
             DATA(c.part), DATA(c.acc), DATA(dy), DATA(code), DATA(y), DATA(x), DATA(Wt), &g, &p);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(c.dx ? (PyObject *)c.dx : Py_None);
done:
    Py_XDECREF(one);
    Py_XDECREF(zero);
    Py_XDECREF(two);
    release(&h);
    return result;
}

PyDoc_STRVAR(max_pool2d_forward_doc,
"max_pool2d_forward(x, kernel=2, stride=None) -> (y, indices)\n\n"
"Max pooling of x (B, C, H, W) over the valid KH x KW windows (kernel: int or (KH, KW), at most the\n"
"input plane) at stride (sh, sw) (int or pair, >= 1; None: the kernel). y (B, C, OH, OW) with\n"
"OH = (H - KH) // sh + 1, OW likewise; indices (B, C, OH, OW) int64, the flat index h W + w in its\n"
"plane of the entry each y came from. Ties: the first maximum in row-major window order.");

static PyObject *py_max_pool2d_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "kernel", "stride", NULL};
    PyObject *x_obj, *kernel_obj = NULL, *stride_obj = Py_None, *result = NULL;
    long KH = 2, KW = 2, sh, sw;
    Hold h = {0};
    if (!parse_args(args, kw, "O|OO", kwlist, &x_obj, &kernel_obj, &stride_obj)) return NULL;
    if (kernel_obj && parse_pair(kernel_obj, "kernel", 1, &KH, &KW) < 0) return NULL;
    sh = KH, sw = KW;
    if (stride_obj != Py_None && parse_pair(stride_obj, "stride", 1, &sh, &sw) < 0) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp xdims[4] = {-1, -1, -1, -1};
    PyArrayObject *x = hold_from(&h, x_obj, input_array(x_obj, "x", &tn, 4, xdims, "(B, C, H, W)", 1));
    if (!x) goto done;
    if (check_batch(xdims[0], "x") < 0) goto done;
    if (xdims[1] < 1) {
        PyErr_Format(PyExc_ValueError, "argument 'x' must have at least one channel (C >= 1), got shape (%ld, %ld, "
                     "%ld, %ld)", (long)xdims[0], (long)xdims[1], (long)xdims[2], (long)xdims[3]);
        goto done;
    }
    if (KH > xdims[2] || KW > xdims[3]) {
        PyErr_Format(PyExc_ValueError, "the pooling kernel (KH, KW) = (%ld, %ld) is larger than the input plane "
                     "(H, W) = (%ld, %ld) of argument 'x'", KH, KW, (long)xdims[2], (long)xdims[3]);
        goto done;
    }
    const long N = (long)(xdims[0] * xdims[1]), H = (long)xdims[2], W = (long)xdims[3];
    const long OH = (H - KH) / sh + 1, OW = (W - KW) / sw + 1;
    npy_intp ydims[4] = {xdims[0], xdims[1], OH, OW};
    PyArrayObject *y = hold(&h, new_array(tn, 4, ydims)), *idx = hold(&h, new_array(NPY_INT64, 4, ydims));
    if (!y || !idx) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, max_pool2d_forward, DATA(y), DATA(idx), DATA(x), N, H, W, KH, KW, sh, sw, OH, OW);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OO)", y, idx);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(max_pool2d_backward_doc,
"max_pool2d_backward(dy, indices, input_size, relu_y=None) -> dx\n\n"
"Backward of max_pool2d_forward: dy (B, C, OH, OW), indices (B, C, OH, OW) of any integer dtype, each\n"
"in [0, H W), input_size (H, W) (int or pair). dx (B, C, H, W) is 0 except dx[b, c].flat[indices] +=\n"
"dy, so overlapping windows that picked the same entry add up. relu_y (B, C, OH, OW): the pooling's\n"
"output when its input was a ReLU's output; then dx is the gradient at the ReLU's input (only\n"
"entries with relu_y > 0 pass dy): relu_backward(max_pool2d_backward(...), x), fused.");

static PyObject *py_max_pool2d_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dy", "indices", "input_size", "relu_y", NULL};
    PyObject *dy_obj, *idx_obj, *size_obj, *relu_obj = Py_None, *result = NULL;
    long H, W;
    Hold h = {0};
    if (!parse_args(args, kw, "OOO|O", kwlist, &dy_obj, &idx_obj, &size_obj, &relu_obj)) return NULL;
    if (parse_pair(size_obj, "input_size", 1, &H, &W) < 0) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp ydims[4] = {-1, -1, -1, -1};
    PyArrayObject *dy = hold_from(&h, dy_obj, input_array(dy_obj, "dy", &tn, 4, ydims, "(B, C, OH, OW)", 1));
    if (!dy) goto done;
    if (check_batch(ydims[0], "dy") < 0) goto done;
    if (ydims[2] > H || ydims[3] > W) {
        PyErr_Format(PyExc_ValueError, "argument 'dy' has an output plane (OH, OW) = (%ld, %ld) larger than the "
                     "input_size (H, W) = (%ld, %ld)", (long)ydims[2], (long)ydims[3], H, W);
        goto done;
    }
    npy_intp idims[4] = {ydims[0], ydims[1], ydims[2], ydims[3]};
    PyArrayObject *idx = hold(&h, index_array(idx_obj, "indices", "flat indices into the input plane", 4, idims,
                                              "(B, C, OH, OW) of dy", (npy_intp)(H * W), "H W", 0));
    if (!idx) goto done;
    PyArrayObject *relu_y = NULL;
    npy_intp rdims[4] = {ydims[0], ydims[1], ydims[2], ydims[3]};
    if (optional_input(relu_obj, "relu_y", &tn, 4, rdims, "(B, C, OH, OW) of dy", 1, &relu_y) < 0) goto done;
    hold_from(&h, relu_obj, relu_y);
    npy_intp xdims[4] = {ydims[0], ydims[1], H, W};
    PyArrayObject *dx = hold(&h, new_array(tn, 4, xdims));
    if (!dx) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, max_pool2d_backward, DATA(dx), DATA(dy), DATA(idx), OPTDATA(relu_y), (long)(ydims[0] * ydims[1]),
             H * W, (long)(ydims[2] * ydims[3]));
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)dx);
done:
    release(&h);
    return result;
}

PyMethodDef dsk_conv_methods[] = {
    KW(conv2d_forward),
    KW(conv2d_backward),
    KW(conv2d_relu_pool_forward),
    KW(conv2d_relu_pool_backward),
    KW(max_pool2d_forward),
    KW(max_pool2d_backward),
    {NULL, NULL, 0, NULL},
};
