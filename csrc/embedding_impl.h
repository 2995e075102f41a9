/* Body of the embedding gather and its sparse backward, included four times by embedding.c: with
 * real = float / double and IDX = int32_t / int64_t (FN appends _f32_i32, ..., _f64_i64).
 * Declarations and the meaning of every argument are in embedding.h. */

typedef struct {
    real *out, *grad;
    int64_t *rows;
    const real *table, *dout;
    const IDX *ids;
    const int64_t *perm, *starts;
    long ld, F, d;
} FN(Embedding);

static void FN(embedding_forward_range)(void *arg, long lo, long hi) {
    const FN(Embedding) *a = arg;
    const long F = a->F, d = a->d;
    const size_t row_bytes = sizeof(real) * (size_t)d;
    for (long b = lo; b < hi; b++) {
        real *ob = a->out + b * a->ld;
        const IDX *ib = a->ids + b * F;
        for (long f = 0; f < F; f++) memcpy(ob + f * d, a->table + (long)ib[f] * d, row_bytes);
    }
}

void FN(embedding_forward)(real *out, long ld, const real *table, const IDX *ids, long B, long F,
                           long d) {
    FN(Embedding) a = {out, NULL, NULL, table, NULL, ids, NULL, NULL, ld, F, d};
    dsk_parallel_for(B, dsk_grain(F * d), FN(embedding_forward_range), &a);
}

/* One run of equal ids per item: runs are disjoint, so threads never share an output row, and each
 * run is summed in ascending position order whatever the thread count. A block of at most COLS
 * columns at a time is summed into a double accumulator on the stack. */
static void FN(embedding_backward_range)(void *arg, long lo, long hi) {
    enum { COLS = 256 };
    const FN(Embedding) *a = arg;
    int64_t *rows = a->rows;
    real *grad = a->grad;
    const real *dout = a->dout;
    const IDX *ids = a->ids;
    const int64_t *perm = a->perm, *starts = a->starts;
    const long ld = a->ld, F = a->F, d = a->d;
    for (long u = lo; u < hi; u++) {
        const long s0 = (long)starts[u], s1 = (long)starts[u + 1];
        rows[u] = (int64_t)ids[perm[s0]];
        for (long j0 = 0; j0 < d; j0 += COLS) {
            double acc[COLS];
            const long ncols = d - j0 < COLS ? d - j0 : COLS;
            for (long j = 0; j < ncols; j++) acc[j] = 0;
            for (long i = s0; i < s1; i++) {
                const long p = (long)perm[i];
                const real *src = dout + (p / F) * ld + (p % F) * d + j0;
                for (long j = 0; j < ncols; j++) acc[j] += src[j];
            }
            real *dst = grad + u * d + j0;
            for (long j = 0; j < ncols; j++) dst[j] = (real)acc[j];
        }
    }
}

void FN(embedding_backward)(int64_t *rows, real *grad, const real *dout, long ld, const IDX *ids,
                            const int64_t *perm, const int64_t *starts, long U, long F, long d) {
    FN(Embedding) a = {NULL, grad, rows, NULL, dout, ids, perm, starts, ld, F, d};
    /* about (positions + runs) d operations in all */
    dsk_parallel_for(U, dsk_grain((starts[U] / (U > 0 ? U : 1) + 1) * d), FN(embedding_backward_range), &a);
}
