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

/* e (kn) = p exp(a - shift) where p > 0, else 0 (in the working precision); returns their sum,
 * accumulated in double. */
static double FN(comet_unnormalized)(real *e, const real *p, const real *a, long kn, double shift) {
    double sum = 0;
    for (long i = 0; i < kn; i++) {
        const double ei = p[i] > 0 ? (double)p[i] * exp((double)a[i] - shift) : 0;
        e[i] = (real)ei;
        sum += ei;
    }
    return sum;
}

/* The arguments of comet_forward / comet_backward, for their loops over examples on the pool. */
typedef struct {
    real *w, *sz, *reach_int, *reach, *g, *norm, *dA, *dZ;
    double *work;
    const real *A, *Z, *dw, *csz, *creach_int, *creach, *cg, *cnorm;
    long n;
    int k, dw_per_tree;
    real gamma;
    double coef_h, eps;
} FN(CometJob);

static void FN(comet_forward_range)(void *arg, long lo, long hi) {
    const FN(CometJob) *job = arg;
    real *w = job->w, *sz = job->sz, *reach_int = job->reach_int, *reach = job->reach, *g = job->g, *norm = job->norm;
    const real *A = job->A, *Z = job->Z, gamma = job->gamma;
    const long n = job->n;
    const int k = job->k;
    const comet_leaves L = comet_layout(n);
    for (long b = lo; b < hi; b++) {
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
        /* one softmax over the k n scores a + log p, as p exp(a - shift) / Dsum, with shift the
         * largest a of a reached leaf (so every exponent is <= 0 and Dsum >= that leaf's reach) */
        double shift = -HUGE_VAL;
        for (long i = 0; i < kn; i++) { /* selects, no branches: reached or not is random */
            const double ai = pb[i] > 0 ? (double)Ab[i] : -HUGE_VAL;
            shift = ai > shift ? ai : shift;
        }
        double dsum = FN(comet_unnormalized)(gb, pb, Ab, kn, shift);
        if (sizeof(real) < sizeof(double) && dsum < 0x1p-60) {
            /* that leaf's reach is tiny: the terms stored in float may have underflowed. Shift by
             * log Dsum as well, which brings Dsum to ~1 (rare: one more pass) */
            shift += log(dsum);
            dsum = FN(comet_unnormalized)(gb, pb, Ab, kn, shift);
        }
        const double inv = 1 / dsum;
        for (long i = 0; i < kn; i++) gb[i] = (real)((double)gb[i] * inv);
        for (long j = 0; j < n; j++) wb[j] = 0;
        for (int t = 0; t < k; t++) /* w_j = sum_t g_tj, trees in order */
            for (long j = 0; j < n; j++) wb[j] += gb[(long)t * n + j];
        norm[2 * b] = (real)shift;
        norm[2 * b + 1] = (real)dsum;
    }
}

void FN(comet_forward)(real *w, real *sz, real *reach_int, real *reach, real *g, real *norm,
                       const real *A, const real *Z, long B, int k, long n, real gamma) {
    FN(CometJob) job = {w, sz, reach_int, reach, g, norm, NULL, NULL, NULL, A, Z, NULL, NULL, NULL, NULL, NULL,
                        NULL, n, k, 0, gamma, 0, 0};
    dsk_parallel_for(B, dsk_grain(4 * (long)k * n), FN(comet_forward_range), &job);
}

static void FN(comet_backward_range)(void *arg, long lo, long hi) {
    const FN(CometJob) *jb = arg;
    real *dA = jb->dA, *dZ = jb->dZ;
    double *work = jb->work;
    const real *dw = jb->dw, *A = jb->A, *Z = jb->Z, *sz = jb->csz, *reach_int = jb->creach_int, *reach = jb->creach;
    const real *g = jb->cg, *norm = jb->cnorm, gamma = jb->gamma;
    const long n = jb->n;
    const int k = jb->k, dw_per_tree = jb->dw_per_tree;
    const double coef_h = jb->coef_h, eps = jb->eps;
    const comet_leaves L = comet_layout(n);
    for (long b = lo; b < hi; b++) {
        const long kn = (long)k * n, kv = (long)k * (n - 1);
        /* dw: one row per example, or one per tree (the permuted slices of local search) */
        const real *dwb = dw ? dw + b * n * (dw_per_tree ? k : 1) : NULL;
        const real *gb = g + b * kn, *pb = reach + b * kn, *Ab = A + b * kn;
        /* d/dp of every node of one tree, heap order: on the stack for trees of up to
         * DSK_COMET_STACK_NODES nodes, else in the caller's work */
        double stack_dp[DSK_COMET_STACK_NODES];
        double *dp = 2 * n - 1 <= DSK_COMET_STACK_NODES ? stack_dp : work + b * (2 * n - 1);
        const double shift = (double)norm[2 * b], dsum = (double)norm[2 * b + 1];
        double wdw = 0; /* sum_{t,j} g_tj dw_tj (dw_tj = dw_j without per-tree rows: <w, dw>) */
        if (dwb)
            for (int t = 0; t < k; t++) {
                const real *dwt = dw_per_tree ? dwb + (long)t * n : dwb;
                for (long j = 0; j < n; j++) wdw += (double)gb[(long)t * n + j] * dwt[j];
            }
        for (int t = 0; t < k; t++) {
            const real *dwt = dwb && dw_per_tree ? dwb + (long)t * n : dwb;
            const long row = b * k + t;
            const real *gt = gb + (long)t * n, *pt = pb + (long)t * n, *at = Ab + (long)t * n;
            const real *s = sz + row * (n - 1), *z = Z + row * (n - 1), *pint = reach_int + b * kv + (long)t * (n - 1);
            real *da = dA + row * n, *dz = dZ + row * (n - 1);
            /* the softmax over the scores: d/da = g (dw - <w, dw>) */
            for (long j = 0; j < n; j++) da[j] = dwt ? (real)((double)gt[j] * ((double)dwt[j] - wdw)) : 0;
            /* the leaves: d sigma / d p = 1 / p, and c = g / p = exp(a - shift) / Dsum, read off the
             * cached g (one rounding) unless g is not a normal number; a leaf that is not reached
             * gets no gradient (and then neither does anything below a node with reach 0) */
            for (long j = 0; j < n; j++) {
                const double p = (double)pt[j], gj = (double)gt[j];
                double c = p > 0 ? gj / p : 0;
                if (gj < DSK_REAL_MIN && p > 0) c = exp((double)at[j] - shift) / dsum; /* rare */
                double d = dwt ? c * ((double)dwt[j] - wdw) : 0;
                if (coef_h != 0) {
                    const double h = coef_h * (log(p + eps) + p / (p + eps));
                    d -= p > 0 ? h : 0;
                }
                dp[comet_leaf_node(L, j)] = d;
            }
            /* S' of every node first (a loop that vectorizes), then one pass up the heap: dp of a
             * node from its children's, dz from their difference. Below a node with reach 0 every
             * dp is 0, and a saturated node has S' = 0: dz = 0 exactly in both cases. */
            for (long v = 0; v < n - 1; v++) dz[v] = FN(smooth_step_slope)(z[v], gamma);
            for (long v = n - 2; v >= 0; v--) {
                const double dl = dp[2 * v + 1], dr = dp[2 * v + 2], on = (double)s[v];
                dz[v] = (real)((double)pint[v] * (dl - dr) * (double)dz[v]);
                dp[v] = on * dl + (1 - on) * dr;
            }
        }
    }
}

void FN(comet_backward)(real *dA, real *dZ, double *work, const real *dw, const real *A,
                        const real *Z, const real *sz, const real *reach_int, const real *reach,
                        const real *g, const real *norm, long B, int k, long n, int dw_per_tree,
                        real gamma, double lambda, double eps) {
    /* the regularizer is a batch mean: coef_h = lambda / B */
    FN(CometJob) job = {NULL, NULL, NULL, NULL, NULL, NULL, dA, dZ, work, A, Z, dw, sz, reach_int, reach, g, norm,
                        n, k, dw_per_tree, gamma, lambda / (double)B, eps};
    dsk_parallel_for(B, dsk_grain(8 * (long)k * n), FN(comet_backward_range), &job);
}
