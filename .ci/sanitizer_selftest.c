/* Deliberate bugs for the sanitizer job (.ci/sanitize): it runs each and fails unless the sanitizers
 * report it, so that a job whose build or environment silently checks nothing cannot pass. Built by
 * setup.py with the extension's flags, and only in a DSELECTK_SANITIZE build. */
#include <limits.h>
#include <stdlib.h>

#include "dsk.h"

/* The build hides symbols by default (-fvisibility=hidden); these are called through ctypes. */
#define DSK_SELFTEST_API __attribute__((visibility("default")))

/* global, so that the compiler cannot drop the stores to a buffer that is freed unread */
double *dsk_selftest_buffer;

DSK_SELFTEST_API void dsk_selftest_set_num_threads(int n) { dsk_set_num_threads(n); }

/* Writes one element past the end of a fresh n-element heap buffer (x: (n,)), from the OpenMP
 * thread that runs the last iteration of a DSK_PARALLEL_FOR loop: with 2 or more threads
 * (dsk_selftest_set_num_threads) and DSK_PARALLEL_MIN_WORK=0, not the calling thread. Returns 0
 * when malloc fails. */
DSK_SELFTEST_API int dsk_selftest_heap_overflow(long n) {
    dsk_selftest_buffer = malloc((size_t)n * sizeof(double));
    if (!dsk_selftest_buffer) return 0;
    DSK_PARALLEL_FOR(n)
    for (long i = 0; i < n; i++) dsk_selftest_buffer[i + (i == n - 1)] = (double)i;
    free(dsk_selftest_buffer);
    return 1;
}

/* Signed overflow for any a > 0 (undefined behaviour: UBSan's signed-integer-overflow). */
DSK_SELFTEST_API int dsk_selftest_signed_overflow(int a) { return a + INT_MAX; }
