/* One knob for both levels of parallelism: our OpenMP loops and the vendored OpenBLAS.
 * Kernels never call BLAS from inside an OpenMP region, so the two never oversubscribe. */
#include "dsk.h"
#include <cblas.h>

static int dsk_num_threads = 1;

int dsk_get_num_threads(void) { return dsk_num_threads; }

void dsk_set_num_threads(int n) {
    if (n < 1) n = 1;
    dsk_num_threads = n;
    scipy_openblas_set_num_threads(n);
}

int dsk_blas_get_num_threads(void) { return scipy_openblas_get_num_threads(); }
