/* Scalar helpers of the CPU kernels, written so that loops of them vectorize:
 * bfloat16 <-> float32 (bfloat16 travels as uint16_t) and exp. */
#ifndef BATCHINFER_CPU_MATH_H
#define BATCHINFER_CPU_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t bits; float value; } both = {.bits = (uint32_t)h << 16};
    return both.value;
}

/* Round to nearest even, as torch converts (finite inputs). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

/* exp(x) in plain arithmetic, so that a loop of it vectorizes (libm's expf does not
 * without -ffast-math): x = n*ln2 + r with |r| <= ln2/2, exp(r) by a degree-7 polynomial
 * (relative error ~2e-7, far below bfloat16's rounding), 2^n put in the exponent bits.
 * Clamped to [-87, 88], where 2^n stays a normal float32. */
static inline float exp_clamped(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    /* Round to nearest by adding and taking away 1.5 * 2^23 (floorf would not vectorize). */
    const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#endif
