/* dselectk._C, optim family: optimizer steps on parameter slabs (csrc/optim.h).
 * Converters and conventions: common.h. */
#include "common.h"

#include <limits.h>

#include "optim.h"

/* check_slabs (common.h) with the fast pass first: optim_slabs_valid reads the slabs side by side
 * on the pool, and only when it finds a bad value does check_slabs scan them one by one for the
 * message naming the first (slab, index). Skipped inside trusted_inputs(), like every scan. */
static int check_step_slabs(int tn, PyArrayObject *const *slabs, const char *const *names, int count,
                            int last_nonneg) {
    if (!finite_checks_on) return 0;
    const void *data[4];
    const long N = (long)PyArray_SIZE(slabs[0]);
    for (int j = 0; j < count; j++) data[j] = DATA(slabs[j]);
    int valid;
    Py_BEGIN_ALLOW_THREADS
    valid = tn == NPY_FLOAT ? optim_slabs_valid_f32((const float *const *)data, count, last_nonneg, N)
                            : optim_slabs_valid_f64((const double *const *)data, count, last_nonneg, N);
    Py_END_ALLOW_THREADS
    if (valid) return 0;
    if (check_slabs(slabs, names, count, last_nonneg) < 0) return -1;
    PyErr_SetString(PyExc_ValueError, "an optimizer slab changed during the step's value check (another thread?)");
    return -1;
}

/* params (N) and grads (N) of an optimizer step: params sets the dtype and N and is updated in
 * place; grads is read only and shares no memory with params. Their values are checked with the
 * state's, in one pass (check_slabs). */
static int slab_pair(PyObject *p_obj, PyObject *g_obj, int *tn, npy_intp *N, Hold *h, PyArrayObject **params,
                     PyArrayObject **grads) {
    if (!(*params = hold_from(h, p_obj, inplace_array(p_obj, "params", tn, 1, N, "(N,)", h, 0)))) return -1;
    if (!(*grads = hold_from(h, g_obj, input_array(g_obj, "grads", tn, 1, N, "(N,)", 0)))) return -1;
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
"lr > 0, momentum >= 0, weight_decay >= 0; nesterov needs momentum > 0. NaN / Inf in params, grads or\n"
"(with momentum) velocity raise ValueError, outside trusted_inputs().");

static PyObject *py_sgd_step(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"params", "grads", "velocity", "lr", "momentum", "weight_decay", "nesterov", NULL};
    PyObject *p_obj, *g_obj, *v_obj, *result = NULL;
    double lr, momentum = 0, weight_decay = 0;
    int nesterov = 0;
    Hold h = {0};
    if (!parse_args(args, kw, "OOOd|ddp", kwlist, &p_obj, &g_obj, &v_obj, &lr, &momentum,
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
    const char *names[3] = {"params", "grads", "velocity"};
    PyArrayObject *slabs[3] = {params, grads, velocity};
    if (check_step_slabs(tn, slabs, names, momentum != 0 ? 3 : 2, 0) < 0) goto done; /* velocity: read with momentum */
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
"lr > 0, 0 <= beta1, beta2 < 1, eps > 0, weight_decay >= 0. NaN / Inf in params, grads, m or v and a\n"
"negative v raise ValueError, outside trusted_inputs().");

static PyObject *py_adam_step(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"params", "grads", "m", "v", "step", "lr", "beta1", "beta2", "eps", "weight_decay", NULL};
    PyObject *p_obj, *g_obj, *m_obj, *v_obj, *step_obj, *result = NULL;
    double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
    unsigned long long step;
    Hold h = {0};
    if (!parse_args(args, kw, "OOOOO|ddddd", kwlist, &p_obj, &g_obj, &m_obj, &v_obj, &step_obj, &lr,
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
    const char *names[4] = {"params", "grads", "m", "v"};
    PyArrayObject *slabs[4] = {params, grads, m, v};
    if (check_step_slabs(tn, slabs, names, 4, 1) < 0) goto done; /* v >= 0 */
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
"params -= lr * g / (sqrt(accum) + eps). lr > 0, eps > 0, weight_decay >= 0. NaN / Inf in params,\n"
"grads or accum and a negative accum raise ValueError, outside trusted_inputs().");

static PyObject *py_adagrad_step(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"params", "grads", "accum", "lr", "eps", "weight_decay", NULL};
    PyObject *p_obj, *g_obj, *a_obj, *result = NULL;
    double lr = 1e-2, eps = 1e-10, weight_decay = 0;
    Hold h = {0};
    if (!parse_args(args, kw, "OOO|ddd", kwlist, &p_obj, &g_obj, &a_obj, &lr, &eps, &weight_decay))
        return NULL;
    if (check_scalar(lr, "lr", 1) < 0 || check_scalar(eps, "eps", 1) < 0 ||
        check_nonneg(weight_decay, "weight_decay") < 0)
        return NULL;
    int tn = NPY_NOTYPE;
    npy_intp N[1] = {-1};
    PyArrayObject *params, *grads, *accum;
    if (slab_pair(p_obj, g_obj, &tn, N, &h, &params, &grads) < 0) goto done;
    if (!(accum = hold_from(&h, a_obj, inplace_array(a_obj, "accum", &tn, 1, N, "(N,)", &h, 0)))) goto done;
    const char *names[3] = {"params", "grads", "accum"};
    PyArrayObject *slabs[3] = {params, grads, accum};
    if (check_step_slabs(tn, slabs, names, 3, 1) < 0) goto done; /* accum >= 0 */
    Py_BEGIN_ALLOW_THREADS
    DISPATCH(tn, adagrad_step, DATA(params), DATA(accum), DATA(grads), (long)N[0], lr, eps, weight_decay);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(&h);
    return result;
}

PyMethodDef dsk_optim_methods[] = {
    KW(sgd_step),
    KW(adam_step),
    KW(adagrad_step),
    {NULL, NULL, 0, NULL},
};
