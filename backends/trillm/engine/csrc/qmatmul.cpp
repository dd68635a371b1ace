// Weight-only quantised matmuls: y = x @ deq(W)^T (+ bias), float32 activations and results.
//
// The weights stay packed in memory and are dequantised in registers, a block of
// 32 inputs of a column at a time, then multiplied with float32 activations: the
// result is the matmul of the dequantised weights (rounded as float32 arithmetic
// rounds), with no rounding of the activations to bfloat16 or int8. Decoding one
// row reads each weight once, so its speed is the speed of reading 4 (int4) or 8
// (int8) bits per weight and unpacking them.
//
// Formats (column n = output feature n, rows of W):
// - int4 (trillm_q4_matmul): per block of 32 inputs, 16 bytes; byte j holds the
//   block's weight j in its low nibble and weight j + 16 in its high nibble;
//   w = (q - 8) * scale + zero with scale and zero float32 [N][K / group],
//   group 32, 64 or 128 (trillm/engine/quant.py packs this from its cache).
// - int8 (trillm_q8_matmul): q int8 [N][K], w = q * scale[n]; the scale is
//   applied to the finished dot product.
//
// Arithmetic per output element, the same whatever else shares the call (batch
// invariance by construction): the 32 products of a block go to two 16-lane
// accumulators (inputs 0-15 and 16-31 of each block), blocks in order; at the
// end the two are added lane-wise and the 16 lanes reduced. The AVX-512 path
// runs tiles of up to 4 rows x 4 columns so that one dequantised block serves
// several rows, but the tile shape never changes an element's operations.
// The AVX2 path (AVX2 and FMA, no AVX-512) has 8-lane accumulators: per block,
// inputs 0-7 then 8-15 go to one, 16-23 then 24-31 to the other, blocks in
// order; the two are added lane-wise and the 8 lanes reduced. Its tiles are up
// to 4 rows x 1 column, or 1 row x 2 columns for a lone row. The generic path
// (neither) does the AVX-512 path's sums in plain loops the compiler
// vectorises. The paths' bits differ from each other (other reduction trees;
// fused multiply-adds or not), never between rows of one call.
//
// Columns are shared among OpenMP threads in chunks (a chunk's weights stay in
// cache while every row tile passes over them); the split never changes a result.
// Plain C ABI, loaded with ctypes (trillm/engine/native.py).

#include <cstdint>
#include <cstring>

#include "qmatmul_common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define TRILLM_Q_AVX512 1
#define TRILLM_Q_AVX2 0
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define TRILLM_Q_AVX512 0
#define TRILLM_Q_AVX2 1
#include <immintrin.h>
#else
#define TRILLM_Q_AVX512 0
#define TRILLM_Q_AVX2 0
#endif

namespace {

using namespace trillm::qmatmul;

struct Int4 {
    const uint8_t* w;  // [N][K / 2]
    const float* scale;  // [N][K / group]
    const float* zero;
    int64_t K, group_shift;  // block b of a column is in group b >> group_shift

    // weights 0-15 and 16-31 of block b of column n
    void generic(int64_t n, int64_t b, float* lo, float* hi) const {
        const uint8_t* bytes = w + n * (K / 2) + b * 16;
        const int64_t g = n * (K / BLOCK >> group_shift) + (b >> group_shift);
        const float s = scale[g], z = zero[g];
        for (int i = 0; i < 16; ++i) {
            lo[i] = static_cast<float>((bytes[i] & 15) - 8) * s + z;
            hi[i] = static_cast<float>((bytes[i] >> 4) - 8) * s + z;
        }
    }
    float finish(int64_t, float v) const { return v; }
#if TRILLM_Q_AVX512
    void avx512(int64_t n, int64_t b, __m512& lo, __m512& hi) const {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + n * (K / 2) + b * 16));
        const __m128i mask = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
        const __m128i l = _mm_sub_epi8(_mm_and_si128(bytes, mask), eight);
        const __m128i h = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), eight);
        const int64_t g = n * (K / BLOCK >> group_shift) + (b >> group_shift);
        const __m512 s = _mm512_set1_ps(scale[g]), z = _mm512_set1_ps(zero[g]);
        lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(l)), s, z);
        hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(h)), s, z);
    }
#endif
#if TRILLM_Q_AVX2
    // weights 0-7, 8-15, 16-23, 24-31 of block b of column n
    void avx2(int64_t n, int64_t b, __m256 (&v)[4]) const {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + n * (K / 2) + b * 16));
        const __m128i mask = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
        const __m128i l = _mm_sub_epi8(_mm_and_si128(bytes, mask), eight);
        const __m128i h = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), eight);
        const int64_t g = n * (K / BLOCK >> group_shift) + (b >> group_shift);
        const __m256 s = _mm256_set1_ps(scale[g]), z = _mm256_set1_ps(zero[g]);
        v[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(l)), s, z);
        v[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(l, 8))), s, z);
        v[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(h)), s, z);
        v[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(h, 8))), s, z);
    }
#endif
};

struct Int8 {
    const int8_t* w;  // [N][K]
    const float* scale;  // [N]
    int64_t K;

    void generic(int64_t n, int64_t b, float* lo, float* hi) const {
        const int8_t* q = w + n * K + b * BLOCK;
        for (int i = 0; i < 16; ++i) {
            lo[i] = static_cast<float>(q[i]);
            hi[i] = static_cast<float>(q[i + 16]);
        }
    }
    float finish(int64_t n, float v) const { return v * scale[n]; }
#if TRILLM_Q_AVX512
    void avx512(int64_t n, int64_t b, __m512& lo, __m512& hi) const {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * K + b * BLOCK));
        lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
        hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
    }
#endif
#if TRILLM_Q_AVX2
    void avx2(int64_t n, int64_t b, __m256 (&v)[4]) const {
        const int8_t* q = w + n * K + b * BLOCK;
        for (int i = 0; i < 4; ++i)
            v[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i))));
    }
#endif
};

#if TRILLM_Q_AVX512

// Rows [0, MT) x columns [n0, n0 + NT) of the output.
template <class F, int MT, int NT>
void tile(const F& f, const float* x, int64_t x_stride, int64_t n0, const float* bias, float* y, int64_t y_stride) {
    __m512 a[MT][NT], c[MT][NT];
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) a[m][j] = c[m][j] = _mm512_setzero_ps();
    const int64_t blocks = f.K / BLOCK;
    for (int64_t b = 0; b < blocks; ++b) {
        __m512 lo[NT], hi[NT];
        for (int j = 0; j < NT; ++j) f.avx512(n0 + j, b, lo[j], hi[j]);
        for (int m = 0; m < MT; ++m) {
            const float* xr = x + m * x_stride + b * BLOCK;
            const __m512 x0 = _mm512_loadu_ps(xr), x1 = _mm512_loadu_ps(xr + 16);
            for (int j = 0; j < NT; ++j) {
                a[m][j] = _mm512_fmadd_ps(lo[j], x0, a[m][j]);
                c[m][j] = _mm512_fmadd_ps(hi[j], x1, c[m][j]);
            }
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j)
            y[m * y_stride + n0 + j] =
                with_bias(f.finish(n0 + j, _mm512_reduce_add_ps(_mm512_add_ps(a[m][j], c[m][j]))), bias, n0 + j);
}

template <class F, int MT>
void row_tile(const F& f, const float* x, int64_t x_stride, int64_t n_begin, int64_t n_end, const float* bias,
              float* y, int64_t y_stride) {
    int64_t n = n_begin;
    if (MT == 1)
        for (; n + 4 <= n_end; n += 4) tile<F, MT, 4>(f, x, x_stride, n, bias, y, y_stride);
    for (; n + 2 <= n_end; n += 2) tile<F, MT, 2>(f, x, x_stride, n, bias, y, y_stride);
    for (; n < n_end; ++n) tile<F, MT, 1>(f, x, x_stride, n, bias, y, y_stride);
}

#endif

#if TRILLM_Q_AVX2

// Rows [0, MT) x columns [n0, n0 + NT) of the output; every element has the same operations.
// (Named as the AVX-512 path's tile and row_tile: one of the two is compiled, matmul calls either.)
template <class F, int MT, int NT>
void tile(const F& f, const float* x, int64_t x_stride, int64_t n0, const float* bias, float* y, int64_t y_stride) {
    __m256 a[MT][NT], c[MT][NT];
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) a[m][j] = c[m][j] = _mm256_setzero_ps();
    const int64_t blocks = f.K / BLOCK;
    for (int64_t b = 0; b < blocks; ++b) {
        __m256 v[NT][4];
        for (int j = 0; j < NT; ++j) f.avx2(n0 + j, b, v[j]);
        for (int m = 0; m < MT; ++m) {
            const float* xr = x + m * x_stride + b * BLOCK;
            const __m256 x0 = _mm256_loadu_ps(xr), x1 = _mm256_loadu_ps(xr + 8);
            const __m256 x2 = _mm256_loadu_ps(xr + 16), x3 = _mm256_loadu_ps(xr + 24);
            for (int j = 0; j < NT; ++j) {
                a[m][j] = _mm256_fmadd_ps(v[j][1], x1, _mm256_fmadd_ps(v[j][0], x0, a[m][j]));
                c[m][j] = _mm256_fmadd_ps(v[j][3], x3, _mm256_fmadd_ps(v[j][2], x2, c[m][j]));
            }
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j)
            y[m * y_stride + n0 + j] = with_bias(f.finish(n0 + j, reduce8(_mm256_add_ps(a[m][j], c[m][j]))), bias, n0 + j);
}

template <class F, int MT>
void row_tile(const F& f, const float* x, int64_t x_stride, int64_t n_begin, int64_t n_end, const float* bias,
              float* y, int64_t y_stride) {
    int64_t n = n_begin;
    if (MT == 1)
        for (; n + 2 <= n_end; n += 2) tile<F, MT, 2>(f, x, x_stride, n, bias, y, y_stride);
    for (; n < n_end; ++n) tile<F, MT, 1>(f, x, x_stride, n, bias, y, y_stride);
}

#endif

template <class F>
float dot_generic(const F& f, const float* xr, int64_t n) {
    float a[16] = {}, c[16] = {}, lo[16], hi[16];
    const int64_t blocks = f.K / BLOCK;
    for (int64_t b = 0; b < blocks; ++b) {
        f.generic(n, b, lo, hi);
        const float* xb = xr + b * BLOCK;
        for (int i = 0; i < 16; ++i) {
            a[i] += lo[i] * xb[i];
            c[i] += hi[i] * xb[i + 16];
        }
    }
    for (int i = 0; i < 16; ++i) a[i] += c[i];
    for (int width = 8; width >= 1; width /= 2)
        for (int i = 0; i < width; ++i) a[i] += a[i + width];
    return f.finish(n, a[0]);
}

template <class F>
void matmul(const F& f, const float* x, int64_t x_stride, int64_t M, int64_t N, const float* bias, float* y,
            int64_t y_stride) {
    for_column_chunks(N, [&](int64_t n_begin, int64_t n_end) {
#if TRILLM_Q_AVX512 || TRILLM_Q_AVX2
        for_row_tiles(M, [&](auto rows, int64_t m0) {
            row_tile<F, decltype(rows)::value>(f, x + m0 * x_stride, x_stride, n_begin, n_end, bias, y + m0 * y_stride,
                                               y_stride);
        });
#else
        for (int64_t n = n_begin; n < n_end; ++n)
            for (int64_t m = 0; m < M; ++m)
                y[m * y_stride + n] = with_bias(dot_generic(f, x + m * x_stride, n), bias, n);
#endif
    });
}

}  // namespace

extern "C" {

// 2 when the AVX-512 path was compiled in, 1 for the AVX2 one, 0 for the generic one.
int trillm_qmatmul_isa() { return TRILLM_Q_AVX512 ? 2 : TRILLM_Q_AVX2 ? 1 : 0; }

// Returns 0, or 1 for shapes the kernel does not take (K not a multiple of 32, group not 32/64/128 or
// not dividing K). x [M][K] with rows x_stride floats apart; y [M][N] with rows y_stride apart; bias [N] or null.
int trillm_q4_matmul(const float* x, int64_t x_stride, int64_t M, int64_t K, const uint8_t* w, const float* scale,
                     const float* zero, int64_t group, int64_t N, const float* bias, float* y, int64_t y_stride) {
    const int64_t shift = group_shift(group);
    if (shift < 0 || K % group != 0) return 1;
    matmul(Int4{w, scale, zero, K, shift}, x, x_stride, M, N, bias, y, y_stride);
    return 0;
}

int trillm_q8_matmul(const float* x, int64_t x_stride, int64_t M, int64_t K, const int8_t* w, const float* scale,
                     int64_t N, const float* bias, float* y, int64_t y_stride) {
    if (K % BLOCK != 0) return 1;
    matmul(Int8{w, scale, K}, x, x_stride, M, N, bias, y, y_stride);
    return 0;
}

}  // extern "C"
