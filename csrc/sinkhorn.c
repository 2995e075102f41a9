/* The Sinkhorn kernels, instantiated for float and double from sinkhorn_impl.h. */
#include "sinkhorn.h"
#include "dsk.h"
#include <math.h>
#include <stddef.h>

#define real float
#define FN(name) name##_f32
#include "sinkhorn_impl.h"
#undef real
#undef FN

#define real double
#define FN(name) name##_f64
#include "sinkhorn_impl.h"
#undef real
#undef FN
