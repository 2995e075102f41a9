/* The cubic smooth-step S(t; gamma) of Section 3.1.3, shared by the DSelect-k and COMET kernels.
 * Included inside each instantiation (real = float / double, FN appends _f32 / _f64).
 *
 * Evaluated exactly at both ends. With v = (gamma/2 - |t|) / gamma in [0, 1/2], the distance of t
 * from the nearer end of the fractional region in units of gamma, the cubic is
 *   min(S, 1 - S) = q(v) = v^2 (3 - 2 v)        (S = q for t < 0, S = 1 - q for t >= 0),
 * the form u^2 (3 - 2u) of the textbook smooth-step and its mirror. It has a small relative error
 * for every v, where -2/gamma^3 t^3 + 3/(2 gamma) t + 1/2 cancels near t = -gamma/2 and leaves an
 * absolute error of one rounding of 1 (in float32 S then came out as 0 at some steps and 2^-25 at
 * others while Z crept toward -gamma/2).
 *
 * Saturation: when q rounds to at most half the spacing of the reals just below 1 (2^-25 in
 * float32, 2^-54 in float64), 1 - q rounds to 1, so S is returned as exactly 0 or 1 and its slope
 * as exactly 0. S and 1 - S then agree in the working precision: S == 0 exactly when 1 - S == 1,
 * S == 1 exactly when 1 - S == 0, and a selector row is one-hot exactly when every entry of S is 0
 * or 1. A saturated entry gets no gradient, as the paper's S' = 0 outside +-gamma/2; the jump of
 * S' at the saturation point is below 6 sqrt(2^-25 / 3) / gamma ~ 6e-4 / gamma in float32 and
 * 2.6e-8 / gamma in float64. q is computed in double for both precisions and rounded once. */

/* Half the spacing of the reals just below 1: min(S, 1 - S) at or below it saturates. */
#ifndef DSK_SATURATION_TOL
#define DSK_SATURATION_TOL ((real)(sizeof(real) == sizeof(float) ? FLT_EPSILON / 4 : DBL_EPSILON / 4))
#endif

/* Written as selects between values that are all computed (no conditional arithmetic), so that
 * loops over t vectorize (blends, no branches) and random signs and saturation patterns cost no
 * mispredictions; GCC, with its default -ftrapping-math, keeps a conditionally computed
 * floating-point expression behind a branch. */

/* v of the comment above, in double, clamped to >= 0 (0 outside the open fractional region). */
static inline double FN(smooth_step_tail)(real t, real gamma) {
    const double g = (double)gamma, v = (0.5 * g - fabs((double)t)) / g;
    return v > 0 ? v : 0;
}

/* min(S, 1 - S) = v^2 (3 - 2v), or exactly 0 where S is saturated. */
static inline double FN(smooth_step_tail_mass)(double v) {
    const double q = v * v * (3 - 2 * v);
    const real qr = (real)q;
    return qr <= DSK_SATURATION_TOL ? 0 : q;
}

static inline real FN(smooth_step_value)(real t, real gamma) {
    const double q = FN(smooth_step_tail_mass)(FN(smooth_step_tail)(t, gamma));
    const real low = (real)q, high = (real)(1 - q);
    return t < 0 ? low : high;
}

/* S'(t) = 6 v (1 - v) / gamma, and exactly 0 wherever S is saturated. */
static inline real FN(smooth_step_slope)(real t, real gamma) {
    const double v = FN(smooth_step_tail)(t, gamma);
    const real slope = (real)(6 * v * (1 - v) / (double)gamma);
    return FN(smooth_step_tail_mass)(v) == 0 ? 0 : slope;
}
