/* Forward and backward passes of the MoE gates of Hazimeh et al., "DSelect-k" (NeurIPS 2021).
 *
 * Conventions (as llm.c): outputs first, then inputs, then sizes; every pointer is a C-contiguous,
 * caller-owned buffer whose shape is given in the comment; kernels never allocate and never exit.
 * Every function exists for float (_f32) and double (_f64).
 *
 * Symbols follow the paper: n experts, k selectors, m = ceil(log2 n) bits per selector, gamma the
 * smooth-step width, alpha (k) selector logits, Z (k, m) binary-encoding logits, lambda the entropy
 * coefficient, xi the coefficient of the penalty for n not a power of two (Appendix B.2). A batch
 * dimension B comes first; the static gate is the case B = 1.
 *
 * Bit convention: s[b] (b = 0..m-1) is the paper's z_{b+1}: s[0] is the least significant bit, so
 * expert j (0-based) is selected when the binary number s[m-1]...s[0] equals j (eq. 4).
 */
#ifndef DSK_GATES_H
#define DSK_GATES_H

#define DSK_DECLARE_GATES(real, sfx)                                                              \
    /* s (N) = S(t; gamma), the cubic smooth-step of Section 3.1.3, exactly 0 or 1 where          \
     * min(S, 1 - S) is within rounding of 0 (smooth_step_impl.h); t (N). */                      \
    void smooth_step_forward_##sfx(real *s, const real *t, long N, real gamma);                   \
    /* dt (N) = dout (N) * S'(t; gamma), 0 wherever S is saturated. */                            \
    void smooth_step_backward_##sfx(real *dt, const real *dout, const real *t, long N,            \
                                    real gamma);                                                  \
    /* r (R, n) = single-expert selector r(s) of eq. (4) for each of R rows of s (R, m);          \
     * entries for the codes n..2^m-1 are dropped (Appendix B.2). O(2^m) per row. */              \
    void selector_forward_##sfx(real *r, const real *s, long R, int m, long n);                   \
    /* ds (R, m) = dr (R, n) . dr/ds.  O(n m) per row, exact also where s is 0 or 1. */           \
    void selector_backward_##sfx(real *ds, const real *dr, const real *s, long R, int m, long n); \
    /* DSelect-k, eq. (6), on logits: w (B, n) = sum_i softmax(alpha_b)_i r(S(Z_{b,i})).          \
     * Also fills the cache the backward needs: sigma (B, k) = softmax(alpha), sz (B, k, m) =     \
     * S(Z), r (B, k, n) the selectors' outputs. Inputs alpha (B, k), Z (B, k, m). */             \
    void dselect_k_forward_##sfx(real *w, real *sigma, real *sz, real *r, const real *alpha,      \
                                 const real *Z, long B, int k, int m, long n, real gamma);        \
    /* Gradients dalpha (B, k), dZ (B, k, m) of                                                   \
     *   <dw, w> + lambda * mean_b Omega_b + xi * mean_b sum_i 1 / (eps + sum_{j<n} r_bij)        \
     * where Omega_b = sum_i h(r_bi), h(r) = -sum_j r_j log(r_j + eps).                           \
     * dw (B, n) may be NULL (regularizers only). sigma, sz, r from the forward; Z (B, k, m). */  \
    void dselect_k_backward_##sfx(real *dalpha, real *dZ, const real *dw, const real *sigma,      \
                                  const real *sz, const real *r, const real *Z, long B, int k,    \
                                  int m, long n, real gamma, double lambda, double xi,            \
                                  double eps);                                                    \
    /* Sum over R rows of h(r_row) = -sum_j r log(r + eps), and of 1 / (eps + sum_j r) (the       \
     * Appendix B.2 penalty); r (R, n). Callers divide by B for batch means. */                   \
    double selector_entropy_##sfx(const real *r, long R, long n, double eps);                     \
    double selector_mass_penalty_##sfx(const real *r, long R, long n, double eps);                \
    /* w (B, n) = softmax(logits) over each row; logits (B, n). */                                \
    void softmax_forward_##sfx(real *w, const real *logits, long B, long n);                      \
    /* dlogits (B, n) = w * (dw - <w, dw>) per row. Also the Top-k backward: entries outside      \
     * the top k have w = 0 and so receive no gradient. */                                        \
    void softmax_backward_##sfx(real *dlogits, const real *dw, const real *w, long B, long n);    \
    /* w (B, n) = softmax(KeepTopK(logits, k)) per row (Shazeer et al.); ties go to the lower     \
     * index. O(n k) per row. */                                                                  \
    void topk_forward_##sfx(real *w, const real *logits, long B, long n, long k);                 \
    /* Noisy Top-k logits: h (N) = clean + normal * softplus(raw_noise); all (N). */              \
    void noisy_logits_forward_##sfx(real *h, const real *clean, const real *raw_noise,            \
                                    const real *normal, long N);                                  \
    /* draw (N) = dh * normal * sigmoid(raw_noise) (dclean is dh itself). */                      \
    void noisy_logits_backward_##sfx(real *draw, const real *dh, const real *raw_noise,           \
                                     const real *normal, long N);                                 \
    /* Ablation gate of Appendix C.2: w (B, n) = sum_i softmax(alpha_b)_i softmax(beta_bi / T);   \
     * cache sigma (B, k), P (B, k, n). alpha (B, k), beta (B, k, n), T > 0. */                   \
    void softmax_selector_forward_##sfx(real *w, real *sigma, real *P, const real *alpha,         \
                                        const real *beta, long B, int k, long n, real T);         \
    /* dalpha (B, k), dbeta (B, k, n) of <dw, w> + lambda * mean_b sum_i h(P_bi).                 \
     * dw (B, n) may be NULL. */                                                                  \
    void softmax_selector_backward_##sfx(real *dalpha, real *dbeta, const real *dw,               \
                                         const real *sigma, const real *P, long B, int k, long n, \
                                         real T, double lambda, double eps);                      \
    /* y (B, d) = sum_j w_j f_j. f is (n, B, d) if bnd == 0, else (B, n, d). w is (n) if          \
     * per_example == 0 (static gate), else (B, n). Experts with active[j] == 0 are skipped: f_j  \
     * is not read. active (n) may be NULL (all active). */                                       \
    void mix_experts_forward_##sfx(real *y, const real *f, const real *w,                         \
                                   const unsigned char *active, long n, long B, long d, int bnd,  \
                                   int per_example);                                              \
    /* dw (n) or (B, n), df (like f) of <dy, y>; dy (B, d). For skipped experts dw = 0 and        \
     * df = 0, and f_j is not read. */                                                            \
    void mix_experts_backward_##sfx(real *dw, real *df, const real *dy, const real *f,            \
                                    const real *w, const unsigned char *active, long n, long B,   \
                                    long d, int bnd, int per_example);                            \
    /* The T mixtures of a multi-gate MoE at once (one per-example gate per task), reading each   \
     * f_j[b] once for all tasks: y (T, B, d) with y_t[b] = sum_j w[t, b, j] f_j[b]; f (n, B, d), \
     * w (T, B, n). Terms whose weight is exactly 0, and experts with active[j] == 0, are         \
     * skipped (f_j is not read for those). active (n) may be NULL (all active). */               \
    void mix_experts_many_forward_##sfx(real *y, const real *f, const real *w,                    \
                                        const unsigned char *active, long T, long n, long B,      \
                                        long d);                                                  \
    /* Gradients of sum_t <dy_t, y_t>; dy (T, B, d): df (n, B, d) with df_j[b] = sum_t w[t, b, j] \
     * dy_t[b] (written, not accumulated) and dw (T, B, n) with dw[t, b, j] = <dy_t[b], f_j[b]>.  \
     * active is over all tasks: for active[j] == 0, df_j = 0, dw[:, :, j] = 0 and f_j is not     \
     * read; an active expert gets its dw for every task, also where its weight is 0. With       \
     * relu_mask, f is the output of a ReLU and df is the gradient at its input: entries where  \
     * f <= 0 are 0 (the expert's last ReLU backward, fused). */                                 \
    void mix_experts_many_backward_##sfx(real *dw, real *df, const real *dy, const real *f,       \
                                         const real *w, const unsigned char *active, long T,      \
                                         long n, long B, long d, int relu_mask);

DSK_DECLARE_GATES(float, f32)
DSK_DECLARE_GATES(double, f64)

#endif /* DSK_GATES_H */
