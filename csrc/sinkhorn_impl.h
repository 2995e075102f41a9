/* Body of the Sinkhorn kernels, included twice by sinkhorn.c: once with real = float, once with
 * real = double (FN appends _f32 / _f64). The iterates live in double for both (sinkhorn.h says
 * why); declarations and the meaning of every argument are in sinkhorn.h. */

/* dst (n, n) = src - logsumexp over each row of src; dst may be src. */
static void FN(normalise_rows)(double *dst, const double *src, long n) {
    for (long i = 0; i < n; i++) {
        const double *s = src + i * n;
        double top = s[0];
        for (long j = 1; j < n; j++) top = s[j] > top ? s[j] : top;
        double sum = 0;
        for (long j = 0; j < n; j++) sum += exp(s[j] - top);
        const double lse = top + log(sum);
        double *d = dst + i * n;
        for (long j = 0; j < n; j++) d[j] = s[j] - lse;
    }
}

/* dst (n, n) = src - logsumexp over each column of src; dst may be src. */
static void FN(normalise_columns)(double *dst, const double *src, long n) {
    for (long j = 0; j < n; j++) {
        double top = src[j];
        for (long i = 1; i < n; i++) top = src[i * n + j] > top ? src[i * n + j] : top;
        double sum = 0;
        for (long i = 0; i < n; i++) sum += exp(src[i * n + j] - top);
        const double lse = top + log(sum);
        for (long i = 0; i < n; i++) dst[i * n + j] = src[i * n + j] - lse;
    }
}

/* The arguments of sinkhorn_forward / sinkhorn_backward, for their loops over the K matrices on
 * the pool. */
typedef struct {
    real *P, *dlog_alpha;
    double *logs, *work;
    const real *log_alpha, *dP, *cP;
    const double *clogs;
    long n, iters, slots;
    double tau, coef, eps;
} FN(SinkhornJob);

static void FN(sinkhorn_forward_range)(void *arg, long lo, long hi) {
    const FN(SinkhornJob) *job = arg;
    real *P = job->P;
    double *logs = job->logs;
    const real *log_alpha = job->log_alpha;
    const long n = job->n, iters = job->iters, slots = job->slots, nn = n * n;
    const double tau = job->tau;
    for (long k = lo; k < hi; k++) {
        double *L = logs + k * slots * nn;
        const real *A = log_alpha + k * nn;
        for (long e = 0; e < nn; e++) L[e] = (double)A[e] / tau;
        const double *prev = L;
        for (long t = 0; t < iters; t++) {
            double *row = slots == 1 ? L : L + 2 * t * nn;
            double *col = slots == 1 ? L : L + (2 * t + 1) * nn;
            FN(normalise_rows)(row, prev, n);
            FN(normalise_columns)(col, row, n);
            prev = col;
        }
        real *Pk = P + k * nn;
        for (long e = 0; e < nn; e++) Pk[e] = (real)exp(prev[e]);
    }
}

void FN(sinkhorn_forward)(real *P, double *logs, const real *log_alpha, long K, long n, double tau,
                          long iters, long slots) {
    FN(SinkhornJob) job = {P, NULL, logs, NULL, log_alpha, NULL, NULL, NULL, n, iters, slots, tau, 0, 0};
    /* one matrix: iters half-step pairs of about 4 n^2 operations (exp and log-sum-exp) */
    dsk_parallel_for(K, dsk_grain(4 * iters * n * n), FN(sinkhorn_forward_range), &job);
}

/* h'(p) for h(p) = -p log(p + eps) */
static inline double FN(entropy_slope)(double p, double eps) { return -(log(p + eps) + p / (p + eps)); }

static void FN(sinkhorn_backward_range)(void *arg, long lo, long hi) {
    const FN(SinkhornJob) *job = arg;
    real *dlog_alpha = job->dlog_alpha;
    double *work = job->work;
    const real *dP = job->dP, *P = job->cP;
    const double *logs = job->clogs;
    const long n = job->n, iters = job->iters, nn = n * n;
    const double tau = job->tau, coef = job->coef, eps = job->eps;
    for (long k = lo; k < hi; k++) {
        double *G = work + k * nn;
        const double *Lk = logs + k * 2 * iters * nn;
        const double *last = Lk + (2 * iters - 1) * nn;
        /* G = d(objective)/dP * dP/d(last) = d * exp(last), since P = exp(last); the regularizer's
         * slope is taken at P itself (the value sinkhorn_entropy sees) */
        for (long i = 0; i < n; i++) {
            const real *p = P + k * nn + i * n;
            double *g = G + i * n;
            double mass = 0;
            for (long j = 0; j < n; j++) mass += p[j];
            double mean_slope = 0; /* sum_j h'(Q_ij) Q_ij of the row-normalised Q */
            if (coef != 0 && mass > 0)
                for (long j = 0; j < n; j++) {
                    const double q = (double)p[j] / mass;
                    mean_slope += FN(entropy_slope)(q, eps) * q;
                }
            for (long j = 0; j < n; j++) {
                double d = dP ? (double)dP[k * nn + i * n + j] : 0;
                if (coef != 0) {
                    d += coef * FN(entropy_slope)((double)p[j], eps);
                    if (mass > 0) d += coef * (FN(entropy_slope)((double)p[j] / mass, eps) - mean_slope) / mass;
                }
                g[j] = d * exp(last[i * n + j]);
            }
        }
        /* back through each half-step Y = X - lse(X): dX = dY - exp(Y) * (sum of dY over the
         * normalised axis) */
        for (long t = iters - 1; t >= 0; t--) {
            const double *col = Lk + (2 * t + 1) * nn, *row = Lk + 2 * t * nn;
            for (long j = 0; j < n; j++) {
                double sum = 0;
                for (long i = 0; i < n; i++) sum += G[i * n + j];
                for (long i = 0; i < n; i++) G[i * n + j] -= exp(col[i * n + j]) * sum;
            }
            for (long i = 0; i < n; i++) {
                double sum = 0;
                for (long j = 0; j < n; j++) sum += G[i * n + j];
                for (long j = 0; j < n; j++) G[i * n + j] -= exp(row[i * n + j]) * sum;
            }
        }
        real *D = dlog_alpha + k * nn;
        for (long e = 0; e < nn; e++) D[e] = (real)(G[e] / tau);
    }
}

void FN(sinkhorn_backward)(real *dlog_alpha, double *work, const real *dP, const real *P,
                           const double *logs, long K, long n, double tau, long iters, double lambda,
                           double eps) {
    /* Omega is a mean over the K matrices: coef = lambda / K */
    FN(SinkhornJob) job = {NULL, dlog_alpha, NULL, work, NULL, dP, P, logs, n, iters, 2 * iters, tau,
                           lambda / (double)K, eps};
    /* one matrix: iters half-step pairs back, about 6 n^2 operations each */
    dsk_parallel_for(K, dsk_grain(6 * iters * n * n), FN(sinkhorn_backward_range), &job);
}

double FN(sinkhorn_entropy)(const real *P, long K, long n, double eps) {
    double total = 0;
    for (long r = 0; r < K * n; r++) {
        const real *p = P + r * n;
        double mass = 0;
        for (long j = 0; j < n; j++) {
            total -= (double)p[j] * log((double)p[j] + eps);
            mass += p[j];
        }
        if (mass > 0)
            for (long j = 0; j < n; j++) {
                const double q = (double)p[j] / mass;
                total -= q * log(q + eps);
            }
    }
    return total;
}
