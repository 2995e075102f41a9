/* The COMET gate kernels, instantiated for float and double from comet_impl.h. */
#include "comet.h"
#include "dsk.h"
#include <float.h>
#include <math.h>
#include <stddef.h>

/* Where the leaves of the heap tree over n experts lie (comet.h): the deepest level starts at
 * node first_deep = 2^D - 1 and holds n_deep = 2n - 2^D leaves, experts 0 .. n_deep - 1; the
 * shallower leaves are nodes n - 1 .. first_deep - 1, experts n_deep .. n - 1. */
typedef struct {
    long n, first_deep, n_deep;
} comet_leaves;

static inline comet_leaves comet_layout(long n) {
    long top = 1; /* 2^D, the largest power of two <= 2n - 1 */
    while (top <= (2 * n - 1) / 2) top *= 2;
    comet_leaves L = {n, top - 1, 2 * n - top};
    return L;
}

/* expert of leaf node v (n - 1 <= v <= 2n - 2) */
static inline long comet_expert_of(comet_leaves L, long v) {
    return v >= L.first_deep ? v - L.first_deep : L.n_deep + (v - (L.n - 1));
}

/* heap index of expert j's leaf, the inverse of comet_expert_of */
static inline long comet_leaf_node(comet_leaves L, long j) {
    return j < L.n_deep ? L.first_deep + j : (L.n - 1) + (j - L.n_deep);
}

void comet_leaf_nodes(long *leaf, long n) {
    const comet_leaves L = comet_layout(n);
    for (long j = 0; j < n; j++) leaf[j] = comet_leaf_node(L, j);
}

#define real float
#define FN(name) name##_f32
#define DSK_REAL_MIN FLT_MIN
#include "comet_impl.h"
#undef real
#undef FN
#undef DSK_REAL_MIN

#define real double
#define FN(name) name##_f64
#define DSK_REAL_MIN DBL_MIN
#include "comet_impl.h"
#undef real
#undef FN
#undef DSK_REAL_MIN
