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
        const double step_size = lr / (1 - pow(beta1, (double)step));                              \
        const double bc2_sqrt = sqrt(1 - pow(beta2, (double)step));                                \
        DSK_PARALLEL_FOR(N)                                                                        \
        for (long i = 0; i < N; i++) {                                                             \
            const double g = (double)grads[i] + weight_decay * (double)params[i];                  \
            const double mi = beta1 * (double)m[i] + (1 - beta1) * g;                              \
            const double vi = beta2 * (double)v[i] + (1 - beta2) * g * g;                          \
            m[i] = (real)mi;                                                                       \
            v[i] = (real)vi;                                                                       \
            params[i] = (real)((double)params[i] - step_size * mi / (sqrt(vi) / bc2_sqrt + eps));  \
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

DSK_DEFINE_OPTIM(float, f32)
DSK_DEFINE_OPTIM(double, f64)
