/* The shared part of the dselectk._C binding: the Hold list, DISPATCH and the argument converters
 * every family file (gates.c, mix.c, nn.c, optim.c, embedding.c, conv.c) uses. Declared here once,
 * defined in common.c; module.c assembles the module (see the comment at its top).
 *
 * Every binding function does the same four things, in this order:
 *   1. converts and validates its arguments (dtype, ndim, shape, finiteness, scalar ranges),
 *      raising TypeError / ValueError that name the argument, what it got and what was expected;
 *   2. allocates (or validates the caller's out=) output arrays;
 *   3. releases the GIL around the pure-C kernel;
 *   4. drops every reference it holds through one exit path (the Hold list below).
 * Inputs are never written. Non-contiguous, misaligned or byte-swapped inputs are copied to a
 * C-contiguous native array first; an out= array must already be C-contiguous and writeable.
 * All array arguments of one call must share one dtype: float32 or float64 (no silent casting).
 *
 * NumPy's C API is a table of function pointers that import_array() fills in. With several
 * translation units, all of them must see one table: PY_ARRAY_UNIQUE_SYMBOL names it, module.c
 * (the one TU that calls import_array()) defines DSK_BINDING_IMPORTS_NUMPY before including this
 * header and so defines the table, and every other TU only declares it (NO_IMPORT_ARRAY).
 * The extension is built with -fvisibility=hidden, so these non-static names (hold, release, ...)
 * stay inside the extension and cannot be bound to a like-named symbol of another library.
 */
#ifndef DSK_BINDING_COMMON_H
#define DSK_BINDING_COMMON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define PY_ARRAY_UNIQUE_SYMBOL dselectk_ARRAY_API
#ifndef DSK_BINDING_IMPORTS_NUMPY
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include <stdint.h>

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
static inline PyArrayObject *hold_from(Hold *h, PyObject *orig, PyArrayObject *a) {
    if (a) {
        h->orig[h->count] = orig;
        h->a[h->count++] = a;
    }
    return a;
}

static inline PyArrayObject *hold(Hold *h, PyArrayObject *a) { return hold_from(h, (PyObject *)a, a); }

static inline void release(Hold *h) {
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

/* The method-table entry of the keyword function py_NAME with the docstring NAME_doc. */
#define KW(name) {#name, (PyCFunction)(void (*)(void))py_##name, METH_VARARGS | METH_KEYWORDS, name##_doc}

/* ---------------------------------------------------------------------------------------------
 * Converters
 */

/* "(2, 3)" / "(4,)" into buf. */
void format_shape(char *buf, size_t size, int ndim, const npy_intp *dims);
/* "float32" / "float64" / "?". */
const char *dtype_name(int typenum);

/* Off (0) only inside dselectk.functional.trusted_inputs(), which models enter between their
 * checked input and their checked loss: the NaN / Inf scans of their intermediate arrays cost a
 * read of each (a tenth of a training step). Per thread, so another thread's calls stay checked;
 * every other check (dtype, shape, overlap, index bounds) is unaffected. */
extern __thread int finite_checks_on;

/* 1 and the flat index of the first NaN / Inf of the C-contiguous float array a in *where, else 0.
 * Runs at memory speed (common.c says how). */
int first_nonfinite(PyArrayObject *a, npy_intp *where);

/* An input array argument.
 *   *typenum: NPY_NOTYPE for the first array of a call (it must be float32 or float64 and sets
 *             the call's dtype), else the dtype every later array must have exactly.
 *   dims:     the expected shape; entries < 0 are free and are filled in from the array.
 *   shape_doc: the expected shape in the paper's symbols, for messages, e.g. "(B, k, m)".
 *   finite:   reject NaN / Inf.
 * Returns a new reference to a C-contiguous, aligned, native-byte-order array, or NULL with an
 * exception set. */
PyArrayObject *input_array(PyObject *obj, const char *name, int *typenum, int ndim, npy_intp *dims,
                           const char *shape_doc, int finite);

/* Same, for an argument that may be None (returns NULL without an exception then). */
int optional_input(PyObject *obj, const char *name, int *typenum, int ndim, npy_intp *dims, const char *shape_doc,
                   int finite, PyArrayObject **result);

/* Conservative: arrays whose extents intersect may share memory (numpy.may_share_memory). */
int overlaps(PyArrayObject *a, PyArrayObject *b);

/* Whether arr may share memory with held array i or with the caller's object it came from. */
int overlaps_held(PyArrayObject *arr, const Hold *h, int i);

/* An output array: a new one when out is NULL/None, else the caller's out= validated (exact dtype
 * and shape, C-contiguous, writeable, sharing no memory with any input in h). New reference. */
PyArrayObject *output_array(PyObject *out, const char *name, int typenum, int ndim, const npy_intp *dims,
                            Hold *inputs);

/* A new uninitialised C-contiguous array. */
PyArrayObject *new_array(int typenum, int ndim, const npy_intp *dims);

/* An array the call updates in place (an accumulated gradient, a parameter slab, an optimizer
 * state): never copied, so it must already be a C-contiguous, aligned, writeable, native-order
 * ndarray of the call's dtype (*typenum as in input_array) and shape (entries of dims < 0 are
 * free and are filled in), sharing no memory with any array in others. New reference, or NULL
 * with an exception set. */
PyArrayObject *inplace_array(PyObject *obj, const char *name, int *typenum, int ndim, npy_intp *dims,
                             const char *shape_doc, Hold *others, int finite);

/* Integer indices (embedding ids and rows, class labels, pooling argmaxes; `what` names them in
 * messages): an ndarray of any integer dtype (not bool) of ndim dimensions (dims as in
 * input_array), every value in [0, V) (V_doc says where V comes from, for messages).
 * Returned as a C-contiguous native int32 array when it is a 32-bit signed array and allow32 is
 * set, else as int64 (unsigned values are checked before they are cast). New reference, or NULL
 * naming the first bad value and its position. */
PyArrayObject *index_array(PyObject *obj, const char *name, const char *what, int ndim, npy_intp *dims,
                           const char *shape_doc, npy_intp V, const char *V_doc, int allow32);

/* Value i of an index_array result (int32 or int64). */
static inline int64_t index_at(PyArrayObject *a, npy_intp i) {
    return PyArray_ITEMSIZE(a) == 4 ? (int64_t)((const int32_t *)DATA(a))[i] : ((const int64_t *)DATA(a))[i];
}

/* "[i, j]" (2-D) or "[i]" for the flat index flat of an array of shape dims, into buf. */
void format_position(char *buf, size_t size, int ndim, const npy_intp *dims, npy_intp flat);

/* PyArg_ParseTupleAndKeywords, except that a number argument that does not convert names itself:
 * too large for its C type (beyond float64's range for a 'd' unit, beyond 64 bits for an 'n'
 * unit) is a ValueError, not an OverflowError naming no argument; not a number at all is a
 * TypeError saying which argument wanted a float or an integer. Every binding function parses
 * its arguments with it. */
int parse_args(PyObject *args, PyObject *kw, const char *format, char **kwlist, ...);

/* The value check of a dense optimizer step's slabs (params, grads and its state: velocity, m, v,
 * accum), before anything changes: ValueError naming the first slab, in argument order, with a
 * NaN / Inf or, with last_nonneg, a negative value in the last slab (a sum or mean of squares:
 * Adam's v, Adagrad's accum, whose square root the step takes; -0.0 is fine). Skipped inside
 * trusted_inputs(), like every NaN / Inf scan. */
int check_slabs(PyArrayObject *const *slabs, const char *const *names, int count, int last_nonneg);

/* ---------------------------------------------------------------------------------------------
 * Scalar and size checks: 0, or -1 with a ValueError naming the argument.
 */

/* v finite and > 0 (strictly_positive) or >= 0. */
int check_scalar(double v, const char *name, int strictly_positive);
#define check_gamma(v, name) check_scalar((v), (name), 1)
#define check_nonneg(v, name) check_scalar((v), (name), 0)

/* A probability-like scalar in [0, 1): dropout rate, Adam's betas. */
int check_unit(double v, const char *name);

/* Every value of a (finite, C-contiguous) array in [lo, hi]; names the first that is not. */
int check_range(PyArrayObject *a, const char *name, double lo, double hi, const char *expected);

/* An integer argument in [minimum, maximum] (seeds, step counters): a Python int or anything with
 * __index__ (numpy integers), not a bool or a float. */
int parse_count(PyObject *obj, const char *name, unsigned long long minimum, unsigned long long maximum,
                unsigned long long *value);

/* B >= 1 (name: the array whose first dimension B is). */
int check_batch(npy_intp B, const char *name);

/* m = ceil(log2 n): bits of the binary code of n experts. n must be >= 2. */
int n_bits(npy_intp n);

/* 2 <= n <= 2**DSK_MAX_BITS experts. */
int check_n(npy_intp n);

/* 1 <= k <= n (what: where k comes from, for messages). */
int check_k(npy_intp k, npy_intp n, const char *what);

/* The BLAS of openblas32 takes 32-bit ints. */
int check_blas_dims(npy_intp a, npy_intp b, npy_intp c);

#endif
