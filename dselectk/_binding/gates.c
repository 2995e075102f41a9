/* dselectk._C, gates family: the gate kernels of csrc/gates.h: the smooth-step, the single-expert
 * selector, DSelect-k and its regularizers, softmax and Top-k, the noisy Top-k logits, the
 * softmax-selector ablation gate.
 * Converters and conventions: common.h. */
#include "common.h"

#include "gates.h"

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
    if (!parse_args(args, kw, "Od|O", kwlist, &t_obj, &gamma, &out_obj)) return NULL;
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
    if (!parse_args(args, kw, "OOd", kwlist, &dout_obj, &t_obj, &gamma)) return NULL;
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
    if (!parse_args(args, kw, "On|O", kwlist, &s_obj, &n, &out_obj)) return NULL;
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
    if (!parse_args(args, kw, "OOn", kwlist, &dr_obj, &s_obj, &n)) return NULL;
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
    if (!parse_args(args, kw, "OOnd|O", kwlist, &alpha_obj, &Z_obj, &n, &gamma, &out_obj))
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
    if (!parse_args(args, kw, "OOOOOd|ddd", kwlist, &dw_obj, &sigma_obj, &sz_obj, &r_obj,
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
    if (!parse_args(args, kw, "O|d", kwlist, &r_obj, &eps)) return NULL;
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
    if (topk ? !parse_args(args, kw, "On|O", kwlist_tk, &l_obj, &k, &out_obj)
             : !parse_args(args, kw, "O|O", kwlist_sm, &l_obj, &out_obj))
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
    if (!parse_args(args, kw, "OO", kwlist, &dw_obj, &w_obj)) return NULL;
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
    if (!parse_args(args, kw, "OOO", backward ? kwlist_b : kwlist_f, &a_obj, &raw_obj,
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
    if (!parse_args(args, kw, "OOd", kwlist, &alpha_obj, &beta_obj, &T)) return NULL;
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
    if (!parse_args(args, kw, "OOOd|dd", kwlist, &dw_obj, &sigma_obj, &P_obj, &T, &lam, &eps))
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

PyMethodDef dsk_gates_methods[] = {
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
    {NULL, NULL, 0, NULL},
};
