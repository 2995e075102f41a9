/* 2-D convolution and max pooling of the CNN experts (Multi-MNIST, Appendix D.2 of the paper).
 *
 * Layout: NCHW throughout. An image batch x is (B, C, H, W), C-contiguous: x[b, c, h, w] is at
 * ((b C + c) H + h) W + w. Convolution weights are (F, C, KH, KW), F the number of filters, and
 * the output is (B, F, OH, OW). "Convolution" is the cross-correlation of deep-learning libraries
 * (the kernel is not flipped):
 *   y[b, f, oh, ow] = bias[f] + sum_{c, i, j} Wt[f, c, i, j] x[b, c, oh sh - pt + i, ow sw - pl + j],
 * where entries of x outside [0, H) x [0, W) are zero (the padding). pt and pl are the zero rows
 * above and the zero columns left of the input; the padding below and right follows from OH and
 * OW, which the caller chooses (usually OH = (H + pt + pb - KH) / sh + 1, OW likewise).
 *
 * Conventions as nn.h: outputs first, then workspaces, then inputs, then weights, then the
 * geometry (a DskConv2d); every pointer is a C-contiguous, caller-owned buffer whose shape is in
 * the comment; kernels never allocate (the caller passes the workspaces) and never exit. Every
 * function exists for float (_f32) and double (_f64). Sizes that reach the 32-bit BLAS (F, K and
 * G P) are checked by the caller.
 *
 * The convolution is im2col followed by one GEMM of the vendored BLAS per group of G examples,
 * each group a task of the thread pool (dsk.h): the group's patches form a (K, G P) matrix in the
 * thread's own workspace, multiplied by the (F, K) weights in one single-threaded SGEMM / DGEMM,
 * then the bias (and ReLU) are applied while the product is in cache. G is as large as fits
 * DSK_CONV_COL_ELEMS elements of workspace (at least 1), so that the patch matrix is still in
 * cache when the GEMM reads it: on the Multi-MNIST CNN's layers (B = 256, float32) that is one
 * example per group, whose product is written straight into its output. The backward cuts the
 * batch into conv2d_slices(g) fixed slices, one task each, that sum their groups' weight and bias
 * gradients into their own partials, added up in slice order at the end: the gradients do not
 * depend on the thread count (the group and slice sizes depend on the geometry only). The input
 * gradient of each example is written by the task of its slice.
 *
 * Symbols: B the batch, C input channels, H x W the input plane, F filters, KH x KW the kernel,
 * sh, sw the strides, OH x OW the output plane, K = C KH KW the length of one patch, P = OH OW.
 */
#ifndef DSK_CONV_H
#define DSK_CONV_H

#include <stddef.h>
#include <stdint.h>

/* The workspace budget, in elements: a group holds as many examples as fit (at least one). */
#ifndef DSK_CONV_COL_ELEMS
#define DSK_CONV_COL_ELEMS (64L * 1024L)
#endif

/* The geometry of one convolution (all sizes >= 1, except the paddings pt, pl >= 0). */
typedef struct {
    long B, C, H, W; /* input x (B, C, H, W) */
    long F, KH, KW;  /* weights (F, C, KH, KW) */
    long sh, sw;     /* strides */
    long pt, pl;     /* zero padding above and left of the input */
    long OH, OW;     /* output (B, F, OH, OW) */
} DskConv2d;

/* The max pooling after a convolution in conv2d_relu_pool_*: windows KH x KW at strides sh, sw over
 * the convolution's output plane (OH, OW of its DskConv2d), giving (OH, OW) here; KH KW <= 256. */
typedef struct {
    long KH, KW, sh, sw, OH, OW;
} DskPool2d;

/* Examples per GEMM: G = min(B, max(1, DSK_CONV_COL_ELEMS / ((K + F) P))). */
long conv2d_group(const DskConv2d *g);
/* Size of one thread's workspace of conv2d_forward / conv2d_backward, in elements of real:
 * (K + F) G P; the workspace `col` holds `slots` of them. */
size_t conv2d_col_size(const DskConv2d *g);
/* The backward's slices S = min(B, DSK_CONV_SLICES); its workspaces `dW_part` hold S F K reals and
 * `acc` S F doubles. */
long conv2d_slices(const DskConv2d *g);
#ifndef DSK_CONV_SLICES
#define DSK_CONV_SLICES 16
#endif

#define DSK_DECLARE_CONV(real, sfx)                                                                \
    /* y (B, F, OH, OW) = conv(x (B, C, H, W), Wt (F, C, KH, KW)) + bias (F) (bias may be NULL),   \
     * then max(y, 0) with relu. col: workspace of slots conv2d_col_size(g) reals; the call runs   \
     * on at most `slots` threads. */                                                              \
    void conv2d_forward_##sfx(real *y, real *col, int slots, const real *x, const real *Wt,        \
                              const real *bias, int relu, const DskConv2d *g);                     \
    /* Backward of conv2d_forward for the upstream gradient dy (B, F, OH, OW). ACCUMULATES, as     \
     * dense_backward:  dW (F, C, KH, KW) += d<dy, y>/dWt,  db (F) += sum_{b, oh, ow} dy[b, :, oh, \
     * ow]  (db may be NULL: skipped), and overwrites dx (B, C, H, W) = d<dy, y>/dx (dx may be     \
     * NULL: skipped). x (B, C, H, W), Wt (F, C, KH, KW). Workspaces: col of slots                \
     * conv2d_col_size(g) reals (at most `slots` threads), dW_part of S F K reals and acc of S F  \
     * doubles (S = conv2d_slices(g)). */                                                          \
    void conv2d_backward_##sfx(real *dx, real *dW, real *db, real *col, int slots, real *dW_part,  \
                               double *acc, const real *dy, const real *x, const real *Wt,         \
                               const DskConv2d *g);                                                \
    /* Max pooling of each of the N = B C planes of x (N, H, W) over the valid windows of KH x KW  \
     * at strides sh, sw: y (N, OH, OW) with OH = (H - KH) / sh + 1, OW = (W - KW) / sw + 1, and   \
     * idx (N, OH, OW) the flat index h W + w in its plane of the entry each y came from.          \
     * Windows are scanned row by row; the first maximum wins ties, and a NaN in a window wins    \
     * over every number (the first NaN in scan order: y is NaN, idx points at it), so the result \
     * is deterministic (and NaN propagates, as in PyTorch). */                                    \
    void max_pool2d_forward_##sfx(real *y, int64_t *idx, const real *x, long N, long H, long W,    \
                                  long KH, long KW, long sh, long sw, long OH, long OW);           \
    /* dx (N, H, W) = 0, then dx[n, idx[n, o]] += dy[n, o] for every output o of plane n (dy, idx  \
     * (N, P), P = OH OW): overlapping windows that picked the same entry add up. The caller       \
     * checks 0 <= idx < H W. With relu_y (N, P), the pooling's output over a ReLU's output, only \
     * outputs with relu_y > 0 pass their dy: the ReLU backward before the pooling, fused. */      \
    void max_pool2d_backward_##sfx(real *dx, const real *dy, const int64_t *idx,                   \
                                   const real *relu_y, long N, long HW, long P);                    \
    /* Conv2D -> ReLU -> MaxPool2D in one pass: pooled (B, F, POH, POW) = max_pool(relu(conv(x) + \
     * bias)) with p's windows, and code (B, F, POH, POW) the position i KW + j of each output's   \
     * maximum in its window (first maximum in row-major order). The convolution's output is not  \
     * written. Workspace col as conv2d_forward. The same values as the three kernels in turn. */  \
    void conv2d_relu_pool_forward_##sfx(real *pooled, uint8_t *code, real *col, int slots,         \
                                        const real *x, const real *Wt, const real *bias,           \
                                        const DskConv2d *g, const DskPool2d *p);                   \
    /* Its backward for dpooled (B, F, POH, POW), with code and pooled from the forward:          \
     * ACCUMULATES dW, db (may be NULL) and writes dx (may be NULL) as conv2d_backward does for    \
     * the gradient at the convolution's output, which is dpooled at each window's maximum where  \
     * pooled > 0 and 0 elsewhere (built a group at a time in the workspace). Workspaces as        \
     * conv2d_backward. The same values as max_pool2d_backward, relu_backward, conv2d_backward. */ \
    void conv2d_relu_pool_backward_##sfx(real *dx, real *dW, real *db, real *col, int slots,       \
                                         real *dW_part, double *acc, const real *dpooled,          \
                                         const uint8_t *code, const real *pooled, const real *x,   \
                                         const real *Wt, const DskConv2d *g, const DskPool2d *p);

DSK_DECLARE_CONV(float, f32)
DSK_DECLARE_CONV(double, f64)

#endif /* DSK_CONV_H */
