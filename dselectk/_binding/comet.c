/* dselectk._C, COMET family: the tree gate kernels of csrc/comet.h.
 * Converters and conventions: common.h. */
#include "common.h"

#include "comet.h"

/* ---------------------------------------------------------------------------------------------
 * COMET
 */

/* The leaf logits A (B, k, n) of a call: the call's first array (it sets the dtype *tn), held in h,
 * with B >= 1, 2 <= n and 1 <= k <= n; adims receives (B, k, n). NULL with an exception set. */
static PyArrayObject *comet_leaf_logits(PyObject *A_obj, int *tn, npy_intp *adims, Hold *h) {
    adims[0] = adims[1] = adims[2] = -1;
    PyArrayObject *A = hold_from(h, A_obj, input_array(A_obj, "A", tn, 3, adims, "(B, k, n)", 1));
    if (!A) return NULL;
    if (check_batch(adims[0], "A") < 0 || check_n(adims[2]) < 0 ||
        check_k(adims[1], adims[2], "A.shape[1], the number of trees") < 0)
        return NULL;
    return A;
}
PyDoc_STRVAR(comet_forward_doc,
"comet_forward(A, Z, gamma, out=None) -> (w, sz, reach_int, reach, g, norm)\n\n"
"The COMET gate for a batch: leaf logits A (B, k, n) (expert order) and node logits\n"
"Z (B, k, n - 1) (heap order) of k trees over n experts. w (B, n) are the expert weights;\n"
"sz = S(Z) (B, k, n - 1), the reach of the internal nodes reach_int (B, k, n - 1) and of the\n"
"leaves reach (B, k, n), the softmax over the k n leaf scores g (B, k, n) and norm (B, 2) are the\n"
"cache comet_backward needs. The static gate is B = 1.");

static PyObject *py_comet_forward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"A", "Z", "gamma", "out", NULL};
    PyObject *A_obj, *Z_obj, *out_obj = NULL, *result = NULL;
    double gamma;
    Hold h = {0};
    if (!parse_args(args, kw, "OOd|O", kwlist, &A_obj, &Z_obj, &gamma, &out_obj)) return NULL;
    if (check_gamma(gamma, "gamma") < 0) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp adims[3];
    PyArrayObject *A = comet_leaf_logits(A_obj, &tn, adims, &h);
    if (!A) goto done;
    const npy_intp B = adims[0], k = adims[1], n = adims[2];
    npy_intp zdims[3] = {B, k, n - 1};
    PyArrayObject *Z = hold_from(&h, Z_obj, input_array(Z_obj, "Z", &tn, 3, zdims, "(B, k, n - 1)", 1));
    if (!Z) goto done;
    npy_intp wdims[2] = {B, n}, ndims[2] = {B, 2};
    PyArrayObject *w = hold(&h, output_array(out_obj, "out", tn, 2, wdims, &h));
    PyArrayObject *sz = hold(&h, new_array(tn, 3, zdims));
    PyArrayObject *reach_int = hold(&h, new_array(tn, 3, zdims));
    PyArrayObject *reach = hold(&h, new_array(tn, 3, adims));
    PyArrayObject *g = hold(&h, new_array(tn, 3, adims));
    PyArrayObject *norm = hold(&h, new_array(tn, 2, ndims));
    if (!w || !sz || !reach_int || !reach || !g || !norm) goto done;
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, comet_forward, DATA(w), DATA(sz), DATA(reach_int), DATA(reach), DATA(g), DATA(norm), DATA(A),
             DATA(Z), (long)B, (int)k, (long)n, gamma);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OOOOOO)", w, sz, reach_int, reach, g, norm);
done:
    release(&h);
    return result;
}

PyDoc_STRVAR(comet_backward_doc,
"comet_backward(dw, A, Z, sz, reach_int, reach, g, norm, gamma, lam=0.0, eps=1e-6) -> (dA, dZ)\n\n"
"Gradients of <dw, w> + lam * mean_b sum_t h(reach_bt), h(p) = -sum_j p_j log(p_j + eps), with\n"
"respect to A (B, k, n) and Z (B, k, n - 1). dw (B, n) may be None (regularizer only); sz,\n"
"reach_int, reach, g, norm come from comet_forward(A, Z, gamma).");

static PyObject *py_comet_backward(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dw", "A", "Z", "sz", "reach_int", "reach", "g", "norm", "gamma", "lam", "eps", NULL};
    PyObject *dw_obj, *A_obj, *Z_obj, *sz_obj, *ri_obj, *reach_obj, *g_obj, *norm_obj, *result = NULL;
    double gamma, lam = 0, eps = 1e-6;
    Hold h = {0};
    double *work = NULL;
    if (!parse_args(args, kw, "OOOOOOOOd|dd", kwlist, &dw_obj, &A_obj, &Z_obj, &sz_obj, &ri_obj,
                                     &reach_obj, &g_obj, &norm_obj, &gamma, &lam, &eps))
        return NULL;
    if (check_gamma(gamma, "gamma") < 0 || check_nonneg(lam, "lam") < 0 || check_gamma(eps, "eps") < 0) return NULL;
    int tn = NPY_NOTYPE;
    npy_intp adims[3];
    PyArrayObject *A = comet_leaf_logits(A_obj, &tn, adims, &h);
    if (!A) goto done;
    const npy_intp B = adims[0], k = adims[1], n = adims[2];
    npy_intp zdims[3] = {B, k, n - 1}, wdims[2] = {B, n}, ndims[2] = {B, 2};
    PyArrayObject *dw = NULL, *Z, *sz, *reach_int, *reach, *g, *norm;
    if (optional_input(dw_obj, "dw", &tn, 2, wdims, "(B, n)", 1, &dw) < 0) goto done;
    hold_from(&h, dw_obj, dw);
    if (!(Z = hold_from(&h, Z_obj, input_array(Z_obj, "Z", &tn, 3, zdims, "(B, k, n - 1)", 1)))) goto done;
    if (!(sz = hold_from(&h, sz_obj, input_array(sz_obj, "sz", &tn, 3, zdims, "(B, k, n - 1)", 0)))) goto done;
    if (!(reach_int = hold_from(&h, ri_obj, input_array(ri_obj, "reach_int", &tn, 3, zdims, "(B, k, n - 1)", 0))))
        goto done;
    if (!(reach = hold_from(&h, reach_obj, input_array(reach_obj, "reach", &tn, 3, adims, "(B, k, n)", 0)))) goto done;
    if (!(g = hold_from(&h, g_obj, input_array(g_obj, "g", &tn, 3, adims, "(B, k, n)", 0)))) goto done;
    if (!(norm = hold_from(&h, norm_obj, input_array(norm_obj, "norm", &tn, 2, ndims, "(B, 2)", 0)))) goto done;
    PyArrayObject *dA = hold(&h, new_array(tn, 3, adims));
    PyArrayObject *dZ = hold(&h, new_array(tn, 3, zdims));
    if (!dA || !dZ) goto done;
    if (2 * n - 1 > DSK_COMET_STACK_NODES) { /* the kernel's scratch, when its stack buffer is too small */
        work = PyMem_RawMalloc((size_t)B * (size_t)(2 * n - 1) * sizeof(double));
        if (!work) {
            PyErr_NoMemory();
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, comet_backward, DATA(dA), DATA(dZ), work, OPTDATA(dw), DATA(A), DATA(Z), DATA(sz), DATA(reach_int),
             DATA(reach), DATA(g), DATA(norm), (long)B, (int)k, (long)n, gamma, lam, eps);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OO)", dA, dZ);
done:
    PyMem_RawFree(work);
    release(&h);
    return result;
}

PyDoc_STRVAR(comet_leaf_nodes_doc,
"comet_leaf_nodes(n) -> leaf\n\n"
"leaf (n,) int64: the heap index of expert j's leaf in a COMET tree over n experts (expert j is\n"
"the j-th leaf in left-first depth-first order).");

static PyObject *py_comet_leaf_nodes(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"n", NULL};
    Py_ssize_t n;
    if (!parse_args(args, kw, "n", kwlist, &n)) return NULL;
    if (check_n(n) < 0) return NULL;
    npy_intp dims[1] = {n};
    PyArrayObject *leaf = new_array(NPY_INT64, 1, dims);
    if (!leaf) return NULL;
    long *buf = PyMem_RawMalloc((size_t)n * sizeof(long));
    if (!buf) {
        Py_DECREF(leaf);
        return PyErr_NoMemory();
    }
    comet_leaf_nodes(buf, (long)n);
    int64_t *out = DATA(leaf);
    for (npy_intp j = 0; j < n; j++) out[j] = buf[j];
    PyMem_RawFree(buf);
    return (PyObject *)leaf;
}

PyMethodDef dsk_comet_methods[] = {
    KW(comet_forward),
    KW(comet_backward),
    KW(comet_leaf_nodes),
    {NULL, NULL, 0, NULL},
};
