/* The converters and checks of common.h (documented there), shared by every family file. */
#include "common.h"

#include <limits.h>
#include <math.h>
#include <string.h>

#include "dsk.h"

__thread int finite_checks_on = 1;

void format_shape(char *buf, size_t size, int ndim, const npy_intp *dims) {
    size_t used = (size_t)snprintf(buf, size, "(");
    for (int i = 0; i < ndim && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, i ? ", %ld" : "%ld", (long)dims[i]);
    if (used < size) snprintf(buf + used, size - used, ndim == 1 ? ",)" : ")");
}

const char *dtype_name(int typenum) {
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

int first_nonfinite(PyArrayObject *a, npy_intp *where) {
    const npy_intp size = PyArray_SIZE(a);
    if (PyArray_TYPE(a) == NPY_FLOAT) FIRST_NONFINITE(float, uint32_t, 0x7f800000u);
    else FIRST_NONFINITE(double, uint64_t, 0x7ff0000000000000ull);
    return 0;
}

/* The dtype rule of input_array and inplace_array: the first array of a call is float32 or
 * float64 and sets *typenum; every later one has exactly *typenum. */
static int check_float_dtype(PyArrayObject *arr, const char *name, int *typenum) {
    const int tn = PyArray_TYPE(arr);
    if (*typenum == NPY_NOTYPE) {
        if (tn != NPY_FLOAT && tn != NPY_DOUBLE) {
            PyErr_Format(PyExc_TypeError, "argument '%s' must have dtype float32 or float64, got %s",
                         name, PyArray_DESCR(arr)->typeobj->tp_name);
            return -1;
        }
        *typenum = tn;
    } else if (tn != *typenum) {
        PyErr_Format(PyExc_TypeError,
                     "argument '%s' has dtype %s, expected %s like the other arrays of this call "
                     "(all arrays must share one dtype: float32 or float64)",
                     name, tn == NPY_FLOAT || tn == NPY_DOUBLE ? dtype_name(tn)
                                                               : PyArray_DESCR(arr)->typeobj->tp_name,
                     dtype_name(*typenum));
        return -1;
    }
    return 0;
}

/* The shape rule of every array argument: ndim dimensions, dims[i] where dims[i] >= 0; fills the
 * free entries of dims from the array. */
static int check_shape(PyArrayObject *arr, const char *name, int ndim, npy_intp *dims, const char *shape_doc) {
    char got[128], want[128];
    format_shape(got, sizeof got, PyArray_NDIM(arr), PyArray_DIMS(arr));
    if (PyArray_NDIM(arr) != ndim) {
        PyErr_Format(PyExc_ValueError, "argument '%s' must be %d-D with shape %s, got shape %s",
                     name, ndim, shape_doc, got);
        return -1;
    }
    for (int i = 0; i < ndim; i++) {
        if (dims[i] >= 0 && PyArray_DIM(arr, i) != dims[i]) {
            npy_intp shown[NPY_MAXDIMS]; /* free dims print as the array's own */
            for (int j = 0; j < ndim; j++) shown[j] = dims[j] >= 0 ? dims[j] : PyArray_DIM(arr, j);
            format_shape(want, sizeof want, ndim, shown);
            PyErr_Format(PyExc_ValueError, "argument '%s' must have shape %s = %s, got %s", name,
                         shape_doc, want, got);
            return -1;
        }
    }
    for (int i = 0; i < ndim; i++) dims[i] = PyArray_DIM(arr, i);
    return 0;
}

/* ValueError naming the first NaN / Inf of a (C-contiguous) float array, unless the checks are off. */
static int check_finite_values(PyArrayObject *a, const char *name) {
    npy_intp where;
    if (finite_checks_on && first_nonfinite(a, &where)) {
        PyErr_Format(PyExc_ValueError, "argument '%s' contains NaN or Inf (first at flat index %ld); "
                     "expected finite values", name, (long)where);
        return -1;
    }
    return 0;
}

PyArrayObject *input_array(PyObject *obj, const char *name, int *typenum, int ndim, npy_intp *dims,
                           const char *shape_doc, int finite) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "argument '%s' must be a numpy.ndarray of float32 or float64, got %s",
                     name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    if (check_float_dtype(arr, name, typenum) < 0 || check_shape(arr, name, ndim, dims, shape_doc) < 0)
        return NULL;
    /* copies only when the array is not already C-contiguous, aligned and native */
    PyArrayObject *conv = (PyArrayObject *)PyArray_FROM_OTF(obj, *typenum, NPY_ARRAY_IN_ARRAY);
    if (!conv) return NULL;
    if (finite && check_finite_values(conv, name) < 0) {
        Py_DECREF(conv);
        return NULL;
    }
    return conv;
}

int optional_input(PyObject *obj, const char *name, int *typenum, int ndim, npy_intp *dims, const char *shape_doc,
                   int finite, PyArrayObject **result) {
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

int overlaps(PyArrayObject *a, PyArrayObject *b) {
    const char *a0, *a1, *b0, *b1;
    return byte_extent(a, &a0, &a1) && byte_extent(b, &b0, &b1) && a0 < b1 && b0 < a1;
}

int overlaps_held(PyArrayObject *arr, const Hold *h, int i) {
    if (overlaps(arr, h->a[i])) return 1;
    return h->orig[i] != (PyObject *)h->a[i] && PyArray_Check(h->orig[i]) &&
           overlaps(arr, (PyArrayObject *)h->orig[i]);
}

PyArrayObject *output_array(PyObject *out, const char *name, int typenum, int ndim, const npy_intp *dims,
                            Hold *inputs) {
    if (out == NULL || out == Py_None) return new_array(typenum, ndim, dims);
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

PyArrayObject *new_array(int typenum, int ndim, const npy_intp *dims) {
    return (PyArrayObject *)PyArray_EMPTY(ndim, (npy_intp *)dims, typenum, 0);
}

PyArrayObject *inplace_array(PyObject *obj, const char *name, int *typenum, int ndim, npy_intp *dims,
                             const char *shape_doc, Hold *others, int finite) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "argument '%s' must be a numpy.ndarray of float32 or float64 (it is "
                     "updated in place), got %s", name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    if (check_float_dtype(arr, name, typenum) < 0) return NULL;
    if (!PyArray_ISNOTSWAPPED(arr)) {
        PyErr_Format(PyExc_TypeError, "argument '%s' must be in native byte order (it is updated in place)", name);
        return NULL;
    }
    if (check_shape(arr, name, ndim, dims, shape_doc) < 0) return NULL;
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
    if (finite && check_finite_values(arr, name) < 0) return NULL;
    Py_INCREF(arr);
    return arr;
}

void format_position(char *buf, size_t size, int ndim, const npy_intp *dims, npy_intp flat) {
    if (ndim == 2) snprintf(buf, size, "[%ld, %ld]", (long)(flat / dims[1]), (long)(flat % dims[1]));
    else snprintf(buf, size, "[%ld]", (long)flat);
}

PyArrayObject *index_array(PyObject *obj, const char *name, const char *what, int ndim, npy_intp *dims,
                           const char *shape_doc, npy_intp V, const char *V_doc, int allow32) {
    char where[64];
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
    if (check_shape(arr, name, ndim, dims, shape_doc) < 0) return NULL;
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

/* ---------------------------------------------------------------------------------------------
 * Scalar and size checks (PyErr_Format has no %g, hence the snprintf)
 */
int check_scalar(double v, const char *name, int strictly_positive) {
    if ((strictly_positive ? v > 0 : v >= 0) && isfinite(v)) return 0;
    char msg[256];
    snprintf(msg, sizeof msg, "%s must be a finite number %s 0, got %g", name, strictly_positive ? ">" : ">=", v);
    PyErr_SetString(PyExc_ValueError, msg);
    return -1;
}

int check_unit(double v, const char *name) {
    if (v >= 0 && v < 1) return 0; /* false for NaN */
    char msg[256];
    snprintf(msg, sizeof msg, "%s must be a finite number in [0, 1), got %g", name, v);
    PyErr_SetString(PyExc_ValueError, msg);
    return -1;
}

int check_range(PyArrayObject *a, const char *name, double lo, double hi, const char *expected) {
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

int parse_count(PyObject *obj, const char *name, unsigned long long minimum, unsigned long long maximum,
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

int check_batch(npy_intp B, const char *name) {
    if (B < 1) {
        PyErr_Format(PyExc_ValueError, "argument '%s' has an empty batch (B = 0); expected at least one "
                     "example", name);
        return -1;
    }
    return 0;
}

int n_bits(npy_intp n) {
    int m = 0;
    while (((npy_intp)1 << m) < n) m++;
    return m;
}

int check_n(npy_intp n) {
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

int check_k(npy_intp k, npy_intp n, const char *what) {
    if (k < 1 || k > n) {
        PyErr_Format(PyExc_ValueError, "k (%s) must satisfy 1 <= k <= n = %ld, got k = %ld", what,
                     (long)n, (long)k);
        return -1;
    }
    return 0;
}

int check_blas_dims(npy_intp a, npy_intp b, npy_intp c) {
    if (a > INT_MAX || b > INT_MAX || c > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "a dimension exceeds 2**31 - 1, the limit of the 32-bit BLAS");
        return -1;
    }
    return 0;
}
