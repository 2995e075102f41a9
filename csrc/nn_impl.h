/* Body of the layer and loss kernels, included twice by nn.c: once with real = float, once with
 * real = double (FN appends _f32 / _f64, GEMM is scipy_cblas_sgemm / scipy_cblas_dgemm).
 * Declarations and the meaning of every argument are in nn.h. BLAS is called only outside the
 * OpenMP loops; sums accumulate in double. */

void FN(dense_forward)(real *y, const real *x, const real *W, const real *b, int B, int p, int o) {
    for (int i = 0; i < B; i++) {
        real *yi = y + (size_t)i * o;
        if (b) memcpy(yi, b, sizeof(real) * (size_t)o);
        else memset(yi, 0, sizeof(real) * (size_t)o);
    }
    if (B > 0 && o > 0 && p > 0)
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, B, o, p, 1, x, p, W, o, 1, y, o);
}

void FN(dense_backward)(real *dx, real *dW, real *db, const real *dy, const real *x, const real *W,
                        int B, int p, int o) {
    /* dW (p, o) += x^T (p, B) dy (B, o): beta = 1 accumulates into the caller's gradient */
    if (B > 0 && o > 0 && p > 0)
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, p, o, B, 1, x, p, dy, o, 1, dW, o);
    if (db) {
        /* column sums of dy, a block of columns at a time so that dy is read row by row into a
         * double accumulator on the stack */
        enum { COLS = 256 };
        const long nblocks = ((long)o + COLS - 1) / COLS;
        DSK_PARALLEL_FOR((long)B * o)
        for (long blk = 0; blk < nblocks; blk++) {
            double acc[COLS];
            const long j0 = blk * COLS, ncols = (long)o - j0 < COLS ? (long)o - j0 : COLS;
            for (long j = 0; j < ncols; j++) acc[j] = 0;
            for (long i = 0; i < B; i++) {
                const real *dyi = dy + i * (long)o + j0;
                for (long j = 0; j < ncols; j++) acc[j] += dyi[j];
            }
            for (long j = 0; j < ncols; j++) db[j0 + j] = (real)(db[j0 + j] + acc[j]);
        }
    }
    if (dx) {
        /* dx (B, p) = dy (B, o) W^T (o, p) */
        if (B > 0 && p > 0 && o > 0)
            GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, B, p, o, 1, dy, o, W, o, 0, dx, p);
        else
            memset(dx, 0, sizeof(real) * (size_t)B * (size_t)p);
    }
}

void FN(relu_forward)(real *y, const real *x, long N) {
    DSK_PARALLEL_FOR(N)
    for (long i = 0; i < N; i++) y[i] = x[i] > 0 ? x[i] : 0;
}

void FN(relu_backward)(real *dx, const real *dy, const real *y, long N) {
    DSK_PARALLEL_FOR(N)
    for (long i = 0; i < N; i++) {
        /* dy is read unconditionally so that the select compiles branch-free: a load inside the
         * condition may not be hoisted, and ReLU's random sign pattern mispredicts every other
         * branch (8 ns per entry measured, against 1 ns) */
        const real g = dy[i];
        dx[i] = y[i] > 0 ? g : 0;
    }
}

void FN(dropout_forward)(real *y, const real *x, long N, const int64_t *rows, long R, double rate, uint64_t seed,
                         uint64_t step) {
    if (rate <= 0) {
        if (y != x) memcpy(y, x, sizeof(real) * (size_t)N);
        return;
    }
    const uint64_t key = dsk_dropout_key(seed, step);
    const double scale = 1 / (1 - rate);
    if (!rows) {
        DSK_PARALLEL_FOR(N)
        for (long i = 0; i < N; i++)
            y[i] = dsk_dropout_u(key, (uint64_t)i) >= rate ? (real)((double)x[i] * scale) : 0;
        return;
    }
    const long B = N / R;
    DSK_PARALLEL_FOR(N)
    for (long b = 0; b < B; b++) {
        const uint64_t first = (uint64_t)rows[b] * (uint64_t)R;
        const real *xb = x + b * R;
        real *yb = y + b * R;
        for (long j = 0; j < R; j++)
            yb[j] = dsk_dropout_u(key, first + (uint64_t)j) >= rate ? (real)((double)xb[j] * scale) : 0;
    }
}

/* Losses: the batch is cut into DSK_LOSS_CHUNKS fixed chunks whose partial sums are added in
 * order, so the loss is the same bit for bit whatever the thread count. */
static inline double FN(weight)(const real *w, long b) { return w ? (double)w[b] : 1.0; }

double FN(bce_with_logits)(real *dz, const real *z, const real *t, const real *w, long B) {
    double partial[DSK_LOSS_CHUNKS];
    const long chunk = (B + DSK_LOSS_CHUNKS - 1) / DSK_LOSS_CHUNKS;
    const double invB = 1.0 / (double)B;
    DSK_PARALLEL_FOR(B * 16)
    for (long c = 0; c < DSK_LOSS_CHUNKS; c++) {
        double acc = 0;
        const long end = (c + 1) * chunk < B ? (c + 1) * chunk : B;
        for (long b = c * chunk; b < end; b++) {
            const double zb = z[b], tb = t[b], wb = FN(weight)(w, b);
            const double e = exp(-fabs(zb)); /* in (0, 1]: never overflows */
            const double sig = zb >= 0 ? 1 / (1 + e) : e / (1 + e);
            acc += wb * ((zb > 0 ? zb : 0) - zb * tb + log1p(e));
            dz[b] = (real)(wb * (sig - tb) * invB);
        }
        partial[c] = acc;
    }
    double total = 0;
    for (long c = 0; c < DSK_LOSS_CHUNKS; c++) total += partial[c];
    return total * invB;
}

double FN(mse)(real *dpred, const real *pred, const real *target, const real *w, long B, long d) {
    double partial[DSK_LOSS_CHUNKS];
    const long chunk = (B + DSK_LOSS_CHUNKS - 1) / DSK_LOSS_CHUNKS;
    const double invB = 1.0 / (double)B;
    DSK_PARALLEL_FOR(B * d * 4)
    for (long c = 0; c < DSK_LOSS_CHUNKS; c++) {
        double acc = 0;
        const long end = (c + 1) * chunk < B ? (c + 1) * chunk : B;
        for (long b = c * chunk; b < end; b++) {
            const double wb = FN(weight)(w, b), g = 2 * wb * invB;
            double sq = 0;
            for (long j = 0; j < d; j++) {
                const double r = (double)pred[b * d + j] - (double)target[b * d + j];
                sq += r * r;
                dpred[b * d + j] = (real)(g * r);
            }
            acc += wb * sq;
        }
        partial[c] = acc;
    }
    double total = 0;
    for (long c = 0; c < DSK_LOSS_CHUNKS; c++) total += partial[c];
    return total * invB;
}

double FN(softmax_cross_entropy)(real *dlogits, const real *logits, const int64_t *labels,
                                 const real *w, long B, long C) {
    double partial[DSK_LOSS_CHUNKS];
    const long chunk = (B + DSK_LOSS_CHUNKS - 1) / DSK_LOSS_CHUNKS;
    const double invB = 1.0 / (double)B;
    DSK_PARALLEL_FOR(B * C * 8)
    for (long c = 0; c < DSK_LOSS_CHUNKS; c++) {
        double acc = 0;
        const long end = (c + 1) * chunk < B ? (c + 1) * chunk : B;
        for (long b = c * chunk; b < end; b++) {
            const real *zb = logits + b * C;
            real *db = dlogits + b * C;
            const long label = (long)labels[b];
            double zmax = zb[0];
            for (long j = 1; j < C; j++) zmax = zb[j] > zmax ? zb[j] : zmax;
            double sum = 0;
            for (long j = 0; j < C; j++) sum += exp((double)zb[j] - zmax);
            const double lse = zmax + log(sum), wb = FN(weight)(w, b), g = wb * invB;
            for (long j = 0; j < C; j++) {
                const double pj = exp((double)zb[j] - lse);
                db[j] = (real)(g * (j == label ? pj - 1 : pj));
            }
            acc += wb * (lse - (double)zb[label]);
        }
        partial[c] = acc;
    }
    double total = 0;
    for (long c = 0; c < DSK_LOSS_CHUNKS; c++) total += partial[c];
    return total * invB;
}
