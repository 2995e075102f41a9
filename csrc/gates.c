/* The gate kernels, instantiated for float and double from gates_impl.h. */
#include "gates.h"
#include "dsk.h"
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>

#define real float
#define FN(name) name##_f32
#include "gates_impl.h"
#undef real
#undef FN

#define real double
#define FN(name) name##_f64
#include "gates_impl.h"
#undef real
#undef FN
