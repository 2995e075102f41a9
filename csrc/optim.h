/* Optimizer steps on a flat parameter slab: one call updates every parameter of a model.
 *
 * Conventions as in nn.h: arrays updated in place first, then read-only inputs, then sizes and
 * hyperparameters; every pointer is a C-contiguous, caller-owned buffer of N elements; kernels
 * never allocate and never exit. Each function exists for float (_f32) and double (_f64); the
 * update of each element is computed in double and rounded once.
 *
 * The rules are PyTorch's torch.optim ones (no dampening, no lr decay, no amsgrad, no maximize).
 * Weight decay is L2: g = grads + weight_decay * params first (as torch.optim, not AdamW).
 */
#ifndef DSK_OPTIM_H
#define DSK_OPTIM_H

#define DSK_DECLARE_OPTIM(real, sfx)                                                               \
    /* SGD with momentum. params (N), velocity (N) (NULL when momentum == 0: not used), grads (N): \
     *   v = momentum v + g;  params -= lr * (nesterov ? g + momentum v : v)   (momentum > 0),     \
     *   params -= lr * g                                                       (momentum == 0). */ \
    void sgd_step_##sfx(real *params, real *velocity, const real *grads, long N, double lr,        \
                        double momentum, double weight_decay, int nesterov);                       \
    /* Adam (Kingma & Ba) with bias correction; step >= 1 is the 1-based number of this update.    \
     * params (N), m (N), v (N) the first and second moments, grads (N):                           \
     *   m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2;                              \
     *   params -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps). */          \
    void adam_step_##sfx(real *params, real *m, real *v, const real *grads, long N, long step,     \
                         double lr, double beta1, double beta2, double eps, double weight_decay);  \
    /* Adagrad. params (N), accum (N) the running sum of squares, grads (N):                       \
     *   accum += g^2;  params -= lr * g / (sqrt(accum) + eps). */                                 \
    void adagrad_step_##sfx(real *params, real *accum, const real *grads, long N, double lr,       \
                            double eps, double weight_decay);

DSK_DECLARE_OPTIM(float, f32)
DSK_DECLARE_OPTIM(double, f64)

/* The value check of an optimizer step, before it writes anything: 1 when every entry of the
 * `count` slabs (N entries each) is finite and, with last_nonneg, no entry of the last slab is
 * negative (-0.0 is fine: a sum of squares, whose square root the step takes); 0 otherwise. One
 * pass that reads the slabs side by side, on the pool, testing bits (integer operations that
 * vectorize for float and double alike). The caller finds the offending entry for its message
 * only when this says 0. */
int optim_slabs_valid_f32(const float *const *slabs, int count, int last_nonneg, long N);
int optim_slabs_valid_f64(const double *const *slabs, int count, int last_nonneg, long N);

#endif /* DSK_OPTIM_H */
