/* dselectk._C, embedding family: embedding tables (csrc/embedding.h): gather, sparse backward,
 * the lazy (sparse) optimizer steps.
 * Converters and conventions: common.h. */
#include "common.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>

#include "embedding.h"

/* The rows of a (V, d) (an embedding table, or an optimizer state of its shape) that ids looks up
 * must be finite, and with nonneg >= 0 (a sum or mean of squared gradients): only those rows are
 * read, so only those are scanned (a whole-table scan per batch would cost O(V d) where the call
 * costs O(B F d)). Cheap, so it runs inside trusted_inputs() too. */
static int check_rows(PyArrayObject *a, const char *name, PyArrayObject *ids, const char *ids_name, int nonneg) {
    const npy_intp d = PyArray_DIM(a, 1), n = PyArray_SIZE(ids);
    char where[64];
    for (npy_intp i = 0; i < n; i++) {
        const int64_t r = index_at(ids, i);
        npy_intp j = 0;
        double v = 0;
        if (PyArray_TYPE(a) == NPY_FLOAT) {
            const float *p = (const float *)DATA(a) + r * d;
            for (; j < d; j++)
                if (!isfinite(p[j]) || (nonneg && p[j] < 0)) break;
            if (j < d) v = p[j];
        } else {
            const double *p = (const double *)DATA(a) + r * d;
            for (; j < d; j++)
                if (!isfinite(p[j]) || (nonneg && p[j] < 0)) break;
            if (j < d) v = p[j];
        }
        if (j == d) continue;
        format_position(where, sizeof where, PyArray_NDIM(ids), PyArray_DIMS(ids), i);
        if (!isfinite(v)) {
            PyErr_Format(PyExc_ValueError, "argument '%s' contains NaN or Inf in row %lld (read for %s%s); "
                         "expected finite values", name, (long long)r, ids_name, where);
        } else {
            char msg[256];
            snprintf(msg, sizeof msg, "argument '%s' must hold values >= 0 (it accumulates squared gradients), "
                     "got %s[%lld, %ld] = %g (row read for %s%s)", name, name, (long long)r, (long)j, v, ids_name,
                     where);
            PyErr_SetString(PyExc_ValueError, msg);
        }
        return -1;
    }
    return 0;
}

/* Columns [offset, offset + width) of every row of a (B, D) array must be finite. */
static int check_block_finite(PyArrayObject *a, const char *name, npy_intp offset, npy_intp width) {
    const npy_intp B = PyArray_DIM(a, 0), D = PyArray_DIM(a, 1);
    for (npy_intp b = 0; b < B; b++)
        for (npy_intp j = offset; j < offset + width; j++) {
            const double v = PyArray_TYPE(a) == NPY_FLOAT ? (double)((const float *)DATA(a))[b * D + j]
                                                          : ((const double *)DATA(a))[b * D + j];
            if (!isfinite(v)) {
                PyErr_Format(PyExc_ValueError, "argument '%s' contains NaN or Inf (first at [%ld, %ld]); expected "
                             "finite values", name, (long)b, (long)j);
                return -1;
            }
        }
    return 0;
}

/* The forward's out=: a (B, D) array with D >= offset + width whose columns are adjacent in
 * memory (a C-contiguous array, or a column slice of one: any row stride), aligned, writeable,
 * native, of the call's dtype, sharing no memory with the inputs in h. *ld receives the row
 * stride in elements. New reference. */
static PyArrayObject *block_output(PyObject *out, int typenum, npy_intp B, npy_intp offset, npy_intp width,
                                   Hold *inputs, npy_intp *ld) {
    char got[128];
    if (!PyArray_Check(out)) {
        PyErr_Format(PyExc_TypeError, "argument 'out' must be a numpy.ndarray or None, got %s", Py_TYPE(out)->tp_name);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)out;
    if (PyArray_TYPE(arr) != typenum || !PyArray_ISNOTSWAPPED(arr)) {
        PyErr_Format(PyExc_TypeError, "argument 'out' must have dtype %s (native byte order)", dtype_name(typenum));
        return NULL;
    }
    format_shape(got, sizeof got, PyArray_NDIM(arr), PyArray_DIMS(arr));
    if (PyArray_NDIM(arr) != 2 || PyArray_DIM(arr, 0) != B || PyArray_DIM(arr, 1) < offset + width) {
        PyErr_Format(PyExc_ValueError, "argument 'out' must have shape (B, D) with B = %ld and D >= offset + F * d "
                     "= %ld, got %s", (long)B, (long)(offset + width), got);
        return NULL;
    }
    const npy_intp item = PyArray_ITEMSIZE(arr), D = PyArray_DIM(arr, 1);
    const npy_intp s0 = PyArray_STRIDE(arr, 0), s1 = PyArray_STRIDE(arr, 1);
    const int rows_ok = B == 1 || (s0 % item == 0 && s0 >= D * item);
    const int cols_ok = D <= 1 || s1 == item;
    if (!rows_ok || !cols_ok || !PyArray_ISALIGNED(arr) || !PyArray_ISWRITEABLE(arr)) {
        PyErr_SetString(PyExc_ValueError, "argument 'out' must be an aligned, writeable array whose columns are "
                        "adjacent in memory (C-contiguous, or a column slice of a C-contiguous array)");
        return NULL;
    }
    for (int i = 0; inputs && i < inputs->count; i++)
        if (overlaps_held(arr, inputs, i)) {
            PyErr_SetString(PyExc_ValueError, "argument 'out' shares memory with an input; inputs are never "
                            "overwritten, pass a separate array");
            return NULL;
        }
    *ld = B == 1 ? D : s0 / item;
    Py_INCREF(arr);
    return arr;
}

/* Call the (float | double) x (int32 | int64 ids) instance of an embedding kernel. */
#define DISPATCH_IDS(typenum, ids32, fn, ...)                                                     \
    do {                                                                                         \
        if ((typenum) == NPY_FLOAT) {                                                            \
            if (ids32) fn##_f32_i32(__VA_ARGS__);                                                \
            else fn##_f32_i64(__VA_ARGS__);                                                      \
        } else {                                                                                 \
            if (ids32) fn##_f64_i32(__VA_ARGS__);                                                \
            else fn##_f64_i64(__VA_ARGS__);                                                      \
        }                                                                                        \
    } while (0)

/* F * d + offset without overflow (all three >= 0). */
static int block_width(npy_intp F, npy_intp d, npy_intp offset, npy_intp *width) {
    if (d > 0 && F > (NPY_MAX_INTP - offset) / d) {
        PyErr_SetString(PyExc_ValueError, "offset + F * d overflows");
        return -1;
    }
    *width = F * d;
    return 0;
}

PyDoc_STRVAR(embedding_forward_doc,
"embedding_forward(table, ids, out=None, offset=0) -> out\n\n"
"Row gather: out[b, offset + f*d : offset + (f+1)*d] = table[ids[b, f]] for table (V, d) and ids\n"
"(B, F) of any integer dtype (int32 and int64 are read as they are), each in [0, V) (ValueError\n"
"naming the first bad id and its position). Without out, a new (B, F*d) array (offset must be 0).\n"
"With out, a (B, D) array with D >= offset + F*d whose columns are adjacent in memory (C-contiguous\n"
"or a column slice of one): only columns [offset, offset + F*d) are written, so several tables and\n"
"dense features can fill one (B, D) input row without copies. Only the rows looked up are checked\n"
"for NaN / Inf.");

static PyObject *py_embedding_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"table", "ids", "out", "offset", NULL};
    PyObject *t_obj, *ids_obj, *out_obj = Py_None, *offset_obj = NULL, *result = NULL;
    unsigned long long offset = 0;
    Hold h = {0};
    if (!parse_args(args, kw, "OO|OO", kwlist, &t_obj, &ids_obj, &out_obj, &offset_obj)) return NULL;
    if (offset_obj && parse_count(offset_obj, "offset", 0, LONG_MAX, &offset) < 0) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp tdims[2] = {-1, -1}, idims[2] = {-1, -1}, width, ld;
    PyArrayObject *table = hold_from(&h, t_obj, input_array(t_obj, "table", &tn, 2, tdims, "(V, d)", 0)), *y;
    if (!table) goto done;
    PyArrayObject *ids = hold_from(&h, ids_obj, index_array(ids_obj, "ids", "row indices", 2, idims, "(B, F)",
                                                            tdims[0], "the rows of 'table'", 1));
    if (!ids || check_batch(idims[0], "ids") < 0) goto done;
    if (block_width(idims[1], tdims[1], (npy_intp)offset, &width) < 0 || check_rows(table, "table", ids, "ids", 0) < 0)
        goto done;
    if (out_obj == Py_None) {
        if (offset != 0) {
            PyErr_SetString(PyExc_ValueError, "offset > 0 needs out=, the wider array to write into");
            goto done;
        }
        npy_intp ydims[2] = {idims[0], width};
        if (!(y = hold(&h, new_array(tn, 2, ydims)))) goto done;
        ld = width;
    } else if (!(y = hold(&h, block_output(out_obj, tn, idims[0], (npy_intp)offset, width, &h, &ld)))) {
        goto done;
    }
    char *dst = (char *)DATA(y) + (npy_intp)offset * PyArray_ITEMSIZE(y);
    const int ids32 = PyArray_ITEMSIZE(ids) == 4;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH_IDS(tn, ids32, embedding_forward, (void *)dst, (long)ld, DATA(table), DATA(ids), (long)idims[0],
                 (long)idims[1], (long)tdims[1]);
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)y);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(embedding_backward_doc,
"embedding_backward(dout, ids, num_embeddings, dim, offset=0) -> (rows, grad_rows)\n\n"
"Sparse gradient of a table (num_embeddings, dim) looked up by ids (B, F) (integer dtype, each in\n"
"[0, num_embeddings)), for the upstream gradient of the block of columns [offset, offset + F*dim)\n"
"of dout (B, D). rows (U,) int64: the distinct ids, ascending; grad_rows (U, dim): per id, the sum\n"
"of the gradient over every position that looked it up (repeated ids are summed), added in\n"
"ascending position order in double, so the result does not depend on the thread count. The\n"
"dense gradient is zeros (V, dim) with grad_rows at rows. Only the block is checked for NaN / Inf.");

static PyObject *py_embedding_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dout", "ids", "num_embeddings", "dim", "offset", NULL};
    PyObject *dout_obj, *ids_obj, *V_obj, *d_obj, *offset_obj = NULL, *result = NULL;
    unsigned long long V, d, offset = 0;
    long U = 0;
    Hold h = {0};
    if (!parse_args(args, kw, "OOOO|O", kwlist, &dout_obj, &ids_obj, &V_obj, &d_obj, &offset_obj))
        return NULL;
    if (parse_count(V_obj, "num_embeddings", 1, LONG_MAX, &V) < 0 || parse_count(d_obj, "dim", 1, LONG_MAX, &d) < 0 ||
        (offset_obj && parse_count(offset_obj, "offset", 0, LONG_MAX, &offset) < 0))
        return NULL;
    int tn = NPY_NOTYPE;
    npy_intp ddims[2] = {-1, -1}, width;
    PyArrayObject *dout = hold_from(&h, dout_obj, input_array(dout_obj, "dout", &tn, 2, ddims, "(B, D)", 0));
    if (!dout || check_batch(ddims[0], "dout") < 0) goto done;
    npy_intp idims[2] = {ddims[0], -1};
    PyArrayObject *ids = hold_from(&h, ids_obj, index_array(ids_obj, "ids", "row indices", 2, idims, "(B, F)",
                                                            (npy_intp)V, "num_embeddings", 1));
    if (!ids || block_width(idims[1], (npy_intp)d, (npy_intp)offset, &width) < 0) goto done;
    if ((npy_intp)offset + width > ddims[1]) {
        char got[128];
        format_shape(got, sizeof got, 2, ddims);
        PyErr_Format(PyExc_ValueError, "argument 'dout' must have at least offset + F * dim = %ld + %ld * %ld = %ld "
                     "columns, got shape %s", (long)offset, (long)idims[1], (long)d, (long)(offset + width), got);
        goto done;
    }
    if (check_block_finite(dout, "dout", (npy_intp)offset, width) < 0) goto done;
    npy_intp N = ddims[0] * idims[1], N1 = N + 1;
    PyArrayObject *perm = hold(&h, (PyArrayObject *)PyArray_EMPTY(1, &N, NPY_INT64, 0));
    PyArrayObject *starts = hold(&h, (PyArrayObject *)PyArray_EMPTY(1, &N1, NPY_INT64, 0));
    if (!perm || !starts) goto done;
    const int ids32 = PyArray_ITEMSIZE(ids) == 4;
    Py_BEGIN_ALLOW_THREADS
    if (ids32) U = embedding_sort_ids_i32(DATA(perm), DATA(starts), DATA(ids), (long)N, (long)V);
    else U = embedding_sort_ids_i64(DATA(perm), DATA(starts), DATA(ids), (long)N, (long)V);
    Py_END_ALLOW_THREADS
    npy_intp rdims[1] = {U}, gdims[2] = {U, (npy_intp)d};
    PyArrayObject *rows = hold(&h, (PyArrayObject *)PyArray_EMPTY(1, rdims, NPY_INT64, 0));
    PyArrayObject *grad = hold(&h, new_array(tn, 2, gdims));
    if (!rows || !grad) goto done;
    const char *src = (const char *)DATA(dout) + (npy_intp)offset * PyArray_ITEMSIZE(dout);
    Py_BEGIN_ALLOW_THREADS
    DISPATCH_IDS(tn, ids32, embedding_backward, DATA(rows), DATA(grad), (const void *)src, (long)ddims[1], DATA(ids),
                 DATA(perm), DATA(starts), U, (long)idims[1], (long)d);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OO)", rows, grad);
done:
    release(&h);
    return result;
}

/* Row indices of a sparse step must be distinct: the kernel updates them in parallel, and a row
 * listed twice would be updated twice with one gradient each (a lost update when two threads race).
 * Ascending rows (as embedding_backward returns them) are accepted in one pass; others are sorted
 * by (value, position) to name the first repeated value and two of its positions. */
typedef struct {
    int64_t value;
    npy_intp pos;
} dsk_row_pos;

static int cmp_row_pos(const void *a, const void *b) {
    const dsk_row_pos *x = a, *y = b;
    if (x->value != y->value) return x->value < y->value ? -1 : 1;
    return x->pos < y->pos ? -1 : x->pos > y->pos;
}

static int check_distinct(PyArrayObject *rows, const char *name) {
    const npy_intp n = PyArray_SIZE(rows);
    const int64_t *r = DATA(rows);
    npy_intp i = 1;
    while (i < n && r[i] > r[i - 1]) i++;
    if (i >= n) return 0;
    dsk_row_pos *buf = PyMem_Malloc(sizeof(dsk_row_pos) * (size_t)n);
    if (!buf) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < n; i++) buf[i] = (dsk_row_pos){r[i], i};
    qsort(buf, (size_t)n, sizeof *buf, cmp_row_pos);
    int status = 0;
    for (i = 1; i < n; i++)
        if (buf[i].value == buf[i - 1].value) {
            PyErr_Format(PyExc_ValueError, "argument '%s' must hold distinct row indices (a sparse step updates each "
                         "row once), got %s[%ld] = %s[%ld] = %lld", name, name, (long)buf[i - 1].pos, name,
                         (long)buf[i].pos, (long long)buf[i].value);
            status = -1;
            break;
        }
    PyMem_Free(buf);
    return status;
}

/* The common arguments of the sparse steps: grad_rows (U, d) (sets the dtype; finite), the n_states
 * tables updated in place -- table (V, d) first, then the optimizer states of its shape, each
 * finite in the rows listed, and >= 0 there where nonneg[i] --, and rows (U,) distinct, in [0, V),
 * sharing no memory with them. */
static int sparse_step_args(PyObject *g_obj, PyObject *r_obj, PyObject **state_objs, const char **state_names,
                            const int *nonneg, int n_states, int *tn, Hold *h, PyArrayObject **grad_rows,
                            PyArrayObject **states, PyArrayObject **rows, npy_intp *U, npy_intp *d) {
    npy_intp gdims[2] = {-1, -1};
    if (!(*grad_rows = hold_from(h, g_obj, input_array(g_obj, "grad_rows", tn, 2, gdims, "(U, d)", 1)))) return -1;
    npy_intp tdims[2] = {-1, gdims[1]};
    for (int i = 0; i < n_states; i++)
        if (!(states[i] = hold_from(h, state_objs[i], inplace_array(state_objs[i], state_names[i], tn, 2, tdims,
                                                                    "(V, d)", h, 0))))
            return -1;
    npy_intp rdims[1] = {gdims[0]};
    if (!(*rows = hold_from(h, r_obj, index_array(r_obj, "rows", "row indices", 1, rdims, "(U,)", tdims[0],
                                                  "the rows of 'table'", 0))))
        return -1;
    for (int i = 0; i < n_states; i++)
        if (overlaps(states[i], *rows) || (PyArray_Check(r_obj) && overlaps(states[i], (PyArrayObject *)r_obj))) {
            PyErr_Format(PyExc_ValueError, "argument 'rows' shares memory with '%s'; pass separate arrays",
                         state_names[i]);
            return -1;
        }
    if (check_distinct(*rows, "rows") < 0) return -1;
    for (int i = 0; i < n_states; i++)
        if (check_rows(states[i], state_names[i], *rows, "rows", nonneg[i]) < 0) return -1;
    *U = gdims[0];
    *d = gdims[1];
    return 0;
}

PyDoc_STRVAR(sparse_adagrad_step_doc,
"sparse_adagrad_step(table, accum, rows, grad_rows, lr=0.01, eps=1e-10) -> None\n\n"
"Lazy Adagrad on the rows of table (V, d) and accum (V, d) (updated in place) listed in rows (U,)\n"
"(integer dtype, distinct, in [0, V)), with grad_rows (U, d) their gradients (embedding_backward's\n"
"output): accum[r] += g^2; table[r] -= lr * g / (sqrt(accum[r]) + eps). Rows not listed, and their\n"
"accum, do not change. lr > 0, eps > 0. No weight decay (as torch.optim's sparse steps). The listed\n"
"rows of table and accum must be finite, those of accum >= 0 (ValueError).");

static PyObject *py_sparse_adagrad_step(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"table", "accum", "rows", "grad_rows", "lr", "eps", NULL};
    PyObject *states_obj[2], *r_obj, *g_obj, *result = NULL;
    const char *names[2] = {"table", "accum"};
    const int nonneg[2] = {0, 1};
    double lr = 1e-2, eps = 1e-10;
    Hold h = {0};
    if (!parse_args(args, kw, "OOOO|dd", kwlist, &states_obj[0], &states_obj[1], &r_obj, &g_obj, &lr,
                    &eps))
        return NULL;
    if (check_scalar(lr, "lr", 1) < 0 || check_scalar(eps, "eps", 1) < 0) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp U, d;
    PyArrayObject *grad_rows, *states[2], *rows;
    if (sparse_step_args(g_obj, r_obj, states_obj, names, nonneg, 2, &tn, &h, &grad_rows, states, &rows, &U, &d) < 0)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, sparse_adagrad_step, DATA(states[0]), DATA(states[1]), DATA(rows), DATA(grad_rows), (long)U, (long)d,
             lr, eps);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(sparse_adam_step_doc,
"sparse_adam_step(table, m, v, rows, grad_rows, step, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8) -> None\n\n"
"Lazy Adam on the rows of table, m, v (V, d) (updated in place) listed in rows (U,) (integer\n"
"dtype, distinct, in [0, V)), with grad_rows (U, d) their gradients: for r = rows[u], g = grad_rows[u]:\n"
"m[r] = beta1 m[r] + (1 - beta1) g; v[r] = beta2 v[r] + (1 - beta2) g^2;\n"
"table[r] -= lr / (1 - beta1**step) * m[r] / (sqrt(v[r]) / sqrt(1 - beta2**step) + eps).\n"
"Rows not listed keep their values and moments. step >= 1 is the GLOBAL step count (the number of\n"
"this update of the model), also for rows last touched long ago: the bias correction of PyTorch's\n"
"SparseAdam and TensorFlow's LazyAdam. lr > 0, 0 <= beta1, beta2 < 1, eps > 0. The listed rows of\n"
"table, m and v must be finite, those of v >= 0 (ValueError).");

static PyObject *py_sparse_adam_step(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"table", "m", "v", "rows", "grad_rows", "step", "lr", "beta1", "beta2", "eps", NULL};
    PyObject *states_obj[3], *r_obj, *g_obj, *step_obj, *result = NULL;
    const char *names[3] = {"table", "m", "v"};
    const int nonneg[3] = {0, 0, 1};
    double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
    unsigned long long step;
    Hold h = {0};
    if (!parse_args(args, kw, "OOOOOO|dddd", kwlist, &states_obj[0], &states_obj[1], &states_obj[2],
                    &r_obj, &g_obj, &step_obj, &lr, &beta1, &beta2, &eps))
        return NULL;
    if (parse_count(step_obj, "step", 1, LONG_MAX, &step) < 0 || check_scalar(lr, "lr", 1) < 0 ||
        check_unit(beta1, "beta1") < 0 || check_unit(beta2, "beta2") < 0 || check_scalar(eps, "eps", 1) < 0)
        return NULL;
    int tn = NPY_NOTYPE;
    npy_intp U, d;
    PyArrayObject *grad_rows, *states[3], *rows;
    if (sparse_step_args(g_obj, r_obj, states_obj, names, nonneg, 3, &tn, &h, &grad_rows, states, &rows, &U, &d) < 0)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, sparse_adam_step, DATA(states[0]), DATA(states[1]), DATA(states[2]), DATA(rows), DATA(grad_rows),
             (long)U, (long)d, (long)step, lr, beta1, beta2, eps);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(&h);
    return result;
}

PyMethodDef dsk_embedding_methods[] = {
    KW(embedding_forward),
    KW(embedding_backward),
    KW(sparse_adagrad_step),
    KW(sparse_adam_step),
    {NULL, NULL, 0, NULL},
};
