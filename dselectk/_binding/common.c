/* The converters and checks of common.h (documented there), shared by every family file. */
#include "common.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
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

/* Scans of array values: every kernel input is checked, so these must run at memory speed. They
 * test the bits (IEEE 754) with integer operations of the value's own width, which SSE2 vectorizes
 * for float and double alike, OR the results of a block together without an early exit, and
 * search only a block with a hit for its first index. The top bit of
 *   nonfinite(b)          = (b & EXP) + EXP_LSB  is set exactly when the exponent is all ones
 *                           (NaN, +-Inf);
 *   negative_or_nonfinite = that | (b & ((b & ~SIGN) + ~SIGN)), which adds the values with the sign
 *                           bit and some other bit set: every negative number but -0.0. */
#define SCAN_BLOCK 4096
#define FIRST_BAD(ctype, utype, test)                                                           \
    do {                                                                                        \
        const ctype *p = (const ctype *)DATA(a);                                                \
        const int top = 8 * (int)sizeof(utype) - 1;                                             \
        for (npy_intp start = 0; start < size; start += SCAN_BLOCK) {                           \
            const npy_intp end = size - start < SCAN_BLOCK ? size : start + SCAN_BLOCK;         \
            utype acc = 0;                                                                      \
            for (npy_intp i = start; i < end; i++) {                                            \
                utype bits;                                                                     \
                memcpy(&bits, p + i, sizeof bits);                                              \
                acc |= test(bits);                                                              \
            }                                                                                   \
            if (acc >> top)                                                                     \
                for (npy_intp i = start; i < end; i++) {                                        \
                    utype bits;                                                                 \
                    memcpy(&bits, p + i, sizeof bits);                                          \
                    if (test(bits) >> top) { *where = i; return 1; }                            \
                }                                                                               \
        }                                                                                       \
    } while (0)

static inline uint32_t nonfinite_f32(uint32_t b) { return (uint32_t)-(int32_t)((b & 0x7f800000u) == 0x7f800000u); }
static inline uint64_t nonfinite_f64(uint64_t b) { return (b & 0x7ff0000000000000ull) + 0x0010000000000000ull; }
static inline uint32_t negative_or_nonfinite_f32(uint32_t b) {
    return nonfinite_f32(b) | (b & ((b & 0x7fffffffu) + 0x7fffffffu));
}
static inline uint64_t negative_or_nonfinite_f64(uint64_t b) {
    return nonfinite_f64(b) | (b & ((b & 0x7fffffffffffffffull) + 0x7fffffffffffffffull));
}

int first_nonfinite(PyArrayObject *a, npy_intp *where) {
    const npy_intp size = PyArray_SIZE(a);
    if (PyArray_TYPE(a) == NPY_FLOAT) FIRST_BAD(float, uint32_t, nonfinite_f32);
    else FIRST_BAD(double, uint64_t, nonfinite_f64);
    return 0;
}

static int first_negative_or_nonfinite(PyArrayObject *a, npy_intp *where) {
    const npy_intp size = PyArray_SIZE(a);
    if (PyArray_TYPE(a) == NPY_FLOAT) FIRST_BAD(float, uint32_t, negative_or_nonfinite_f32);
    else FIRST_BAD(double, uint64_t, negative_or_nonfinite_f64);
    return 0;
}

static double value_at(PyArrayObject *a, npy_intp i) {
    return PyArray_TYPE(a) == NPY_FLOAT ? (double)((const float *)DATA(a))[i] : ((const double *)DATA(a))[i];
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

/* A pass per slab: one loop over all the slabs at once was measured no faster (the scans run near
 * memory speed already). */
int check_slabs(PyArrayObject *const *slabs, const char *const *names, int count, int last_nonneg) {
    for (int j = 0; j < count; j++) {
        npy_intp where;
        if (!(last_nonneg && j == count - 1)) {
            if (check_finite_values(slabs[j], names[j]) < 0) return -1;
        } else if (finite_checks_on && first_negative_or_nonfinite(slabs[j], &where)) {
            const double v = value_at(slabs[j], where);
            if (!isfinite(v)) return check_finite_values(slabs[j], names[j]); /* names the first NaN / Inf */
            char msg[256];
            snprintf(msg, sizeof msg, "argument '%s' must hold values >= 0 (it accumulates squared gradients), got "
                     "%s[%ld] = %g", names[j], names[j], (long)where, v);
            PyErr_SetString(PyExc_ValueError, msg);
            return -1;
        }
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
        const double v = value_at(a, i);
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

/* ---------------------------------------------------------------------------------------------
 * Argument parsing
 */

/* The format unit (its letter) of argument i of a PyArg format such as "OOd|O"; 0 past the end. */
static char format_unit(const char *format, int i) {
    for (const char *c = format; *c && *c != ':' && *c != ';'; c++) {
        if (*c == '|' || *c == '$') continue;
        if (i-- == 0) return *c;
        if (c[1] == '&' || c[1] == '!' || c[1] == '#' || c[1] == '*') c++; /* O&, O!, s#, s*: one unit */
    }
    return 0;
}

/* Whether converting v for format unit `unit` ('d': a double, 'n': a Py_ssize_t) raises `failure`
 * (OverflowError or TypeError); if so, that error is replaced by one naming the argument `name`. */
static int name_conversion_error(PyObject *v, char unit, const char *name, PyObject *failure) {
    if (unit != 'd' && unit != 'n') return 0;
    PyObject *index = NULL;
    long nbits = -1;
    if (unit == 'd') {
        if (!(PyFloat_AsDouble(v) == -1 && PyErr_Occurred())) return 0;
    } else if ((index = PyNumber_Index(v)) != NULL) {
        if (!(PyLong_AsSsize_t(index) == -1 && PyErr_Occurred())) {
            Py_DECREF(index);
            return 0;
        }
    }
    const int matches = PyErr_ExceptionMatches(failure);
    PyErr_Clear();
    if (matches && index) {
        PyObject *bits = PyObject_CallMethod(index, "bit_length", NULL);
        nbits = bits ? PyLong_AsLong(bits) : -1;
        Py_XDECREF(bits);
        PyErr_Clear();
    }
    Py_XDECREF(index);
    if (!matches) return 0;
    const char *type = Py_TYPE(v)->tp_name;
    if (failure == PyExc_TypeError)
        PyErr_Format(PyExc_TypeError, unit == 'd' ? "%s must be a real number (a float), got %s"
                                                  : "%s must be an integer, got %s", name, type);
    else if (unit == 'd')
        PyErr_Format(PyExc_ValueError, "%s must be a finite number, got %s %s too large for a float64 (whose "
                     "largest value is about 1.8e308)", name, PyLong_Check(v) ? "an" : "a", type);
    else
        PyErr_Format(PyExc_ValueError, "%s is out of range: expected an integer of magnitude below 2**63 (and "
                     "within this function's limits), got one of %ld bits", name, nbits);
    return 1;
}

int parse_args(PyObject *args, PyObject *kw, const char *format, char **kwlist, ...) {
    va_list va;
    va_start(va, kwlist);
    const int ok = PyArg_VaParseTupleAndKeywords(args, kw, format, kwlist, va);
    va_end(va);
    PyObject *failure = ok ? NULL
                     : PyErr_ExceptionMatches(PyExc_OverflowError) ? PyExc_OverflowError
                     : PyErr_ExceptionMatches(PyExc_TypeError) ? PyExc_TypeError : NULL;
    if (!failure) return ok;
    /* Find the number argument that failed to convert; keep the original error if none did. */
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *original = PyErr_GetRaisedException();
#else
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
#endif
    const Py_ssize_t npos = PyTuple_GET_SIZE(args);
    int named = 0;
    for (int i = 0; kwlist[i] && !named; i++) {
        PyObject *v = i < npos ? PyTuple_GET_ITEM(args, i) : kw ? PyDict_GetItemString(kw, kwlist[i]) : NULL;
        if (v) named = name_conversion_error(v, format_unit(format, i), kwlist[i], failure);
    }
#if PY_VERSION_HEX >= 0x030C0000
    if (named) Py_DECREF(original);
    else PyErr_SetRaisedException(original);
#else
    if (named) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
    } else {
        PyErr_Restore(type, value, traceback);
    }
#endif
    return 0;
}
