/* Body of the embedding gather and its sparse backward, included four times by embedding.c: with
 * real = float / double and IDX = int32_t / int64_t (FN appends _f32_i32, ..., _f64_i64).
 * Declarations and the meaning of every argument are in embedding.h. */

void FN(embedding_forward)(real *out, long ld, const real *table, const IDX *ids, long B, long F,
                           long d) {
    const size_t row_bytes = sizeof(real) * (size_t)d;
    DSK_PARALLEL_FOR(B * F * d)
    for (long b = 0; b < B; b++) {
        real *ob = out + b * ld;
        const IDX *ib = ids + b * F;
        for (long f = 0; f < F; f++) memcpy(ob + f * d, table + (long)ib[f] * d, row_bytes);
    }
}

void FN(embedding_backward)(int64_t *rows, real *grad, const real *dout, long ld, const IDX *ids,
                            const int64_t *perm, const int64_t *starts, long U, long F, long d) {
    /* one run of equal ids per iteration: runs are disjoint, so threads never share an output
     * row, and each run is summed in ascending position order whatever the thread count. A block
     * of at most COLS columns at a time is summed into a double accumulator on the stack. */
    enum { COLS = 256 };
    DSK_PARALLEL_FOR((starts[U] + U) * d)
    for (long u = 0; u < U; u++) {
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
