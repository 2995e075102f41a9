/* Matrix products on the pool (gemm.h): each product is cut into tiles of rows or of columns of C,
 * every tile one single-threaded call of the vendored OpenBLAS, run as tasks of one job.
 *
 * The cut never splits the inner dimension K, so every entry of C is the dot product it would be
 * in one call, summed in the same order by the same kernel (the BLAS may still pick another
 * kernel for a smaller block: tests compare results across thread counts to rounding). A tile
 * re-packs the operand it shares with the other tiles (op(B) when rows are cut, op(A) when columns
 * are), so the larger of M and N is cut, which copies less. Tile count:
 *   - for the threads: one per DSK_GEMM_TILE_WORK multiply-adds (~20 us of one core), at most
 *     DSK_TASKS_PER_THREAD per thread (enough for a descheduled thread not to hold the others);
 *   - for the cache, when the product has an epilogue (`after`): tiles of at most
 *     DSK_GEMM_TILE_ELEMS entries of C, so that the epilogue reads the tile from cache, not memory;
 * the larger of the two, with tiles starting at multiples of 16 (the BLAS's register block). */
#include "gemm.h"
#include "dsk.h"

#ifndef DSK_GEMM_TILE_WORK
#if DSK_PARALLEL_MIN_WORK == 0 /* the sanitizer build: every product of two or more tiles threaded */
#define DSK_GEMM_TILE_WORK 1L
#else
#define DSK_GEMM_TILE_WORK (1L << 20)
#endif
#endif
#ifndef DSK_GEMM_TILE_ELEMS
#define DSK_GEMM_TILE_ELEMS (64L * 1024L)
#endif
#define DSK_GEMM_ALIGN 16

/* The BLAS runs inside tasks and must not start threads of its own: another library (threadpoolctl,
 * say) may have raised its thread count since dsk_set_num_threads lowered it. A read of an int. */
static void dsk_blas_single_threaded(void) {
    if (scipy_openblas_get_num_threads() != 1) scipy_openblas_set_num_threads(1);
}

/* Tile length along the cut dimension of a product (M, N, K); *split_rows says which is cut. */
static long tile_step(long M, long N, long K, int epilogue, int *split_rows) {
    *split_rows = M >= N;
    const long dim = *split_rows ? M : N, most = (dim + DSK_GEMM_ALIGN - 1) / DSK_GEMM_ALIGN;
    long tiles = 1;
    if (dsk_can_parallelize()) {
        const double per_work = (double)M * N * K / DSK_GEMM_TILE_WORK;
        tiles = per_work < (double)dsk_chunks(dim, DSK_GEMM_ALIGN) ? (long)per_work : dsk_chunks(dim, DSK_GEMM_ALIGN);
    }
    if (epilogue) {
        const long for_cache = (M * N + DSK_GEMM_TILE_ELEMS - 1) / DSK_GEMM_TILE_ELEMS;
        if (for_cache > tiles) tiles = for_cache;
    }
    if (tiles > most) tiles = most;
    if (tiles < 1) tiles = 1;
    const long step = (dim + tiles - 1) / tiles;
    return (step + DSK_GEMM_ALIGN - 1) / DSK_GEMM_ALIGN * DSK_GEMM_ALIGN;
}

#define DSK_DEFINE_GEMM(real, sfx, SFX, blas)                                                      \
    typedef struct {                                                                               \
        const DskGemm##SFX *products;                                                              \
        int count;                                                                                 \
        long first[DSK_GEMM_MAX_PRODUCTS + 1]; /* task index of each product's first tile */       \
        long step[DSK_GEMM_MAX_PRODUCTS];                                                          \
        int split_rows[DSK_GEMM_MAX_PRODUCTS];                                                     \
    } GemmJob##SFX;                                                                                \
                                                                                                   \
    static void gemm_tile_##sfx(const DskGemm##SFX *g, long lo, long hi, int split_rows) {         \
        if (split_rows) { /* rows lo..hi of C and of op(A) */                                      \
            const real *A = g->ta == CblasNoTrans ? g->A + lo * g->lda : g->A + lo;                \
            blas(CblasRowMajor, g->ta, g->tb, (int)(hi - lo), g->N, g->K, g->alpha, A, g->lda,      \
                 g->B, g->ldb, g->beta, g->C + lo * g->ldc, g->ldc);                               \
            if (g->after) g->after(g->after_ctx, lo, hi, 0, g->N);                                 \
        } else { /* columns lo..hi of C and of op(B) */                                            \
            const real *B = g->tb == CblasNoTrans ? g->B + lo : g->B + lo * g->ldb;                \
            blas(CblasRowMajor, g->ta, g->tb, g->M, (int)(hi - lo), g->K, g->alpha, g->A, g->lda,   \
                 B, g->ldb, g->beta, g->C + lo, g->ldc);                                           \
            if (g->after) g->after(g->after_ctx, 0, g->M, lo, hi);                                 \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    static void gemm_task_##sfx(void *arg, long task, int thread) {                                \
        const GemmJob##SFX *job = arg;                                                             \
        int p = 0;                                                                                 \
        while (task >= job->first[p + 1]) p++;                                                     \
        const DskGemm##SFX *g = job->products + p;                                                 \
        const long dim = job->split_rows[p] ? g->M : g->N, lo = (task - job->first[p]) * job->step[p]; \
        (void)thread;                                                                              \
        gemm_tile_##sfx(g, lo, lo + job->step[p] < dim ? lo + job->step[p] : dim, job->split_rows[p]); \
    }                                                                                              \
                                                                                                   \
    void dsk_##sfx##gemm_run(int count, const DskGemm##SFX *products) {                            \
        GemmJob##SFX job;                                                                          \
        dsk_blas_single_threaded();                                                                \
        job.products = products;                                                                   \
        job.count = count;                                                                         \
        job.first[0] = 0;                                                                          \
        double work = 0;                                                                           \
        for (int p = 0; p < count; p++) {                                                          \
            const DskGemm##SFX *g = products + p;                                                  \
            work += (double)g->M * g->N * g->K;                                                    \
            job.step[p] = tile_step(g->M, g->N, g->K, g->after != NULL, &job.split_rows[p]);       \
            const long dim = job.split_rows[p] ? g->M : g->N;                                      \
            job.first[p + 1] = job.first[p] + (dim > 0 && g->M > 0 && g->N > 0 ? (dim + job.step[p] - 1) / job.step[p] : 0); \
        }                                                                                          \
        if (work >= 2.0 * DSK_GEMM_TILE_WORK) dsk_parallel_tasks(job.first[count], gemm_task_##sfx, &job); \
        else /* tiles for the cache only: not worth a thread */                                    \
            for (long t = 0; t < job.first[count]; t++) gemm_task_##sfx(&job, t, 0);               \
    }                                                                                              \
                                                                                                   \
    void dsk_##sfx##gemm(enum CBLAS_ORDER order, enum CBLAS_TRANSPOSE ta, enum CBLAS_TRANSPOSE tb,  \
                         int M, int N, int K, real alpha, const real *A, int lda, const real *B,    \
                         int ldb, real beta, real *C, int ldc) {                                    \
        if (order != CblasRowMajor || !dsk_can_parallelize()) {                                    \
            dsk_blas_single_threaded();                                                            \
            blas(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);                     \
            return;                                                                                \
        }                                                                                          \
        const DskGemm##SFX g = {ta, tb, M, N, K, lda, ldb, ldc, alpha, beta, A, B, C, NULL, NULL}; \
        dsk_##sfx##gemm_run(1, &g);                                                                \
    }

DSK_DEFINE_GEMM(float, s, S, scipy_cblas_sgemm)
DSK_DEFINE_GEMM(double, d, D, scipy_cblas_dgemm)
