/* Affine maps through the vendored BLAS (SGEMM/DGEMM). Row-major throughout. */
#ifndef DSK_LINEAR_H
#define DSK_LINEAR_H

#define DSK_DECLARE_LINEAR(real, sfx)                                                            \
    /* y (B,o) = x (B,p) W^T + b; W (o,p), b (o) or NULL */                                      \
    void linear_forward_##sfx(real *y, const real *x, const real *W, const real *b,              \
                              int B, int p, int o);                                              \
    /* dW (o,p) = dy^T x; db (o) = sum_b dy (NULL: skipped); dx (B,p) = dy W (NULL: skipped).    \
     * dy (B,o). Gradients are overwritten, not accumulated. */                                  \
    void linear_backward_##sfx(real *dx, real *dW, real *db, const real *dy, const real *x,      \
                               const real *W, int B, int p, int o);

DSK_DECLARE_LINEAR(float, f32)
DSK_DECLARE_LINEAR(double, f64)

#endif
