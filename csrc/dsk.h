/* Shared definitions of the dselectk C kernels. No Python here: kernels are plain C99, never
 * allocate, never exit, and take caller-owned, C-contiguous buffers with explicit sizes. */
#ifndef DSK_H
#define DSK_H

#include <stddef.h>

#ifndef DSK_HAVE_OPENMP
#define DSK_HAVE_OPENMP 0
#endif

/* Largest supported m = ceil(log2 n): the backward keeps O(m) prefix products on the stack. */
#define DSK_MAX_BITS 30
/* Up to this m the selector backward runs through the doubling tree with O(2^m) stack buffers. */
#define DSK_TREE_MAX_BITS 10

/* Thread count used by every OpenMP loop (and by the vendored BLAS): see threads.c. */
int dsk_get_num_threads(void);
void dsk_set_num_threads(int n);
int dsk_blas_get_num_threads(void);

/* Loops with at most this much work run in the calling thread. The sanitizer build (setup.py,
 * DSELECTK_SANITIZE) sets 0, so that the tests' small inputs run the threaded loops too. */
#ifndef DSK_PARALLEL_MIN_WORK
#define DSK_PARALLEL_MIN_WORK 32768
#endif

#define DSK_PRAGMA(x) _Pragma(#x)
#if DSK_HAVE_OPENMP
/* Parallel loop over independent rows, only when there is enough work to pay for the threads.
 * The thread count is passed explicitly (num_threads) rather than through omp_set_num_threads,
 * whose setting would only apply to the thread that called it. */
#define DSK_PARALLEL_FOR(work) \
    DSK_PRAGMA(omp parallel for schedule(static) num_threads(dsk_get_num_threads()) if((work) > DSK_PARALLEL_MIN_WORK))
#else
#define DSK_PARALLEL_FOR(work)
#endif

#endif /* DSK_H */
