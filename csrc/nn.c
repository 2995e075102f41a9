/* Dense layers, ReLU, dropout and losses, instantiated for float and double from nn_impl.h. */
#include "nn.h"
#include "dsk.h"
#include "gemm.h"
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Fixed number of partial sums of a loss (see nn_impl.h): independent of the thread count. */
#define DSK_LOSS_CHUNKS 64
/* Elementwise loops: entries per chunk of the pool (~20 us of memory traffic). */
#define DSK_ELEMENTWISE_GRAIN 65536

/* The counter-based dropout hash documented at the end of nn.h (splitmix64's finalizer). */
static inline uint64_t dsk_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

static inline uint64_t dsk_dropout_key(uint64_t seed, uint64_t step) {
    return dsk_mix64(dsk_mix64(seed + UINT64_C(0x9E3779B97F4A7C15)) + step * UINT64_C(0xD1B54A32D192ED03));
}

/* u in [0, 1), a multiple of 2^-53, for element i */
static inline double dsk_dropout_u(uint64_t key, uint64_t i) {
    return (double)(dsk_mix64(key + (i + 1) * UINT64_C(0x9E3779B97F4A7C15)) >> 11) * 0x1.0p-53;
}

#define real float
#define FN(name) name##_f32
#define GEMM_T DskGemmS
#define GEMM_RUN dsk_sgemm_run
#include "nn_impl.h"
#undef real
#undef FN
#undef GEMM_T
#undef GEMM_RUN

#define real double
#define FN(name) name##_f64
#define GEMM_T DskGemmD
#define GEMM_RUN dsk_dgemm_run
#include "nn_impl.h"
#undef real
#undef FN
#undef GEMM_T
#undef GEMM_RUN
