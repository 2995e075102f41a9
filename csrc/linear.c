#include "linear.h"
#include "dsk.h"
#include "gemm.h"
#include <string.h>

/* One product of the pool (gemm.h) per GEMM. */
#define DSK_DEFINE_LINEAR(real, sfx, gemm)                                                        \
    void linear_forward_##sfx(real *y, const real *x, const real *W, const real *b,              \
                              int B, int p, int o) {                                             \
        for (int i = 0; i < B; i++) {                                                            \
            real *yi = y + (size_t)i * o;                                                        \
            if (b) memcpy(yi, b, sizeof(real) * (size_t)o);                                      \
            else memset(yi, 0, sizeof(real) * (size_t)o);                                        \
        }                                                                                        \
        if (B > 0 && o > 0 && p > 0)                                                             \
            gemm(CblasRowMajor, CblasNoTrans, CblasTrans, B, o, p, 1, x, p, W, p, 1, y, o);      \
    }                                                                                            \
    void linear_backward_##sfx(real *dx, real *dW, real *db, const real *dy, const real *x,      \
                               const real *W, int B, int p, int o) {                             \
        if (o > 0 && p > 0) {                                                                    \
            if (B > 0)                                                                           \
                gemm(CblasRowMajor, CblasTrans, CblasNoTrans, o, p, B, 1, dy, o, x, p, 0, dW, p);\
            else                                                                                 \
                memset(dW, 0, sizeof(real) * (size_t)o * p);                                     \
        }                                                                                        \
        if (db) {                                                                                \
            for (int j = 0; j < o; j++) db[j] = 0;                                               \
            for (int i = 0; i < B; i++)                                                          \
                for (int j = 0; j < o; j++) db[j] += dy[(size_t)i * o + j];                      \
        }                                                                                        \
        if (dx) {                                                                                \
            if (o > 0 && B > 0 && p > 0)                                                         \
                gemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, B, p, o, 1, dy, o, W, p, 0, dx, p);\
            else                                                                                 \
                memset(dx, 0, sizeof(real) * (size_t)B * p);                                     \
        }                                                                                        \
    }

DSK_DEFINE_LINEAR(float, f32, dsk_sgemm)
DSK_DEFINE_LINEAR(double, f64, dsk_dgemm)
