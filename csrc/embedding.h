/* Embedding tables: gathering rows for the forward pass, sparse gradients for the backward pass
 * and lazy optimizer steps that update only the rows a batch touched.
 *
 * Conventions as in nn.h: outputs first, then inputs, then sizes and hyperparameters; every
 * pointer is a caller-owned buffer whose shape is given in the comment; kernels never allocate
 * and never exit. Row indices are checked by the caller (0 <= id < V): the kernels trust them.
 * The functions that read ids exist for float and double tables and for int32 and int64 ids
 * (_f32_i32, _f32_i64, _f64_i32, _f64_i64); the sort reads ids only (_i32, _i64); the optimizer
 * steps read no ids (_f32, _f64: their rows are int64).
 *
 * Symbols: V rows of a table, d its width, B the batch, F the id columns looked up in one call,
 * N = B * F the looked-up positions (flat index p = b * F + f), U the distinct ids among them.
 *
 * Writing into a wider row: the forward writes the F * d gathered values of example b at
 * out + b * ld, ld >= F * d the distance between two rows of out. Pointing out at column c of a
 * (B, D) C-contiguous array and passing ld = D writes columns [c, c + F * d) of each row and leaves
 * the others alone, so several tables (and dense features) fill one (B, D) input without copies.
 * The backward reads its block of a (B, D) upstream gradient the same way.
 *
 * Backward: the gradient of a table is sparse: rows (U) the distinct ids, ascending, and grad (U, d)
 * the sum of the upstream gradient over every position that looked that id up. Two steps:
 *   1. embedding_sort_ids: a stable LSD radix sort of the positions by id (perm), and the start of
 *      each run of equal ids in perm (starts). Returns U.
 *   2. embedding_backward: per distinct id, the sum over its run in ascending position order, in
 *      double. The order does not depend on the thread count (runs are summed independently), so
 *      the gradient is the same bit for bit whatever the number of threads.
 */
#ifndef DSK_EMBEDDING_H
#define DSK_EMBEDDING_H

#include <stdint.h>

#define DSK_DECLARE_EMBEDDING_IDS(idx_t, isfx)                                                     \
    /* perm (N): the positions 0..N-1 sorted by ids[p] (ascending), stably (equal ids keep their    \
     * positions in ascending order). starts (N + 1): on return starts[u] is the index in perm of   \
     * the first position of the u-th distinct id and starts[U] = N; it is also the sort's scratch.  \
     * ids (N) in [0, V). Returns U, the number of distinct ids (0 when N == 0). */                  \
    long embedding_sort_ids_##isfx(int64_t *perm, int64_t *starts, const idx_t *ids, long N, long V);

#define DSK_DECLARE_EMBEDDING(real, idx_t, sfx)                                                    \
    /* out (B, ld): out[b * ld + f * d + j] = table[ids[b * F + f] * d + j] for f < F, j < d;      \
     * columns >= F * d of each row are not touched. table (V, d), ids (B, F), ld >= F * d. */       \
    void embedding_forward_##sfx(real *out, long ld, const real *table, const idx_t *ids, long B,  \
                                 long F, long d);                                                  \
    /* rows (U), grad (U, d): rows[u] = the u-th smallest distinct id and                           \
     *   grad[u] = sum over the positions p of its run (ascending p) of dout[p / F, (p % F) d : +d]  \
     * with dout (B, ld) read as in the forward (block of F * d columns at the start of each row).   \
     * ids (B, F), perm (N), starts (U + 1) from embedding_sort_ids on the same ids. */              \
    void embedding_backward_##sfx(int64_t *rows, real *grad, const real *dout, long ld,            \
                                  const idx_t *ids, const int64_t *perm, const int64_t *starts,    \
                                  long U, long F, long d);

/* Lazy ("sparse") optimizer steps on the rows of a table: only the U rows listed in rows (distinct
 * and in [0, V): checked by the caller, as the rows are updated in parallel) change, together with
 * their optimizer state; every other row and its state is left exactly as it is. The update of a
 * listed row is the dense step of optim.h (weight decay 0) with grad_rows[u] as its gradient.
 *
 * Adam uses the global step count ``step`` (>= 1, the number of this update of the model) for the
 * bias correction, also for a row that was last touched many steps ago: the rule of PyTorch's
 * torch.optim.SparseAdam and of TensorFlow Addons' LazyAdam. */
#define DSK_DECLARE_SPARSE_OPTIM(real, sfx)                                                        \
    /* table (V, d), accum (V, d) updated in the rows listed; rows (U), grad_rows (U, d):           \
     *   accum[r] += g^2;  table[r] -= lr * g / (sqrt(accum[r]) + eps),  r = rows[u], g = grad_rows[u]. */ \
    void sparse_adagrad_step_##sfx(real *table, real *accum, const int64_t *rows,                 \
                                   const real *grad_rows, long U, long d, double lr, double eps);  \
    /* table (V, d), m (V, d), v (V, d) updated in the rows listed; rows (U), grad_rows (U, d):     \
     *   m[r] = beta1 m[r] + (1 - beta1) g;  v[r] = beta2 v[r] + (1 - beta2) g^2;                   \
     *   table[r] -= lr / (1 - beta1^step) * m[r] / (sqrt(v[r]) / sqrt(1 - beta2^step) + eps). */   \
    void sparse_adam_step_##sfx(real *table, real *m, real *v, const int64_t *rows,               \
                                const real *grad_rows, long U, long d, long step, double lr,       \
                                double beta1, double beta2, double eps);

DSK_DECLARE_EMBEDDING_IDS(int32_t, i32)
DSK_DECLARE_EMBEDDING_IDS(int64_t, i64)
DSK_DECLARE_EMBEDDING(float, int32_t, f32_i32)
DSK_DECLARE_EMBEDDING(float, int64_t, f32_i64)
DSK_DECLARE_EMBEDDING(double, int32_t, f64_i32)
DSK_DECLARE_EMBEDDING(double, int64_t, f64_i64)
DSK_DECLARE_SPARSE_OPTIM(float, f32)
DSK_DECLARE_SPARSE_OPTIM(double, f64)

#endif /* DSK_EMBEDDING_H */
