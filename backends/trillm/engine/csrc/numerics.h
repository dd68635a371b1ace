// Scalar numerics both native sources share: bfloat16 conversions as torch does them, and a
// vectorisable exp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace trillm {

inline float bf16_to_float(uint16_t h) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// Round to nearest even, as torch's float -> bfloat16 conversion does (NaN stays NaN).
inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

// exp(x) within 2 ulp for x in [-87, 88]: x = n ln2 + r with |r| <= ln2 / 2, a degree-6
// polynomial for exp(r) (Cephes' expf coefficients), times 2^n built in the exponent bits.
// Branch-free, so the loops that call it vectorise (std::exp does not without -ffast-math).
// Outside the range x is clamped first: exp(-87) ~ 1.6e-38 stands for smaller values.
inline float exp_f32(float x) {
    x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
    const float n = std::nearbyint(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r -= n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

}  // namespace trillm
