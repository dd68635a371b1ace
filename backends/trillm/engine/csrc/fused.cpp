// The row-wise work between a layer's matmuls, fused: one call where eager torch runs 5-12 ops.
//
// At decode sizes a torch op costs a few microseconds of dispatch whatever its size, and a layer
// ran about 45 of them (norms, RoPE, casts, slices, the cache writes, SiLU, residual adds): at one
// stream that dispatch took longer than the matmuls' arithmetic. These three functions do the
// same arithmetic in float32 per row, each element read and written once:
//
//   trillm_add_rms_norm   hidden += delta (optional); x = RMSNorm(hidden) * weight, x in the next
//                         matmul's input dtype;
//   trillm_rope_split     q, k rotated (rotate-half RoPE from cos/sin tables), v; q, k, v written
//                         in the KV cache's dtype, k and v also into the cache at each row's slot;
//   trillm_silu_mul       x = silu(gate) * up, in the next matmul's input dtype.
//
// Every row is computed alone, in a fixed order, so a row's result never depends on the other
// rows (batch invariance). Rows are shared among OpenMP threads (torch's pool, see
// paged_decode.cpp) when there are enough of them to pay for the fork.
//
// dtype codes, per tensor: 0 float32, 1 bfloat16.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "numerics.h"

namespace {

using trillm::bf16_to_float;
using trillm::exp_f32;
using trillm::float_to_bf16;

constexpr int64_t kParallelRows = 8;

// Each row loop below has the dtype switch outside it, so that the loop itself vectorises.
inline void load_row(int dtype, const void* src, float* dst, int64_t n) {
    if (dtype == 0) {
        std::memcpy(dst, src, n * sizeof(float));
    } else {
        const uint16_t* s = static_cast<const uint16_t*>(src);
        for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
    }
}

inline void store_row(int dtype, const float* src, void* dst, int64_t n) {
    if (dtype == 0) {
        std::memcpy(dst, src, n * sizeof(float));
    } else {
        uint16_t* d = static_cast<uint16_t*>(dst);
        for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
    }
}

inline int64_t element_size(int dtype) { return dtype == 0 ? 4 : 2; }

inline const char* at(const void* base, int dtype, int64_t index) {
    return static_cast<const char*>(base) + index * element_size(dtype);
}

inline char* at(void* base, int dtype, int64_t index) {
    return static_cast<char*>(base) + index * element_size(dtype);
}

}  // namespace

extern "C" {

// hidden: float32 [rows, n], updated in place when delta is given (delta: [rows, n] of delta_dtype,
// or null); weight: [n] of weight_dtype; x: [rows, n] of x_dtype.
// RMSNorm as transformers computes it in float32: h * (1 / sqrt(mean(h^2) + eps)), then * weight.
int trillm_add_rms_norm(float* hidden, const void* delta, int delta_dtype, const void* weight, int weight_dtype,
                        float eps, void* x, int x_dtype, int64_t rows, int64_t n) {
    std::vector<float> w(n);
    load_row(weight_dtype, weight, w.data(), n);
#pragma omp parallel if (rows >= kParallelRows)
    {
    std::vector<float> d(n), y(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        float* h = hidden + r * n;
        if (delta != nullptr) {
            load_row(delta_dtype, at(delta, delta_dtype, r * n), d.data(), n);
            for (int64_t i = 0; i < n; ++i) h[i] += d[i];
        }
        float lane[16] = {0.f};
        int64_t i = 0;
        for (; i + 16 <= n; i += 16)
            for (int j = 0; j < 16; ++j) lane[j] += h[i + j] * h[i + j];
        for (int j = 0; i < n; ++i, ++j) lane[j] += h[i] * h[i];
        for (int width = 8; width > 0; width /= 2)
            for (int j = 0; j < width; ++j) lane[j] += lane[j + width];
        const float inv = 1.f / std::sqrt(lane[0] / static_cast<float>(n) + eps);
        for (int64_t k = 0; k < n; ++k) y[k] = h[k] * inv * w[k];
        store_row(x_dtype, y.data(), at(x, x_dtype, r * n), n);
    }
    }
    return 0;
}

// qkv: [rows, (heads + 2 kv_heads) d] of qkv_dtype (q heads, then k, then v); cos, sin_signed:
// float32 [positions, d] (sin's first half negated: rotating is x * cos + swap_halves(x) * sin);
// positions, slots: int64 [rows]; q_out: [rows, heads, d], k_out, v_out: [rows, kv_heads, d], all
// of kv_dtype; k_cache, v_cache: this layer's [slots, kv_heads, d] of kv_dtype (slot = block *
// block_size + offset), written at slots[r].
int trillm_rope_split(const void* qkv, int qkv_dtype, const float* cos, const float* sin_signed,
                      const int64_t* positions, const int64_t* slots, void* q_out, void* k_out, void* v_out,
                      void* k_cache, void* v_cache, int kv_dtype, int64_t rows, int64_t heads, int64_t kv_heads,
                      int64_t d) {
    const int64_t width = (heads + 2 * kv_heads) * d;
    const int64_t half = d / 2;
#pragma omp parallel if (rows >= kParallelRows)
    {
    std::vector<float> in(width), out(width);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        load_row(qkv_dtype, at(qkv, qkv_dtype, r * width), in.data(), width);
        const float* c = cos + positions[r] * d;
        const float* s = sin_signed + positions[r] * d;
        for (int64_t h = 0; h < heads + kv_heads; ++h) {
            const float* x = in.data() + h * d;
            float* y = out.data() + h * d;
            for (int64_t i = 0; i < half; ++i) y[i] = x[i] * c[i] + x[i + half] * s[i];
            for (int64_t i = half; i < d; ++i) y[i] = x[i] * c[i] + x[i - half] * s[i];
        }
        for (int64_t i = (heads + kv_heads) * d; i < width; ++i) out[i] = in[i];
        const int64_t kv = kv_heads * d;
        store_row(kv_dtype, out.data(), at(q_out, kv_dtype, r * heads * d), heads * d);
        store_row(kv_dtype, out.data() + heads * d, at(k_out, kv_dtype, r * kv), kv);
        store_row(kv_dtype, out.data() + heads * d + kv, at(v_out, kv_dtype, r * kv), kv);
        store_row(kv_dtype, out.data() + heads * d, at(k_cache, kv_dtype, slots[r] * kv), kv);
        store_row(kv_dtype, out.data() + heads * d + kv, at(v_cache, kv_dtype, slots[r] * kv), kv);
    }
    }
    return 0;
}

// gate_up: [rows, 2 n] of in_dtype (gate, then up); x: [rows, n] of x_dtype. silu(g) = g / (1 + exp(-g)).
int trillm_silu_mul(const void* gate_up, int in_dtype, void* x, int x_dtype, int64_t rows, int64_t n) {
#pragma omp parallel if (rows >= kParallelRows)
    {
    std::vector<float> in(2 * n), y(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        load_row(in_dtype, at(gate_up, in_dtype, r * 2 * n), in.data(), 2 * n);
        for (int64_t i = 0; i < n; ++i) y[i] = in[i] / (1.f + exp_f32(-in[i])) * in[n + i];
        store_row(x_dtype, y.data(), at(x, x_dtype, r * n), n);
    }
    }
    return 0;
}

}  // extern "C"
