/* Body of the layer and loss kernels, included twice by nn.c: once with real = float, once with
 * real = double (FN appends _f32 / _f64; GEMM_T and GEMM_RUN are the pool's products of gemm.h,
 * DskGemmS / dsk_sgemm_run or DskGemmD / dsk_dgemm_run). Declarations and the meaning of every
 * argument are in nn.h. Loops run on the pool (dsk.h); sums accumulate in double. */

/* The epilogue of dense_forward on the tile y[r0:r1, c0:c1]: + b, ReLU, dropout. */
typedef struct {
    real *y;
    const real *b;
    long o;
    int relu;
    const DskDropout *drop;
    uint64_t key;
} FN(DenseAct);

/* Row helpers with restrict parameters, so that the loops vectorize (struct fields read inside a
 * loop would be reloaded after every store: the build uses -fno-strict-aliasing). */
static inline void FN(add_bias_relu_row)(real *restrict y, const real *restrict b, long n, int relu) {
    if (b && relu)
        for (long c = 0; c < n; c++) {
            const real v = y[c] + b[c];
            y[c] = v > 0 ? v : 0;
        }
    else if (b)
        for (long c = 0; c < n; c++) y[c] += b[c];
    else if (relu)
        for (long c = 0; c < n; c++) y[c] = y[c] > 0 ? y[c] : 0;
}

static inline void FN(dropout_row)(real *restrict y, long n, uint64_t key, uint64_t first, double rate, double scale) {
    for (long c = 0; c < n; c++)
        y[c] = dsk_dropout_u(key, first + (uint64_t)c) >= rate ? (real)((double)y[c] * scale) : 0;
}

static void FN(dense_act)(void *arg, long r0, long r1, long c0, long c1) {
    const FN(DenseAct) *a = arg;
    const double rate = a->drop ? a->drop->rate : 0, scale = 1 / (1 - rate);
    const real *b = a->b ? a->b + c0 : NULL;
    for (long r = r0; r < r1; r++) {
        real *yr = a->y + r * a->o + c0;
        FN(add_bias_relu_row)(yr, b, c1 - c0, a->relu);
        if (rate > 0) {
            const uint64_t row = a->drop->rows ? (uint64_t)a->drop->rows[r] : (uint64_t)r; /* its place in the batch */
            FN(dropout_row)(yr, c1 - c0, a->key, row * (uint64_t)a->o + (uint64_t)c0, rate, scale);
        }
    }
}

void FN(dense_forward)(real *y, const real *x, const real *W, const real *b, int B, int p, int o, int relu,
                       const DskDropout *drop) {
    if (B <= 0 || o <= 0) return;
    const int act = b || relu || (drop && drop->rate > 0);
    FN(DenseAct) a = {y, b, o, relu, drop, drop ? dsk_dropout_key(drop->seed, drop->step) : 0};
    /* p == 0: the BLAS's beta = 0 zero-fills y, then the epilogue adds b */
    const GEMM_T g = {CblasNoTrans, CblasNoTrans, B, o, p, p > 0 ? p : 1, o, o, 1, 0, x, W, y,
                      act ? FN(dense_act) : NULL, &a};
    GEMM_RUN(1, &g);
}

/* db (o) += the column sums of dy (B, o), a block of columns per task, summed in double. */
typedef struct {
    real *db;
    const real *dy;
    long B, o;
} FN(ColumnSums);

static inline void FN(add_row_double)(double *restrict acc, const real *restrict x, long n) {
    for (long j = 0; j < n; j++) acc[j] += x[j];
}

static void FN(column_sums)(void *arg, long j0, long j1) {
    enum { COLS = 256 };
    const FN(ColumnSums) *a = arg;
    const long B = a->B, o = a->o;
    for (long jb = j0; jb < j1; jb += COLS) {
        double acc[COLS];
        const long ncols = j1 - jb < COLS ? j1 - jb : COLS;
        for (long j = 0; j < ncols; j++) acc[j] = 0;
        for (long i = 0; i < B; i++) FN(add_row_double)(acc, a->dy + i * o + jb, ncols);
        for (long j = 0; j < ncols; j++) a->db[jb + j] = (real)(a->db[jb + j] + acc[j]);
    }
}

/* The epilogue of dense_backward's dx on the tile dx[r0:r1, c0:c1]: the ReLU (and dropout)
 * backward of the layer before, read from its output x. */
typedef struct {
    real *dx;
    const real *x;
    long p;
    double scale;
} FN(InputMask);

/* d = x > 0 ? d (times scale, in double) : 0 over n entries. d is read unconditionally so that the
 * select compiles branch-free: a load inside the condition may not be hoisted, and ReLU's random
 * sign pattern mispredicts every other branch (8 ns per entry measured, against 1 ns). */
static inline void FN(mask_row)(real *restrict d, const real *restrict x, long n, double scale) {
    if (scale == 1)
        for (long c = 0; c < n; c++) {
            const real g = d[c];
            d[c] = x[c] > 0 ? g : 0;
        }
    else
        for (long c = 0; c < n; c++) {
            const real g = (real)((double)d[c] * scale);
            d[c] = x[c] > 0 ? g : 0;
        }
}

static void FN(input_mask)(void *arg, long r0, long r1, long c0, long c1) {
    const FN(InputMask) *a = arg;
    for (long r = r0; r < r1; r++) FN(mask_row)(a->dx + r * a->p + c0, a->x + r * a->p + c0, c1 - c0, a->scale);
}

void FN(dense_backward)(real *dx, real *dW, real *db, const real *dy, const real *x, const real *W, int B, int p,
                        int o, double input_scale) {
    FN(InputMask) mask = {dx, x, p, input_scale};
    /* dW (p, o) += x^T (p, B) dy (B, o): beta = 1 accumulates into the caller's gradient; and
     * dx (B, p) = dy (B, o) W^T (o, p), with the mask in its epilogue: one job for both */
    GEMM_T g[2] = {{CblasTrans, CblasNoTrans, p, o, B, p > 0 ? p : 1, o, o, 1, 1, x, dy, dW, NULL, NULL},
                   {CblasNoTrans, CblasTrans, B, p, o, o > 0 ? o : 1, o > 0 ? o : 1, p, 1, 0, dy, W, dx,
                    input_scale > 0 ? FN(input_mask) : NULL, &mask}};
    if (B > 0 && p > 0 && o > 0) GEMM_RUN(dx ? 2 : 1, g);
    else if (dx && B > 0 && p > 0) memset(dx, 0, sizeof(real) * (size_t)B * (size_t)p);
    if (db && B > 0) {
        FN(ColumnSums) cs = {db, dy, B, o};
        dsk_parallel_for(o, (32768 + B - 1) / B, FN(column_sums), &cs);
    }
}

typedef struct {
    real *y;
    const real *x, *dy;
    double rate, scale;
    uint64_t key;
    const int64_t *rows; /* dropout: the rows' places in the whole batch, or NULL */
    long R;              /* dropout with rows: entries per row */
} FN(Elementwise);

static inline void FN(relu_row)(real *restrict y, const real *restrict x, long n) {
    for (long i = 0; i < n; i++) y[i] = x[i] > 0 ? x[i] : 0;
}

static void FN(relu_range)(void *arg, long lo, long hi) {
    const FN(Elementwise) *a = arg;
    if (a->y == a->x) FN(add_bias_relu_row)(a->y + lo, NULL, hi - lo, 1); /* in place */
    else FN(relu_row)(a->y + lo, a->x + lo, hi - lo);
}

void FN(relu_forward)(real *y, const real *x, long N) {
    FN(Elementwise) a = {y, x, NULL, 0, 0, 0, NULL, 0};
    dsk_parallel_for(N, DSK_ELEMENTWISE_GRAIN, FN(relu_range), &a);
}

static inline void FN(relu_backward_row)(real *restrict dx, const real *restrict dy, const real *restrict y, long n) {
    for (long i = 0; i < n; i++) {
        const real g = dy[i]; /* read unconditionally: branch-free (see mask_row) */
        dx[i] = y[i] > 0 ? g : 0;
    }
}

static void FN(relu_backward_range)(void *arg, long lo, long hi) {
    const FN(Elementwise) *a = arg;
    FN(relu_backward_row)(a->y + lo, a->dy + lo, a->x + lo, hi - lo);
}

void FN(relu_backward)(real *dx, const real *dy, const real *y, long N) {
    FN(Elementwise) a = {dx, y, dy, 0, 0, 0, NULL, 0};
    dsk_parallel_for(N, DSK_ELEMENTWISE_GRAIN, FN(relu_backward_range), &a);
}

/* y (n) = dropout of x (n), the entries hashing first, first + 1, ... */
static inline void FN(dropout_row_of)(real *restrict y, const real *restrict x, long n, uint64_t key, uint64_t first,
                                      double rate, double scale) {
    for (long i = 0; i < n; i++)
        y[i] = dsk_dropout_u(key, first + (uint64_t)i) >= rate ? (real)((double)x[i] * scale) : 0;
}

static void FN(dropout_range)(void *arg, long lo, long hi) {
    const FN(Elementwise) *a = arg;
    FN(dropout_row_of)(a->y + lo, a->x + lo, hi - lo, a->key, (uint64_t)lo, a->rate, a->scale);
}

/* rows lo..hi of R entries; row b hashes rows[b] R + j (nn.h) */
static void FN(dropout_rows_range)(void *arg, long lo, long hi) {
    const FN(Elementwise) *a = arg;
    const long R = a->R;
    for (long b = lo; b < hi; b++)
        FN(dropout_row_of)(a->y + b * R, a->x + b * R, R, a->key, (uint64_t)a->rows[b] * (uint64_t)R, a->rate, a->scale);
}

void FN(dropout_forward)(real *y, const real *x, long N, const int64_t *rows, long R, double rate, uint64_t seed,
                         uint64_t step) {
    if (rate <= 0) {
        if (y != x) memcpy(y, x, sizeof(real) * (size_t)N);
        return;
    }
    FN(Elementwise) a = {y, x, NULL, rate, 1 / (1 - rate), dsk_dropout_key(seed, step), rows, R};
    if (!rows) dsk_parallel_for(N, DSK_ELEMENTWISE_GRAIN / 4, FN(dropout_range), &a);
    else dsk_parallel_for(N / R, dsk_grain(16 * R), FN(dropout_rows_range), &a);
}

/* Losses: the batch is cut into DSK_LOSS_CHUNKS fixed chunks whose partial sums are added in
 * order, so the loss is the same bit for bit whatever the thread count. A chunk is a task. */
static inline double FN(weight)(const real *w, long b) { return w ? (double)w[b] : 1.0; }

typedef struct {
    real *grad;
    const real *pred, *target, *w;
    const int64_t *labels;
    long B, d, chunk;
    double invB;
    double partial[DSK_LOSS_CHUNKS];
} FN(Loss);

/* Runs the chunk function over the DSK_LOSS_CHUNKS chunks (as tasks when work, about the
 * operations of the whole loss, is worth threads) and returns the weighted batch mean. */
static double FN(run_loss)(FN(Loss) *job, dsk_task_fn chunk_fn, long work) {
    job->chunk = (job->B + DSK_LOSS_CHUNKS - 1) / DSK_LOSS_CHUNKS;
    job->invB = 1.0 / (double)job->B;
    if (work > DSK_PARALLEL_MIN_WORK) dsk_parallel_tasks(DSK_LOSS_CHUNKS, chunk_fn, job);
    else
        for (long c = 0; c < DSK_LOSS_CHUNKS; c++) chunk_fn(job, c, 0);
    double total = 0;
    for (long c = 0; c < DSK_LOSS_CHUNKS; c++) total += job->partial[c];
    return total * job->invB;
}

static void FN(bce_chunk)(void *arg, long c, int thread) {
    FN(Loss) *j = arg;
    real *restrict dz = j->grad;
    const real *restrict z = j->pred, *restrict t = j->target, *restrict w = j->w;
    const double invB = j->invB;
    double acc = 0;
    const long end = (c + 1) * j->chunk < j->B ? (c + 1) * j->chunk : j->B;
    (void)thread;
    for (long b = c * j->chunk; b < end; b++) {
        const double zb = z[b], tb = t[b], wb = FN(weight)(w, b);
        const double e = exp(-fabs(zb)); /* in (0, 1]: never overflows */
        const double sig = zb >= 0 ? 1 / (1 + e) : e / (1 + e);
        acc += wb * ((zb > 0 ? zb : 0) - zb * tb + log1p(e));
        dz[b] = (real)(wb * (sig - tb) * invB);
    }
    j->partial[c] = acc;
}

double FN(bce_with_logits)(real *dz, const real *z, const real *t, const real *w, long B) {
    FN(Loss) job = {dz, z, t, w, NULL, B, 1, 0, 0, {0}};
    return FN(run_loss)(&job, FN(bce_chunk), B * 16);
}

static void FN(mse_chunk)(void *arg, long c, int thread) {
    FN(Loss) *j = arg;
    real *restrict dpred = j->grad;
    const real *restrict pred = j->pred, *restrict target = j->target, *restrict w = j->w;
    double acc = 0;
    const long end = (c + 1) * j->chunk < j->B ? (c + 1) * j->chunk : j->B, d = j->d;
    (void)thread;
    for (long b = c * j->chunk; b < end; b++) {
        const double wb = FN(weight)(w, b), g = 2 * wb * j->invB;
        double sq = 0;
        for (long k = 0; k < d; k++) {
            const double r = (double)pred[b * d + k] - (double)target[b * d + k];
            sq += r * r;
            dpred[b * d + k] = (real)(g * r);
        }
        acc += wb * sq;
    }
    j->partial[c] = acc;
}

double FN(mse)(real *dpred, const real *pred, const real *target, const real *w, long B, long d) {
    FN(Loss) job = {dpred, pred, target, w, NULL, B, d, 0, 0, {0}};
    return FN(run_loss)(&job, FN(mse_chunk), B * d * 4);
}

static void FN(softmax_ce_chunk)(void *arg, long c, int thread) {
    FN(Loss) *j = arg;
    double acc = 0;
    const long end = (c + 1) * j->chunk < j->B ? (c + 1) * j->chunk : j->B, C = j->d;
    const real *w = j->w;
    (void)thread;
    for (long b = c * j->chunk; b < end; b++) {
        const real *restrict zb = j->pred + b * C;
        real *restrict db = j->grad + b * C;
        const long label = (long)j->labels[b];
        double zmax = zb[0];
        for (long k = 1; k < C; k++) zmax = zb[k] > zmax ? zb[k] : zmax;
        double sum = 0;
        for (long k = 0; k < C; k++) sum += exp((double)zb[k] - zmax);
        const double lse = zmax + log(sum), wb = FN(weight)(w, b), g = wb * j->invB;
        for (long k = 0; k < C; k++) {
            const double pk = exp((double)zb[k] - lse);
            db[k] = (real)(g * (k == label ? pk - 1 : pk));
        }
        acc += wb * (lse - (double)zb[label]);
    }
    j->partial[c] = acc;
}

double FN(softmax_cross_entropy)(real *dlogits, const real *logits, const int64_t *labels, const real *w, long B,
                                 long C) {
    FN(Loss) job = {dlogits, logits, NULL, w, labels, B, C, 0, 0, {0}};
    return FN(run_loss)(&job, FN(softmax_ce_chunk), B * C * 8);
}
