/* Deliberate bugs for the sanitizer job (.ci/sanitize): it runs each and fails unless the sanitizers
 * report it, so that a job whose build or environment silently checks nothing cannot pass. Built by
 * setup.py with the extension's flags, and only in a DSELECTK_SANITIZE build. */
#include <limits.h>
#include <stdlib.h>
#include <time.h>

#include "dsk.h"

/* The build hides symbols by default (-fvisibility=hidden); these are called through ctypes. */
#define DSK_SELFTEST_API __attribute__((visibility("default")))

/* global, so that the compiler cannot drop the stores to a buffer that is freed unread */
double *dsk_selftest_buffer;
static long dsk_selftest_n;
static int dsk_selftest_worker_ran;

DSK_SELFTEST_API void dsk_selftest_set_num_threads(int n) { dsk_set_num_threads(n); }

/* A task of the pool (threads.c): on a worker thread (thread > 0) it writes one element past the
 * end of the buffer; on the calling thread it waits (at most 2 s) for a worker to have done so, so
 * that the caller cannot claim every task itself and the write always comes from a pool worker. */
static void overflow_task(void *ctx, long task, int thread) {
    (void)ctx;
    (void)task;
    if (thread > 0) {
        dsk_selftest_buffer[dsk_selftest_n] = 1.0;
        __atomic_store_n(&dsk_selftest_worker_ran, 1, __ATOMIC_SEQ_CST);
        return;
    }
    const struct timespec pause = {0, 1000000};
    for (int i = 0; i < 2000 && !__atomic_load_n(&dsk_selftest_worker_ran, __ATOMIC_SEQ_CST); i++) nanosleep(&pause, NULL);
}

/* Writes one element past the end of a fresh n-element heap buffer (x: (n,)) from a worker thread
 * of the pool (needs 2 or more threads: dsk_selftest_set_num_threads). Returns 0 when malloc fails,
 * 1 when the job ran (the write happened unless no worker could be started). */
DSK_SELFTEST_API int dsk_selftest_heap_overflow(long n) {
    dsk_selftest_buffer = malloc((size_t)n * sizeof(double));
    if (!dsk_selftest_buffer) return 0;
    dsk_selftest_n = n;
    dsk_parallel_tasks(2, overflow_task, NULL);
    free(dsk_selftest_buffer);
    return 1;
}

/* Signed overflow for any a > 0 (undefined behaviour: UBSan's signed-integer-overflow). */
DSK_SELFTEST_API int dsk_selftest_signed_overflow(int a) { return a + INT_MAX; }
