/* Body of the convolution and pooling kernels, included twice by conv.c: once with real = float,
 * once with real = double (FN appends _f32 / _f64, GEMM is scipy_cblas_sgemm / scipy_cblas_dgemm).
 * Declarations and the meaning of every argument are in conv.h. BLAS is called only outside the
 * OpenMP loops (which do the im2col / col2im copies); sums accumulate in double. */

/* Row k = (c, i, j) of the im2col matrix of one example: dst[p] for p = oh OW + ow gets
 * x[c, oh sh - pt + i, ow sw - pl + j], 0 where that is in the padding. xc: plane c (H, W).
 * At stride sw = 1 the valid part of an output row is one contiguous copy (the common case, and
 * most of the convolution's time when it was an element loop). */
static void FN(im2col_row)(real *dst, const real *xc, long i, long j, const DskConv2d *g) {
    long lo, hi;
    dsk_conv_valid_columns(g, j, &lo, &hi);
    const long off = j - g->pl, OW = g->OW;
    for (long oh = 0; oh < g->OH; oh++) {
        real *d = dst + oh * OW;
        const long ih = oh * g->sh - g->pt + i;
        if (ih < 0 || ih >= g->H || lo >= hi) {
            memset(d, 0, sizeof(real) * (size_t)OW);
            continue;
        }
        const real *row = xc + ih * g->W;
        for (long ow = 0; ow < lo; ow++) d[ow] = 0;
        if (g->sw == 1) memcpy(d + lo, row + lo + off, sizeof(real) * (size_t)(hi - lo));
        else
            for (long ow = lo; ow < hi; ow++) d[ow] = row[ow * g->sw + off];
        for (long ow = hi; ow < OW; ow++) d[ow] = 0;
    }
}

/* The transpose of im2col_row: dxc (H, W) += the row src (P) at the positions it was read from. */
static void FN(col2im_row)(real *dxc, const real *src, long i, long j, const DskConv2d *g) {
    long lo, hi;
    dsk_conv_valid_columns(g, j, &lo, &hi);
    for (long oh = 0; oh < g->OH; oh++) {
        const long ih = oh * g->sh - g->pt + i;
        if (ih < 0 || ih >= g->H) continue;
        const real *s = src + oh * g->OW;
        real *row = dxc + ih * g->W;
        const long off = j - g->pl;
        if (g->sw == 1) {
            real *r = row + lo + off; /* unit stride: a vectorizable row add */
            const real *q = s + lo;
            for (long t = 0; t < hi - lo; t++) r[t] += q[t];
        } else
            for (long ow = lo; ow < hi; ow++) row[ow * g->sw + off] += s[ow];
    }
}

/* The im2col matrix col (K, G P) of the examples b0 .. b0 + G - 1: column g P + p is the patch of
 * output p of example b0 + g. Parallel over the examples. */
static void FN(im2col_group)(real *col, const real *x, long b0, long G, const DskConv2d *g) {
    const long K = g->C * g->KH * g->KW, P = g->OH * g->OW, HW = g->H * g->W, GP = G * P;
    DSK_PARALLEL_FOR(G * K * P)
    for (long e = 0; e < G; e++) {
        const real *xb = x + (size_t)(b0 + e) * g->C * HW;
        for (long k = 0; k < K; k++) {
            const long c = k / (g->KH * g->KW), i = k / g->KW % g->KH, j = k % g->KW;
            FN(im2col_row)(col + k * GP + e * P, xb + c * HW, i, j, g);
        }
    }
}

void FN(conv2d_forward)(real *y, real *col, const real *x, const real *Wt, const real *bias,
                        const DskConv2d *g) {
    const long K = g->C * g->KH * g->KW, P = g->OH * g->OW, Gmax = conv2d_group(g);
    for (long b0 = 0; b0 < g->B; b0 += Gmax) {
        const long G = g->B - b0 < Gmax ? g->B - b0 : Gmax, GP = G * P;
        real *prod = col + (size_t)K * GP; /* (F, G P) */
        FN(im2col_group)(col, x, b0, G, g);
        /* prod (F, G P) = Wt (F, K) col (K, G P): one GEMM for the group, outside any parallel region */
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)g->F, (int)GP, (int)K, 1, Wt, (int)K, col, (int)GP, 0,
             prod, (int)GP);
        /* y[b0 + e, f, :] = prod[f, e P : (e + 1) P] + bias[f] */
        DSK_PARALLEL_FOR(G * g->F * P)
        for (long e = 0; e < G; e++)
            for (long f = 0; f < g->F; f++) {
                real *yr = y + ((size_t)(b0 + e) * g->F + f) * P;
                const real *pr = prod + f * GP + e * P, b = bias ? bias[f] : 0;
                for (long p = 0; p < P; p++) yr[p] = pr[p] + b;
            }
    }
}

void FN(conv2d_backward)(real *dx, real *dW, real *db, real *col, double *acc, const real *dy, const real *x,
                         const real *Wt, const DskConv2d *g) {
    const long K = g->C * g->KH * g->KW, P = g->OH * g->OW, HW = g->H * g->W, Gmax = conv2d_group(g);
    for (long f = 0; f < g->F; f++) acc[f] = 0;
    for (long b0 = 0; b0 < g->B; b0 += Gmax) {
        const long G = g->B - b0 < Gmax ? g->B - b0 : Gmax, GP = G * P;
        real *dy2 = col + (size_t)K * GP; /* dy of the group as (F, G P) */
        FN(im2col_group)(col, x, b0, G, g);
        DSK_PARALLEL_FOR(G * g->F * P)
        for (long e = 0; e < G; e++)
            for (long f = 0; f < g->F; f++)
                memcpy(dy2 + f * GP + e * P, dy + ((size_t)(b0 + e) * g->F + f) * P, sizeof(real) * (size_t)P);
        /* dW (F, K) += dy2 (F, G P) col^T (G P, K): beta = 1 accumulates into the caller's gradient */
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)g->F, (int)K, (int)GP, 1, dy2, (int)GP, col, (int)GP, 1,
             dW, (int)K);
        if (db) {
            DSK_PARALLEL_FOR(g->F * GP)
            for (long f = 0; f < g->F; f++) {
                double s = 0;
                for (long q = 0; q < GP; q++) s += dy2[f * GP + q];
                acc[f] += s;
            }
        }
        if (!dx) continue;
        /* dcol (K, G P) = Wt^T (K, F) dy2 (F, G P), into col (no longer needed), then scattered */
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, (int)K, (int)GP, (int)g->F, 1, Wt, (int)K, dy2, (int)GP, 0, col,
             (int)GP);
        DSK_PARALLEL_FOR(G * K * P)
        for (long e = 0; e < G; e++) {
            real *dxb = dx + (size_t)(b0 + e) * g->C * HW;
            memset(dxb, 0, sizeof(real) * (size_t)(g->C * HW));
            for (long k = 0; k < K; k++) {
                const long c = k / (g->KH * g->KW), i = k / g->KW % g->KH, j = k % g->KW;
                FN(col2im_row)(dxb + c * HW, col + k * GP + e * P, i, j, g);
            }
        }
    }
    if (db)
        for (long f = 0; f < g->F; f++) db[f] = (real)(db[f] + acc[f]);
}

/* The common 2 x 2 window at stride 2: two input rows per output row, unrolled, vectorizable. */
static void FN(max_pool2x2_plane)(real *yn, int64_t *in, const real *xn, long W, long OH, long OW) {
    for (long oh = 0; oh < OH; oh++) {
        const real *r0 = xn + 2 * oh * W, *r1 = r0 + W;
        real *yr = yn + oh * OW;
        int64_t *ir = in + oh * OW;
        const int64_t base = 2 * oh * W;
        for (long ow = 0; ow < OW; ow++) {
            real m = r0[2 * ow];
            int64_t best = base + 2 * ow;
            const real b = r0[2 * ow + 1], c = r1[2 * ow], d = r1[2 * ow + 1];
            int t = DSK_POOL_TAKES(b, m);
            m = t ? b : m;
            best = t ? base + 2 * ow + 1 : best;
            t = DSK_POOL_TAKES(c, m);
            m = t ? c : m;
            best = t ? base + W + 2 * ow : best;
            t = DSK_POOL_TAKES(d, m);
            m = t ? d : m;
            best = t ? base + W + 2 * ow + 1 : best;
            yr[ow] = m;
            ir[ow] = best;
        }
    }
}

void FN(max_pool2d_forward)(real *y, int64_t *idx, const real *x, long N, long H, long W, long KH, long KW,
                            long sh, long sw, long OH, long OW) {
    DSK_PARALLEL_FOR(N * OH * OW * KH * KW)
    for (long n = 0; n < N; n++) {
        const real *xn = x + (size_t)n * H * W;
        real *yn = y + (size_t)n * OH * OW;
        int64_t *in = idx + (size_t)n * OH * OW;
        if (KH == 2 && KW == 2 && sh == 2 && sw == 2) {
            FN(max_pool2x2_plane)(yn, in, xn, W, OH, OW);
            continue;
        }
        for (long oh = 0; oh < OH; oh++)
            for (long ow = 0; ow < OW; ow++) {
                long best = oh * sh * W + ow * sw;
                real m = xn[best];
                for (long i = 0; i < KH; i++) {
                    const long r = (oh * sh + i) * W + ow * sw;
                    for (long j = 0; j < KW; j++) {
                        const real v = xn[r + j];
                        const int t = DSK_POOL_TAKES(v, m);
                        m = t ? v : m;
                        best = t ? r + j : best;
                    }
                }
                yn[oh * OW + ow] = m;
                in[oh * OW + ow] = best;
            }
    }
}

void FN(max_pool2d_backward)(real *dx, const real *dy, const int64_t *idx, long N, long HW, long P) {
    DSK_PARALLEL_FOR(N * (HW + P))
    for (long n = 0; n < N; n++) {
        real *dxn = dx + (size_t)n * HW;
        const real *dyn = dy + (size_t)n * P;
        const int64_t *in = idx + (size_t)n * P;
        memset(dxn, 0, sizeof(real) * (size_t)HW);
        for (long p = 0; p < P; p++) dxn[in[p]] += dyn[p];
    }
}
