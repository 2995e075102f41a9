/* Body of the gate kernels, included twice by gates.c: once with real = float, once with
 * real = double (FN appends _f32 / _f64). Reductions (dot products, sums of logs) accumulate in
 * double so that float32 results stay close to the float64 reference. Declarations and the meaning
 * of every argument are in gates.h. */

#include "smooth_step_impl.h"

/* Elementwise kernels' arguments: out (N) from in (N) and in2 (N). */
typedef struct {
    real *out;
    const real *in, *in2, *in3;
    real gamma;
} FN(Elementwise);

static void FN(smooth_step_range)(void *arg, long lo, long hi) {
    const FN(Elementwise) *a = arg;
    real *restrict s = a->out;
    const real *restrict t = a->in, gamma = a->gamma;
    for (long i = lo; i < hi; i++) s[i] = FN(smooth_step_value)(t[i], gamma);
}

void FN(smooth_step_forward)(real *s, const real *t, long N, real gamma) {
    FN(Elementwise) a = {s, t, NULL, NULL, gamma};
    dsk_parallel_for(N, DSK_PARALLEL_MIN_WORK, FN(smooth_step_range), &a);
}

static void FN(smooth_step_backward_range)(void *arg, long lo, long hi) {
    const FN(Elementwise) *a = arg;
    real *restrict dt = a->out;
    const real *restrict t = a->in, *restrict dout = a->in2, gamma = a->gamma;
    for (long i = lo; i < hi; i++) dt[i] = dout[i] * FN(smooth_step_slope)(t[i], gamma);
}

void FN(smooth_step_backward)(real *dt, const real *dout, const real *t, long N, real gamma) {
    FN(Elementwise) a = {dt, t, dout, NULL, gamma};
    dsk_parallel_for(N, DSK_PARALLEL_MIN_WORK, FN(smooth_step_backward_range), &a);
}

/* One selector row: r (n) from s (m), by doubling. After bit b the first 2^(b+1) codes hold the
 * products over bits 0..b; code j + 2^b has bit b set (factor s_b), code j has it clear (1 - s_b).
 * Since 2^(m-1) < n, only the last doubling can reach past n, and those codes are dropped. */
static void FN(selector_row_forward)(real *r, const real *s, int m, long n) {
    r[0] = 1;
    for (int b = 0; b < m; b++) {
        const long half = 1L << b;
        const real on = s[b], off = 1 - s[b];
        for (long j = 0; j < half; j++) {
            if (j + half < n) r[j + half] = r[j] * on;
            r[j] *= off;
        }
    }
}

/* dr_j of one selector row: coef_w * dw_j + coef_h * h'(r_j) + coef_p, where
 * h'(r) = -(log(r + eps) + r / (r + eps)) is the derivative of the entropy term -r log(r + eps). */
static inline double FN(selector_entry_grad)(long j, const real *dw, double coef_w, const real *r,
                                             double coef_h, double coef_p, double eps) {
    double drj = coef_p;
    if (dw) drj += coef_w * (double)dw[j];
    if (coef_h != 0) {
        const double rj = (double)r[j];
        drj -= coef_h * (log(rj + eps) + rj / (rj + eps));
    }
    return drj;
}

/* One selector row's backward: ds (m) = sum_{j<n} dr_j dr_j/ds with dr_j from selector_entry_grad
 * (dw may be NULL). Reverse mode through the doubling of selector_row_forward: with L_b the
 * products over bits < b (2^b entries) and G_{b+1} the gradient after bit b,
 *   ds_b = sum_j L_b[j] (G_{b+1}[j + 2^b] - G_{b+1}[j]),
 *   G_b[j] = (1 - s_b) G_{b+1}[j] + s_b G_{b+1}[j + 2^b].
 * O(2^m) per row and no division, so it is exact where s is 0 or 1. The levels live in a stack
 * buffer (kernels never allocate), which bounds m; larger m use the O(n m) prefix/suffix form. */
static void FN(selector_row_backward)(double *ds, const real *s, int m, long n, const real *dw,
                                      double coef_w, const real *r, double coef_h, double coef_p,
                                      double eps) {
    if (m <= DSK_TREE_MAX_BITS) {
        double levels[1 << DSK_TREE_MAX_BITS]; /* level b (b < m) at offset 2^b - 1 */
        double grad[1 << DSK_TREE_MAX_BITS];
        levels[0] = 1;
        for (int b = 0; b + 1 < m; b++) {
            const long half = 1L << b;
            const double *cur = levels + half - 1;
            double *next = levels + 2 * half - 1;
            const double on = (double)s[b], off = 1 - on;
            for (long j = 0; j < half; j++) {
                next[j] = cur[j] * off;
                next[j + half] = cur[j] * on;
            }
        }
        const long codes = 1L << m;
        for (long j = 0; j < n; j++) grad[j] = FN(selector_entry_grad)(j, dw, coef_w, r, coef_h, coef_p, eps);
        for (long j = n; j < codes; j++) grad[j] = 0; /* dropped codes carry no gradient */
        for (int b = m - 1; b >= 0; b--) {
            const long half = 1L << b;
            const double *cur = levels + half - 1;
            const double on = (double)s[b], off = 1 - on;
            double acc = 0;
            for (long j = 0; j < half; j++) {
                const double g0 = grad[j], g1 = grad[j + half];
                acc += cur[j] * (g1 - g0);
                grad[j] = off * g0 + on * g1;
            }
            ds[b] = acc;
        }
        return;
    }
    /* large m: dr_j/ds_b is the product of the other m - 1 factors, from prefix and suffix
     * products */
    double prefix[DSK_MAX_BITS + 1];
    for (int b = 0; b < m; b++) ds[b] = 0;
    for (long j = 0; j < n; j++) {
        const double drj = FN(selector_entry_grad)(j, dw, coef_w, r, coef_h, coef_p, eps);
        if (drj == 0) continue;
        prefix[0] = 1;
        for (int b = 0; b < m; b++)
            prefix[b + 1] = prefix[b] * (((j >> b) & 1) ? (double)s[b] : 1 - (double)s[b]);
        double suffix = 1;
        for (int b = m - 1; b >= 0; b--) {
            const int bit = (j >> b) & 1;
            const double term = prefix[b] * suffix;
            ds[b] += bit ? drj * term : -drj * term;
            suffix *= bit ? (double)s[b] : 1 - (double)s[b];
        }
    }
}

typedef struct {
    real *out;
    const real *s, *dr;
    int m;
    long n;
} FN(Selector);

static void FN(selector_range)(void *arg, long lo, long hi) {
    const FN(Selector) *a = arg;
    for (long i = lo; i < hi; i++) FN(selector_row_forward)(a->out + i * a->n, a->s + i * a->m, a->m, a->n);
}

void FN(selector_forward)(real *r, const real *s, long R, int m, long n) {
    FN(Selector) a = {r, s, NULL, m, n};
    dsk_parallel_for(R, dsk_grain(n), FN(selector_range), &a);
}

static void FN(selector_backward_range)(void *arg, long lo, long hi) {
    const FN(Selector) *a = arg;
    const int m = a->m;
    for (long i = lo; i < hi; i++) {
        double acc[DSK_MAX_BITS];
        FN(selector_row_backward)(acc, a->s + i * m, m, a->n, a->dr + i * a->n, 1.0, NULL, 0.0, 0.0, 0.0);
        for (int b = 0; b < m; b++) a->out[i * m + b] = (real)acc[b];
    }
}

void FN(selector_backward)(real *ds, const real *dr, const real *s, long R, int m, long n) {
    FN(Selector) a = {ds, s, dr, m, n};
    dsk_parallel_for(R, dsk_grain(n * m), FN(selector_backward_range), &a);
}

/* softmax of one row v (len) into out (len), in place allowed */
static void FN(softmax_row)(real *out, const real *v, long len, real scale) {
    real vmax = v[0];
    for (long j = 1; j < len; j++) vmax = v[j] > vmax ? v[j] : vmax;
    double sum = 0;
    for (long j = 0; j < len; j++) {
        out[j] = (real)exp((double)(scale * (v[j] - vmax)));
        sum += out[j];
    }
    const real inv = (real)(1.0 / sum);
    for (long j = 0; j < len; j++) out[j] *= inv;
}

/* dv (len) = p * (dp - <p, dp>), the backward of p = softmax(v); dp may alias dv. */
static void FN(softmax_row_backward)(real *dv, const real *dp, const real *p, long len, real scale) {
    double dot = 0;
    for (long j = 0; j < len; j++) dot += (double)p[j] * dp[j];
    for (long j = 0; j < len; j++) dv[j] = (real)(scale * p[j] * ((double)dp[j] - dot));
}

/* The arguments of the batched gate kernels (dselect_k_*, softmax_selector_*), one struct for all. */
typedef struct {
    real *w, *sigma, *sz, *r, *dalpha, *dZ;
    const real *alpha, *Z, *dw, *csigma, *csz, *cr;
    long n;
    int k, m;
    real gamma;
    double coef_h, coef_xi, eps;
    int dw_per_selector; /* dselect_k_backward: dw holds one row per selector, else 0 */
} FN(GateJob);

static void FN(dselect_k_forward_range)(void *arg, long lo, long hi) {
    const FN(GateJob) *a = arg;
    real *w = a->w, *sigma = a->sigma, *sz = a->sz, *r = a->r;
    const real *alpha = a->alpha, *Z = a->Z, gamma = a->gamma;
    const long n = a->n;
    const int k = a->k, m = a->m;
    for (long b = lo; b < hi; b++) {
        real *wb = w + b * n, *sigb = sigma + b * k;
        FN(softmax_row)(sigb, alpha + b * k, k, 1);
        for (long j = 0; j < n; j++) wb[j] = 0;
        for (int i = 0; i < k; i++) {
            const long row = b * k + i;
            real *s = sz + row * m, *ri = r + row * n;
            for (int c = 0; c < m; c++) s[c] = FN(smooth_step_value)(Z[row * m + c], gamma);
            FN(selector_row_forward)(ri, s, m, n);
            const real si = sigb[i];
            for (long j = 0; j < n; j++) wb[j] += si * ri[j];
        }
    }
}

void FN(dselect_k_forward)(real *w, real *sigma, real *sz, real *r, const real *alpha,
                           const real *Z, long B, int k, int m, long n, real gamma) {
    FN(GateJob) a = {w, sigma, sz, r, NULL, NULL, alpha, Z, NULL, NULL, NULL, NULL, n, k, m, gamma, 0, 0, 0, 0};
    dsk_parallel_for(B, dsk_grain(k * n), FN(dselect_k_forward_range), &a);
}

static void FN(dselect_k_backward_range)(void *arg, long lo, long hi) {
    const FN(GateJob) *a = arg;
    real *dalpha = a->dalpha, *dZ = a->dZ;
    const real *dw = a->dw, *sigma = a->csigma, *sz = a->csz, *r = a->cr, *Z = a->Z, gamma = a->gamma;
    const long n = a->n;
    const int k = a->k, m = a->m;
    const double coef_h = a->coef_h, coef_xi = a->coef_xi, eps = a->eps;
    const int dw_per_selector = a->dw_per_selector;
    const long dw_rows = dw_per_selector ? k : 1; /* rows of dw per example */
    for (long b = lo; b < hi; b++) {
        const real *sigb = sigma + b * k, *dwb = dw ? dw + b * dw_rows * n : NULL;
        real *dab = dalpha + b * k;
        /* dsigma_i = <dw_i, r_i>, then through the softmax; written into dalpha first */
        for (int i = 0; i < k; i++) {
            const real *dwi = dwb && dw_per_selector ? dwb + i * n : dwb;
            double dot = 0;
            if (dwi)
                for (long j = 0; j < n; j++) dot += (double)dwi[j] * r[(b * k + i) * n + j];
            dab[i] = (real)dot;
        }
        FN(softmax_row_backward)(dab, dab, sigb, k, 1);
        for (int i = 0; i < k; i++) {
            const long row = b * k + i;
            const real *ri = r + row * n;
            const real *dwi = dwb && dw_per_selector ? dwb + i * n : dwb;
            double coef_p = 0;
            if (coef_xi != 0) { /* d/dr_j of xi / (eps + sum_j r_j) is the same for every j < n */
                double mass = 0;
                for (long j = 0; j < n; j++) mass += ri[j];
                coef_p = -coef_xi / ((eps + mass) * (eps + mass));
            }
            double ds[DSK_MAX_BITS];
            FN(selector_row_backward)(ds, sz + row * m, m, n, dwi, (double)sigb[i], ri, coef_h,
                                      coef_p, eps);
            for (int c = 0; c < m; c++)
                dZ[row * m + c] = (real)(ds[c] * FN(smooth_step_slope)(Z[row * m + c], gamma));
        }
    }
}

void FN(dselect_k_backward)(real *dalpha, real *dZ, const real *dw, const real *sigma,
                            const real *sz, const real *r, const real *Z, long B, int k, int m,
                            long n, int dw_per_selector, real gamma, double lambda, double xi,
                            double eps) {
    /* The regularizers are batch means, hence the 1/B on their coefficients. */
    FN(GateJob) a = {NULL, NULL, NULL, NULL, dalpha, dZ, NULL, Z, dw, sigma, sz, r, n, k, m, gamma,
                     lambda / (double)B, xi / (double)B, eps, dw_per_selector};
    dsk_parallel_for(B, dsk_grain(k * n * m), FN(dselect_k_backward_range), &a);
}

double FN(selector_entropy)(const real *r, long R, long n, double eps) {
    double total = 0;
    for (long i = 0; i < R * n; i++) total -= (double)r[i] * log((double)r[i] + eps);
    return total;
}

double FN(selector_mass_penalty)(const real *r, long R, long n, double eps) {
    double total = 0;
    for (long i = 0; i < R; i++) {
        double mass = 0;
        for (long j = 0; j < n; j++) mass += r[i * n + j];
        total += 1 / (eps + mass);
    }
    return total;
}

/* Row kernels' arguments: out (B, n) from in (B, n) (and in2). */
typedef struct {
    real *out;
    const real *in, *in2;
    long n, k;
} FN(Rows);

static void FN(softmax_range)(void *arg, long lo, long hi) {
    const FN(Rows) *a = arg;
    for (long b = lo; b < hi; b++) FN(softmax_row)(a->out + b * a->n, a->in + b * a->n, a->n, 1);
}

void FN(softmax_forward)(real *w, const real *logits, long B, long n) {
    FN(Rows) a = {w, logits, NULL, n, 0};
    dsk_parallel_for(B, dsk_grain(4 * n), FN(softmax_range), &a);
}

static void FN(softmax_backward_range)(void *arg, long lo, long hi) {
    const FN(Rows) *a = arg;
    const long n = a->n;
    for (long b = lo; b < hi; b++) FN(softmax_row_backward)(a->out + b * n, a->in + b * n, a->in2 + b * n, n, 1);
}

void FN(softmax_backward)(real *dlogits, const real *dw, const real *w, long B, long n) {
    FN(Rows) a = {dlogits, dw, w, n, 0};
    dsk_parallel_for(B, dsk_grain(2 * n), FN(softmax_backward_range), &a);
}

static void FN(topk_range)(void *arg, long lo, long hi) {
    const FN(Rows) *a = arg;
    const long n = a->n, k = a->k;
    for (long b = lo; b < hi; b++) {
        const real *v = a->in + b * n;
        real *wb = a->out + b * n;
        /* w doubles as the "already kept" mark while the k largest are picked */
        for (long j = 0; j < n; j++) wb[j] = 0;
        real vmax = 0;
        for (long t = 0; t < k; t++) {
            long best = -1;
            for (long j = 0; j < n; j++)
                if (wb[j] == 0 && (best < 0 || v[j] > v[best])) best = j;
            wb[best] = 1;
            if (t == 0) vmax = v[best];
        }
        double sum = 0;
        for (long j = 0; j < n; j++)
            if (wb[j] != 0) {
                wb[j] = (real)exp((double)(v[j] - vmax));
                sum += wb[j];
            }
        const real inv = (real)(1.0 / sum);
        for (long j = 0; j < n; j++) wb[j] *= inv;
    }
}

void FN(topk_forward)(real *w, const real *logits, long B, long n, long k) {
    FN(Rows) a = {w, logits, NULL, n, k};
    dsk_parallel_for(B, dsk_grain(n * k), FN(topk_range), &a);
}

static inline double FN(softplus)(double x) { return x > 0 ? x + log1p(exp(-x)) : log1p(exp(x)); }

static void FN(noisy_logits_range)(void *arg, long lo, long hi) {
    const FN(Elementwise) *a = arg;
    real *restrict h = a->out;
    const real *restrict clean = a->in, *restrict raw_noise = a->in2, *restrict normal = a->in3;
    for (long i = lo; i < hi; i++) h[i] = (real)(clean[i] + normal[i] * FN(softplus)(raw_noise[i]));
}

void FN(noisy_logits_forward)(real *h, const real *clean, const real *raw_noise,
                              const real *normal, long N) {
    FN(Elementwise) a = {h, clean, raw_noise, normal, 0};
    dsk_parallel_for(N, DSK_PARALLEL_MIN_WORK / 8, FN(noisy_logits_range), &a);
}

static void FN(noisy_logits_backward_range)(void *arg, long lo, long hi) {
    const FN(Elementwise) *a = arg;
    real *restrict draw = a->out;
    const real *restrict dh = a->in, *restrict raw_noise = a->in2, *restrict normal = a->in3;
    for (long i = lo; i < hi; i++) {
        const double sig = 1 / (1 + exp(-(double)raw_noise[i]));
        draw[i] = (real)(dh[i] * normal[i] * sig);
    }
}

void FN(noisy_logits_backward)(real *draw, const real *dh, const real *raw_noise,
                               const real *normal, long N) {
    FN(Elementwise) a = {draw, dh, raw_noise, normal, 0};
    dsk_parallel_for(N, DSK_PARALLEL_MIN_WORK / 8, FN(noisy_logits_backward_range), &a);
}

static void FN(softmax_selector_forward_range)(void *arg, long lo, long hi) {
    const FN(GateJob) *a = arg; /* r: P, Z: beta, gamma: T */
    real *w = a->w, *sigma = a->sigma, *P = a->r;
    const real *alpha = a->alpha, *beta = a->Z, T = a->gamma;
    const long n = a->n;
    const int k = a->k;
    for (long b = lo; b < hi; b++) {
        real *wb = w + b * n, *sigb = sigma + b * k;
        FN(softmax_row)(sigb, alpha + b * k, k, 1);
        for (long j = 0; j < n; j++) wb[j] = 0;
        for (int i = 0; i < k; i++) {
            real *Pi = P + (b * k + i) * n;
            FN(softmax_row)(Pi, beta + (b * k + i) * n, n, 1 / T);
            for (long j = 0; j < n; j++) wb[j] += sigb[i] * Pi[j];
        }
    }
}

void FN(softmax_selector_forward)(real *w, real *sigma, real *P, const real *alpha,
                                  const real *beta, long B, int k, long n, real T) {
    FN(GateJob) a = {w, sigma, NULL, P, NULL, NULL, alpha, beta, NULL, NULL, NULL, NULL, n, k, 0, T, 0, 0, 0, 0};
    dsk_parallel_for(B, dsk_grain(4 * k * n), FN(softmax_selector_forward_range), &a);
}

static void FN(softmax_selector_backward_range)(void *arg, long lo, long hi) {
    const FN(GateJob) *a = arg; /* dZ: dbeta, cr: P, gamma: T */
    real *dalpha = a->dalpha, *dbeta = a->dZ;
    const real *dw = a->dw, *sigma = a->csigma, *P = a->cr, T = a->gamma;
    const long n = a->n;
    const int k = a->k;
    const double coef_h = a->coef_h, eps = a->eps;
    for (long b = lo; b < hi; b++) {
        const real *sigb = sigma + b * k, *dwb = dw ? dw + b * n : NULL;
        real *dab = dalpha + b * k;
        for (int i = 0; i < k; i++) {
            const real *Pi = P + (b * k + i) * n;
            real *dPi = dbeta + (b * k + i) * n; /* dP first, then turned into dbeta in place */
            double dot = 0;
            for (long j = 0; j < n; j++) {
                double dp = 0;
                if (dwb) {
                    dot += (double)dwb[j] * Pi[j];
                    dp = (double)sigb[i] * dwb[j];
                }
                if (coef_h != 0) dp -= coef_h * (log((double)Pi[j] + eps) + Pi[j] / (Pi[j] + eps));
                dPi[j] = (real)dp;
            }
            dab[i] = (real)dot;
            FN(softmax_row_backward)(dPi, dPi, Pi, n, 1 / T);
        }
        FN(softmax_row_backward)(dab, dab, sigb, k, 1);
    }
}

void FN(softmax_selector_backward)(real *dalpha, real *dbeta, const real *dw, const real *sigma,
                                   const real *P, long B, int k, long n, real T, double lambda,
                                   double eps) {
    FN(GateJob) a = {NULL, NULL, NULL, NULL, dalpha, dbeta, NULL, NULL, dw, sigma, NULL, P, n, k, 0, T,
                     lambda / (double)B, 0, eps, 0};
    dsk_parallel_for(B, dsk_grain(4 * k * n), FN(softmax_selector_backward_range), &a);
}

/* Pointer to expert j's output rows for examples b.. in either layout. */
static inline const real *FN(expert_rows)(const real *f, long j, long b, long n, long B, long d,
                                          int bnd) {
    return bnd ? f + (b * n + j) * d : f + (j * B + b) * d;
}

/* The mixing kernels' arguments. */
typedef struct {
    real *y, *dw, *df;
    const real *f, *w, *dy;
    const unsigned char *active;
    long T, n, B, d;
    int bnd, per_example, relu_mask;
} FN(Mix);

static void FN(mix_forward_range)(void *arg, long lo, long hi) {
    const FN(Mix) *a = arg;
    real *y = a->y;
    const real *f = a->f, *w = a->w;
    const unsigned char *active = a->active;
    const long n = a->n, B = a->B, d = a->d;
    const int bnd = a->bnd, per_example = a->per_example;
    for (long b = lo; b < hi; b++) {
        real *yb = y + b * d;
        for (long c = 0; c < d; c++) yb[c] = 0;
        for (long j = 0; j < n; j++) {
            if (active && !active[j]) continue;
            const real wj = per_example ? w[b * n + j] : w[j];
            if (wj == 0) continue; /* exact zero: contributes nothing, skip the read */
            const real *fj = FN(expert_rows)(f, j, b, n, B, d, bnd);
            for (long c = 0; c < d; c++) yb[c] += wj * fj[c];
        }
    }
}

void FN(mix_experts_forward)(real *y, const real *f, const real *w, const unsigned char *active,
                             long n, long B, long d, int bnd, int per_example) {
    FN(Mix) a = {y, NULL, NULL, f, w, NULL, active, 1, n, B, d, bnd, per_example, 0};
    dsk_parallel_for(B, dsk_grain(n * d), FN(mix_forward_range), &a);
}

/* df_j[b] = w_bj dy_b, dw_bj = <dy_b, f_j[b]>. Over experts for the static gate (each dw_j is a
 * sum over the whole batch), over examples for the per-example gate. */
static void FN(mix_backward_static_range)(void *arg, long lo, long hi) {
    const FN(Mix) *a = arg;
    real *dw = a->dw, *df = a->df;
    const real *f = a->f, *w = a->w, *dy = a->dy;
    const unsigned char *active = a->active;
    const long n = a->n, B = a->B, d = a->d;
    const int bnd = a->bnd;
    for (long j = lo; j < hi; j++) {
        const int on = !active || active[j];
        double acc = 0;
        for (long b = 0; b < B; b++) {
            real *dfj = (real *)FN(expert_rows)(df, j, b, n, B, d, bnd);
            const real *dyb = dy + b * d;
            if (!on) {
                for (long c = 0; c < d; c++) dfj[c] = 0;
                continue;
            }
            const real *fj = FN(expert_rows)(f, j, b, n, B, d, bnd);
            for (long c = 0; c < d; c++) {
                dfj[c] = w[j] * dyb[c];
                acc += (double)dyb[c] * fj[c];
            }
        }
        dw[j] = (real)acc;
    }
}

static void FN(mix_backward_range)(void *arg, long lo, long hi) {
    const FN(Mix) *a = arg;
    real *dw = a->dw, *df = a->df;
    const real *f = a->f, *w = a->w, *dy = a->dy;
    const unsigned char *active = a->active;
    const long n = a->n, B = a->B, d = a->d;
    const int bnd = a->bnd;
    for (long b = lo; b < hi; b++) {
        const real *dyb = dy + b * d;
        for (long j = 0; j < n; j++) {
            real *dfj = (real *)FN(expert_rows)(df, j, b, n, B, d, bnd);
            if (active && !active[j]) {
                for (long c = 0; c < d; c++) dfj[c] = 0;
                dw[b * n + j] = 0;
                continue;
            }
            const real *fj = FN(expert_rows)(f, j, b, n, B, d, bnd);
            const real wj = w[b * n + j];
            double acc = 0;
            for (long c = 0; c < d; c++) {
                dfj[c] = wj * dyb[c];
                acc += (double)dyb[c] * fj[c];
            }
            dw[b * n + j] = (real)acc;
        }
    }
}

void FN(mix_experts_backward)(real *dw, real *df, const real *dy, const real *f, const real *w,
                              const unsigned char *active, long n, long B, long d, int bnd,
                              int per_example) {
    FN(Mix) a = {NULL, dw, df, f, w, dy, active, 1, n, B, d, bnd, per_example, 0};
    if (!per_example) dsk_parallel_for(n, dsk_grain(B * d), FN(mix_backward_static_range), &a);
    else dsk_parallel_for(B, dsk_grain(n * d), FN(mix_backward_range), &a);
}

/* <x, y> over d entries, accumulated in double. Eight partial sums, each in order, so that GCC
 * vectorizes the loop without reassociating (no -ffast-math needed) and the result does not
 * depend on the build: the same bits with or without OpenMP. */
static inline real FN(dot_lanes)(const real *restrict x, const real *restrict y, long d) {
    /* 16 in-order partial sums in the working precision: they vectorize (a double accumulator
     * for float data halves the SIMD width and made this the backward's bottleneck), and the
     * sum's rounding error grows with d / 16 terms per lane rather than d. */
    real s[16] = {0};
    long c = 0;
    for (; c + 16 <= d; c += 16)
        for (int u = 0; u < 16; u++) s[u] += x[c + u] * y[c + u];
    for (; c < d; c++) s[0] += x[c] * y[c];
    for (int u = 8; u > 0; u /= 2)
        for (int v = 0; v < u; v++) s[v] += s[v + u];
    return s[0];
}

/* y += a x over d entries. restrict parameters (rather than restrict locals, which GCC's alias
 * analysis mostly ignores) let the loop vectorize without a run-time overlap check. */
static inline void FN(axpy_row)(real *restrict y, const real *restrict x, real a, long d) {
    for (long c = 0; c < d; c++) y[c] += a * x[c];
}

/* Parallel over examples: example b owns the rows y_t[b] of every task. Per b, f_j[b] (d entries)
 * is read from memory once and stays in L1 while it is added to the T outputs; the T rows y_t[b]
 * stay there too. Terms are summed over j in order, as mix_experts_forward. */
static void FN(mix_many_forward_range)(void *arg, long lo, long hi) {
    const FN(Mix) *a = arg;
    real *y = a->y;
    const real *f = a->f, *w = a->w;
    const unsigned char *active = a->active;
    const long T = a->T, n = a->n, B = a->B, d = a->d;
    for (long b = lo; b < hi; b++) {
        for (long t = 0; t < T; t++) {
            real *yt = y + (t * B + b) * d;
            for (long c = 0; c < d; c++) yt[c] = 0;
        }
        for (long j = 0; j < n; j++) {
            if (active && !active[j]) continue;
            const real *fj = f + (j * B + b) * d;
            for (long t = 0; t < T; t++) {
                const real wt = w[(t * B + b) * n + j];
                if (wt == 0) continue; /* exact zero: contributes nothing */
                FN(axpy_row)(y + (t * B + b) * d, fj, wt, d);
            }
        }
    }
}

void FN(mix_experts_many_forward)(real *y, const real *f, const real *w, const unsigned char *active,
                                  long T, long n, long B, long d) {
    FN(Mix) a = {y, NULL, NULL, f, w, NULL, active, T, n, B, d, 0, 1, 0};
    dsk_parallel_for(B, dsk_grain(T * n * d), FN(mix_many_forward_range), &a);
}

/* Parallel over examples: example b owns df_j[b] for every j and dw[t, b, :] for every t. Per
 * (b, j), f_j[b] and df_j[b] stay in L1 over the T tasks (and the T rows dy_t[b] over the n
 * experts). df_j[b] sums the tasks in order t = 0..T-1, as a loop over tasks that adds the df of
 * mix_experts_backward into a zeroed total would. */
static void FN(mix_many_backward_range)(void *arg, long lo, long hi) {
    const FN(Mix) *a = arg;
    real *dw = a->dw, *df = a->df;
    const real *f = a->f, *w = a->w, *dy = a->dy;
    const unsigned char *active = a->active;
    const long T = a->T, n = a->n, B = a->B, d = a->d;
    const int relu_mask = a->relu_mask;
    for (long b = lo; b < hi; b++) {
        for (long j = 0; j < n; j++) {
            real *dfj = df + (j * B + b) * d;
            for (long c = 0; c < d; c++) dfj[c] = 0;
            if (active && !active[j]) {
                for (long t = 0; t < T; t++) dw[(t * B + b) * n + j] = 0;
                continue;
            }
            const real *fj = f + (j * B + b) * d;
            for (long t = 0; t < T; t++) {
                const real *dyt = dy + (t * B + b) * d;
                const real wt = w[(t * B + b) * n + j];
                /* an exact zero weight adds nothing to df_j; dw is computed all the same */
                if (wt != 0) FN(axpy_row)(dfj, dyt, wt, d);
                dw[(t * B + b) * n + j] = FN(dot_lanes)(dyt, fj, d);
            }
            if (relu_mask)
                for (long c = 0; c < d; c++) dfj[c] = fj[c] > 0 ? dfj[c] : 0;
        }
    }
}

void FN(mix_experts_many_backward)(real *dw, real *df, const real *dy, const real *f, const real *w,
                                   const unsigned char *active, long T, long n, long B, long d, int relu_mask) {
    FN(Mix) a = {NULL, dw, df, f, w, dy, active, T, n, B, d, 0, 1, relu_mask};
    dsk_parallel_for(B, dsk_grain(T * n * d), FN(mix_many_backward_range), &a);
}
