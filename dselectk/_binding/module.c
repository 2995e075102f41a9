/* dselectk._C: the one binding module between Python and the C kernels of csrc/, assembled from
 * one file per kernel family. This file holds the module itself (threads, finite-check switch,
 * build information, PyInit); common.h holds the rules every binding function follows and the
 * converters they share.
 *
 * Adding a kernel family (say csrc/comet.h):
 *   1. write dselectk/_binding/comet.c: `#include "common.h"` and the kernel header, its py_*
 *      functions and docstrings like those of gates.c, and at its end the method table
 *          PyMethodDef dsk_comet_methods[] = {KW(comet_forward), ..., {NULL, NULL, 0, NULL}};
 *   2. add the line `X(comet)` to DSK_FAMILIES below;
 *   3. add "dselectk/_binding/comet.c" to BINDING_SOURCES in setup.py (and the kernel's .c file
 *      to KERNEL_SOURCES).
 * Nothing else changes: common.h declares no family, and this file adds every family's functions
 * to the module at import.
 */
#define DSK_BINDING_IMPORTS_NUMPY /* the one TU that calls import_array(): see common.h */
#include "common.h"

#include "dsk.h"

#ifndef DSK_BLAS_NAME
#define DSK_BLAS_NAME "unknown"
#endif

/* The kernel families, one binding file each (dselectk/_binding/<family>.c, defining
 * dsk_<family>_methods). */
#define DSK_FAMILIES(X) \
    X(gates)            \
    X(mix)              \
    X(nn)               \
    X(optim)            \
    X(embedding)        \
    X(conv)             \
    X(comet)            \
    X(sinkhorn)

#define DSK_DECLARE_FAMILY(family) extern PyMethodDef dsk_##family##_methods[];
DSK_FAMILIES(DSK_DECLARE_FAMILY)
#define DSK_FAMILY_ENTRY(family) dsk_##family##_methods,
static PyMethodDef *const families[] = {DSK_FAMILIES(DSK_FAMILY_ENTRY)};

/* ---------------------------------------------------------------------------------------------
 * Threads and build information
 */
static PyObject *py_set_num_threads(PyObject *Py_UNUSED(self), PyObject *arg) {
    int overflow = 0;
    const long n = PyLong_AsLongAndOverflow(arg, &overflow);
    if (n == -1 && !overflow && PyErr_Occurred()) return NULL;
    if (overflow || n < 1 || n > 4096) {
        PyErr_Format(PyExc_ValueError, "the number of threads must be between 1 and 4096, got %S", arg);
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
    if (tn != NPY_FLOAT && tn != NPY_DOUBLE) {
        if (PyTypeNum_ISBOOL(tn) || PyTypeNum_ISINTEGER(tn)) Py_RETURN_NONE; /* ids and labels cannot be NaN */
        /* float16, long double, complex: dselectk.functional.check_finite scans them; the rest
         * (object, strings, dates) holds no numbers to scan. Never a silent pass. */
        PyErr_Format(PyExc_TypeError, "argument '%s' has dtype %S; this scan takes float32, float64, bool and "
                     "integer arrays", name, (PyObject *)PyArray_DESCR(arr));
        return NULL;
    }
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
    return Py_BuildValue("{s:O,s:s,s:i,s:i,s:i,s:l}", "openmp", DSK_HAVE_OPENMP ? Py_True : Py_False, "blas",
                         DSK_BLAS_NAME, "num_threads", dsk_get_num_threads(), "blas_num_threads",
                         dsk_blas_get_num_threads(), "pool_workers", dsk_pool_workers(), "parallel_min_work",
                         (long)DSK_PARALLEL_MIN_WORK);
}

static PyMethodDef module_methods[] = {
    {"set_num_threads", py_set_num_threads, METH_O, "set_num_threads(n): threads of the kernels' pool (loops and products)."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int"},
    {"set_finite_checks", py_set_finite_checks, METH_O,
     "set_finite_checks(on) -> previous: this thread's NaN/Inf scans of kernel inputs (see "
     "dselectk.functional.trusted_inputs)."},
    {"check_finite", py_check_finite, METH_VARARGS,
     "check_finite(x, name): ValueError naming `name` if the float32 / float64 array x holds NaN or Inf\n"
     "(bool and integer arrays pass; other dtypes are a TypeError)."},
    {"build_info", py_build_info, METH_NOARGS, "build_info() -> dict: OpenMP, BLAS and thread settings."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "dselectk._C",
                                    "C kernels of dselectk (see dselectk.functional for the documented API).",
                                    -1, module_methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__C(void) {
    import_array();
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    /* the most experts the selector and tree kernels take (check_n), for the gates' constructors */
    if (PyModule_AddIntConstant(m, "MAX_EXPERTS", 1L << DSK_MAX_BITS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    for (size_t i = 0; i < sizeof families / sizeof families[0]; i++)
        if (PyModule_AddFunctions(m, families[i]) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    return m;
}
