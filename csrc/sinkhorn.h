/* Sinkhorn normalisation of a learned permutation (the permutation local search of Ibrahim et al.,
 * "COMET", KDD 2023; section 2 of shared/reference/comet-spec.md), forward and backward.
 *
 * Conventions (as llm.c and gates.h): outputs first, then inputs, then sizes; every pointer is a
 * C-contiguous, caller-owned buffer whose shape is given in the comment; kernels never allocate
 * and never exit. Every function exists for float (_f32) and double (_f64): `real` arrays have
 * that type, while the log-domain iterates and the backward's workspace are double for both, so
 * that the float32 kernel is the float64 computation on the float32 inputs, rounded once at the
 * end (150 iterations at 1/tau = 1e7 would otherwise accumulate float32 rounding in the log
 * domain).
 *
 * Symbols: K matrices (one permutation per gate or per selector / tree), n experts, log_alpha
 * (K, n, n) the learned logits, tau > 0 the temperature, iters >= 1 the number of iterations.
 * One iteration is a row log-sum-exp normalisation followed by a column one, the order of the
 * authors' code (model/permutations/learn_permutations.py, _sinkhorn): so after the last
 * iteration every column of P sums to 1 exactly (up to rounding) and the rows approximately.
 *
 * Memory: the backward runs through the iterations, so the forward can keep every half-step,
 * logs (K, 2 iters, n, n) doubles: 16 iters K n^2 bytes (n = 64, iters = 150, K = 1: 9.8 MB),
 * meant for n <= 64. Without a backward one slot suffices (logs (K, 1, n, n)).
 */
#ifndef DSK_SINKHORN_H
#define DSK_SINKHORN_H

#define DSK_DECLARE_SINKHORN(real, sfx)                                                           \
    /* P (K, n, n) = Sinkhorn(log_alpha / tau) with `iters` iterations (rows, then columns).     \
     * logs (K, slots, n, n): slots == 2 iters keeps every half-step's normalised log-matrix     \
     * (logs[:, 2t] after the row step of iteration t, logs[:, 2t + 1] after its column step),   \
     * what sinkhorn_backward needs; slots == 1 is a workspace overwritten by each half-step.    \
     * log_alpha (K, n, n). */                                                                    \
    void sinkhorn_forward_##sfx(real *P, double *logs, const real *log_alpha, long K, long n,     \
                                double tau, long iters, long slots);                              \
    /* dlog_alpha (K, n, n), the gradient of                                                     \
     *   <dP, P> + lambda * Omega(P),  Omega = mean_K [ H(P) + H(row-normalised P) ],            \
     * H(A) = -sum_ij A_ij log(A_ij + eps), through every iteration (reverse mode; no implicit  \
     * shortcut). dP (K, n, n) may be NULL (the regularizer alone). P (K, n, n) and logs         \
     * (K, 2 iters, n, n) from the forward (Omega's slope is taken at P, the chain rule through   \
     * exp at logs); work (K, n, n) a double workspace. */                                        \
    void sinkhorn_backward_##sfx(real *dlog_alpha, double *work, const real *dP, const real *P,   \
                                 const double *logs, long K, long n, double tau, long iters,      \
                                 double lambda, double eps);                                      \
    /* Omega(P) summed (not averaged) over the K matrices of P (K, n, n): sum_K [ H(P) +         \
     * H(row-normalised P) ]; callers divide by K. A row of zeros adds nothing. */                \
    double sinkhorn_entropy_##sfx(const real *P, long K, long n, double eps);

DSK_DECLARE_SINKHORN(float, f32)
DSK_DECLARE_SINKHORN(double, f64)

#endif /* DSK_SINKHORN_H */
