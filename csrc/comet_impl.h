/* Body of the COMET kernels, included twice by comet.c: once with real = float, once with
 * real = double (FN appends _f32 / _f64). Sums, exponentials and gradients are computed in double
 * and rounded once. Declarations and the meaning of every argument are in comet.h. */

#include "smooth_step_impl.h"

/* One tree's reach, one pass down the heap: reach_int (n - 1) of the internal nodes, reach (n)
 * of the leaves in expert order, from s (n - 1). A child of a node with reach 0, or on the side
 * of a saturated s, gets reach exactly 0. */
static void FN(comet_tree_reach)(real *reach_int, real *reach, const real *s, comet_leaves L) {
    const long n = L.n;
    reach_int[0] = 1;
    for (long v = 0; v < n - 1; v++) {
        const real p = reach_int[v], on = s[v], off = 1 - on;
        const long left = 2 * v + 1;
        for (int side = 0; side < 2; side++) {
            const long c = left + side;
            const real pc = p * (side ? off : on);
            if (c < n - 1) reach_int[c] = pc;
            else reach[comet_expert_of(L, c)] = pc;
        }
    }
}

void FN(comet_forward)(real *w, real *sz, real *reach_int, real *reach, real *g, real *norm,
                       const real *A, const real *Z, long B, int k, long n, real gamma) {
    const comet_leaves L = comet_layout(n);
    DSK_PARALLEL_FOR(B * k * n)
    for (long b = 0; b < B; b++) {
        const long kn = (long)k * n, kv = (long)k * (n - 1);
        const real *Ab = A + b * kn;
        real *pb = reach + b * kn, *gb = g + b * kn, *wb = w + b * n;
        for (int t = 0; t < k; t++) {
            const long row = b * k + t;
            real *s = sz + row * (n - 1);
            const real *z = Z + row * (n - 1);
            for (long v = 0; v < n - 1; v++) s[v] = FN(smooth_step_value)(z[v], gamma);
            FN(comet_tree_reach)(reach_int + b * kv + (long)t * (n - 1), pb + (long)t * n, s, L);
        }
        /* one softmax over the k n scores a + log p, as p exp(a - amax) / Dsum: amax over the
         * leaves that are reached, so that Dsum >= the reach of one of them */
        double amax = -HUGE_VAL;
        for (long i = 0; i < kn; i++)
            if (pb[i] > 0 && (double)Ab[i] > amax) amax = (double)Ab[i];
        double dsum = 0;
        for (long i = 0; i < kn; i++)
            if (pb[i] > 0) dsum += (double)pb[i] * exp((double)Ab[i] - amax);
        for (long j = 0; j < n; j++) wb[j] = 0;
        for (long i = 0; i < kn; i++) {
            const double gi = pb[i] > 0 ? (double)pb[i] * exp((double)Ab[i] - amax) / dsum : 0;
            gb[i] = (real)gi;
        }
        for (int t = 0; t < k; t++) /* w_j = sum_t g_tj, trees in order */
            for (long j = 0; j < n; j++) wb[j] += gb[(long)t * n + j];
        norm[2 * b] = (real)amax;
        norm[2 * b + 1] = (real)dsum;
    }
}

void FN(comet_backward)(real *dA, real *dZ, double *work, const real *dw, const real *A,
                        const real *Z, const real *sz, const real *reach_int, const real *reach,
                        const real *g, const real *norm, long B, int k, long n, real gamma,
                        double lambda, double eps) {
    const comet_leaves L = comet_layout(n);
    const double coef_h = lambda / (double)B; /* the regularizer is a batch mean */
    DSK_PARALLEL_FOR(B * k * n)
    for (long b = 0; b < B; b++) {
        const long kn = (long)k * n, kv = (long)k * (n - 1);
        const real *dwb = dw ? dw + b * n : NULL, *gb = g + b * kn, *pb = reach + b * kn, *Ab = A + b * kn;
        double *dp = work + b * (n - 1);
        const double amax = (double)norm[2 * b], dsum = (double)norm[2 * b + 1];
        double wdw = 0; /* <w, dw> = sum_{t,j} g_tj dw_j */
        if (dwb)
            for (int t = 0; t < k; t++)
                for (long j = 0; j < n; j++) wdw += (double)gb[(long)t * n + j] * dwb[j];
        for (int t = 0; t < k; t++) {
            const long row = b * k + t;
            const real *gt = gb + (long)t * n, *pt = pb + (long)t * n, *at = Ab + (long)t * n;
            const real *s = sz + row * (n - 1), *z = Z + row * (n - 1), *pint = reach_int + b * kv + (long)t * (n - 1);
            real *da = dA + row * n, *dz = dZ + row * (n - 1);
            /* the softmax over the scores: d/da = g (dw - <w, dw>) */
            for (long j = 0; j < n; j++) da[j] = dwb ? (real)((double)gt[j] * ((double)dwb[j] - wdw)) : 0;
            /* one pass up the heap: dp of a node from its children's, dz from the difference */
            for (long v = n - 2; v >= 0; v--) {
                double dchild[2];
                for (int side = 0; side < 2; side++) {
                    const long c = 2 * v + 1 + side;
                    if (c < n - 1) {
                        dchild[side] = dp[c];
                        continue;
                    }
                    const long j = comet_expert_of(L, c);
                    const double p = (double)pt[j];
                    double d = 0; /* a leaf that is not reached gets no gradient */
                    if (p > 0) {
                        /* d sigma / d p = 1 / p, and g / p = exp(a - amax) / Dsum */
                        if (dwb) d = exp((double)at[j] - amax) / dsum * ((double)dwb[j] - wdw);
                        if (coef_h != 0) d -= coef_h * (log(p + eps) + p / (p + eps));
                    }
                    dchild[side] = d;
                }
                const double p = (double)pint[v], on = (double)s[v];
                const double slope = (double)FN(smooth_step_slope)(z[v], gamma);
                dz[v] = (p != 0 && slope != 0) ? (real)(p * (dchild[0] - dchild[1]) * slope) : 0;
                dp[v] = p != 0 ? on * dchild[0] + (1 - on) * dchild[1] : 0;
            }
        }
    }
}
