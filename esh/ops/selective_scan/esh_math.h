/* The exponentials the CPU kernels (scan_cpu.c, conv_cpu.c) share, inlined so that the loops
 * around them vectorise without a library call: 2^r e^f with r an integer and |f| <= ln(2) / 2,
 * e^f by its Taylor series to degree 7 (truncation error below 6e-9 relative, under float32's
 * rounding). */
#ifndef ESH_MATH_H
#define ESH_MATH_H

#include <math.h>
#include <stdint.h>

static inline float esh_scaled_exp(float r, float f) {
    float p = 1.0f / 5040.0f;
    p = p * f + 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    union {
        int32_t i;
        float f;
    } scale;
    scale.i = ((int32_t)r + 127) << 23;
    return p * scale.f;
}

/* 2^x for the scan's decays: r = round(x), f = (x - r) ln 2. x is clamped to [-126, 126]:
 * decays below 2^-126 come out as 2^-126, which no float32 sum can tell from 0. */
static inline float esh_exp2f(float x) {
    x = fminf(fmaxf(x, -126.0f), 126.0f);
    const float r = floorf(x + 0.5f);
    return esh_scaled_exp(r, (x - r) * 0.6931471805599453f);
}

/* e^x for the softplus and the gates: r = round(x / ln 2) and f = x - r ln 2 taken in two parts
 * (Cody and Waite: the high part of ln 2 has few enough bits that r times it is exact), so the
 * error does not grow with |x| (within 2.4e-7 relative of float64 over [-85, 85] in the softplus
 * and sigmoid built on it). x is clamped to [-87, 88], where e^x is a normal float. */
static inline float esh_expf(float x) {
    x = fminf(fmaxf(x, -87.0f), 88.0f);
    const float r = floorf(x * 1.4426950408889634f + 0.5f);
    return esh_scaled_exp(r, fmaf(-r, 1.428606765330187e-06f, fmaf(-r, 0.693145751953125f, x)));
}

/* The logistic sigmoid on esh_expf: the gates' SiLU and its slope (scan and conv kernels). */
static inline float esh_sigmoidf(float x) { return 1.0f / (1.0f + esh_expf(-x)); }

#endif
