/* dselectk._C, sinkhorn family: the Sinkhorn normalisation of the permutation local search
 * (csrc/sinkhorn.h): forward with its cache of log-domain half-steps, backward through the
 * iterations with the entropy regularizer, the regularizer's value.
 * Converters and conventions: common.h. The cache `logs` is float64 for float32 and float64 calls
 * alike (csrc/sinkhorn.h says why). */
#include "common.h"

#include <math.h>

#include "sinkhorn.h"

/* Largest |log_alpha| / tau accepted: the log-domain iterates stay far from overflow (each
 * half-step moves an entry by at most the spread of its row or column plus log n). */
#define SINKHORN_MAX_SCALED 1e150
#define SINKHORN_MAX_ITERS 100000

/* 0, or -1 with a ValueError when the Sinkhorn input log_alpha / tau would overflow. */
static int check_scaled(PyArrayObject *a, double tau) {
    const npy_intp size = PyArray_SIZE(a);
    double top = 0;
    for (npy_intp i = 0; i < size; i++) {
        const double v = fabs(PyArray_TYPE(a) == NPY_FLOAT ? (double)((const float *)DATA(a))[i]
                                                           : ((const double *)DATA(a))[i]);
        top = v > top ? v : top;
    }
    if (top / tau <= SINKHORN_MAX_SCALED) return 0;
    char msg[256];
    snprintf(msg, sizeof msg, "max |log_alpha| / tau = %g / %g exceeds %g: the Sinkhorn iterates would overflow; "
             "expected a larger tau", top, tau, SINKHORN_MAX_SCALED);
    PyErr_SetString(PyExc_ValueError, msg);
    return -1;
}

/* K matrices of n x n with `slots` cached half-steps: 0, or -1 with a MemoryError when the cache
 * could not be indexed. */
static int check_cache_size(npy_intp K, npy_intp n, npy_intp slots) {
    if ((double)K * (double)slots * (double)n * (double)n * 8.0 < (double)NPY_MAX_INTP) return 0;
    PyErr_Format(PyExc_MemoryError, "the Sinkhorn cache of K = %ld matrices of %ld x %ld with %ld half-steps "
                 "is too large", (long)K, (long)n, (long)n, (long)slots);
    return -1;
}

PyDoc_STRVAR(sinkhorn_forward_doc,
"sinkhorn_forward(log_alpha, tau, iters, keep=True, out=None) -> (P, logs)\n\n"
"P (K, n, n) = Sinkhorn(log_alpha / tau) for log_alpha (K, n, n): `iters` iterations of a row\n"
"log-sum-exp normalisation followed by a column one (the authors' order), so P's columns sum to 1.\n"
"tau > 0, 1 <= iters <= 100000. logs (K, 2 iters, n, n) float64 holds every half-step (the\n"
"backward's cache) when keep, else (K, 1, n, n) only the last.");

static PyObject *py_sinkhorn_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"log_alpha", "tau", "iters", "keep", "out", NULL};
    PyObject *a_obj, *iters_obj, *out_obj = NULL, *result = NULL;
    double tau;
    int keep = 1;
    unsigned long long iters;
    Hold h = {0};
    if (!parse_args(args, kw, "OdO|pO", kwlist, &a_obj, &tau, &iters_obj, &keep, &out_obj))
        return NULL;
    if (check_gamma(tau, "tau (the temperature)") < 0 ||
        parse_count(iters_obj, "iters (the number of Sinkhorn iterations)", 1, SINKHORN_MAX_ITERS, &iters) < 0)
        return NULL;
    int tn = NPY_NOTYPE;
    npy_intp adims[3] = {-1, -1, -1};
    PyArrayObject *a = hold_from(&h, a_obj, input_array(a_obj, "log_alpha", &tn, 3, adims, "(K, n, n)", 1));
    if (!a) goto done;
    const npy_intp K = adims[0], n = adims[1];
    if (check_batch(K, "log_alpha") < 0) goto done;
    if (n < 1 || adims[2] != n) {
        PyErr_Format(PyExc_ValueError, "argument 'log_alpha' must have shape (K, n, n) with n >= 1 (square "
                     "matrices), got (%ld, %ld, %ld)", (long)K, (long)n, (long)adims[2]);
        goto done;
    }
    if (check_scaled(a, tau) < 0) goto done;
    const npy_intp slots = keep ? 2 * (npy_intp)iters : 1;
    if (check_cache_size(K, n, slots) < 0) goto done;
    npy_intp ldims[4] = {K, slots, n, n};
    PyArrayObject *P = hold(&h, output_array(out_obj, "out", tn, 3, adims, &h));
    if (!P) goto done;
    PyArrayObject *logs = hold(&h, new_array(NPY_DOUBLE, 4, ldims));
    if (!logs) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, sinkhorn_forward, DATA(P), DATA(logs), DATA(a), (long)K, (long)n, tau, (long)iters, (long)slots);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OO)", P, logs);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(sinkhorn_backward_doc,
"sinkhorn_backward(dP, P, logs, tau, lam=0.0, eps=1e-6) -> dlog_alpha\n\n"
"Gradient (K, n, n) of <dP, P> + lam * Omega(P) with respect to log_alpha, through every iteration;\n"
"Omega = mean over K of H(P) + H(row-normalised P), H(A) = -sum A log(A + eps). dP (K, n, n) may be\n"
"None (the regularizer alone); P (K, n, n) and logs (K, 2 iters, n, n) (float64) from\n"
"sinkhorn_forward(..., keep=True) with the same tau.");

static PyObject *py_sinkhorn_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dP", "P", "logs", "tau", "lam", "eps", NULL};
    PyObject *dP_obj, *P_obj, *logs_obj, *result = NULL;
    double tau, lam = 0, eps = 1e-6;
    Hold h = {0};
    if (!parse_args(args, kw, "OOOd|dd", kwlist, &dP_obj, &P_obj, &logs_obj, &tau, &lam, &eps))
        return NULL;
    if (check_gamma(tau, "tau (the temperature)") < 0 || check_nonneg(lam, "lam") < 0 || check_gamma(eps, "eps") < 0)
        return NULL;
    /* logs is float64 whatever the call's dtype: checked here, where its message can say so */
    if (PyArray_Check(logs_obj) && PyArray_TYPE((PyArrayObject *)logs_obj) != NPY_DOUBLE) {
        PyErr_Format(PyExc_TypeError, "argument 'logs' must have dtype float64 (the cache of sinkhorn_forward is "
                     "float64 for float32 and float64 calls alike), got %s",
                     PyArray_DESCR((PyArrayObject *)logs_obj)->typeobj->tp_name);
        return NULL;
    }
    int tn = NPY_NOTYPE, dn = NPY_DOUBLE;
    npy_intp ldims[4] = {-1, -1, -1, -1};
    PyArrayObject *logs = hold_from(&h, logs_obj, input_array(logs_obj, "logs", &dn, 4, ldims,
                                                              "(K, 2 iters, n, n), float64", 0));
    if (!logs) goto done;
    const npy_intp K = ldims[0], slots = ldims[1], n = ldims[2];
    if (check_batch(K, "logs") < 0) goto done;
    if (n < 1 || ldims[3] != n || slots < 2 || slots % 2) {
        PyErr_Format(PyExc_ValueError, "argument 'logs' must have shape (K, 2 iters, n, n) with iters >= 1 and n >= 1 "
                     "(the cache of sinkhorn_forward with keep=True), got (%ld, %ld, %ld, %ld)", (long)K,
                     (long)slots, (long)n, (long)ldims[3]);
        goto done;
    }
    npy_intp pdims[3] = {K, n, n};
    PyArrayObject *P = hold_from(&h, P_obj, input_array(P_obj, "P", &tn, 3, pdims, "(K, n, n)", 0));
    if (!P) goto done;
    PyArrayObject *dP = NULL;
    if (optional_input(dP_obj, "dP", &tn, 3, pdims, "(K, n, n)", 1, &dP) < 0) goto done;
    hold_from(&h, dP_obj, dP);
    PyArrayObject *da = hold(&h, new_array(tn, 3, pdims));
    PyArrayObject *work = hold(&h, new_array(NPY_DOUBLE, 3, pdims));
    if (!da || !work) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, sinkhorn_backward, DATA(da), DATA(work), OPTDATA(dP), DATA(P), DATA(logs), (long)K, (long)n, tau,
             (long)(slots / 2), lam, eps);
    Py_END_ALLOW_THREADS
    result = Py_NewRef((PyObject *)da);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(sinkhorn_entropy_doc,
"sinkhorn_entropy(P, eps=1e-6) -> float\n\n"
"Sum over the K matrices of P (K, n, n) of H(P) + H(row-normalised P), H(A) = -sum A log(A + eps)\n"
"(natural log); a row of zeros adds nothing to the second term.");

static PyObject *py_sinkhorn_entropy(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"P", "eps", NULL};
    PyObject *P_obj, *result = NULL;
    double eps = 1e-6, value = 0;
    Hold h = {0};
    if (!parse_args(args, kw, "O|d", kwlist, &P_obj, &eps)) return NULL;
    if (check_gamma(eps, "eps") < 0) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp dims[3] = {-1, -1, -1};
    PyArrayObject *P = hold_from(&h, P_obj, input_array(P_obj, "P", &tn, 3, dims, "(K, n, n)", 1));
    if (!P) goto done;
    if (dims[2] != dims[1]) {
        PyErr_Format(PyExc_ValueError, "argument 'P' must have shape (K, n, n) (square matrices), got (%ld, %ld, %ld)",
                     (long)dims[0], (long)dims[1], (long)dims[2]);
        goto done;
    }
    if (check_range(P, "P", 0.0, INFINITY, ">= 0") < 0) goto done;
    Py_BEGIN_ALLOW_THREADS
    if (tn == NPY_FLOAT) value = sinkhorn_entropy_f32(DATA(P), (long)dims[0], (long)dims[1], eps);
    else value = sinkhorn_entropy_f64(DATA(P), (long)dims[0], (long)dims[1], eps);
    Py_END_ALLOW_THREADS
    result = PyFloat_FromDouble(value);
done:
    release(&h);
    return result;
}

PyMethodDef dsk_sinkhorn_methods[] = {
    KW(sinkhorn_forward),
    KW(sinkhorn_backward),
    KW(sinkhorn_entropy),
    {NULL, NULL, 0, NULL},
};
