/* Convolution and max pooling (NCHW), instantiated for float and double from conv_impl.h. */
#include "conv.h"
#include "dsk.h"
#include "gemm.h"
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

long conv2d_group(const DskConv2d *g) {
    const long per_example = (g->C * g->KH * g->KW + g->F) * g->OH * g->OW;
    long G = DSK_CONV_COL_ELEMS / per_example;
    if (G < 1) G = 1;
    return g->B < G ? g->B : G;
}

size_t conv2d_col_size(const DskConv2d *g) {
    return (size_t)(g->C * g->KH * g->KW + g->F) * (size_t)conv2d_group(g) * (size_t)(g->OH * g->OW);
}

long conv2d_slices(const DskConv2d *g) { return g->B < DSK_CONV_SLICES ? g->B : DSK_CONV_SLICES; }

/* The output columns ow in [*lo, *hi) whose input column ow sw - pl + j lies inside [0, W). */
static void dsk_conv_valid_columns(const DskConv2d *g, long j, long *lo, long *hi) {
    const long first = g->pl - j, last = g->W - 1 + g->pl - j; /* need first <= ow sw <= last */
    long a = first <= 0 ? 0 : (first + g->sw - 1) / g->sw;
    long b = last < 0 ? 0 : last / g->sw + 1;
    if (a > g->OW) a = g->OW;
    if (b > g->OW) b = g->OW;
    if (b < a) b = a;
    *lo = a;
    *hi = b;
}

/* Whether v replaces the running maximum m of a window: strictly greater (the first maximum wins
 * ties), or the first NaN. Written without branches so that the compiler can use blends: the
 * comparisons of pooling inputs are unpredictable, and a mispredicted branch per entry made the
 * pooling as slow as the convolution before it. */
#define DSK_POOL_TAKES(v, m) (((v) > (m)) | (((v) != (v)) & ((m) == (m))))

#define real float
#define FN(name) name##_f32
#define GEMM dsk_sgemm
#include "conv_impl.h"
#undef real
#undef FN
#undef GEMM

#define real double
#define FN(name) name##_f64
#define GEMM dsk_dgemm
#include "conv_impl.h"
#undef real
#undef FN
#undef GEMM
