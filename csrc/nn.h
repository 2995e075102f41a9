/* Building blocks of the experts and task towers around the gates: dense layers, ReLU, inverted
 * dropout and the training losses.
 *
 * Conventions (as llm.c, and as gates.h): outputs first, then inputs, then weights, then sizes;
 * every pointer is a C-contiguous, caller-owned buffer whose shape is given in the comment;
 * kernels never allocate and never exit. Every function exists for float (_f32) and double (_f64).
 * Reductions accumulate in double. Sizes that reach the 32-bit BLAS are int; the caller checks
 * that they fit.
 *
 * Symbols: B the batch, p the input width, o the output width, N a flat element count, C the
 * number of classes, d the width of a regression target.
 *
 * Losses are means over the batch with optional per-example weights w (B) >= 0 (NULL: all 1):
 *   loss = (1 / B) sum_b w_b l_b,
 * they return the loss and write the gradient of that mean with respect to their first input.
 */
#ifndef DSK_NN_H
#define DSK_NN_H

#include <stdint.h>

/* Dropout applied in a layer's epilogue, exactly as dropout_forward on that output (B, o) with
 * the same (rate, seed, step, rows): entry j of row b is kept when u_i >= rate, i = b o + j, or
 * rows[b] o + j with rows (B) (the row's place in a larger batch; NULL: none), and scaled by
 * 1 / (1 - rate); rate in [0, 1). */
typedef struct {
    double rate;
    uint64_t seed, step;
    const int64_t *rows;
} DskDropout;

#define DSK_DECLARE_NN(real, sfx)                                                                  \
    /* y (B, o) = act(x (B, p) W (p, o) + b (o)); b may be NULL. W is (in, out): one GEMM, cut in  \
     * tiles (gemm.h) whose epilogue adds b and applies act while the tile is in cache: with relu, \
     * max(., 0), then with drop (or NULL) its dropout: exactly dropout_forward(relu_forward(x W + \
     * b)) entry by entry, without the passes over y and the arrays between them. */              \
    void dense_forward_##sfx(real *y, const real *x, const real *W, const real *b, int B, int p,   \
                             int o, int relu, const DskDropout *drop);                             \
    /* Backward of dense_forward (without act: the caller has taken dy through it) for the        \
     * upstream gradient dy (B, o). ACCUMULATES:                                                   \
     *   dW (p, o) += x^T dy,   db (o) += sum_b dy[b, :]   (db may be NULL: skipped),              \
     * and overwrites dx (B, p) = dy W^T (dx may be NULL: skipped). With input_scale > 0, x is the \
     * output of a ReLU (scaled by a dropout of keep scale input_scale, or 1 without one) and dx   \
     * is the gradient at that ReLU's input: dx = x > 0 ? input_scale (dy W^T) : 0, the ReLU and   \
     * dropout backwards fused into the product's epilogue (rounded as dropout_backward: the      \
     * product times the scale in double). x (B, p), W (p, o). */                                  \
    void dense_backward_##sfx(real *dx, real *dW, real *db, const real *dy, const real *x,         \
                              const real *W, int B, int p, int o, double input_scale);             \
    /* y (N) = max(x, 0); x (N). */                                                                \
    void relu_forward_##sfx(real *y, const real *x, long N);                                       \
    /* dx (N) = dy where y > 0, else 0; dy (N), y (N) the forward's output. */                     \
    void relu_backward_##sfx(real *dx, const real *dy, const real *y, long N);                     \
    /* Inverted dropout: y (N) = x (N) * keep_i / (1 - rate), keep_i = [u_i >= rate], where        \
     * u_i in [0, 1) hashes (seed, step, i) as given at the end of this file. The mask is never    \
     * stored: the backward recomputes it, and it does not depend on the thread count.             \
     * 0 <= rate < 1; rate == 0 copies x. Also the backward: dx = dropout(dy) with the same        \
     * (rate, seed, step, rows). rows (N / R) or NULL: x is then N / R rows of R entries, and     \
     * entry j of row b hashes i = rows[b] * R + j, not its flat index b * R + j: the row's place \
     * in a larger batch (a data-parallel share, the rows an expert computes), so that it gets    \
     * the mask it has in the whole batch. rows[b] * R + R must not exceed 2^63 (the caller      \
     * checks); R >= 1 divides N. */                                                              \
    void dropout_forward_##sfx(real *y, const real *x, long N, const int64_t *rows, long R,        \
                               double rate, uint64_t seed, uint64_t step);                         \
    /* Binary cross-entropy on logits z (B) with targets t (B) in [0, 1], weights w (B) or NULL:   \
     *   l_b = max(z, 0) - z t + log(1 + exp(-|z|)),  dz (B) = w_b (sigmoid(z_b) - t_b) / B.       \
     * Returns the weighted batch mean of l. */                                                    \
    double bce_with_logits_##sfx(real *dz, const real *z, const real *t, const real *w, long B);   \
    /* Squared error summed over the d outputs of each example: pred, target (B, d), w (B) or      \
     * NULL: l_b = sum_c (pred - target)^2,  dpred (B, d) = 2 w_b (pred - target) / B.             \
     * Returns the weighted batch mean of l. */                                                    \
    double mse_##sfx(real *dpred, const real *pred, const real *target, const real *w, long B,     \
                     long d);                                                                      \
    /* Softmax cross-entropy: logits (B, C), labels (B) with 0 <= labels[b] < C (checked by the    \
     * caller), w (B) or NULL: l_b = logsumexp(logits_b) - logits_b[labels_b],                     \
     * dlogits (B, C) = w_b (softmax(logits_b) - onehot(labels_b)) / B.                            \
     * Returns the weighted batch mean of l. */                                                    \
    double softmax_cross_entropy_##sfx(real *dlogits, const real *logits, const int64_t *labels,   \
                                       const real *w, long B, long C);

DSK_DECLARE_NN(float, f32)
DSK_DECLARE_NN(double, f64)

/* The dropout hash, in full (tests re-derive the mask from it in NumPy): with uint64 arithmetic
 * mod 2^64, G = 0x9E3779B97F4A7C15, G2 = 0xD1B54A32D192ED03 and mix64 the splitmix64 finalizer
 *   z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31,
 * key = mix64(mix64(seed + G) + step * G2) and u_i = (mix64(key + (i + 1) G) >> 11) * 2^-53. */

#endif /* DSK_NN_H */
