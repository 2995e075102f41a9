/* Embedding gather, sparse backward and lazy optimizer steps (embedding.h). The gather and the
 * backward are instantiated from embedding_impl.h for float / double tables and int32 / int64 ids;
 * the id sort and the optimizer steps are short enough to be macros, as in optim.c. */
#include "embedding.h"
#include "dsk.h"
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Radix sort digits: 11 bits, so ids below 2^22 (4M rows) sort in two passes over the positions. */
#define DSK_RADIX_BITS 11
#define DSK_RADIX_SIZE (1 << DSK_RADIX_BITS)

/* LSD radix sort of the positions by id: each pass is a stable counting sort on one digit, so
 * after the last pass positions are ordered by id and, within an id, by position. Serial: it is
 * O(N) per pass with a 16 KiB histogram, and the summation it prepares is the parallel part. */
#define DSK_DEFINE_EMBEDDING_IDS(idx_t, isfx)                                                      \
    long embedding_sort_ids_##isfx(int64_t *perm, int64_t *starts, const idx_t *ids, long N,       \
                                   long V) {                                                       \
        int64_t *src = perm, *dst = starts;                                                        \
        for (long i = 0; i < N; i++) src[i] = i;                                                   \
        const uint64_t top = V > 1 ? (uint64_t)(V - 1) : 0;                                        \
        for (int shift = 0; shift < 64 && (top >> shift) != 0; shift += DSK_RADIX_BITS) {          \
            long count[DSK_RADIX_SIZE + 1];                                                        \
            memset(count, 0, sizeof count);                                                        \
            for (long i = 0; i < N; i++)                                                           \
                count[(((uint64_t)ids[src[i]] >> shift) & (DSK_RADIX_SIZE - 1)) + 1]++;            \
            for (long k = 0; k < DSK_RADIX_SIZE; k++) count[k + 1] += count[k];                    \
            for (long i = 0; i < N; i++) {                                                         \
                const int64_t p = src[i];                                                          \
                dst[count[((uint64_t)ids[p] >> shift) & (DSK_RADIX_SIZE - 1)]++] = p;              \
            }                                                                                      \
            int64_t *t = src;                                                                      \
            src = dst;                                                                             \
            dst = t;                                                                               \
        }                                                                                          \
        if (src != perm) memcpy(perm, src, sizeof(int64_t) * (size_t)N);                           \
        long U = 0;                                                                                \
        for (long i = 0; i < N; i++)                                                               \
            if (i == 0 || ids[perm[i]] != ids[perm[i - 1]]) starts[U++] = i;                       \
        starts[U] = N;                                                                             \
        return U;                                                                                  \
    }

DSK_DEFINE_EMBEDDING_IDS(int32_t, i32)
DSK_DEFINE_EMBEDDING_IDS(int64_t, i64)

#define real float
#define IDX int32_t
#define FN(name) name##_f32_i32
#include "embedding_impl.h"
#undef IDX
#undef FN
#define IDX int64_t
#define FN(name) name##_f32_i64
#include "embedding_impl.h"
#undef IDX
#undef FN
#undef real

#define real double
#define IDX int32_t
#define FN(name) name##_f64_i32
#include "embedding_impl.h"
#undef IDX
#undef FN
#define IDX int64_t
#define FN(name) name##_f64_i64
#include "embedding_impl.h"
#undef IDX
#undef FN
#undef real

/* The arithmetic of each entry is that of adagrad_step / adam_step in optim.c (with weight decay
 * 0), so a sparse step over every row equals the dense step bit for bit. Rows are distinct, so the
 * parallel loop over them never writes one entry twice. */
#define DSK_DEFINE_SPARSE_OPTIM(real, sfx)                                                         \
    typedef struct {                                                                               \
        real *table, *s1, *s2;                                                                     \
        const int64_t *rows;                                                                       \
        const real *grad_rows;                                                                     \
        long d;                                                                                    \
        double lr, eps;                                                                            \
        real step_size, inv_bc2_sqrt, b1, b2;                                                      \
    } SparseOptim_##sfx;                                                                           \
                                                                                                   \
    static void sparse_adagrad_range_##sfx(void *arg, long lo, long hi) {                          \
        const SparseOptim_##sfx *o = arg;                                                          \
        const long d = o->d;                                                                       \
        for (long u = lo; u < hi; u++) {                                                           \
            real *p = o->table + o->rows[u] * d, *a = o->s1 + o->rows[u] * d;                      \
            const real *gu = o->grad_rows + u * d;                                                 \
            for (long j = 0; j < d; j++) {                                                         \
                const double g = (double)gu[j];                                                    \
                const double s = (double)a[j] + g * g;                                             \
                a[j] = (real)s;                                                                    \
                p[j] = (real)((double)p[j] - o->lr * g / (sqrt(s) + o->eps));                      \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    void sparse_adagrad_step_##sfx(real *table, real *accum, const int64_t *rows,                 \
                                   const real *grad_rows, long U, long d, double lr, double eps) { \
        SparseOptim_##sfx o = {table, accum, NULL, rows, grad_rows, d, lr, eps, 0, 0, 0, 0};       \
        dsk_parallel_for(U, dsk_grain(4 * d), sparse_adagrad_range_##sfx, &o);                     \
    }                                                                                              \
                                                                                                   \
    static void sparse_adam_range_##sfx(void *arg, long lo, long hi) {                             \
        const SparseOptim_##sfx *o = arg;                                                          \
        const long d = o->d;                                                                       \
        const real step_size = o->step_size, inv_bc2_sqrt = o->inv_bc2_sqrt, b1 = o->b1, b2 = o->b2; \
        const real e = (real)o->eps;                                                               \
        for (long u = lo; u < hi; u++) {                                                           \
            real *p = o->table + o->rows[u] * d, *mu = o->s1 + o->rows[u] * d, *vu = o->s2 + o->rows[u] * d; \
            const real *gu = o->grad_rows + u * d;                                                 \
            for (long j = 0; j < d; j++) {                                                         \
                const real g = gu[j];                                                              \
                const real mi = b1 * mu[j] + (1 - b1) * g;                                         \
                const real vi = b2 * vu[j] + (1 - b2) * g * g;                                     \
                mu[j] = mi;                                                                        \
                vu[j] = vi;                                                                        \
                p[j] -= step_size * mi / (SQRT(vi) * inv_bc2_sqrt + e);                            \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    void sparse_adam_step_##sfx(real *table, real *m, real *v, const int64_t *rows,               \
                                const real *grad_rows, long U, long d, long step, double lr,       \
                                double beta1, double beta2, double eps) {                          \
        SparseOptim_##sfx o = {table, m, v, rows, grad_rows, d, lr, eps,                           \
                               (real)(lr / (1 - pow(beta1, (double)step))),                        \
                               (real)(1 / sqrt(1 - pow(beta2, (double)step))), (real)beta1, (real)beta2}; \
        dsk_parallel_for(U, dsk_grain(4 * d), sparse_adam_range_##sfx, &o);                        \
    }

#define SQRT sqrtf
DSK_DEFINE_SPARSE_OPTIM(float, f32)
#undef SQRT
#define SQRT sqrt
DSK_DEFINE_SPARSE_OPTIM(double, f64)
#undef SQRT
