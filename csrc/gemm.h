/* Matrix products on the thread pool (dsk.h), through the vendored BLAS at one thread per task.
 *
 * dsk_sgemm / dsk_dgemm take the arguments of cblas_sgemm / cblas_dgemm. dsk_sgemm_run /
 * dsk_dgemm_run run several products as one job of the pool (their tiles are the tasks), each
 * with an optional function `after(ctx, r0, r1, c0, c1)` called on every finished tile
 * C[r0:r1, c0:c1] while it is still in cache: a bias, an activation, a mask (the epilogue).
 * gemm.c says how products are cut into tiles; the cut never splits the inner dimension K, so every
 * entry of C is the same dot product as in one call to the BLAS. Only row-major products. */
#ifndef DSK_GEMM_H
#define DSK_GEMM_H

#include <cblas.h>

typedef void (*dsk_tile_fn)(void *ctx, long r0, long r1, long c0, long c1);

#define DSK_DECLARE_GEMM(real, sfx, SFX)                                                          \
    /* C (M, N) = alpha op(A) op(B) + beta C, row-major: op(A) (M, K), op(B) (K, N). */          \
    typedef struct {                                                                              \
        enum CBLAS_TRANSPOSE ta, tb;                                                              \
        int M, N, K, lda, ldb, ldc;                                                               \
        real alpha, beta;                                                                         \
        const real *A, *B;                                                                        \
        real *C;                                                                                  \
        dsk_tile_fn after; /* or NULL */                                                          \
        void *after_ctx;                                                                          \
    } DskGemm##SFX;                                                                               \
    void dsk_##sfx##gemm_run(int count, const DskGemm##SFX *products);                            \
    void dsk_##sfx##gemm(enum CBLAS_ORDER order, enum CBLAS_TRANSPOSE ta, enum CBLAS_TRANSPOSE tb, \
                         int M, int N, int K, real alpha, const real *A, int lda, const real *B,   \
                         int ldb, real beta, real *C, int ldc);

DSK_DECLARE_GEMM(float, s, S)
DSK_DECLARE_GEMM(double, d, D)

/* Most products one dsk_?gemm_run call takes. */
#define DSK_GEMM_MAX_PRODUCTS 16

#endif /* DSK_GEMM_H */
