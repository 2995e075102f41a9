/* dselectk._C: the one binding module between Python and the C kernels of csrc/.
 *
 * Every function here does the same four things, in this order:
 *   1. converts and validates its arguments (dtype, ndim, shape, finiteness, scalar ranges),
 *      raising TypeError / ValueError that name the argument, what it got and what was expected;
 *   2. allocates (or validates the caller's out=) output arrays;
 *   3. releases the GIL around the pure-C kernel;
 *   4. drops every reference it holds through one exit path (the Hold list below).
 * Inputs are never written. Non-contiguous, misaligned or byte-swapped inputs are copied to a
 * C-contiguous native array first; an out= array must already be C-contiguous and writeable.
 * All array arguments of one call must share one dtype: float32 or float64 (no silent casting).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <numpy/arrayobject.h>

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "conv.h"
#include "dsk.h"
#include "embedding.h"
#include "gates.h"
#include "linear.h"
#include "nn.h"
#include "optim.h"

#ifndef DSK_BLAS_NAME
#define DSK_BLAS_NAME "unknown"
#endif

/* ---------------------------------------------------------------------------------------------
 * Reference holding: every array a function creates goes into a Hold, released at the one exit.
 */
#define HOLD_MAX 16
typedef struct {
    PyArrayObject *a[HOLD_MAX];
    PyObject *orig[HOLD_MAX]; /* borrowed: the caller's object a was converted from */
    int count;
} Hold;

/* Holds a, converted from the caller's object orig (kept to check out= against the caller's
 * memory, not only against a copy of it). */
static PyArrayObject *hold_from(Hold *h, PyObject *orig, PyArrayObject *a) {
    if (a) {
        h->orig[h->count] = orig;
        h->a[h->count++] = a;
    }
    return a;
}

static PyArrayObject *hold(Hold *h, PyArrayObject *a) { return hold_from(h, (PyObject *)a, a); }

static void release(Hold *h) {
    for (int i = 0; i < h->count; i++) Py_DECREF(h->a[i]);
    h->count = 0;
}

#define DATA(a) PyArray_DATA(a)
#define OPTDATA(a) ((a) ? PyArray_DATA(a) : NULL)

/* Call the float or the double instance of a kernel. */
#define DISPATCH(typenum, fn, ...)                                                                \
    do {                                                                                         \
        if ((typenum) == NPY_FLOAT) fn##_f32(__VA_ARGS__);                                       \
        else fn##_f64(__VA_ARGS__);                                                              \
    } while (0)

/* ---------------------------------------------------------------------------------------------
 * Converters
 */
static void format_shape(char *buf, size_t size, int ndim, const npy_intp *dims) {
    size_t used = (size_t)snprintf(buf, size, "(");
    for (int i = 0; i < ndim && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, i ? ", %ld" : "%ld", (long)dims[i]);
    if (used < size) snprintf(buf + used, size - used, ndim == 1 ? ",)" : ")");
}

static const char *dtype_name(int typenum) {
    return typenum == NPY_FLOAT ? "float32" : typenum == NPY_DOUBLE ? "float64" : "?";
}

/* The exponent bits of a float / double are all ones exactly for NaN and Inf. Blocks are scanned
 * without an early exit (a vectorizable OR of the tests), and only a block with a hit is searched
 * for its first index: every kernel input is checked, so this scan must run at memory speed. */
#define FINITE_SCAN_BLOCK 4096
#define FIRST_NONFINITE(ctype, utype, expmask)                                                  \
    do {                                                                                        \
        const ctype *p = (const ctype *)DATA(a);                                                \
        for (npy_intp start = 0; start < size; start += FINITE_SCAN_BLOCK) {                    \
            const npy_intp end = size - start < FINITE_SCAN_BLOCK ? size : start + FINITE_SCAN_BLOCK; \
            int bad = 0;                                                                        \
            for (npy_intp i = start; i < end; i++) {                                            \
                utype bits;                                                                     \
                memcpy(&bits, p + i, sizeof bits);                                              \
                bad |= (bits & (expmask)) == (expmask);                                         \
            }                                                                                   \
            if (bad)                                                                            \
                for (npy_intp i = start; i < end; i++)                                          \
                    if (!isfinite(p[i])) { *where = i; return 1; }                              \
        }                                                                                       \
    } while (0)

/* Off (0) only inside dselectk.functional.trusted_inputs(), which models enter between their
 * checked input and their checked loss: the NaN / Inf scans of their intermediate arrays cost a
 * read of each (a tenth of a training step). Per thread, so another thread's calls stay checked;
 * every other check (dtype, shape, overlap, index bounds) is unaffected. */
static __thread int finite_checks_on = 1;

static int first_nonfinite(PyArrayObject *a, npy_intp *where) {
    const npy_intp size = PyArray_SIZE(a);
    if (PyArray_TYPE(a) == NPY_FLOAT) FIRST_NONFINITE(float, uint32_t, 0x7f800000u);
    else FIRST_NONFINITE(double, uint64_t, 0x7ff0000000000000ull);
    return 0;
}

/* An input array argument.
 *   *typenum: NPY_NOTYPE for the first array of a call (it must be float32 or float64 and sets
 *             the call's dtype), else the dtype every later array must have exactly.
 *   dims:     the expected shape; entries < 0 are free and are filled in from the array.
 *   shape_doc: the expected shape in the paper's symbols, for messages, e.g. "(B, k, m)".
 *   finite:   reject NaN / Inf.
 * Returns a new reference to a C-contiguous, aligned, native-byte-order array, or NULL with an
 * exception set. */
static PyArrayObject *input_array(PyObject *obj, const char *name, int *typenum, int ndim,
                                  npy_intp *dims, const char *shape_doc, int finite) {
    char got[128], want[128];
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "argument '%s' must be a numpy.ndarray of float32 or float64, got %s",
                     name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    const int tn = PyArray_TYPE(arr);
    if (*typenum == NPY_NOTYPE) {
        if (tn != NPY_FLOAT && tn != NPY_DOUBLE) {
            PyErr_Format(PyExc_TypeError, "argument '%s' must have dtype float32 or float64, got %s",
                         name, PyArray_DESCR(arr)->typeobj->tp_name);
            return NULL;
        }
        *typenum = tn;
    } else if (tn != *typenum) {
        PyErr_Format(PyExc_TypeError,
                     "argument '%s' has dtype %s, expected %s like the other arrays of this call "
                     "(all arrays must share one dtype: float32 or float64)",
                     name, tn == NPY_FLOAT || tn == NPY_DOUBLE ? dtype_name(tn)
                                                               : PyArray_DESCR(arr)->typeobj->tp_name,
                     dtype_name(*typenum));
        return NULL;
    }
    format_shape(got, sizeof got, PyArray_NDIM(arr), PyArray_DIMS(arr));
    if (PyArray_NDIM(arr) != ndim) {
        PyErr_Format(PyExc_ValueError, "argument '%s' must be %d-D with shape %s, got shape %s",
                     name, ndim, shape_doc, got);
        return NULL;
    }
    for (int i = 0; i < ndim; i++) {
        if (dims[i] >= 0 && PyArray_DIM(arr, i) != dims[i]) {
            npy_intp shown[NPY_MAXDIMS]; /* free dims print as the array's own */
            for (int j = 0; j < ndim; j++) shown[j] = dims[j] >= 0 ? dims[j] : PyArray_DIM(arr, j);
            format_shape(want, sizeof want, ndim, shown);
            PyErr_Format(PyExc_ValueError, "argument '%s' must have shape %s = %s, got %s", name,
                         shape_doc, want, got);
            return NULL;
        }
    }
    for (int i = 0; i < ndim; i++) dims[i] = PyArray_DIM(arr, i);
    /* copies only when the array is not already C-contiguous, aligned and native */
    PyArrayObject *conv = (PyArrayObject *)PyArray_FROM_OTF(obj, *typenum, NPY_ARRAY_IN_ARRAY);
    if (!conv) return NULL;
    npy_intp where;
    if (finite && finite_checks_on && first_nonfinite(conv, &where)) {
        PyErr_Format(PyExc_ValueError, "argument '%s' contains NaN or Inf (first at flat index %ld); "
                     "expected finite values", name, (long)where);
        Py_DECREF(conv);
        return NULL;
    }
    return conv;
}

/* Same, for an argument that may be None (returns NULL without an exception then). */
static int optional_input(PyObject *obj, const char *name, int *typenum, int ndim, npy_intp *dims,
                          const char *shape_doc, int finite, PyArrayObject **result) {
    *result = NULL;
    if (obj == NULL || obj == Py_None) return 0;
    *result = input_array(obj, name, typenum, ndim, dims, shape_doc, finite);
    return *result ? 0 : -1;
}

/* [*lo, *hi) spans every byte an array can touch, negative strides included; 0 if it is empty. */
static int byte_extent(PyArrayObject *a, const char **lo, const char **hi) {
    if (PyArray_SIZE(a) == 0) return 0;
    const char *start = PyArray_BYTES(a), *end = start + PyArray_ITEMSIZE(a);
    for (int i = 0; i < PyArray_NDIM(a); i++) {
        const npy_intp reach = PyArray_STRIDE(a, i) * (PyArray_DIM(a, i) - 1);
        if (reach < 0) start += reach;
        else end += reach;
    }
    *lo = start;
    *hi = end;
    return 1;
}

/* Conservative: arrays whose extents intersect may share memory (numpy.may_share_memory). */
static int overlaps(PyArrayObject *a, PyArrayObject *b) {
    const char *a0, *a1, *b0, *b1;
    return byte_extent(a, &a0, &a1) && byte_extent(b, &b0, &b1) && a0 < b1 && b0 < a1;
}

/* Whether arr may share memory with held array i or with the caller's object it came from. */
static int overlaps_held(PyArrayObject *arr, const Hold *h, int i) {
    if (overlaps(arr, h->a[i])) return 1;
    return h->orig[i] != (PyObject *)h->a[i] && PyArray_Check(h->orig[i]) &&
           overlaps(arr, (PyArrayObject *)h->orig[i]);
}

/* An output array: a new one when out is NULL/None, else the caller's out= validated (exact dtype
 * and shape, C-contiguous, writeable, sharing no memory with any input in h). New reference. */
static PyArrayObject *output_array(PyObject *out, const char *name, int typenum, int ndim,
                                   const npy_intp *dims, Hold *inputs) {
    if (out == NULL || out == Py_None)
        return (PyArrayObject *)PyArray_EMPTY(ndim, (npy_intp *)dims, typenum, 0);
    char got[128], want[128];
    if (!PyArray_Check(out)) {
        PyErr_Format(PyExc_TypeError, "argument '%s' must be a numpy.ndarray or None, got %s", name,
                     Py_TYPE(out)->tp_name);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)out;
    format_shape(got, sizeof got, PyArray_NDIM(arr), PyArray_DIMS(arr));
    format_shape(want, sizeof want, ndim, dims);
    if (PyArray_TYPE(arr) != typenum || !PyArray_ISNOTSWAPPED(arr)) {
        PyErr_Format(PyExc_TypeError, "argument '%s' must have dtype %s (native byte order)", name,
                     dtype_name(typenum));
        return NULL;
    }
    if (PyArray_NDIM(arr) != ndim || !PyArray_CompareLists(PyArray_DIMS(arr), (npy_intp *)dims, ndim)) {
        PyErr_Format(PyExc_ValueError, "argument '%s' must have shape %s, got %s", name, want, got);
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(arr) || !PyArray_ISALIGNED(arr) || !PyArray_ISWRITEABLE(arr)) {
        PyErr_Format(PyExc_ValueError, "argument '%s' must be a C-contiguous, aligned, writeable array",
                     name);
        return NULL;
    }
    for (int i = 0; inputs && i < inputs->count; i++)
        if (overlaps_held(arr, inputs, i)) {
            PyErr_Format(PyExc_ValueError, "argument '%s' shares memory with an input; inputs are never "
                         "overwritten, pass a separate array", name);
            return NULL;
        }
    Py_INCREF(arr);
    return arr;
}

static PyArrayObject *new_array(int typenum, int ndim, const npy_intp *dims) {
    return (PyArrayObject *)PyArray_EMPTY(ndim, (npy_intp *)dims, typenum, 0);
}

/* PyErr_Format has no %g, hence the snprintf */
static int check_scalar(double v, const char *name, int strictly_positive) {
    if ((strictly_positive ? v > 0 : v >= 0) && isfinite(v)) return 0;
    char msg[256];
    snprintf(msg, sizeof msg, "%s must be a finite number %s 0, got %g", name, strictly_positive ? ">" : ">=", v);
    PyErr_SetString(PyExc_ValueError, msg);
    return -1;
}
#define check_gamma(v, name) check_scalar((v), (name), 1)
#define check_nonneg(v, name) check_scalar((v), (name), 0)

static int check_batch(npy_intp B, const char *name) {
    if (B < 1) {
        PyErr_Format(PyExc_ValueError, "argument '%s' has an empty batch (B = 0); expected at least one "
                     "example", name);
        return -1;
    }
    return 0;
}

/* m = ceil(log2 n): bits of the binary code of n experts. n must be >= 2. */
static int n_bits(npy_intp n) {
    int m = 0;
    while (((npy_intp)1 << m) < n) m++;
    return m;
}

static int check_n(npy_intp n) {
    if (n < 2) {
        PyErr_Format(PyExc_ValueError, "n (the number of experts) must be >= 2, got %ld", (long)n);
        return -1;
    }
    if (n > ((npy_intp)1 << DSK_MAX_BITS)) {
        PyErr_Format(PyExc_ValueError, "n (the number of experts) must be <= 2**%d, got %ld", DSK_MAX_BITS,
                     (long)n);
        return -1;
    }
    return 0;
}

static int check_k(npy_intp k, npy_intp n, const char *what) {
    if (k < 1 || k > n) {
        PyErr_Format(PyExc_ValueError, "k (%s) must satisfy 1 <= k <= n = %ld, got k = %ld", what,
                     (long)n, (long)k);
        return -1;
    }
    return 0;
}

/* The BLAS of openblas32 takes 32-bit ints. */
static int check_blas_dims(npy_intp a, npy_intp b, npy_intp c) {
    if (a > INT_MAX || b > INT_MAX || c > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "a dimension exceeds 2**31 - 1, the limit of the 32-bit BLAS");
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Smooth-step
 */
PyDoc_STRVAR(smooth_step_forward_doc,
"smooth_step_forward(t, gamma, out=None) -> s\n\n"
"S(t; gamma) elementwise for a 1-D array t (Section 3.1.3).");

static PyObject *py_smooth_step_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"t", "gamma", "out", NULL};
    PyObject *t_obj, *out_obj = NULL, *result = NULL;
    double gamma;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Od|O", kwlist, &t_obj, &gamma, &out_obj)) return NULL;
    if (check_gamma(gamma, "gamma") < 0) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp dims[1] = {-1};
    PyArrayObject *t = hold_from(&h, t_obj, input_array(t_obj, "t", &tn, 1, dims, "(N,)", 1));
    if (!t) goto done;
    PyArrayObject *s = hold(&h, output_array(out_obj, "out", tn, 1, dims, &h));
    if (!s) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, smooth_step_forward, DATA(s), DATA(t), (long)dims[0], gamma);
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)s);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(smooth_step_backward_doc,
"smooth_step_backward(dout, t, gamma) -> dt\n\n"
"dt = dout * S'(t; gamma) for 1-D arrays.");

static PyObject *py_smooth_step_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dout", "t", "gamma", NULL};
    PyObject *dout_obj, *t_obj, *result = NULL;
    double gamma;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOd", kwlist, &dout_obj, &t_obj, &gamma)) return NULL;
    if (check_gamma(gamma, "gamma") < 0) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp dims[1] = {-1};
    PyArrayObject *dout = hold_from(&h, dout_obj, input_array(dout_obj, "dout", &tn, 1, dims, "(N,)", 1));
    if (!dout) goto done;
    PyArrayObject *t = hold_from(&h, t_obj, input_array(t_obj, "t", &tn, 1, dims, "(N,)", 1));
    if (!t) goto done;
    PyArrayObject *dt = hold(&h, new_array(tn, 1, dims));
    if (!dt) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, smooth_step_backward, DATA(dt), DATA(dout), DATA(t), (long)dims[0], gamma);
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)dt);
done:
    release(&h);
    return result;
}

/* ---------------------------------------------------------------------------------------------
 * Single-expert selector
 */
PyDoc_STRVAR(selector_forward_doc,
"selector_forward(s, n, out=None) -> r\n\n"
"Single-expert selector r(s) of eq. (4) for each row of s (R, m), m = ceil(log2 n); r is (R, n).\n"
"s[:, 0] is the least significant bit; codes n..2**m-1 are dropped.");

static PyObject *py_selector_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"s", "n", "out", NULL};
    PyObject *s_obj, *out_obj = NULL, *result = NULL;
    Py_ssize_t n;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "On|O", kwlist, &s_obj, &n, &out_obj)) return NULL;
    if (check_n(n) < 0) return NULL;
    const int m = n_bits(n);
    int tn = NPY_NOTYPE;
    npy_intp sdims[2] = {-1, m};
    PyArrayObject *s = hold_from(&h, s_obj, input_array(s_obj, "s", &tn, 2, sdims, "(R, m), m = ceil(log2 n)", 1));
    if (!s) goto done;
    npy_intp rdims[2] = {sdims[0], n};
    PyArrayObject *r = hold(&h, output_array(out_obj, "out", tn, 2, rdims, &h));
    if (!r) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, selector_forward, DATA(r), DATA(s), (long)sdims[0], m, (long)n);
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)r);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(selector_backward_doc,
"selector_backward(dr, s, n) -> ds\n\n"
"Gradient ds (R, m) of <dr, r(s)> for dr (R, n), s (R, m).");

static PyObject *py_selector_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dr", "s", "n", NULL};
    PyObject *dr_obj, *s_obj, *result = NULL;
    Py_ssize_t n;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOn", kwlist, &dr_obj, &s_obj, &n)) return NULL;
    if (check_n(n) < 0) return NULL;
    const int m = n_bits(n);
    int tn = NPY_NOTYPE;
    npy_intp rdims[2] = {-1, n}, sdims[2] = {-1, m};
    PyArrayObject *dr = hold_from(&h, dr_obj, input_array(dr_obj, "dr", &tn, 2, rdims, "(R, n)", 1));
    if (!dr) goto done;
    sdims[0] = rdims[0];
    PyArrayObject *s = hold_from(&h, s_obj, input_array(s_obj, "s", &tn, 2, sdims, "(R, m), m = ceil(log2 n)", 1));
    if (!s) goto done;
    PyArrayObject *ds = hold(&h, new_array(tn, 2, sdims));
    if (!ds) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, selector_backward, DATA(ds), DATA(dr), DATA(s), (long)sdims[0], m, (long)n);
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)ds);
done:
    release(&h);
    return result;
}

/* ---------------------------------------------------------------------------------------------
 * DSelect-k
 */
PyDoc_STRVAR(dselect_k_forward_doc,
"dselect_k_forward(alpha, Z, n, gamma, out=None) -> (w, sigma, sz, r)\n\n"
"DSelect-k on logits, eq. (6), for a batch: alpha (B, k), Z (B, k, m), m = ceil(log2 n).\n"
"w (B, n) are the expert weights; sigma = softmax(alpha) (B, k), sz = S(Z) (B, k, m) and the\n"
"selector outputs r (B, k, n) are the cache dselect_k_backward needs. The static gate is B = 1.");

static PyObject *py_dselect_k_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"alpha", "Z", "n", "gamma", "out", NULL};
    PyObject *alpha_obj, *Z_obj, *out_obj = NULL, *result = NULL;
    Py_ssize_t n;
    double gamma;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOnd|O", kwlist, &alpha_obj, &Z_obj, &n, &gamma, &out_obj))
        return NULL;
    if (check_n(n) < 0 || check_gamma(gamma, "gamma") < 0) return NULL;
    const int m = n_bits(n);
    int tn = NPY_NOTYPE;
    npy_intp adims[2] = {-1, -1};
    PyArrayObject *alpha = hold_from(&h, alpha_obj, input_array(alpha_obj, "alpha", &tn, 2, adims, "(B, k)", 1));
    if (!alpha) goto done;
    const npy_intp B = adims[0], k = adims[1];
    if (check_batch(B, "alpha") < 0 || check_k(k, n, "alpha.shape[1], the number of selectors") < 0) goto done;
    npy_intp zdims[3] = {B, k, m};
    PyArrayObject *Z = hold_from(&h, Z_obj, input_array(Z_obj, "Z", &tn, 3, zdims, "(B, k, m), m = ceil(log2 n)", 1));
    if (!Z) goto done;
    npy_intp wdims[2] = {B, n}, rdims[3] = {B, k, n};
    PyArrayObject *w = hold(&h, output_array(out_obj, "out", tn, 2, wdims, &h));
    PyArrayObject *sigma = hold(&h, new_array(tn, 2, adims));
    PyArrayObject *sz = hold(&h, new_array(tn, 3, zdims));
    PyArrayObject *r = hold(&h, new_array(tn, 3, rdims));
    if (!w || !sigma || !sz || !r) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, dselect_k_forward, DATA(w), DATA(sigma), DATA(sz), DATA(r), DATA(alpha), DATA(Z),
             (long)B, (int)k, m, (long)n, gamma);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OOOO)", w, sigma, sz, r);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(dselect_k_backward_doc,
"dselect_k_backward(dw, sigma, sz, r, Z, gamma, lam=0.0, xi=0.0, eps=1e-6) -> (dalpha, dZ)\n\n"
"Gradients of <dw, w> + lam * mean_b Omega_b + xi * mean_b sum_i 1/(eps + sum_{j<n} r_bij) with\n"
"respect to alpha (B, k) and Z (B, k, m). dw (B, n) may be None (regularizers only);\n"
"sigma, sz, r come from dselect_k_forward. Omega_b = sum_i h(r_bi), h(r) = -sum_j r_j log(r_j + eps).");

static PyObject *py_dselect_k_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dw", "sigma", "sz", "r", "Z", "gamma", "lam", "xi", "eps", NULL};
    PyObject *dw_obj, *sigma_obj, *sz_obj, *r_obj, *Z_obj, *result = NULL;
    double gamma, lam = 0, xi = 0, eps = 1e-6;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOd|ddd", kwlist, &dw_obj, &sigma_obj, &sz_obj, &r_obj,
                                     &Z_obj, &gamma, &lam, &xi, &eps))
        return NULL;
    if (check_gamma(gamma, "gamma") < 0 || check_nonneg(lam, "lam") < 0 || check_nonneg(xi, "xi") < 0 ||
        check_gamma(eps, "eps") < 0)
        return NULL;
    int tn = NPY_NOTYPE;
    npy_intp rdims[3] = {-1, -1, -1};
    PyArrayObject *r = hold_from(&h, r_obj, input_array(r_obj, "r", &tn, 3, rdims, "(B, k, n)", 0));
    if (!r) goto done;
    const npy_intp B = rdims[0], k = rdims[1], n = rdims[2];
    if (check_batch(B, "r") < 0 || check_n(n) < 0 || check_k(k, n, "r.shape[1]") < 0) goto done;
    const int m = n_bits(n);
    npy_intp sdims[2] = {B, k}, zdims[3] = {B, k, m}, wdims[2] = {B, n};
    PyArrayObject *dw = NULL, *sigma, *sz, *Z;
    if (optional_input(dw_obj, "dw", &tn, 2, wdims, "(B, n)", 1, &dw) < 0) goto done;
    hold_from(&h, dw_obj, dw);
    if (!(sigma = hold_from(&h, sigma_obj, input_array(sigma_obj, "sigma", &tn, 2, sdims, "(B, k)", 0)))) goto done;
    if (!(sz = hold_from(&h, sz_obj, input_array(sz_obj, "sz", &tn, 3, zdims, "(B, k, m)", 0)))) goto done;
    if (!(Z = hold_from(&h, Z_obj, input_array(Z_obj, "Z", &tn, 3, zdims, "(B, k, m)", 1)))) goto done;
    PyArrayObject *dalpha = hold(&h, new_array(tn, 2, sdims));
    PyArrayObject *dZ = hold(&h, new_array(tn, 3, zdims));
    if (!dalpha || !dZ) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, dselect_k_backward, DATA(dalpha), DATA(dZ), OPTDATA(dw), DATA(sigma), DATA(sz), DATA(r),
             DATA(Z), (long)B, (int)k, m, (long)n, gamma, lam, xi, eps);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OO)", dalpha, dZ);
done:
    release(&h);
    return result;
}

/* selector_entropy / selector_mass_penalty share everything but the kernel */
static PyObject *selector_reduction(PyObject *args, PyObject *kw, int which) {
    static char *kwlist[] = {"r", "eps", NULL};
    PyObject *r_obj, *result = NULL;
    double eps = 1e-6, value = 0;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|d", kwlist, &r_obj, &eps)) return NULL;
    if (check_gamma(eps, "eps") < 0) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp dims[2] = {-1, -1};
    PyArrayObject *r = hold_from(&h, r_obj, input_array(r_obj, "r", &tn, 2, dims, "(R, n)", 1));
    if (!r) goto done;
    Py_BEGIN_ALLOW_THREADS
    if (tn == NPY_FLOAT)
        value = which ? selector_mass_penalty_f32(DATA(r), (long)dims[0], (long)dims[1], eps)
                      : selector_entropy_f32(DATA(r), (long)dims[0], (long)dims[1], eps);
    else
        value = which ? selector_mass_penalty_f64(DATA(r), (long)dims[0], (long)dims[1], eps)
                      : selector_entropy_f64(DATA(r), (long)dims[0], (long)dims[1], eps);
    Py_END_ALLOW_THREADS
    result = PyFloat_FromDouble(value);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(selector_entropy_doc,
"selector_entropy(r, eps=1e-6) -> float\n\n"
"Sum over the rows of r (R, n) of h(r_row) = -sum_j r_j log(r_j + eps) (natural log).");
static PyObject *py_selector_entropy(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    return selector_reduction(args, kw, 0);
}

PyDoc_STRVAR(selector_mass_penalty_doc,
"selector_mass_penalty(r, eps=1e-6) -> float\n\n"
"Sum over the rows of r (R, n) of 1 / (eps + sum_j r_j) (Appendix B.2, without xi).");
static PyObject *py_selector_mass_penalty(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    return selector_reduction(args, kw, 1);
}

/* ---------------------------------------------------------------------------------------------
 * Softmax and Top-k
 */
PyDoc_STRVAR(softmax_forward_doc,
"softmax_forward(logits, out=None) -> w\n\nRow-wise softmax of logits (B, n).");
PyDoc_STRVAR(topk_forward_doc,
"topk_forward(logits, k, out=None) -> w\n\n"
"softmax(KeepTopK(logits, k)) row-wise for logits (B, n): the k largest entries keep their\n"
"softmax mass, the others are exactly 0. Ties go to the lower index.");

/* softmax_forward (k == 0) and topk_forward share argument handling */
static PyObject *logits_gate(PyObject *args, PyObject *kw, int topk) {
    static char *kwlist_sm[] = {"logits", "out", NULL};
    static char *kwlist_tk[] = {"logits", "k", "out", NULL};
    PyObject *l_obj, *out_obj = NULL, *result = NULL;
    Py_ssize_t k = 0;
    Hold h = {0};
    if (topk ? !PyArg_ParseTupleAndKeywords(args, kw, "On|O", kwlist_tk, &l_obj, &k, &out_obj)
             : !PyArg_ParseTupleAndKeywords(args, kw, "O|O", kwlist_sm, &l_obj, &out_obj))
        return NULL;
    int tn = NPY_NOTYPE;
    npy_intp dims[2] = {-1, -1};
    PyArrayObject *logits = hold_from(&h, l_obj, input_array(l_obj, "logits", &tn, 2, dims, "(B, n)", 1));
    if (!logits) goto done;
    if (check_batch(dims[0], "logits") < 0) goto done;
    if (dims[1] < 1) {
        PyErr_SetString(PyExc_ValueError, "argument 'logits' must have at least one column (n >= 1)");
        goto done;
    }
    if (topk && check_k(k, dims[1], "the number of experts kept") < 0) goto done;
    PyArrayObject *w = hold(&h, output_array(out_obj, "out", tn, 2, dims, &h));
    if (!w) goto done;
    Py_BEGIN_ALLOW_THREADS
    if (topk) DISPATCH(tn, topk_forward, DATA(w), DATA(logits), (long)dims[0], (long)dims[1], (long)k);
    else DISPATCH(tn, softmax_forward, DATA(w), DATA(logits), (long)dims[0], (long)dims[1]);
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)w);
done:
    release(&h);
    return result;
}

static PyObject *py_softmax_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    return logits_gate(args, kw, 0);
}
static PyObject *py_topk_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    return logits_gate(args, kw, 1);
}

PyDoc_STRVAR(softmax_backward_doc,
"softmax_backward(dw, w) -> dlogits\n\n"
"dlogits = w * (dw - <w, dw>) row-wise; dw, w (B, n). Also the Top-k backward (w from topk_forward):\n"
"entries outside the top k have w = 0 and receive no gradient.");

static PyObject *py_softmax_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dw", "w", NULL};
    PyObject *dw_obj, *w_obj, *result = NULL;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO", kwlist, &dw_obj, &w_obj)) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp dims[2] = {-1, -1};
    PyArrayObject *dw = hold_from(&h, dw_obj, input_array(dw_obj, "dw", &tn, 2, dims, "(B, n)", 1));
    if (!dw) goto done;
    if (check_batch(dims[0], "dw") < 0) goto done;
    PyArrayObject *w = hold_from(&h, w_obj, input_array(w_obj, "w", &tn, 2, dims, "(B, n)", 1));
    if (!w) goto done;
    PyArrayObject *dl = hold(&h, new_array(tn, 2, dims));
    if (!dl) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, softmax_backward, DATA(dl), DATA(dw), DATA(w), (long)dims[0], (long)dims[1]);
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)dl);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(noisy_logits_forward_doc,
"noisy_logits_forward(clean, raw_noise, normal) -> h\n\n"
"Noisy Top-k logits h = clean + normal * softplus(raw_noise); all 1-D of one length.");
PyDoc_STRVAR(noisy_logits_backward_doc,
"noisy_logits_backward(dh, raw_noise, normal) -> draw\n\n"
"draw = dh * normal * sigmoid(raw_noise); the gradient to clean is dh itself.");

static PyObject *noisy_logits(PyObject *args, PyObject *kw, int backward) {
    static char *kwlist_f[] = {"clean", "raw_noise", "normal", NULL};
    static char *kwlist_b[] = {"dh", "raw_noise", "normal", NULL};
    PyObject *a_obj, *raw_obj, *normal_obj, *result = NULL;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO", backward ? kwlist_b : kwlist_f, &a_obj, &raw_obj,
                                     &normal_obj))
        return NULL;
    int tn = NPY_NOTYPE;
    npy_intp dims[1] = {-1};
    PyArrayObject *a = hold_from(&h, a_obj, input_array(a_obj, backward ? "dh" : "clean", &tn, 1, dims, "(N,)", 1));
    if (!a) goto done;
    PyArrayObject *raw = hold_from(&h, raw_obj, input_array(raw_obj, "raw_noise", &tn, 1, dims, "(N,)", 1));
    if (!raw) goto done;
    PyArrayObject *normal = hold_from(&h, normal_obj, input_array(normal_obj, "normal", &tn, 1, dims, "(N,)", 1));
    if (!normal) goto done;
    PyArrayObject *o = hold(&h, new_array(tn, 1, dims));
    if (!o) goto done;
    Py_BEGIN_ALLOW_THREADS
    if (backward) DISPATCH(tn, noisy_logits_backward, DATA(o), DATA(a), DATA(raw), DATA(normal), (long)dims[0]);
    else DISPATCH(tn, noisy_logits_forward, DATA(o), DATA(a), DATA(raw), DATA(normal), (long)dims[0]);
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)o);
done:
    release(&h);
    return result;
}

static PyObject *py_noisy_logits_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    return noisy_logits(args, kw, 0);
}
static PyObject *py_noisy_logits_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    return noisy_logits(args, kw, 1);
}

/* ---------------------------------------------------------------------------------------------
 * Softmax-selector ablation gate (Appendix C.2)
 */
PyDoc_STRVAR(softmax_selector_forward_doc,
"softmax_selector_forward(alpha, beta, T) -> (w, sigma, P)\n\n"
"Ablation gate w = sum_i softmax(alpha)_i softmax(beta_i / T); alpha (B, k), beta (B, k, n), T > 0.\n"
"sigma (B, k) and P (B, k, n) are the cache for the backward.");

static PyObject *py_softmax_selector_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"alpha", "beta", "T", NULL};
    PyObject *alpha_obj, *beta_obj, *result = NULL;
    double T;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOd", kwlist, &alpha_obj, &beta_obj, &T)) return NULL;
    if (check_gamma(T, "T (the temperature)") < 0) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp adims[2] = {-1, -1};
    PyArrayObject *alpha = hold_from(&h, alpha_obj, input_array(alpha_obj, "alpha", &tn, 2, adims, "(B, k)", 1));
    if (!alpha) goto done;
    if (check_batch(adims[0], "alpha") < 0) goto done;
    npy_intp bdims[3] = {adims[0], adims[1], -1};
    PyArrayObject *beta = hold_from(&h, beta_obj, input_array(beta_obj, "beta", &tn, 3, bdims, "(B, k, n)", 1));
    if (!beta) goto done;
    const npy_intp B = adims[0], k = adims[1], n = bdims[2];
    if (check_n(n) < 0 || check_k(k, n, "alpha.shape[1], the number of selectors") < 0) goto done;
    npy_intp wdims[2] = {B, n};
    PyArrayObject *w = hold(&h, new_array(tn, 2, wdims));
    PyArrayObject *sigma = hold(&h, new_array(tn, 2, adims));
    PyArrayObject *P = hold(&h, new_array(tn, 3, bdims));
    if (!w || !sigma || !P) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, softmax_selector_forward, DATA(w), DATA(sigma), DATA(P), DATA(alpha), DATA(beta), (long)B,
             (int)k, (long)n, T);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OOO)", w, sigma, P);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(softmax_selector_backward_doc,
"softmax_selector_backward(dw, sigma, P, T, lam=0.0, eps=1e-6) -> (dalpha, dbeta)\n\n"
"Gradients of <dw, w> + lam * mean_b sum_i h(P_bi) for the ablation gate; dw (B, n) may be None.");

static PyObject *py_softmax_selector_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dw", "sigma", "P", "T", "lam", "eps", NULL};
    PyObject *dw_obj, *sigma_obj, *P_obj, *result = NULL;
    double T, lam = 0, eps = 1e-6;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOd|dd", kwlist, &dw_obj, &sigma_obj, &P_obj, &T, &lam, &eps))
        return NULL;
    if (check_gamma(T, "T (the temperature)") < 0 || check_nonneg(lam, "lam") < 0 || check_gamma(eps, "eps") < 0)
        return NULL;
    int tn = NPY_NOTYPE;
    npy_intp pdims[3] = {-1, -1, -1};
    PyArrayObject *P = hold_from(&h, P_obj, input_array(P_obj, "P", &tn, 3, pdims, "(B, k, n)", 0));
    if (!P) goto done;
    const npy_intp B = pdims[0], k = pdims[1], n = pdims[2];
    if (check_batch(B, "P") < 0 || check_n(n) < 0 || check_k(k, n, "P.shape[1]") < 0) goto done;
    npy_intp sdims[2] = {B, k}, wdims[2] = {B, n};
    PyArrayObject *dw = NULL, *sigma;
    if (optional_input(dw_obj, "dw", &tn, 2, wdims, "(B, n)", 1, &dw) < 0) goto done;
    hold_from(&h, dw_obj, dw);
    if (!(sigma = hold_from(&h, sigma_obj, input_array(sigma_obj, "sigma", &tn, 2, sdims, "(B, k)", 0)))) goto done;
    PyArrayObject *dalpha = hold(&h, new_array(tn, 2, sdims));
    PyArrayObject *dbeta = hold(&h, new_array(tn, 3, pdims));
    if (!dalpha || !dbeta) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, softmax_selector_backward, DATA(dalpha), DATA(dbeta), OPTDATA(dw), DATA(sigma), DATA(P),
             (long)B, (int)k, (long)n, T, lam, eps);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OO)", dalpha, dbeta);
done:
    release(&h);
    return result;
}

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
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|spO", kwlist, &f_obj, &w_obj, &layout, &skip_zero, &out_obj))
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
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|sp", kwlist, &dy_obj, &f_obj, &w_obj, &layout, &skip_zero))
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
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|pO", kwlist, &f_obj, &w_obj, &skip_zero, &out_obj))
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
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|pp", kwlist, &dy_obj, &f_obj, &w_obj, &skip_zero, &relu_mask))
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
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OOp", kwlist, &x_obj, &W_obj, &b_obj, &out_obj, &relu)) return NULL;
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
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|pp", kwlist, &dy_obj, &x_obj, &W_obj, &need_dx, &need_db))
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

/* ---------------------------------------------------------------------------------------------
 * Layers, dropout, losses and optimizer steps (csrc/nn.h, csrc/optim.h)
 */

/* An array the call updates in place (an accumulated gradient, a parameter slab, an optimizer
 * state): never copied, so it must already be a C-contiguous, aligned, writeable, native-order
 * ndarray of the call's dtype (*typenum as in input_array) and shape (entries of dims < 0 are
 * free and are filled in), sharing no memory with any array in others. New reference, or NULL
 * with an exception set. */
static PyArrayObject *inplace_array(PyObject *obj, const char *name, int *typenum, int ndim, npy_intp *dims,
                                    const char *shape_doc, Hold *others, int finite) {
    char got[128], want[128];
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "argument '%s' must be a numpy.ndarray of float32 or float64 (it is "
                     "updated in place), got %s", name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    const int tn = PyArray_TYPE(arr);
    if (*typenum == NPY_NOTYPE && tn != NPY_FLOAT && tn != NPY_DOUBLE) {
        PyErr_Format(PyExc_TypeError, "argument '%s' must have dtype float32 or float64, got %s", name,
                     PyArray_DESCR(arr)->typeobj->tp_name);
        return NULL;
    }
    if (*typenum != NPY_NOTYPE && tn != *typenum) {
        PyErr_Format(PyExc_TypeError,
                     "argument '%s' has dtype %s, expected %s like the other arrays of this call "
                     "(all arrays must share one dtype: float32 or float64)",
                     name, tn == NPY_FLOAT || tn == NPY_DOUBLE ? dtype_name(tn)
                                                               : PyArray_DESCR(arr)->typeobj->tp_name,
                     dtype_name(*typenum));
        return NULL;
    }
    if (!PyArray_ISNOTSWAPPED(arr)) {
        PyErr_Format(PyExc_TypeError, "argument '%s' must be in native byte order (it is updated in place)", name);
        return NULL;
    }
    format_shape(got, sizeof got, PyArray_NDIM(arr), PyArray_DIMS(arr));
    if (PyArray_NDIM(arr) != ndim) {
        PyErr_Format(PyExc_ValueError, "argument '%s' must be %d-D with shape %s, got shape %s", name, ndim,
                     shape_doc, got);
        return NULL;
    }
    for (int i = 0; i < ndim; i++) {
        if (dims[i] >= 0 && PyArray_DIM(arr, i) != dims[i]) {
            npy_intp shown[NPY_MAXDIMS];
            for (int j = 0; j < ndim; j++) shown[j] = dims[j] >= 0 ? dims[j] : PyArray_DIM(arr, j);
            format_shape(want, sizeof want, ndim, shown);
            PyErr_Format(PyExc_ValueError, "argument '%s' must have shape %s = %s, got %s", name, shape_doc,
                         want, got);
            return NULL;
        }
    }
    if (!PyArray_IS_C_CONTIGUOUS(arr) || !PyArray_ISALIGNED(arr) || !PyArray_ISWRITEABLE(arr)) {
        PyErr_Format(PyExc_ValueError, "argument '%s' must be a C-contiguous, aligned, writeable array: it is "
                     "updated in place, so it cannot be copied", name);
        return NULL;
    }
    for (int i = 0; others && i < others->count; i++)
        if (overlaps_held(arr, others, i)) {
            PyErr_Format(PyExc_ValueError, "argument '%s' shares memory with another array argument of this "
                         "call; pass separate arrays", name);
            return NULL;
        }
    npy_intp where;
    if (finite && finite_checks_on && first_nonfinite(arr, &where)) {
        PyErr_Format(PyExc_ValueError, "argument '%s' contains NaN or Inf (first at flat index %ld); "
                     "expected finite values", name, (long)where);
        return NULL;
    }
    *typenum = tn;
    for (int i = 0; i < ndim; i++) dims[i] = PyArray_DIM(arr, i);
    Py_INCREF(arr);
    return arr;
}

/* An integer argument in [minimum, maximum] (seeds, step counters): a Python int or anything with
 * __index__ (numpy integers), not a bool or a float. */
static int parse_count(PyObject *obj, const char *name, unsigned long long minimum, unsigned long long maximum,
                       unsigned long long *value) {
    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an integer, got %s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyObject *i = PyNumber_Index(obj);
    if (!i) return -1;
    int overflow = 0, ok = 0;
    const long long s = PyLong_AsLongLongAndOverflow(i, &overflow);
    if (s == -1 && !overflow && PyErr_Occurred()) {
        Py_DECREF(i);
        return -1;
    }
    if (overflow == 0 && s >= 0) {
        *value = (unsigned long long)s;
        ok = 1;
    } else if (overflow > 0) {
        *value = PyLong_AsUnsignedLongLong(i);
        if (PyErr_Occurred()) PyErr_Clear(); /* > 2**64 - 1: reported below */
        else ok = 1;
    }
    if (!ok || *value < minimum || *value > maximum) {
        PyErr_Format(PyExc_ValueError, "%s must be an integer in [%llu, %llu], got %S", name, minimum, maximum, i);
        Py_DECREF(i);
        return -1;
    }
    Py_DECREF(i);
    return 0;
}

/* A probability-like scalar in [0, 1): dropout rate, Adam's betas. */
static int check_unit(double v, const char *name) {
    if (v >= 0 && v < 1) return 0; /* false for NaN */
    char msg[256];
    snprintf(msg, sizeof msg, "%s must be a finite number in [0, 1), got %g", name, v);
    PyErr_SetString(PyExc_ValueError, msg);
    return -1;
}

/* Every value of a (finite, C-contiguous) array in [lo, hi]; names the first that is not. */
static int check_range(PyArrayObject *a, const char *name, double lo, double hi, const char *expected) {
    const npy_intp size = PyArray_SIZE(a);
    for (npy_intp i = 0; i < size; i++) {
        const double v = PyArray_TYPE(a) == NPY_FLOAT ? (double)((const float *)DATA(a))[i]
                                                       : ((const double *)DATA(a))[i];
        if (v < lo || v > hi) {
            char msg[256];
            snprintf(msg, sizeof msg, "argument '%s' must hold values %s, got %s[%ld] = %g", name, expected, name,
                     (long)i, v);
            PyErr_SetString(PyExc_ValueError, msg);
            return -1;
        }
    }
    return 0;
}

/* Per-example loss weights (B,): optional, finite and >= 0. */
static int loss_weights(PyObject *obj, int *tn, npy_intp B, Hold *h, PyArrayObject **w) {
    npy_intp dims[1] = {B};
    if (optional_input(obj, "weights", tn, 1, dims, "(B,)", 1, w) < 0) return -1;
    hold(h, *w);
    return *w ? check_range(*w, "weights", 0, HUGE_VAL, ">= 0") : 0;
}

PyDoc_STRVAR(dense_forward_doc,
"dense_forward(x, W, b=None, out=None, relu=False) -> y\n\n"
"y (B, o) = x (B, p) W (p, o) + b (o,); b may be None. W is (in, out), unlike linear_forward's\n"
"(out, in). One SGEMM/DGEMM of the vendored OpenBLAS. relu=True returns max(y, 0) instead, applied\n"
"in place while y is still in cache (exactly relu_forward(dense_forward(x, W, b))).");

static PyObject *py_dense_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "W", "b", "out", "relu", NULL};
    PyObject *x_obj, *W_obj, *b_obj = NULL, *out_obj = NULL, *result = NULL;
    int relu = 0;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OOp", kwlist, &x_obj, &W_obj, &b_obj, &out_obj, &relu)) return NULL;
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
    npy_intp ydims[2] = {xdims[0], wdims[1]};
    PyArrayObject *y = hold(&h, output_array(out_obj, "out", tn, 2, ydims, &h));
    if (!y) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, dense_forward, DATA(y), DATA(x), DATA(W), OPTDATA(b), (int)xdims[0], (int)xdims[1], (int)wdims[1]);
    if (relu) DISPATCH(tn, relu_forward, DATA(y), DATA(y), (long)PyArray_SIZE(y));
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)y);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(dense_backward_doc,
"dense_backward(dy, x, W, dW, db=None, need_dx=True) -> dx or None\n\n"
"Backward of dense_forward for dy (B, o), x (B, p), W (p, o). ACCUMULATES in place:\n"
"dW (p, o) += x^T dy and db (o,) += dy summed over the batch (skipped when db is None); dW and db\n"
"must be C-contiguous, writeable arrays of the call's dtype and exact shape that share no memory\n"
"with the inputs (they are never copied). Returns dx = dy W^T (B, p), or None unless need_dx.");

static PyObject *py_dense_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dy", "x", "W", "dW", "db", "need_dx", NULL};
    PyObject *dy_obj, *x_obj, *W_obj, *dW_obj, *db_obj = Py_None, *result = NULL;
    int need_dx = 1;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|Op", kwlist, &dy_obj, &x_obj, &W_obj, &dW_obj, &db_obj,
                                     &need_dx))
        return NULL;
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
    if (need_dx && !(dx = hold(&h, new_array(tn, 2, xdims)))) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, dense_backward, OPTDATA(dx), DATA(dW), OPTDATA(db), DATA(dy), DATA(x), DATA(W), (int)xdims[0],
             (int)xdims[1], (int)wdims[1]);
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
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O", kwlist, &x_obj, &out_obj)) return NULL;
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
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO", kwlist, &dy_obj, &y_obj)) return NULL;
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
"dropout_forward(x, rate, seed, step, training=True) -> y\n\n"
"Inverted dropout of a 1-D x: each entry is kept with probability 1 - rate and scaled by\n"
"1 / (1 - rate). The mask is a counter-based hash of (seed, step, flat index) (csrc/nn.h): not\n"
"stored, the same in dropout_backward, independent of the thread count. 0 <= rate < 1; seed and\n"
"step are integers in [0, 2**64 - 1]. training=False or rate == 0 returns a copy of x.");
PyDoc_STRVAR(dropout_backward_doc,
"dropout_backward(dy, rate, seed, step, training=True) -> dx\n\n"
"dx = dy * mask / (1 - rate) with the mask of dropout_forward(x, rate, seed, step, training).");

static PyObject *dropout(PyObject *args, PyObject *kw, int backward) {
    static char *kwlist_f[] = {"x", "rate", "seed", "step", "training", NULL};
    static char *kwlist_b[] = {"dy", "rate", "seed", "step", "training", NULL};
    PyObject *x_obj, *seed_obj, *step_obj, *result = NULL;
    double rate;
    int training = 1;
    unsigned long long seed, step;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OdOO|p", backward ? kwlist_b : kwlist_f, &x_obj, &rate, &seed_obj,
                                     &step_obj, &training))
        return NULL;
    if (check_unit(rate, "rate (the dropout probability)") < 0 ||
        parse_count(seed_obj, "seed", 0, UINT64_MAX, &seed) < 0 ||
        parse_count(step_obj, "step", 0, UINT64_MAX, &step) < 0)
        return NULL;
    int tn = NPY_NOTYPE;
    npy_intp dims[1] = {-1};
    PyArrayObject *x = hold_from(&h, x_obj, input_array(x_obj, backward ? "dy" : "x", &tn, 1, dims, "(N,)", 1));
    if (!x) goto done;
    PyArrayObject *y = hold(&h, new_array(tn, 1, dims));
    if (!y) goto done;
    const double r = training ? rate : 0;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, dropout_forward, DATA(y), DATA(x), (long)dims[0], r, (uint64_t)seed, (uint64_t)step);
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
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O", kwlist, &z_obj, &t_obj, &w_obj)) return NULL;
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
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O", kwlist, &p_obj, &t_obj, &w_obj)) return NULL;
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

/* Integer indices (embedding ids and rows, class labels, pooling argmaxes; `what` names them in
 * messages): an ndarray of any integer dtype (not bool) of ndim dimensions (dims as in
 * input_array), every value in [0, V) (V_doc says where V comes from, for messages).
 * Returned as a C-contiguous native int32 array when it is a 32-bit signed array and allow32 is
 * set, else as int64 (unsigned values are checked before they are cast). New reference, or NULL
 * naming the first bad value and its position. */
static void format_position(char *buf, size_t size, int ndim, const npy_intp *dims, npy_intp flat) {
    if (ndim == 2) snprintf(buf, size, "[%ld, %ld]", (long)(flat / dims[1]), (long)(flat % dims[1]));
    else snprintf(buf, size, "[%ld]", (long)flat);
}

static int64_t index_at(PyArrayObject *a, npy_intp i) {
    return PyArray_ITEMSIZE(a) == 4 ? (int64_t)((const int32_t *)DATA(a))[i] : ((const int64_t *)DATA(a))[i];
}

static PyArrayObject *index_array(PyObject *obj, const char *name, const char *what, int ndim, npy_intp *dims,
                                  const char *shape_doc, npy_intp V, const char *V_doc, int allow32) {
    char got[128], want[128], where[64];
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "argument '%s' must be a numpy.ndarray of integer %s, got %s", name, what,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    if (!PyArray_ISINTEGER(arr)) {
        PyErr_Format(PyExc_TypeError, "argument '%s' must have an integer dtype (%s), got %s", name, what,
                     PyArray_DESCR(arr)->typeobj->tp_name);
        return NULL;
    }
    format_shape(got, sizeof got, PyArray_NDIM(arr), PyArray_DIMS(arr));
    if (PyArray_NDIM(arr) != ndim) {
        PyErr_Format(PyExc_ValueError, "argument '%s' must be %d-D with shape %s, got shape %s", name, ndim,
                     shape_doc, got);
        return NULL;
    }
    for (int i = 0; i < ndim; i++) {
        if (dims[i] >= 0 && PyArray_DIM(arr, i) != dims[i]) {
            npy_intp shown[NPY_MAXDIMS];
            for (int j = 0; j < ndim; j++) shown[j] = dims[j] >= 0 ? dims[j] : PyArray_DIM(arr, j);
            format_shape(want, sizeof want, ndim, shown);
            PyErr_Format(PyExc_ValueError, "argument '%s' must have shape %s = %s, got %s", name, shape_doc, want,
                         got);
            return NULL;
        }
    }
    for (int i = 0; i < ndim; i++) dims[i] = PyArray_DIM(arr, i);
    const int unsig = PyArray_ISUNSIGNED(arr);
    const int typenum = unsig ? NPY_UINT64 : allow32 && PyArray_ITEMSIZE(arr) == 4 ? NPY_INT32 : NPY_INT64;
    PyArrayObject *conv = (PyArrayObject *)PyArray_FROM_OTF(obj, typenum, NPY_ARRAY_IN_ARRAY);
    if (!conv) return NULL;
    const npy_intp size = PyArray_SIZE(conv);
    for (npy_intp i = 0; i < size; i++) {
        const int bad = unsig ? ((const uint64_t *)DATA(conv))[i] >= (uint64_t)V
                              : index_at(conv, i) < 0 || index_at(conv, i) >= (int64_t)V;
        if (!bad) continue;
        format_position(where, sizeof where, ndim, dims, i);
        if (unsig)
            PyErr_Format(PyExc_ValueError, "argument '%s' must hold %s in [0, V) = [0, %ld) (V = %s), "
                         "got %s%s = %llu", name, what, (long)V, V_doc, name, where,
                         (unsigned long long)((const uint64_t *)DATA(conv))[i]);
        else
            PyErr_Format(PyExc_ValueError, "argument '%s' must hold %s in [0, V) = [0, %ld) (V = %s), "
                         "got %s%s = %lld", name, what, (long)V, V_doc, name, where, (long long)index_at(conv, i));
        Py_DECREF(conv);
        return NULL;
    }
    if (!unsig) return conv;
    PyArrayObject *s = (PyArrayObject *)PyArray_FROM_OTF((PyObject *)conv, NPY_INT64,
                                                         NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    Py_DECREF(conv);
    return s;
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
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O", kwlist, &z_obj, &l_obj, &w_obj)) return NULL;
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

/* params (N) and grads (N) of an optimizer step: params sets the dtype and N, is updated in place
 * and must be finite; grads is read only, finite, and shares no memory with params. */
static int slab_pair(PyObject *p_obj, PyObject *g_obj, int *tn, npy_intp *N, Hold *h, PyArrayObject **params,
                     PyArrayObject **grads) {
    if (!(*params = hold_from(h, p_obj, inplace_array(p_obj, "params", tn, 1, N, "(N,)", h, 1)))) return -1;
    if (!(*grads = hold_from(h, g_obj, input_array(g_obj, "grads", tn, 1, N, "(N,)", 1)))) return -1;
    if (overlaps(*grads, *params) || (PyArray_Check(g_obj) && overlaps((PyArrayObject *)g_obj, *params))) {
        PyErr_SetString(PyExc_ValueError, "argument 'grads' shares memory with 'params'; pass separate arrays");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(sgd_step_doc,
"sgd_step(params, grads, velocity, lr, momentum=0.0, weight_decay=0.0, nesterov=False) -> None\n\n"
"One SGD step (torch.optim.SGD, no dampening) on the 1-D slabs params (updated in place), grads\n"
"and velocity (updated in place; may be None when momentum == 0, and is not touched then):\n"
"g = grads + weight_decay * params; v = momentum * v + g;\n"
"params -= lr * (g + momentum * v if nesterov else v)  (params -= lr * g when momentum == 0).\n"
"lr > 0, momentum >= 0, weight_decay >= 0; nesterov needs momentum > 0.");

static PyObject *py_sgd_step(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"params", "grads", "velocity", "lr", "momentum", "weight_decay", "nesterov", NULL};
    PyObject *p_obj, *g_obj, *v_obj, *result = NULL;
    double lr, momentum = 0, weight_decay = 0;
    int nesterov = 0;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOd|ddp", kwlist, &p_obj, &g_obj, &v_obj, &lr, &momentum,
                                     &weight_decay, &nesterov))
        return NULL;
    if (check_scalar(lr, "lr", 1) < 0 || check_nonneg(momentum, "momentum") < 0 ||
        check_nonneg(weight_decay, "weight_decay") < 0)
        return NULL;
    if (nesterov && momentum == 0) {
        PyErr_SetString(PyExc_ValueError, "nesterov=True needs momentum > 0 (as torch.optim.SGD), got momentum 0");
        return NULL;
    }
    int tn = NPY_NOTYPE;
    npy_intp N[1] = {-1};
    PyArrayObject *params, *grads, *velocity = NULL;
    if (slab_pair(p_obj, g_obj, &tn, N, &h, &params, &grads) < 0) goto done;
    if (v_obj == Py_None) {
        if (momentum != 0) {
            PyErr_SetString(PyExc_ValueError, "argument 'velocity' must be an array of shape (N,) when momentum > 0, "
                            "got None");
            goto done;
        }
    } else if (!(velocity = hold_from(&h, v_obj, inplace_array(v_obj, "velocity", &tn, 1, N, "(N,)", &h, 0)))) {
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, sgd_step, DATA(params), momentum != 0 ? OPTDATA(velocity) : NULL, DATA(grads), (long)N[0], lr,
             momentum, weight_decay, nesterov);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(adam_step_doc,
"adam_step(params, grads, m, v, step, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0) -> None\n\n"
"One Adam step (Kingma & Ba; torch.optim.Adam, L2 weight decay) on the 1-D slabs params, m, v\n"
"(updated in place) and grads; step >= 1 is this update's 1-based number:\n"
"g = grads + weight_decay * params; m = beta1 m + (1 - beta1) g; v = beta2 v + (1 - beta2) g^2;\n"
"params -= lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps).\n"
"lr > 0, 0 <= beta1, beta2 < 1, eps > 0, weight_decay >= 0.");

static PyObject *py_adam_step(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"params", "grads", "m", "v", "step", "lr", "beta1", "beta2", "eps", "weight_decay", NULL};
    PyObject *p_obj, *g_obj, *m_obj, *v_obj, *step_obj, *result = NULL;
    double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
    unsigned long long step;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO|ddddd", kwlist, &p_obj, &g_obj, &m_obj, &v_obj, &step_obj, &lr,
                                     &beta1, &beta2, &eps, &weight_decay))
        return NULL;
    if (parse_count(step_obj, "step", 1, LONG_MAX, &step) < 0 || check_scalar(lr, "lr", 1) < 0 ||
        check_unit(beta1, "beta1") < 0 || check_unit(beta2, "beta2") < 0 || check_scalar(eps, "eps", 1) < 0 ||
        check_nonneg(weight_decay, "weight_decay") < 0)
        return NULL;
    int tn = NPY_NOTYPE;
    npy_intp N[1] = {-1};
    PyArrayObject *params, *grads, *m, *v;
    if (slab_pair(p_obj, g_obj, &tn, N, &h, &params, &grads) < 0) goto done;
    if (!(m = hold_from(&h, m_obj, inplace_array(m_obj, "m", &tn, 1, N, "(N,)", &h, 0)))) goto done;
    if (!(v = hold_from(&h, v_obj, inplace_array(v_obj, "v", &tn, 1, N, "(N,)", &h, 0)))) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, adam_step, DATA(params), DATA(m), DATA(v), DATA(grads), (long)N[0], (long)step, lr, beta1, beta2,
             eps, weight_decay);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(adagrad_step_doc,
"adagrad_step(params, grads, accum, lr=0.01, eps=1e-10, weight_decay=0.0) -> None\n\n"
"One Adagrad step (torch.optim.Adagrad without lr decay) on the 1-D slabs params, accum (updated\n"
"in place) and grads: g = grads + weight_decay * params; accum += g^2;\n"
"params -= lr * g / (sqrt(accum) + eps). lr > 0, eps > 0, weight_decay >= 0.");

static PyObject *py_adagrad_step(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"params", "grads", "accum", "lr", "eps", "weight_decay", NULL};
    PyObject *p_obj, *g_obj, *a_obj, *result = NULL;
    double lr = 1e-2, eps = 1e-10, weight_decay = 0;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|ddd", kwlist, &p_obj, &g_obj, &a_obj, &lr, &eps, &weight_decay))
        return NULL;
    if (check_scalar(lr, "lr", 1) < 0 || check_scalar(eps, "eps", 1) < 0 ||
        check_nonneg(weight_decay, "weight_decay") < 0)
        return NULL;
    int tn = NPY_NOTYPE;
    npy_intp N[1] = {-1};
    PyArrayObject *params, *grads, *accum;
    if (slab_pair(p_obj, g_obj, &tn, N, &h, &params, &grads) < 0) goto done;
    if (!(accum = hold_from(&h, a_obj, inplace_array(a_obj, "accum", &tn, 1, N, "(N,)", &h, 0)))) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, adagrad_step, DATA(params), DATA(accum), DATA(grads), (long)N[0], lr, eps, weight_decay);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(&h);
    return result;
}

/* ---------------------------------------------------------------------------------------------
 * Embedding tables (csrc/embedding.h): gather, sparse backward, lazy optimizer steps
 */

/* The rows of table (V, d) that ids looks up must be finite: only those are read, so only those
 * are scanned (a whole-table scan per batch would cost O(V d) where the call costs O(B F d)). */
static int check_rows_finite(PyArrayObject *table, PyArrayObject *ids, const char *ids_name) {
    const npy_intp d = PyArray_DIM(table, 1), n = PyArray_SIZE(ids);
    char where[64];
    for (npy_intp i = 0; i < n; i++) {
        const int64_t r = index_at(ids, i);
        int finite = 1;
        if (PyArray_TYPE(table) == NPY_FLOAT) {
            const float *p = (const float *)DATA(table) + r * d;
            for (npy_intp j = 0; j < d && finite; j++) finite = isfinite(p[j]);
        } else {
            const double *p = (const double *)DATA(table) + r * d;
            for (npy_intp j = 0; j < d && finite; j++) finite = isfinite(p[j]);
        }
        if (!finite) {
            format_position(where, sizeof where, PyArray_NDIM(ids), PyArray_DIMS(ids), i);
            PyErr_Format(PyExc_ValueError, "argument 'table' contains NaN or Inf in row %lld (read for %s%s); "
                         "expected finite values", (long long)r, ids_name, where);
            return -1;
        }
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
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OO", kwlist, &t_obj, &ids_obj, &out_obj, &offset_obj)) return NULL;
    if (offset_obj && parse_count(offset_obj, "offset", 0, LONG_MAX, &offset) < 0) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp tdims[2] = {-1, -1}, idims[2] = {-1, -1}, width, ld;
    PyArrayObject *table = hold_from(&h, t_obj, input_array(t_obj, "table", &tn, 2, tdims, "(V, d)", 0)), *y;
    if (!table) goto done;
    PyArrayObject *ids = hold_from(&h, ids_obj, index_array(ids_obj, "ids", "row indices", 2, idims, "(B, F)",
                                                            tdims[0], "the rows of 'table'", 1));
    if (!ids || check_batch(idims[0], "ids") < 0) goto done;
    if (block_width(idims[1], tdims[1], (npy_intp)offset, &width) < 0 || check_rows_finite(table, ids, "ids") < 0)
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
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|O", kwlist, &dout_obj, &ids_obj, &V_obj, &d_obj, &offset_obj))
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
 * tables updated in place -- table (V, d) first (finite in the rows listed), then the optimizer
 * states of its shape --, and rows (U,) distinct, in [0, V), sharing no memory with them. */
static int sparse_step_args(PyObject *g_obj, PyObject *r_obj, PyObject **state_objs, const char **state_names,
                            int n_states, int *tn, Hold *h, PyArrayObject **grad_rows, PyArrayObject **states,
                            PyArrayObject **rows, npy_intp *U, npy_intp *d) {
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
    if (check_distinct(*rows, "rows") < 0 || check_rows_finite(states[0], *rows, "rows") < 0) return -1;
    *U = gdims[0];
    *d = gdims[1];
    return 0;
}

PyDoc_STRVAR(sparse_adagrad_step_doc,
"sparse_adagrad_step(table, accum, rows, grad_rows, lr=0.01, eps=1e-10) -> None\n\n"
"Lazy Adagrad on the rows of table (V, d) and accum (V, d) (updated in place) listed in rows (U,)\n"
"(integer dtype, distinct, in [0, V)), with grad_rows (U, d) their gradients (embedding_backward's\n"
"output): accum[r] += g^2; table[r] -= lr * g / (sqrt(accum[r]) + eps). Rows not listed, and their\n"
"accum, do not change. lr > 0, eps > 0. No weight decay (as torch.optim's sparse steps).");

static PyObject *py_sparse_adagrad_step(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"table", "accum", "rows", "grad_rows", "lr", "eps", NULL};
    PyObject *states_obj[2], *r_obj, *g_obj, *result = NULL;
    const char *names[2] = {"table", "accum"};
    double lr = 1e-2, eps = 1e-10;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|dd", kwlist, &states_obj[0], &states_obj[1], &r_obj, &g_obj, &lr,
                                     &eps))
        return NULL;
    if (check_scalar(lr, "lr", 1) < 0 || check_scalar(eps, "eps", 1) < 0) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp U, d;
    PyArrayObject *grad_rows, *states[2], *rows;
    if (sparse_step_args(g_obj, r_obj, states_obj, names, 2, &tn, &h, &grad_rows, states, &rows, &U, &d) < 0)
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
"SparseAdam and TensorFlow's LazyAdam. lr > 0, 0 <= beta1, beta2 < 1, eps > 0.");

static PyObject *py_sparse_adam_step(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"table", "m", "v", "rows", "grad_rows", "step", "lr", "beta1", "beta2", "eps", NULL};
    PyObject *states_obj[3], *r_obj, *g_obj, *step_obj, *result = NULL;
    const char *names[3] = {"table", "m", "v"};
    double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
    unsigned long long step;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOO|dddd", kwlist, &states_obj[0], &states_obj[1], &states_obj[2],
                                     &r_obj, &g_obj, &step_obj, &lr, &beta1, &beta2, &eps))
        return NULL;
    if (parse_count(step_obj, "step", 1, LONG_MAX, &step) < 0 || check_scalar(lr, "lr", 1) < 0 ||
        check_unit(beta1, "beta1") < 0 || check_unit(beta2, "beta2") < 0 || check_scalar(eps, "eps", 1) < 0)
        return NULL;
    int tn = NPY_NOTYPE;
    npy_intp U, d;
    PyArrayObject *grad_rows, *states[3], *rows;
    if (sparse_step_args(g_obj, r_obj, states_obj, names, 3, &tn, &h, &grad_rows, states, &rows, &U, &d) < 0)
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

/* ---------------------------------------------------------------------------------------------
 * Convolution and max pooling, NCHW (csrc/conv.h)
 */

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
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OOOOp", kwlist, &x_obj, &W_obj, &b_obj, &stride_obj, &pad_obj,
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
    npy_intp ydims[4] = {g.B, g.F, g.OH, g.OW}, cdims[1] = {(npy_intp)conv2d_col_size(&g)};
    PyArrayObject *y = hold(&h, output_array(out_obj, "out", tn, 4, ydims, &h));
    if (!y) goto done;
    PyArrayObject *col = hold(&h, new_array(tn, 1, cdims));
    if (!col) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, conv2d_forward, DATA(y), DATA(col), DATA(x), DATA(Wt), OPTDATA(b), &g);
    if (relu) DISPATCH(tn, relu_forward, DATA(y), DATA(y), (long)PyArray_SIZE(y));
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)y);
done:
    Py_XDECREF(one);
    Py_XDECREF(zero);
    release(&h);
    return result;
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
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|OOOp", kwlist, &dy_obj, &x_obj, &W_obj, &dW_obj, &db_obj,
                                     &stride_obj, &pad_obj, &need_dx))
        goto done;
    int tn = NPY_NOTYPE;
    PyArrayObject *x, *Wt, *db = NULL, *dx = NULL;
    DskConv2d g;
    if (conv_inputs(x_obj, W_obj, stride_obj ? stride_obj : one, pad_obj ? pad_obj : zero, &tn, &h, &x, &Wt, &g) < 0)
        goto done;
    npy_intp ydims[4] = {g.B, g.F, g.OH, g.OW};
    PyArrayObject *dy = hold_from(&h, dy_obj, input_array(dy_obj, "dy", &tn, 4, ydims, "(B, F, OH, OW)", 1));
    if (!dy) goto done;
    npy_intp wdims[4] = {g.F, g.C, g.KH, g.KW}, bdims[1] = {g.F}, xdims[4] = {g.B, g.C, g.H, g.W};
    PyArrayObject *dW = inplace_array(dW_obj, "dW", &tn, 4, wdims, "(F, C, KH, KW)", &h, 0);
    if (!hold(&h, dW)) goto done;
    if (db_obj != Py_None && !(db = hold_from(&h, db_obj, inplace_array(db_obj, "db", &tn, 1, bdims, "(F,)", &h, 0))))
        goto done;
    if (need_dx && !(dx = hold(&h, new_array(tn, 4, xdims)))) goto done;
    npy_intp cdims[1] = {(npy_intp)conv2d_col_size(&g)}, adims[1] = {(npy_intp)conv2d_acc_size(&g)};
    PyArrayObject *col = hold(&h, new_array(tn, 1, cdims)), *acc = hold(&h, new_array(NPY_DOUBLE, 1, adims));
    if (!col || !acc) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, conv2d_backward, OPTDATA(dx), DATA(dW), OPTDATA(db), DATA(col), DATA(acc), DATA(dy), DATA(x),
             DATA(Wt), &g);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(dx ? (PyObject *)dx : Py_None);
done:
    Py_XDECREF(one);
    Py_XDECREF(zero);
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
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OO", kwlist, &x_obj, &kernel_obj, &stride_obj)) return NULL;
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
"max_pool2d_backward(dy, indices, input_size) -> dx\n\n"
"Backward of max_pool2d_forward: dy (B, C, OH, OW), indices (B, C, OH, OW) of any integer dtype, each\n"
"in [0, H W), input_size (H, W) (int or pair). dx (B, C, H, W) is 0 except dx[b, c].flat[indices] +=\n"
"dy, so overlapping windows that picked the same entry add up.");

static PyObject *py_max_pool2d_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dy", "indices", "input_size", NULL};
    PyObject *dy_obj, *idx_obj, *size_obj, *result = NULL;
    long H, W;
    Hold h = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO", kwlist, &dy_obj, &idx_obj, &size_obj)) return NULL;
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
    npy_intp xdims[4] = {ydims[0], ydims[1], H, W};
    PyArrayObject *dx = hold(&h, new_array(tn, 4, xdims));
    if (!dx) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, max_pool2d_backward, DATA(dx), DATA(dy), DATA(idx), (long)(ydims[0] * ydims[1]), H * W,
             (long)(ydims[2] * ydims[3]));
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)dx);
done:
    release(&h);
    return result;
}

/* ---------------------------------------------------------------------------------------------
 * Threads and build information
 */
static PyObject *py_set_num_threads(PyObject *Py_UNUSED(self), PyObject *arg) {
    const long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1 || n > 4096) {
        PyErr_Format(PyExc_ValueError, "the number of threads must be between 1 and 4096, got %ld", n);
        return NULL;
    }
    dsk_set_num_threads((int)n);
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(unused)) {
    return PyLong_FromLong(dsk_get_num_threads());
}

static PyObject *py_set_finite_checks(PyObject *Py_UNUSED(self), PyObject *arg) {
    const int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    const int previous = finite_checks_on;
    finite_checks_on = on;
    return PyBool_FromLong(previous);
}

static PyObject *py_check_finite(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *obj;
    const char *name;
    if (!PyArg_ParseTuple(args, "Os", &obj, &name)) return NULL;
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "argument '%s' must be a numpy.ndarray, got %s", name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    const int tn = PyArray_TYPE(arr);
    if (tn != NPY_FLOAT && tn != NPY_DOUBLE) Py_RETURN_NONE; /* integer ids and labels cannot be NaN */
    PyArrayObject *conv = (PyArrayObject *)PyArray_FROM_OTF(obj, tn, NPY_ARRAY_IN_ARRAY);
    if (!conv) return NULL;
    npy_intp where;
    const int bad = first_nonfinite(conv, &where);
    Py_DECREF(conv);
    if (bad) {
        PyErr_Format(PyExc_ValueError, "argument '%s' contains NaN or Inf (first at flat index %ld); expected "
                     "finite values", name, (long)where);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_build_info(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(unused)) {
    return Py_BuildValue("{s:O,s:s,s:i,s:i}", "openmp", DSK_HAVE_OPENMP ? Py_True : Py_False, "blas",
                         DSK_BLAS_NAME, "num_threads", dsk_get_num_threads(), "blas_num_threads",
                         dsk_blas_get_num_threads());
}

#define KW(name) {#name, (PyCFunction)(void (*)(void))py_##name, METH_VARARGS | METH_KEYWORDS, name##_doc}
/* The COMET family is written as a file of the binding split (dselectk/_binding/); until that
 * split lands here, this file includes it with the converters above. */
#define DSK_BINDING_MONOLITHIC
#include "_binding/comet.c"
static PyMethodDef methods[] = {
    KW(comet_forward),
    KW(comet_backward),
    KW(comet_leaf_nodes),
    KW(smooth_step_forward),
    KW(smooth_step_backward),
    KW(selector_forward),
    KW(selector_backward),
    KW(dselect_k_forward),
    KW(dselect_k_backward),
    KW(selector_entropy),
    KW(selector_mass_penalty),
    KW(softmax_forward),
    KW(softmax_backward),
    KW(topk_forward),
    KW(noisy_logits_forward),
    KW(noisy_logits_backward),
    KW(softmax_selector_forward),
    KW(softmax_selector_backward),
    KW(mix_experts_forward),
    KW(mix_experts_backward),
    KW(mix_experts_many_forward),
    KW(mix_experts_many_backward),
    KW(linear_forward),
    KW(linear_backward),
    KW(dense_forward),
    KW(dense_backward),
    KW(relu_forward),
    KW(relu_backward),
    KW(dropout_forward),
    KW(dropout_backward),
    KW(bce_with_logits),
    KW(mse),
    KW(softmax_cross_entropy),
    KW(sgd_step),
    KW(adam_step),
    KW(adagrad_step),
    KW(embedding_forward),
    KW(embedding_backward),
    KW(sparse_adagrad_step),
    KW(sparse_adam_step),
    KW(conv2d_forward),
    KW(conv2d_backward),
    KW(max_pool2d_forward),
    KW(max_pool2d_backward),
    {"set_num_threads", py_set_num_threads, METH_O, "set_num_threads(n): threads of the OpenMP loops and the BLAS."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int"},
    {"set_finite_checks", py_set_finite_checks, METH_O,
     "set_finite_checks(on) -> previous: this thread's NaN/Inf scans of kernel inputs (see "
     "dselectk.functional.trusted_inputs)."},
    {"check_finite", py_check_finite, METH_VARARGS,
     "check_finite(x, name): ValueError naming `name` if the float array x holds NaN or Inf."},
    {"build_info", py_build_info, METH_NOARGS, "build_info() -> dict: OpenMP, BLAS and thread settings."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "dselectk._C",
                                    "C kernels of dselectk (see dselectk.functional for the documented API).",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__C(void) {
    import_array();
    return PyModule_Create(&module);
}
