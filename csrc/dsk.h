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

/* The thread count of the pool (threads.c): the caller plus dsk_get_num_threads() - 1 workers.
 * The vendored BLAS itself stays at one thread (dsk_set_num_threads keeps it there): products are
 * split into tasks by dsk_sgemm / dsk_dgemm (gemm.h). */
int dsk_get_num_threads(void);
void dsk_set_num_threads(int n);
int dsk_blas_get_num_threads(void);
int dsk_pool_workers(void); /* worker threads started so far */

/* The pool (threads.c says how it works).
 *
 * dsk_parallel_tasks runs fn(ctx, task, thread) once for every task in [0, ntasks), on the
 * calling thread and the pool's workers, and returns when all have run. Tasks are claimed one at
 * a time in increasing order, so they should be of similar cost and many enough to balance (a
 * few per thread); `thread` in [0, dsk_get_num_threads()) identifies the thread running the task
 * (0: the caller), for per-thread scratch space. Tasks must not depend on each other's order.
 * Inside a task, and when another application thread is using the pool, the call runs all tasks
 * serially in the calling thread (thread 0).
 *
 * dsk_parallel_for runs fn(ctx, lo, hi) over consecutive chunks [lo, hi) covering [0, n), of at
 * least `grain` items each (fewer only for the last), at most DSK_TASKS_PER_THREAD chunks per
 * thread: all of [0, n) in one call when n < 2 grain. Choose grain so that a chunk is worth a few
 * microseconds (the cost of a task is ~0.1 us; of waking a sleeping worker ~10 us, which the
 * caller never waits for). */
typedef void (*dsk_task_fn)(void *ctx, long task, int thread);
typedef void (*dsk_range_fn)(void *ctx, long lo, long hi);
void dsk_parallel_tasks(long ntasks, dsk_task_fn fn, void *ctx);
/* The same on at most max_threads threads (thread ids < max_threads): for callers that size
 * per-thread scratch space from dsk_get_num_threads() before the call, which another thread
 * could change meanwhile. */
void dsk_parallel_tasks_upto(long ntasks, dsk_task_fn fn, void *ctx, int max_threads);
void dsk_parallel_for(long n, long grain, dsk_range_fn fn, void *ctx);
#define DSK_TASKS_PER_THREAD 4
/* Loops run in chunks of at least this much work (about their element operations, ~20-40 us), so
 * serially below twice that: a shorter chunk does not pay for waking a thread, and on a loaded
 * machine a chunk that a descheduled thread claimed costs the caller a wait. The sanitizer build
 * (setup.py, DSELECTK_SANITIZE) sets 0: then every loop of two or more items, and every product
 * of two or more tiles, runs on several threads, so that the tests' small inputs exercise them. */
#ifndef DSK_PARALLEL_MIN_WORK
#define DSK_PARALLEL_MIN_WORK (1L << 17)
#endif
/* The grain of dsk_parallel_for for items of about `work` operations each. */
static inline long dsk_grain(long work) {
    return work >= DSK_PARALLEL_MIN_WORK ? 1 : DSK_PARALLEL_MIN_WORK / (work > 0 ? work : 1);
}
/* The number of chunks dsk_parallel_for would cut [0, n) into (1 when it would run serially). */
long dsk_chunks(long n, long grain);
/* 1 when a dsk_parallel_* call from here would use more than one thread: several threads set and
 * not inside a task. */
int dsk_can_parallelize(void);

/* For a function whose short copy loops must stay loops: GCC would turn them into memcpy calls,
 * whose call overhead exceeds the copy of a few tens of entries (im2col). */
#if defined(__GNUC__) && !defined(__clang__)
#define DSK_KEEP_COPY_LOOPS __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define DSK_KEEP_COPY_LOOPS
#endif

#endif /* DSK_H */
