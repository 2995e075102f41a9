/* Body of the convolution and pooling kernels, included twice by conv.c: once with real = float,
 * once with real = double (FN appends _f32 / _f64, GEMM is dsk_sgemm / dsk_dgemm, called inside
 * the pool's tasks, where they are single-threaded calls of the BLAS). Declarations and the meaning of every
 * argument are in conv.h; sums accumulate in double. */

/* d (n) = s (n) for the short rows of im2col (a few to a few tens of entries): a loop, as a call
 * of memcpy per row cost more than the copy (a tenth of a CNN step); DSK_KEEP_COPY_LOOPS on the
 * caller keeps GCC from turning it back into one. */
static inline void FN(copy_row)(real *restrict d, const real *restrict s, long n) {
    for (long t = 0; t < n; t++) d[t] = s[t];
}

/* Row k = (c, i, j) of the im2col matrix of one example: dst[p] for p = oh OW + ow gets
 * x[c, oh sh - pt + i, ow sw - pl + j], 0 where that is in the padding. xc: plane c (H, W).
 * At stride sw = 1 the valid part of an output row is one contiguous copy (the common case, and
 * most of the convolution's time when it was an element loop with the geometry re-read from g). */
DSK_KEEP_COPY_LOOPS static void FN(im2col_row)(real *dst, const real *xc, long i, long j, const DskConv2d *g) {
    long lo, hi;
    dsk_conv_valid_columns(g, j, &lo, &hi);
    /* the geometry in locals: read through g, it would be reloaded after every store (the build
     * has -fno-strict-aliasing) */
    const long off = j - g->pl, OW = g->OW, OH = g->OH, H = g->H, W = g->W, sh = g->sh, sw = g->sw, pt = g->pt;
    for (long oh = 0; oh < OH; oh++) {
        real *d = dst + oh * OW;
        const long ih = oh * sh - pt + i;
        if (ih < 0 || ih >= H || lo >= hi) {
            memset(d, 0, sizeof(real) * (size_t)OW);
            continue;
        }
        const real *row = xc + ih * W;
        for (long ow = 0; ow < lo; ow++) d[ow] = 0;
        if (sw == 1) FN(copy_row)(d + lo, row + lo + off, hi - lo);
        else
            for (long ow = lo; ow < hi; ow++) d[ow] = row[ow * sw + off];
        for (long ow = hi; ow < OW; ow++) d[ow] = 0;
    }
}

static inline void FN(add_row)(real *restrict r, const real *restrict q, long n) {
    for (long t = 0; t < n; t++) r[t] += q[t];
}

/* The transpose of im2col_row: dxc (H, W) += the row src (P) at the positions it was read from. */
static void FN(col2im_row)(real *dxc, const real *src, long i, long j, const DskConv2d *g) {
    long lo, hi;
    dsk_conv_valid_columns(g, j, &lo, &hi);
    const long off = j - g->pl, OW = g->OW, OH = g->OH, H = g->H, W = g->W, sh = g->sh, sw = g->sw, pt = g->pt;
    for (long oh = 0; oh < OH; oh++) {
        const long ih = oh * sh - pt + i;
        if (ih < 0 || ih >= H) continue;
        const real *q = src + oh * OW;
        real *row = dxc + ih * W;
        if (sw == 1) FN(add_row)(row + lo + off, q + lo, hi - lo); /* unit stride: a vectorizable row add */
        else
            for (long ow = lo; ow < hi; ow++) row[ow * sw + off] += q[ow];
    }
}

/* The im2col matrix col (K, G P) of the examples b0 .. b0 + G - 1: column g P + p is the patch of
 * output p of example b0 + g. */
static void FN(im2col_group)(real *col, const real *x, long b0, long G, const DskConv2d *g) {
    const long K = g->C * g->KH * g->KW, P = g->OH * g->OW, HW = g->H * g->W, GP = G * P;
    for (long e = 0; e < G; e++) {
        const real *xb = x + (size_t)(b0 + e) * g->C * HW;
        for (long k = 0; k < K; k++) {
            const long c = k / (g->KH * g->KW), i = k / g->KW % g->KH, j = k % g->KW;
            FN(im2col_row)(col + k * GP + e * P, xb + c * HW, i, j, g);
        }
    }
}

/* The input gradient of the group of G examples from b0: dcol (K, G P) = Wt^T (K, F) dyg (F, G P)
 * into col (the group's patches, no longer needed), then scattered (col2im) into dx (B, C, H, W),
 * whose rows of these examples it overwrites. */
static void FN(input_gradient_group)(real *dx, real *col, const real *Wt, const real *dyg, long b0, long G,
                                     const DskConv2d *g) {
    const long K = g->C * g->KH * g->KW, P = g->OH * g->OW, HW = g->H * g->W, GP = G * P;
    GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, (int)K, (int)GP, (int)g->F, 1, Wt, (int)K, dyg, (int)GP, 0, col,
         (int)GP);
    for (long e = 0; e < G; e++) {
        real *dxb = dx + (size_t)(b0 + e) * g->C * HW;
        memset(dxb, 0, sizeof(real) * (size_t)(g->C * HW));
        for (long k = 0; k < K; k++) {
            const long c = k / (g->KH * g->KW), i = k / g->KW % g->KH, j = k % g->KW;
            FN(col2im_row)(dxb + c * HW, col + k * GP + e * P, i, j, g);
        }
    }
}

typedef struct {
    real *y, *col, *dx, *dW_part;
    double *acc;
    const real *x, *Wt, *bias, *dy;
    const DskConv2d *g;
    long group, per_slot, slice;
    int relu;
} FN(Conv);

/* Forward of the group of examples starting at task * group: im2col, one GEMM, bias and ReLU. A
 * group of one example writes the product straight into its output (F, P); larger groups go
 * through the (F, G P) product block after the patches in the thread's workspace. */
static void FN(conv_forward_group)(void *arg, long task, int thread) {
    const FN(Conv) *a = arg;
    const DskConv2d *g = a->g;
    const long K = g->C * g->KH * g->KW, P = g->OH * g->OW, b0 = task * a->group;
    const long G = g->B - b0 < a->group ? g->B - b0 : a->group, GP = G * P;
    real *col = a->col + (size_t)thread * a->per_slot, *prod = col + (size_t)K * GP;
    real *y0 = a->y + (size_t)b0 * g->F * P;
    FN(im2col_group)(col, a->x, b0, G, g);
    /* (F, G P) = Wt (F, K) col (K, G P), single-threaded inside the task */
    GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)g->F, (int)GP, (int)K, 1, a->Wt, (int)K, col, (int)GP, 0,
         G == 1 ? y0 : prod, (int)GP);
    for (long e = 0; e < G; e++)
        for (long f = 0; f < g->F; f++) {
            real *yr = y0 + (e * g->F + f) * P;
            const real *pr = G == 1 ? yr : prod + f * GP + e * P, b = a->bias ? a->bias[f] : 0;
            if (a->relu)
                for (long p = 0; p < P; p++) {
                    const real v = pr[p] + b;
                    yr[p] = v > 0 ? v : 0;
                }
            else
                for (long p = 0; p < P; p++) yr[p] = pr[p] + b;
        }
}

void FN(conv2d_forward)(real *y, real *col, int slots, const real *x, const real *Wt, const real *bias, int relu,
                        const DskConv2d *g) {
    const long G = conv2d_group(g);
    FN(Conv) a = {y, col, NULL, NULL, NULL, x, Wt, bias, NULL, g, G, (long)conv2d_col_size(g), 0, relu};
    dsk_parallel_tasks_upto((g->B + G - 1) / G, FN(conv_forward_group), &a, slots);
}

/* Backward of the slice `task`: its groups in order, the weight and bias gradients summed into
 * the slice's own partials (dW_part, acc), the input gradient written per example. */
static void FN(conv_backward_slice)(void *arg, long task, int thread) {
    const FN(Conv) *a = arg;
    const DskConv2d *g = a->g;
    const long K = g->C * g->KH * g->KW, P = g->OH * g->OW, Fn = g->F;
    const long start = task * a->slice, end = start + a->slice < g->B ? start + a->slice : g->B;
    real *col = a->col + (size_t)thread * a->per_slot, *dWs = a->dW_part + (size_t)task * Fn * K;
    double *acc = a->acc + task * Fn;
    for (long f = 0; f < Fn; f++) acc[f] = 0;
    for (long b0 = start; b0 < end; b0 += a->group) {
        const long G = end - b0 < a->group ? end - b0 : a->group, GP = G * P;
        real *dy2 = col + (size_t)K * GP; /* dy of the group as (F, G P); a group of one is dy itself */
        const real *dyg = a->dy + (size_t)b0 * Fn * P;
        FN(im2col_group)(col, a->x, b0, G, g);
        if (G > 1) {
            for (long e = 0; e < G; e++)
                for (long f = 0; f < Fn; f++)
                    memcpy(dy2 + f * GP + e * P, dyg + (e * Fn + f) * P, sizeof(real) * (size_t)P);
            dyg = dy2;
        }
        /* dWs (F, K) (+)= dy2 (F, G P) col^T (G P, K), the slice's first group overwriting */
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)Fn, (int)K, (int)GP, 1, dyg, (int)GP, col, (int)GP,
             b0 == start ? 0 : 1, dWs, (int)K);
        for (long f = 0; f < Fn; f++) {
            double s = 0;
            for (long q = 0; q < GP; q++) s += dyg[f * GP + q];
            acc[f] += s;
        }
        if (a->dx) FN(input_gradient_group)(a->dx, col, a->Wt, dyg, b0, G, g);
    }
}

/* dW (F, K) += the slices' partials, db (F) += their sums (db may be NULL), added in slice order:
 * the same sums whatever the thread count. */
static void FN(add_partials)(real *dW, real *db, const real *dW_part, const double *acc, long slices, long F, long K) {
    const long FK = F * K;
    for (long s = 0; s < slices; s++) {
        const real *part = dW_part + (size_t)s * FK;
        for (long q = 0; q < FK; q++) dW[q] += part[q];
    }
    if (db)
        for (long f = 0; f < F; f++) {
            double total = 0;
            for (long s = 0; s < slices; s++) total += acc[s * F + f];
            db[f] = (real)(db[f] + total);
        }
}

void FN(conv2d_backward)(real *dx, real *dW, real *db, real *col, int slots, real *dW_part, double *acc,
                         const real *dy, const real *x, const real *Wt, const DskConv2d *g) {
    const long K = g->C * g->KH * g->KW, S = conv2d_slices(g), slice = (g->B + S - 1) / S;
    FN(Conv) a = {NULL, col, dx, dW_part, acc, x, Wt, NULL, dy, g, conv2d_group(g), (long)conv2d_col_size(g), slice, 0};
    const long tasks = (g->B + slice - 1) / slice;
    dsk_parallel_tasks_upto(tasks, FN(conv_backward_slice), &a, slots);
    FN(add_partials)(dW, db, dW_part, acc, tasks, g->F, K);
}

/* ---------------------------------------------------------------------------------------------
 * Conv2D -> ReLU -> MaxPool2D as one kernel: the convolution's output plane is pooled from the
 * group's product while it is in cache and is never written out; the pooling keeps, per output,
 * the position of its maximum in the window (a byte). The backward rebuilds the gradient at the
 * convolution's output, a group at a time, in the workspace. Same groups, same products and same
 * sums as conv2d_forward + relu + max_pool2d_forward and their backwards: the same bits.
 */

static void FN(relu_pool2x2_row)(real *restrict y, uint8_t *restrict code, const real *restrict r0,
                                 const real *restrict r1, real bias, long OW) {
    for (long ow = 0; ow < OW; ow++) {
        real a = r0[2 * ow] + bias, b = r0[2 * ow + 1] + bias, d = r1[2 * ow] + bias, e = r1[2 * ow + 1] + bias;
        a = a > 0 ? a : 0;
        b = b > 0 ? b : 0;
        d = d > 0 ? d : 0;
        e = e > 0 ? e : 0;
        const int k01 = b > a, k23 = e > d;
        const real m01 = b > a ? b : a, m23 = e > d ? e : d; /* selects on the compares: vectorizes */
        const int second = m23 > m01;
        y[ow] = m23 > m01 ? m23 : m01;
        code[ow] = (uint8_t)(k01 + second * (2 + k23 - k01));
    }
}

/* pooled (POH, POW) and code (POH, POW) of the plane relu(plane + bias) (H, W) = (OH, OW) of the
 * convolution. After the ReLU no value is NaN (max(NaN, 0) is 0, as relu_forward), so the first
 * maximum in row-major window order wins, as in max_pool2d_forward. */
static void FN(relu_pool_plane)(real *restrict pooled, uint8_t *restrict code, const real *restrict plane, real bias,
                                long W, const DskPool2d *p) {
    if (p->KH == 2 && p->KW == 2 && p->sh == 2 && p->sw == 2) {
        /* a tournament, (a, b) and (d, e) then the winners, with strict comparisons so that the
         * first of equal values wins as in scan order: branch-free, so that it vectorizes */
        for (long oh = 0; oh < p->OH; oh++)
            FN(relu_pool2x2_row)(pooled + oh * p->OW, code + oh * p->OW, plane + 2 * oh * W, plane + (2 * oh + 1) * W,
                                 bias, p->OW);
        return;
    }
    for (long oh = 0; oh < p->OH; oh++)
        for (long ow = 0; ow < p->OW; ow++) {
            real m = 0;
            uint8_t best = 0;
            for (long i = 0; i < p->KH; i++) {
                const real *r = plane + (oh * p->sh + i) * W + ow * p->sw;
                for (long j = 0; j < p->KW; j++) {
                    real v = r[j] + bias;
                    v = v > 0 ? v : 0;
                    if ((i == 0 && j == 0) || v > m) {
                        m = v;
                        best = (uint8_t)(i * p->KW + j);
                    }
                }
            }
            pooled[oh * p->OW + ow] = m;
            code[oh * p->OW + ow] = best;
        }
}

/* dplane (H, W) += dy at each output's maximum, for outputs whose pooled value is > 0 (where the
 * ReLU passed): the pooling and ReLU backwards. dplane must be zero before the first call. Returns
 * the sum of the passed dy (in double, in window order): the plane's share of the bias gradient. */
static double FN(unpool_plane)(real *restrict dplane, const real *restrict dy, const uint8_t *restrict code,
                               const real *restrict pooled, long W, const DskPool2d *p) {
    const long OH = p->OH, OW = p->OW, KW = p->KW, sh = p->sh, sw = p->sw;
    double sum = 0;
    for (long oh = 0; oh < OH; oh++)
        for (long ow = 0; ow < OW; ow++) {
            const long o = oh * OW + ow;
            if (!(pooled[o] > 0)) continue;
            const long i = code[o] / KW, j = code[o] % KW;
            dplane[(oh * sh + i) * W + ow * sw + j] += dy[o];
            sum += dy[o];
        }
    return sum;
}

typedef struct {
    real *pooled, *col, *dx, *dW_part;
    uint8_t *code;
    double *acc;
    const real *x, *Wt, *bias, *dpooled, *cpooled;
    const uint8_t *ccode;
    const DskConv2d *g;
    const DskPool2d *p;
    long group, per_slot, slice;
} FN(ConvPool);

static void FN(conv_pool_forward_group)(void *arg, long task, int thread) {
    const FN(ConvPool) *a = arg;
    const DskConv2d *g = a->g;
    const long K = g->C * g->KH * g->KW, P = g->OH * g->OW, PP = a->p->OH * a->p->OW, b0 = task * a->group;
    const long G = g->B - b0 < a->group ? g->B - b0 : a->group, GP = G * P;
    real *col = a->col + (size_t)thread * a->per_slot, *prod = col + (size_t)K * GP;
    FN(im2col_group)(col, a->x, b0, G, g);
    GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)g->F, (int)GP, (int)K, 1, a->Wt, (int)K, col, (int)GP, 0,
         prod, (int)GP);
    for (long e = 0; e < G; e++)
        for (long f = 0; f < g->F; f++) {
            const size_t out = ((size_t)(b0 + e) * g->F + f) * PP;
            FN(relu_pool_plane)(a->pooled + out, a->code + out, prod + f * GP + e * P, a->bias ? a->bias[f] : 0,
                                g->OW, a->p);
        }
}

void FN(conv2d_relu_pool_forward)(real *pooled, uint8_t *code, real *col, int slots, const real *x, const real *Wt,
                                  const real *bias, const DskConv2d *g, const DskPool2d *p) {
    const long G = conv2d_group(g);
    FN(ConvPool) a = {pooled, col, NULL, NULL, code, NULL, x, Wt, bias, NULL, NULL, NULL, g, p, G,
                      (long)conv2d_col_size(g), 0};
    dsk_parallel_tasks_upto((g->B + G - 1) / G, FN(conv_pool_forward_group), &a, slots);
}

static void FN(conv_pool_backward_slice)(void *arg, long task, int thread) {
    const FN(ConvPool) *a = arg;
    const DskConv2d *g = a->g;
    const long K = g->C * g->KH * g->KW, P = g->OH * g->OW, Fn = g->F;
    const long PP = a->p->OH * a->p->OW;
    const long start = task * a->slice, end = start + a->slice < g->B ? start + a->slice : g->B;
    real *col = a->col + (size_t)thread * a->per_slot, *dWs = a->dW_part + (size_t)task * Fn * K;
    double *acc = a->acc + task * Fn;
    for (long f = 0; f < Fn; f++) acc[f] = 0;
    for (long b0 = start; b0 < end; b0 += a->group) {
        const long G = end - b0 < a->group ? end - b0 : a->group, GP = G * P;
        real *dyc = col + (size_t)K * GP; /* the gradient at the convolution's output, (F, G P) */
        memset(dyc, 0, sizeof(real) * (size_t)(Fn * GP));
        for (long e = 0; e < G; e++)
            for (long f = 0; f < Fn; f++) {
                const size_t o = ((size_t)(b0 + e) * Fn + f) * PP;
                /* db: the nonzero entries of the plane's gradient are the passed dy, in window order */
                acc[f] += FN(unpool_plane)(dyc + f * GP + e * P, a->dpooled + o, a->ccode + o, a->cpooled + o, g->OW,
                                           a->p);
            }
        FN(im2col_group)(col, a->x, b0, G, g);
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)Fn, (int)K, (int)GP, 1, dyc, (int)GP, col, (int)GP,
             b0 == start ? 0 : 1, dWs, (int)K);
        if (a->dx) FN(input_gradient_group)(a->dx, col, a->Wt, dyc, b0, G, g);
    }
}

void FN(conv2d_relu_pool_backward)(real *dx, real *dW, real *db, real *col, int slots, real *dW_part, double *acc,
                                   const real *dpooled, const uint8_t *code, const real *pooled, const real *x,
                                   const real *Wt, const DskConv2d *g, const DskPool2d *p) {
    const long K = g->C * g->KH * g->KW, S = conv2d_slices(g), slice = (g->B + S - 1) / S;
    FN(ConvPool) a = {NULL, col, dx, dW_part, NULL, acc, x, Wt, NULL, dpooled, pooled, code, g, p, conv2d_group(g),
                      (long)conv2d_col_size(g), slice};
    const long tasks = (g->B + slice - 1) / slice;
    dsk_parallel_tasks_upto(tasks, FN(conv_pool_backward_slice), &a, slots);
    FN(add_partials)(dW, db, dW_part, acc, tasks, g->F, K);
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

typedef struct {
    real *y, *dx;
    int64_t *idx;
    const real *x, *dy, *mask;
    const int64_t *cidx;
    long H, W, KH, KW, sh, sw, OH, OW, HW, P;
} FN(Pool);

static void FN(max_pool_range)(void *arg, long lo, long hi) {
    const FN(Pool) *a = arg;
    const long H = a->H, W = a->W, KH = a->KH, KW = a->KW, sh = a->sh, sw = a->sw, OH = a->OH, OW = a->OW;
    for (long n = lo; n < hi; n++) {
        const real *xn = a->x + (size_t)n * H * W;
        real *yn = a->y + (size_t)n * OH * OW;
        int64_t *in = a->idx + (size_t)n * OH * OW;
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

void FN(max_pool2d_forward)(real *y, int64_t *idx, const real *x, long N, long H, long W, long KH, long KW,
                            long sh, long sw, long OH, long OW) {
    FN(Pool) a = {y, NULL, idx, x, NULL, NULL, NULL, H, W, KH, KW, sh, sw, OH, OW, H * W, OH * OW};
    dsk_parallel_for(N, dsk_grain(OH * OW * KH * KW * 2), FN(max_pool_range), &a);
}

static void FN(max_pool_backward_range)(void *arg, long lo, long hi) {
    const FN(Pool) *a = arg;
    const long HW = a->HW, P = a->P;
    for (long n = lo; n < hi; n++) {
        real *dxn = a->dx + (size_t)n * HW;
        const real *dyn = a->dy + (size_t)n * P, *mn = a->mask ? a->mask + (size_t)n * P : NULL;
        const int64_t *in = a->cidx + (size_t)n * P;
        memset(dxn, 0, sizeof(real) * (size_t)HW);
        if (mn)
            for (long p = 0; p < P; p++) dxn[in[p]] += mn[p] > 0 ? dyn[p] : 0;
        else
            for (long p = 0; p < P; p++) dxn[in[p]] += dyn[p];
    }
}

void FN(max_pool2d_backward)(real *dx, const real *dy, const int64_t *idx, const real *relu_y, long N, long HW,
                             long P) {
    FN(Pool) a = {NULL, dx, NULL, NULL, dy, relu_y, idx, 0, 0, 0, 0, 0, 0, 0, 0, HW, P};
    dsk_parallel_for(N, dsk_grain(HW + P), FN(max_pool_backward_range), &a);
}
