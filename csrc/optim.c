/* Optimizer steps (optim.h) for float and double. Elementwise, so one OpenMP loop each. */
#include "optim.h"
#include "dsk.h"
#include <math.h>

#define DSK_DEFINE_OPTIM(real, sfx)                                                                \
    void sgd_step_##sfx(real *params, real *velocity, const real *grads, long N, double lr,        \
                        double momentum, double weight_decay, int nesterov) {                      \
        DSK_PARALLEL_FOR(N)                                                                        \
        for (long i = 0; i < N; i++) {                                                             \
            double g = (double)grads[i] + weight_decay * (double)params[i];                        \
            if (momentum != 0) {                                                                   \
                const double v = momentum * (double)velocity[i] + g;                               \
                velocity[i] = (real)v;                                                             \
                g = nesterov ? g + momentum * v : v;                                               \
            }                                                                                      \
            params[i] = (real)((double)params[i] - lr * g);                                        \
        }                                                                                          \
    }                                                                                              \
    void adam_step_##sfx(real *params, real *m, real *v, const real *grads, long N, long step,     \
                         double lr, double beta1, double beta2, double eps, double weight_decay) { \
        /* bias corrections folded into two scalars; the per-entry arithmetic is in real       \
         * precision (as torch.optim does for float32) so that it vectorizes */                 \
        const real step_size = (real)(lr / (1 - pow(beta1, (double)step)));                       \
        const real inv_bc2_sqrt = (real)(1 / sqrt(1 - pow(beta2, (double)step)));                 \
        const real b1 = (real)beta1, b2 = (real)beta2, wd = (real)weight_decay, e = (real)eps;   \
        DSK_PARALLEL_FOR(N)                                                                        \
        for (long i = 0; i < N; i++) {                                                             \
            const real g = grads[i] + wd * params[i];                                              \
            const real mi = b1 * m[i] + (1 - b1) * g;                                              \
            const real vi = b2 * v[i] + (1 - b2) * g * g;                                          \
            m[i] = mi;                                                                             \
            v[i] = vi;                                                                             \
            params[i] -= step_size * mi / (SQRT(vi) * inv_bc2_sqrt + e);                           \
        }                                                                                          \
    }                                                                                              \
    void adagrad_step_##sfx(real *params, real *accum, const real *grads, long N, double lr,       \
                            double eps, double weight_decay) {                                     \
        DSK_PARALLEL_FOR(N)                                                                        \
        for (long i = 0; i < N; i++) {                                                             \
            const double g = (double)grads[i] + weight_decay * (double)params[i];                  \
            const double a = (double)accum[i] + g * g;                                             \
            accum[i] = (real)a;                                                                    \
            params[i] = (real)((double)params[i] - lr * g / (sqrt(a) + eps));                      \
        }                                                                                          \
    }

#define SQRT sqrtf
DSK_DEFINE_OPTIM(float, f32)
#undef SQRT
#define SQRT sqrt
DSK_DEFINE_OPTIM(double, f64)
#undef SQRT
