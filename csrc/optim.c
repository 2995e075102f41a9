/* Optimizer steps (optim.h) for float and double. Elementwise: one loop on the pool each. */
#include "optim.h"
#include "dsk.h"
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Entries per chunk of the pool: ~15 us of an Adam update. */
#define DSK_OPTIM_GRAIN 16384

#define DSK_DEFINE_OPTIM(real, sfx)                                                                \
    typedef struct {                                                                               \
        real *params, *s1, *s2;                                                                    \
        const real *grads;                                                                         \
        double lr, momentum, weight_decay, eps;                                                    \
        int nesterov;                                                                              \
        real step_size, inv_bc2_sqrt, b1, b2;                                                      \
    } OptimJob_##sfx;                                                                              \
                                                                                                   \
    static void sgd_range_##sfx(void *arg, long lo, long hi) {                                     \
        const OptimJob_##sfx *j = arg;                                                             \
        real *params = j->params, *velocity = j->s1;                                               \
        const real *grads = j->grads;                                                              \
        const double lr = j->lr, momentum = j->momentum, weight_decay = j->weight_decay;           \
        for (long i = lo; i < hi; i++) {                                                           \
            double g = (double)grads[i] + weight_decay * (double)params[i];                        \
            if (momentum != 0) {                                                                   \
                const double v = momentum * (double)velocity[i] + g;                               \
                velocity[i] = (real)v;                                                             \
                g = j->nesterov ? g + momentum * v : v;                                            \
            }                                                                                      \
            params[i] = (real)((double)params[i] - lr * g);                                        \
        }                                                                                          \
    }                                                                                              \
    void sgd_step_##sfx(real *params, real *velocity, const real *grads, long N, double lr,        \
                        double momentum, double weight_decay, int nesterov) {                      \
        OptimJob_##sfx j = {params, velocity, NULL, grads, lr, momentum, weight_decay, 0, nesterov, 0, 0, 0, 0}; \
        dsk_parallel_for(N, DSK_OPTIM_GRAIN, sgd_range_##sfx, &j);                                 \
    }                                                                                              \
                                                                                                   \
    static void adam_range_##sfx(void *arg, long lo, long hi) {                                    \
        const OptimJob_##sfx *j = arg;                                                             \
        real *restrict params = j->params, *restrict m = j->s1, *restrict v = j->s2;               \
        const real *restrict grads = j->grads;                                                     \
        const real step_size = j->step_size, inv_bc2_sqrt = j->inv_bc2_sqrt, b1 = j->b1, b2 = j->b2; \
        const real wd = (real)j->weight_decay, e = (real)j->eps;                                   \
        for (long i = lo; i < hi; i++) {                                                           \
            const real g = grads[i] + wd * params[i];                                              \
            const real mi = b1 * m[i] + (1 - b1) * g;                                              \
            const real vi = b2 * v[i] + (1 - b2) * g * g;                                          \
            m[i] = mi;                                                                             \
            v[i] = vi;                                                                             \
            params[i] -= step_size * mi / (SQRT(vi) * inv_bc2_sqrt + e);                           \
        }                                                                                          \
    }                                                                                              \
    void adam_step_##sfx(real *params, real *m, real *v, const real *grads, long N, long step,     \
                         double lr, double beta1, double beta2, double eps, double weight_decay) { \
        /* bias corrections folded into two scalars; the per-entry arithmetic is in real           \
         * precision (as torch.optim does for float32) so that it vectorizes */                    \
        OptimJob_##sfx j = {params, m, v, grads, lr, 0, weight_decay, eps, 0,                      \
                            (real)(lr / (1 - pow(beta1, (double)step))),                           \
                            (real)(1 / sqrt(1 - pow(beta2, (double)step))), (real)beta1, (real)beta2}; \
        dsk_parallel_for(N, DSK_OPTIM_GRAIN, adam_range_##sfx, &j);                                \
    }                                                                                              \
                                                                                                   \
    static void adagrad_range_##sfx(void *arg, long lo, long hi) {                                 \
        const OptimJob_##sfx *j = arg;                                                             \
        real *params = j->params, *accum = j->s1;                                                  \
        const real *grads = j->grads;                                                              \
        for (long i = lo; i < hi; i++) {                                                           \
            const double g = (double)grads[i] + j->weight_decay * (double)params[i];               \
            const double a = (double)accum[i] + g * g;                                             \
            accum[i] = (real)a;                                                                    \
            params[i] = (real)((double)params[i] - j->lr * g / (sqrt(a) + j->eps));                \
        }                                                                                          \
    }                                                                                              \
    void adagrad_step_##sfx(real *params, real *accum, const real *grads, long N, double lr,       \
                            double eps, double weight_decay) {                                     \
        OptimJob_##sfx j = {params, accum, NULL, grads, lr, 0, weight_decay, eps, 0, 0, 0, 0, 0};  \
        dsk_parallel_for(N, DSK_OPTIM_GRAIN, adagrad_range_##sfx, &j);                             \
    }

#define SQRT sqrtf
DSK_DEFINE_OPTIM(float, f32)
#undef SQRT
#define SQRT sqrt
DSK_DEFINE_OPTIM(double, f64)
#undef SQRT

/* The slab check: bits of NaN / Inf (exponent all ones) and of a negative number other than -0.0
 * (sign set and some other bit set), OR-ed over a chunk without early exit so that it vectorizes. */
#define DSK_OPTIM_SLABS 4
#define DSK_DEFINE_SLAB_CHECK(real, sfx, utype, EXP, SIGN)                                        \
    typedef struct {                                                                               \
        const real *slabs[DSK_OPTIM_SLABS];                                                        \
        int count, last_nonneg;                                                                    \
        int bad;                                                                                   \
    } SlabCheck_##sfx;                                                                             \
                                                                                                   \
    static utype nonfinite_bits_##sfx(const real *restrict x, long n) {                            \
        utype acc = 0;                                                                             \
        for (long i = 0; i < n; i++) {                                                             \
            utype b;                                                                               \
            memcpy(&b, x + i, sizeof b);                                                           \
            acc |= (utype)((b & EXP) == EXP);                                                      \
        }                                                                                          \
        return acc;                                                                                \
    }                                                                                              \
                                                                                                   \
    static utype negative_bits_##sfx(const real *restrict x, long n) {                             \
        utype acc = 0;                                                                             \
        for (long i = 0; i < n; i++) {                                                             \
            utype b;                                                                               \
            memcpy(&b, x + i, sizeof b);                                                           \
            acc |= (utype)(((b & EXP) == EXP) | ((b >> (8 * sizeof(utype) - 1)) & ((b & ~SIGN) != 0))); \
        }                                                                                          \
        return acc;                                                                                \
    }                                                                                              \
                                                                                                   \
    static void slab_check_range_##sfx(void *arg, long lo, long hi) {                              \
        SlabCheck_##sfx *c = arg;                                                                  \
        if (__atomic_load_n(&c->bad, __ATOMIC_RELAXED)) return; /* another chunk found one */     \
        utype acc = 0;                                                                             \
        for (int s = 0; s < c->count && !acc; s++)                                                 \
            acc |= s == c->count - 1 && c->last_nonneg ? negative_bits_##sfx(c->slabs[s] + lo, hi - lo) \
                                                       : nonfinite_bits_##sfx(c->slabs[s] + lo, hi - lo); \
        if (acc) __atomic_store_n(&c->bad, 1, __ATOMIC_RELAXED);                                   \
    }                                                                                              \
                                                                                                   \
    int optim_slabs_valid_##sfx(const real *const *slabs, int count, int last_nonneg, long N) {    \
        SlabCheck_##sfx c = {{NULL}, count < DSK_OPTIM_SLABS ? count : DSK_OPTIM_SLABS, last_nonneg, 0}; \
        for (int s = 0; s < c.count; s++) c.slabs[s] = slabs[s];                                   \
        dsk_parallel_for(N, DSK_OPTIM_GRAIN, slab_check_range_##sfx, &c);                          \
        return !c.bad;                                                                             \
    }

DSK_DEFINE_SLAB_CHECK(float, f32, uint32_t, 0x7f800000u, 0x80000000u)
DSK_DEFINE_SLAB_CHECK(double, f64, uint64_t, 0x7ff0000000000000ull, 0x8000000000000000ull)
