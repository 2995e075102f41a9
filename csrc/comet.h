/* Forward and backward passes of the COMET gate of Ibrahim et al., "COMET: Learning Cardinality
 * Constrained Mixture of Experts with Trees and Local Search" (KDD 2023), as specified in
 * shared/reference/comet-spec.md, Section 1.
 *
 * Conventions as gates.h (llm.c): outputs first, then inputs, then sizes; every pointer is a
 * C-contiguous, caller-owned buffer whose shape is given in the comment; kernels never allocate
 * and never exit. Every function exists for float (_f32) and double (_f64).
 *
 * Symbols: n >= 2 experts, k trees, gamma the smooth-step width, lambda the entropy coefficient.
 * A batch dimension B comes first; the static gate is the case B = 1.
 *
 * The tree. Each of the k trees is heap-indexed over 2n - 1 nodes: node v < n - 1 is internal with
 * children 2v + 1 (left) and 2v + 2 (right), nodes n - 1 .. 2n - 2 are leaves. For n not a power
 * of two the tree is unbalanced (no padding). Expert j is the j-th leaf in left-first depth-first
 * order, which is not heap order: with D = floor(log2(2n - 1)) the depth of the deepest leaves and
 * L = 2n - 2^D their number, the deepest leaves (nodes 2^D - 1 ..) come first, then the shallower
 * ones (nodes n - 1 ..); for n = 3 the experts 0, 1, 2 are the leaf nodes 3, 4, 2.
 *
 * Per tree t and example b (indices b, t omitted):
 *   s_v = S(z_v; gamma) for the internal nodes (Z (B, k, n - 1), heap order);
 *   reach p_root = 1, p_{2v+1} = p_v s_v, p_{2v+2} = p_v (1 - s_v) (one pass down the heap);
 *   leaf scores sigma_j = a_j + log p_j for the leaf of expert j (A (B, k, n), expert order).
 * Then over all k n scores of example b at once (one softmax, not one per tree):
 *   g_{t,j} = p_{t,j} exp(a_{t,j}) / sum_{t',j'} p_{t',j'} exp(a_{t',j'}) = softmax(sigma)_{t,j},
 *   w_j = sum_t g_{t,j}.
 * A leaf with p = 0 gets g = 0 exactly (its score is -inf: no epsilon), and once every s is 0 or 1
 * each tree reaches one leaf with p = 1, so w has at most k nonzeros. The smooth-step saturates
 * exactly as DSelect-k's (smooth_step_impl.h). No logarithm is taken: with
 * amax = max a over the leaves with p > 0, g = p exp(a - amax) / Dsum.
 *
 * The regularizer is lambda * mean_b sum_t h(p_{b,t,:}), h(p) = -sum_j p_j log(p_j + eps), the
 * entropy of each tree's leaf-reach distribution (training only; its value is
 * selector_entropy over reach, in gates.h).
 */
#ifndef DSK_COMET_H
#define DSK_COMET_H

/* Trees of up to this many nodes (n <= 2048 experts) keep the backward's per-node gradients in a
 * stack buffer (32 KB); larger ones use the caller's work array. */
#define DSK_COMET_STACK_NODES 4095

#define DSK_DECLARE_COMET(real, sfx)                                                              \
    /* w (B, n) = the COMET weights for leaf logits A (B, k, n) and node logits Z (B, k, n - 1).  \
     * Also fills the cache the backward needs: sz (B, k, n - 1) = S(Z), reach_int (B, k, n - 1) \
     * the internal nodes' reach (heap order), reach (B, k, n) the leaves' reach p (expert       \
     * order), g (B, k, n) the softmax over the k n scores, norm (B, 2) = (amax, Dsum) of each   \
     * example's softmax. O(k n) per example. */                                                 \
    void comet_forward_##sfx(real *w, real *sz, real *reach_int, real *reach, real *g, real *norm, \
                             const real *A, const real *Z, long B, int k, long n, real gamma);    \
    /* Gradients dA (B, k, n), dZ (B, k, n - 1) of                                               \
     *   <dw, w> + lambda * mean_b sum_t h(p_{b,t}),  h(p) = -sum_j p_j log(p_j + eps).           \
     * dw (B, n) may be NULL (regularizer only). A, Z the forward's inputs; sz, reach_int, reach, \
     * g, norm its cache. work (B, 2n - 1) is scratch for the gradients of every node's reach   \
     * (one pass up the heap per tree), needed only when 2n - 1 > DSK_COMET_STACK_NODES (else it \
     * may be NULL: the kernel keeps them on the stack). Leaves and subtrees with reach 0 get no \
     * gradient, and a node whose s is saturated gets dZ = 0 exactly. O(k n) per example. */    \
    void comet_backward_##sfx(real *dA, real *dZ, double *work, const real *dw, const real *A,     \
                              const real *Z, const real *sz, const real *reach_int,               \
                              const real *reach, const real *g, const real *norm, long B, int k,  \
                              long n, real gamma, double lambda, double eps);

DSK_DECLARE_COMET(float, f32)
DSK_DECLARE_COMET(double, f64)

/* leaf (n): leaf[j] = the heap index of expert j's leaf (the depth-first order above). */
void comet_leaf_nodes(long *leaf, long n);

#endif /* DSK_COMET_H */
