// Quantised matmuls with int8 activations and integer dot products: y = deq(xq) @ deq(W)^T (+ bias).
//
// qmatmul.cpp multiplies float32 activations with weights unpacked to float32: about 20
// instructions per 32 weights and column, of which 2-4 are the multiply-adds. Here each
// row of x is first rounded to int8 per block of 32 inputs (llama.cpp's Q8_1 idea), and
// the weights' integers meet the activations' in integer dot products: VNNI's vpdpbusd
// (64 byte products per instruction) on AVX-512, vpmaddubsw + vpmaddwd on AVX2. The
// weights stay in qmatmul.cpp's formats; what changes is the activations' precision.
//
// Activations, per row, per block b of 32 inputs (the same integers on every path:
// one float32 multiply and a round to nearest even):
//   amax = max |x|, dx_b = amax / 127, xq = nearbyint(x * (127 / amax)) in [-127, 127]
//   (0 where amax is 0; dx_b is NaN where the block holds a NaN or an infinity, so that
//   it reaches the output as in a float matmul).
// The result is then sum_b dx_b * (integer dot of the block), in float32:
// - int4 (trillm_q4a8_matmul): w = (q - 8) * s + z per group: per block
//   dx_b * (s * sum (q - 8) xq + z * sum xq); the integer sums are exact.
// - int8 (trillm_q8a8_matmul): w = q * scale[n]: scale[n] * sum_b dx_b * sum q xq.
//   Its weights are laid out per pair of blocks as the activations are (below),
//   trillm/engine/quant.py's pack_pairs.
// So the error against the float32 matmul of deq(W) is that of x's rounding,
// |x - dx xq| <= dx / 2 per input, plus float32 rounding of a sum over K / 32 blocks.
//
// Layout of a pair of blocks (b0, b1) in the int8 vectors, which is how one load of
// qmatmul.cpp's int4 bytes (16 per block: q[j] | q[j + 16] << 4) unpacks with one mask
// and one shift: [b0 inputs 0-15 | b1 0-15 | b0 16-31 | b1 16-31]. A 32-bit lane of a
// dot product (4 bytes) then lies in one block: 16 lanes, lanes 0-3 and 8-11 of b0,
// 4-7 and 12-15 of b1. K must be a multiple of 64 (pairs).
//
// Batch invariance: an output element's operations depend on K, its row of x and its
// column of W only; tiles (up to 4 rows x 4 columns) share loads, never arithmetic.
// The three paths (AVX-512 with VNNI, AVX2, portable) give the same integers and may
// differ in the float32 rounding of the per-block sums.
// Plain C ABI, loaded with ctypes (trillm/engine/native.py).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "qmatmul_common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define TRILLM_A8_AVX512 1
#define TRILLM_A8_AVX2 0
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define TRILLM_A8_AVX512 0
#define TRILLM_A8_AVX2 1
#include <immintrin.h>
#else
#define TRILLM_A8_AVX512 0
#define TRILLM_A8_AVX2 0
#endif

namespace {

using namespace trillm::qmatmul;

constexpr int64_t PAIR = 64;
constexpr int64_t LANES = 16;  // 32-bit lanes of a pair

// Position in the pair layout of input i (0-63) of a pair.
inline int64_t pair_pos(int64_t i) {
    const int64_t block = i / BLOCK, j = i % BLOCK;
    return (j / 16) * 32 + block * 16 + j % 16;
}

// One call's activations, quantised.
struct Acts {
    int64_t K = 0, pairs = 0;
    std::vector<int8_t> q;  // [M][K], pair layout
    std::vector<float> dx;  // [M][K / 32]
    std::vector<int32_t> sum;  // [M][K / 32]: sum of a block's xq
    std::vector<float> d;  // [M][pairs][16]: dx of each lane's block
    std::vector<float> e;  // [M][pairs][16]: dx_b * sum_b at lane 0 (b0) and 4 (b1), else 0
    std::vector<int32_t> c8;  // [M][pairs][16]: -8 * the lane's sum of xq (int4's offset)

    const int8_t* qrow(int64_t m) const { return q.data() + m * K; }
    const float* drow(int64_t m) const { return d.data() + m * pairs * LANES; }
    const float* erow(int64_t m) const { return e.data() + m * pairs * LANES; }
    const int32_t* crow(int64_t m) const { return c8.data() + m * pairs * LANES; }
};

void quantize_row(const float* x, int64_t K, int8_t* q, float* dx, int32_t* sums) {
    for (int64_t b = 0; b < K / BLOCK; ++b) {
        const float* xb = x + b * BLOCK;
        float amax = 0.0f, total = 0.0f;
        for (int i = 0; i < BLOCK; ++i) {
            const float a = std::fabs(xb[i]);
            amax = a > amax ? a : amax;
            total += a;  // NaN or inf here means the block is not finite
        }
        int8_t block[BLOCK];
        int32_t s = 0;
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int i = 0; i < BLOCK; ++i) {
            const float r = std::isfinite(total) ? std::nearbyint(xb[i] * inv) : 0.0f;
            block[i] = static_cast<int8_t>(r);
            s += block[i];
        }
        dx[b] = std::isfinite(total) ? amax / 127.0f : NAN;
        sums[b] = s;
        int8_t* dst = q + (b / 2) * PAIR + (b % 2) * 16;  // pair_pos of the block's inputs 0-15, then 16-31
        std::memcpy(dst, block, 16);
        std::memcpy(dst + 32, block + 16, 16);
    }
}

void quantize(const float* x, int64_t x_stride, int64_t M, int64_t K, Acts& a) {
    a.K = K;
    a.pairs = K / PAIR;
    const int64_t blocks = K / BLOCK;
    a.q.resize(M * K);  // every element is written below (resize keeps the capacity of earlier calls)
    a.dx.resize(M * blocks);
    a.sum.resize(M * blocks);
    a.d.resize(M * a.pairs * LANES);
    a.e.resize(M * a.pairs * LANES);
    a.c8.resize(M * a.pairs * LANES);
#pragma omp parallel for schedule(static) if (M >= 4)
    for (int64_t m = 0; m < M; ++m) {
        int8_t* q = a.q.data() + m * K;
        float* dx = a.dx.data() + m * blocks;
        int32_t* sums = a.sum.data() + m * blocks;
        quantize_row(x + m * x_stride, K, q, dx, sums);
        for (int64_t p = 0; p < a.pairs; ++p) {
            float* d = a.d.data() + (m * a.pairs + p) * LANES;
            float* e = a.e.data() + (m * a.pairs + p) * LANES;
            int32_t* c = a.c8.data() + (m * a.pairs + p) * LANES;
            for (int64_t lane = 0; lane < LANES; ++lane) {
                const int64_t half = (lane / 4) % 2;  // which block of the pair
                d[lane] = dx[2 * p + half];
                int32_t partial = 0;
                for (int i = 0; i < 4; ++i) partial += q[p * PAIR + lane * 4 + i];
                c[lane] = -8 * partial;
            }
            for (int64_t lane = 0; lane < LANES; ++lane) e[lane] = 0.0f;
            e[0] = dx[2 * p] * static_cast<float>(sums[2 * p]);
            e[4] = dx[2 * p + 1] * static_cast<float>(sums[2 * p + 1]);
        }
    }
}

struct Int4 {
    const uint8_t* w;  // [N][K / 2], qmatmul.cpp's layout
    const float* scale;  // [N][K / group]
    const float* zero;
    int64_t K, group_shift;  // block b of a column is in group b >> group_shift

    int64_t g(int64_t n, int64_t b) const { return n * (K / BLOCK >> group_shift) + (b >> group_shift); }

    // Portable: the block's exact sum (q - 8) xq, scaled.
    float block(int64_t n, int64_t b, const Acts& a, int64_t m) const {
        const uint8_t* bytes = w + n * (K / 2) + b * 16;
        const int8_t* xq = a.qrow(m) + (b / 2) * PAIR;
        const int64_t half = b % 2;
        int32_t dot = 0;
        for (int j = 0; j < 16; ++j) {
            dot += ((bytes[j] & 15) - 8) * xq[pair_pos(half * BLOCK + j)];
            dot += ((bytes[j] >> 4) - 8) * xq[pair_pos(half * BLOCK + j + 16)];
        }
        const int64_t blocks = K / BLOCK;
        const float dx = a.dx[m * blocks + b];
        return dx * (scale[g(n, b)] * static_cast<float>(dot) + zero[g(n, b)] * static_cast<float>(a.sum[m * blocks + b]));
    }
    float finish(int64_t, float v) const { return v; }
};

struct Int8 {
    const int8_t* w;  // [N][K], pair layout
    const float* scale;  // [N]
    int64_t K;

    float block(int64_t n, int64_t b, const Acts& a, int64_t m) const {
        const int8_t* wq = w + n * K + (b / 2) * PAIR;
        const int8_t* xq = a.qrow(m) + (b / 2) * PAIR;
        const int64_t half = b % 2;
        int32_t dot = 0;
        for (int j = 0; j < BLOCK; ++j) {
            const int64_t pos = pair_pos(half * BLOCK + j);
            dot += wq[pos] * xq[pos];
        }
        return a.dx[m * (K / BLOCK) + b] * static_cast<float>(dot);
    }
    float finish(int64_t n, float v) const { return v * scale[n]; }
};

template <class F>
float dot_generic(const F& f, const Acts& a, int64_t m, int64_t n) {
    float acc = 0.0f;
    for (int64_t b = 0; b < f.K / BLOCK; ++b) acc += f.block(n, b, a, m);
    return f.finish(n, acc);
}

#if TRILLM_A8_AVX512

// One column's pair p, unpacked once for every row of a tile.
struct Int4Pair {
    __m512i w;  // q in [0, 15], pair layout
    __m512 s, z;  // scale and zero of each lane's block
};

inline __m512 lane_pattern(float v0, float v1) {  // lanes 0-3, 8-11: v0; 4-7, 12-15: v1
    const __m512 a = _mm512_set1_ps(v0), b = _mm512_set1_ps(v1);
    return _mm512_mask_blend_ps(0xF0F0, a, b);
}

inline Int4Pair load_pair(const Int4& f, int64_t n, int64_t p) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(f.w + n * (f.K / 2) + p * 32));
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(bytes), _mm256_srli_epi16(bytes, 4), 1);
    const int64_t g0 = f.g(n, 2 * p), g1 = f.g(n, 2 * p + 1);
    return {_mm512_and_si512(both, _mm512_set1_epi8(15)), lane_pattern(f.scale[g0], f.scale[g1]),
            lane_pattern(f.zero[g0], f.zero[g1])};
}

// Rows [0, MT) x columns [n0, n0 + NT): per pair, acc += cvt(sum (q - 8) xq) * s * dx + z * dx * sum xq.
template <int MT, int NT>
void tile4(const Int4& f, const Acts& a, int64_t m0, int64_t n0, const float* bias, float* y, int64_t y_stride) {
    __m512 acc[MT][NT];
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) acc[m][j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < a.pairs; ++p) {
        Int4Pair w[NT];
        for (int j = 0; j < NT; ++j) w[j] = load_pair(f, n0 + j, p);
        for (int m = 0; m < MT; ++m) {
            const __m512i x = _mm512_loadu_si512(a.qrow(m0 + m) + p * PAIR);
            const __m512i c = _mm512_loadu_si512(a.crow(m0 + m) + p * LANES);
            const __m512 d = _mm512_loadu_ps(a.drow(m0 + m) + p * LANES);
            const __m512 e = _mm512_loadu_ps(a.erow(m0 + m) + p * LANES);
            for (int j = 0; j < NT; ++j) {
                const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c, w[j].w, x));
                acc[m][j] = _mm512_fmadd_ps(w[j].z, e, _mm512_fmadd_ps(dot, _mm512_mul_ps(w[j].s, d), acc[m][j]));
            }
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j)
            y[(m0 + m) * y_stride + n0 + j] = with_bias(_mm512_reduce_add_ps(acc[m][j]), bias, n0 + j);
}

// int8: |w| times x with w's sign (vpdpbusd takes one unsigned operand); both in [-127, 127].
template <int MT, int NT>
void tile8(const Int8& f, const Acts& a, int64_t m0, int64_t n0, const float* bias, float* y, int64_t y_stride) {
    __m512 acc[MT][NT];
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) acc[m][j] = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t p = 0; p < a.pairs; ++p) {
        __m512i mag[NT];
        __mmask64 neg[NT];
        for (int j = 0; j < NT; ++j) {
            const __m512i w = _mm512_loadu_si512(f.w + (n0 + j) * f.K + p * PAIR);
            mag[j] = _mm512_abs_epi8(w);
            neg[j] = _mm512_movepi8_mask(w);
        }
        for (int m = 0; m < MT; ++m) {
            const __m512i x = _mm512_loadu_si512(a.qrow(m0 + m) + p * PAIR);
            const __m512 d = _mm512_loadu_ps(a.drow(m0 + m) + p * LANES);
            for (int j = 0; j < NT; ++j) {
                const __m512i signed_x = _mm512_mask_sub_epi8(x, neg[j], zero, x);
                const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, mag[j], signed_x));
                acc[m][j] = _mm512_fmadd_ps(dot, d, acc[m][j]);
            }
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j)
            y[(m0 + m) * y_stride + n0 + j] =
                with_bias(f.finish(n0 + j, _mm512_reduce_add_ps(acc[m][j])), bias, n0 + j);
}

#endif

#if TRILLM_A8_AVX2

// The AVX2 path does a pair as two 256-bit halves: [b0 0-15 | b1 0-15] and [b0 16-31 | b1 16-31];
// lanes 0-3 of a half are b0's, 4-7 b1's. Per element: two 8-lane accumulators (one per half),
// added lane-wise at the end, then reduced by reduce8 (qmatmul_common.h, as qmatmul.cpp's AVX2 path).

inline __m256 lane_pattern(float v0, float v1) {
    return _mm256_blend_ps(_mm256_set1_ps(v0), _mm256_set1_ps(v1), 0xF0);
}

// 32 unsigned bytes times 32 signed ones, summed in fours to 8 int32 lanes (no product pair
// exceeds int16: 2 * 127 * 127 for int8, 2 * 15 * 127 for int4).
inline __m256i dot4(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

template <int MT, int NT>
void tile4(const Int4& f, const Acts& a, int64_t m0, int64_t n0, const float* bias, float* y, int64_t y_stride) {
    __m256 lo[MT][NT], hi[MT][NT];
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) lo[m][j] = hi[m][j] = _mm256_setzero_ps();
    const __m256i mask = _mm256_set1_epi8(15);
    for (int64_t p = 0; p < a.pairs; ++p) {
        __m256i w0[NT], w1[NT];
        __m256 s[NT], z[NT];
        for (int j = 0; j < NT; ++j) {
            const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(f.w + (n0 + j) * (f.K / 2) + p * 32));
            w0[j] = _mm256_and_si256(bytes, mask);
            w1[j] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
            const int64_t g0 = f.g(n0 + j, 2 * p), g1 = f.g(n0 + j, 2 * p + 1);
            s[j] = lane_pattern(f.scale[g0], f.scale[g1]);
            z[j] = lane_pattern(f.zero[g0], f.zero[g1]);
        }
        for (int m = 0; m < MT; ++m) {
            const int8_t* xq = a.qrow(m0 + m) + p * PAIR;
            const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
            const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32));
            const int32_t* c = a.crow(m0 + m) + p * LANES;
            const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c));
            const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 8));
            const float* d = a.drow(m0 + m) + p * LANES;
            const float* e = a.erow(m0 + m) + p * LANES;
            const __m256 d0 = _mm256_loadu_ps(d), d1 = _mm256_loadu_ps(d + 8);
            const __m256 e0 = _mm256_loadu_ps(e), e1 = _mm256_loadu_ps(e + 8);
            for (int j = 0; j < NT; ++j) {
                const __m256 dot0 = _mm256_cvtepi32_ps(_mm256_add_epi32(c0, dot4(w0[j], x0)));
                const __m256 dot1 = _mm256_cvtepi32_ps(_mm256_add_epi32(c1, dot4(w1[j], x1)));
                lo[m][j] = _mm256_fmadd_ps(z[j], e0, _mm256_fmadd_ps(dot0, _mm256_mul_ps(s[j], d0), lo[m][j]));
                hi[m][j] = _mm256_fmadd_ps(z[j], e1, _mm256_fmadd_ps(dot1, _mm256_mul_ps(s[j], d1), hi[m][j]));
            }
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j)
            y[(m0 + m) * y_stride + n0 + j] = with_bias(reduce8(_mm256_add_ps(lo[m][j], hi[m][j])), bias, n0 + j);
}

template <int MT, int NT>
void tile8(const Int8& f, const Acts& a, int64_t m0, int64_t n0, const float* bias, float* y, int64_t y_stride) {
    __m256 lo[MT][NT], hi[MT][NT];
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) lo[m][j] = hi[m][j] = _mm256_setzero_ps();
    for (int64_t p = 0; p < a.pairs; ++p) {
        __m256i w0[NT], w1[NT], mag0[NT], mag1[NT];  // w's sign goes onto x, |w| is the unsigned operand
        for (int j = 0; j < NT; ++j) {
            const int8_t* wq = f.w + (n0 + j) * f.K + p * PAIR;
            w0[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq));
            w1[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 32));
            mag0[j] = _mm256_abs_epi8(w0[j]);
            mag1[j] = _mm256_abs_epi8(w1[j]);
        }
        for (int m = 0; m < MT; ++m) {
            const int8_t* xq = a.qrow(m0 + m) + p * PAIR;
            const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
            const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32));
            const float* d = a.drow(m0 + m) + p * LANES;
            const __m256 d0 = _mm256_loadu_ps(d), d1 = _mm256_loadu_ps(d + 8);
            for (int j = 0; j < NT; ++j) {
                const __m256 dot0 = _mm256_cvtepi32_ps(dot4(mag0[j], _mm256_sign_epi8(x0, w0[j])));
                const __m256 dot1 = _mm256_cvtepi32_ps(dot4(mag1[j], _mm256_sign_epi8(x1, w1[j])));
                lo[m][j] = _mm256_fmadd_ps(dot0, d0, lo[m][j]);
                hi[m][j] = _mm256_fmadd_ps(dot1, d1, hi[m][j]);
            }
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j)
            y[(m0 + m) * y_stride + n0 + j] =
                with_bias(f.finish(n0 + j, reduce8(_mm256_add_ps(lo[m][j], hi[m][j]))), bias, n0 + j);
}

#endif

#if TRILLM_A8_AVX512 || TRILLM_A8_AVX2

template <int MT, int NT>
void tile(const Int4& f, const Acts& a, int64_t m0, int64_t n0, const float* bias, float* y, int64_t ys) {
    tile4<MT, NT>(f, a, m0, n0, bias, y, ys);
}
template <int MT, int NT>
void tile(const Int8& f, const Acts& a, int64_t m0, int64_t n0, const float* bias, float* y, int64_t ys) {
    tile8<MT, NT>(f, a, m0, n0, bias, y, ys);
}

// Columns [n_begin, n_end) of rows [m0, m0 + MT): a lone row takes wider column tiles.
template <class F, int MT>
void row_tile(const F& f, const Acts& a, int64_t m0, int64_t n_begin, int64_t n_end, const float* bias, float* y,
              int64_t ys) {
    constexpr int WIDE = TRILLM_A8_AVX512 ? 4 : 2;
    int64_t n = n_begin;
    if (MT == 1)
        for (; n + WIDE <= n_end; n += WIDE) tile<MT, WIDE>(f, a, m0, n, bias, y, ys);
    if (TRILLM_A8_AVX512)
        for (; n + 2 <= n_end; n += 2) tile<MT, 2>(f, a, m0, n, bias, y, ys);
    for (; n < n_end; ++n) tile<MT, 1>(f, a, m0, n, bias, y, ys);
}

#endif

template <class F>
void matmul(const F& f, const float* x, int64_t x_stride, int64_t M, int64_t N, const float* bias, float* y,
            int64_t y_stride) {
    // The calling thread's buffers, reused between calls. The team reads them through this
    // reference: in the parallel region the name of a thread_local would mean each thread's own.
    thread_local Acts buffers;
    Acts& a = buffers;
    quantize(x, x_stride, M, f.K, a);
    for_column_chunks(N, [&](int64_t n_begin, int64_t n_end) {
#if TRILLM_A8_AVX512 || TRILLM_A8_AVX2
        for_row_tiles(M, [&](auto rows, int64_t m0) {
            row_tile<F, decltype(rows)::value>(f, a, m0, n_begin, n_end, bias, y, y_stride);
        });
#else
        for (int64_t n = n_begin; n < n_end; ++n)
            for (int64_t m = 0; m < M; ++m) y[m * y_stride + n] = with_bias(dot_generic(f, a, m, n), bias, n);
#endif
    });
}

}  // namespace

extern "C" {

// 2 when the AVX-512 VNNI path was compiled in, 1 for the AVX2 one, 0 for the portable one.
int trillm_qmatmul_a8_isa() { return TRILLM_A8_AVX512 ? 2 : TRILLM_A8_AVX2 ? 1 : 0; }

// The activations' quantisation alone (what the matmuls do first), for tests: xq [M][K] in
// the pair layout, dx [M][K / 32]. Returns 1 when K is not a multiple of 64.
int trillm_a8_quantize(const float* x, int64_t x_stride, int64_t M, int64_t K, int8_t* xq, float* dx) {
    if (K % PAIR != 0) return 1;
    std::vector<int32_t> sums(K / BLOCK);
    for (int64_t m = 0; m < M; ++m) quantize_row(x + m * x_stride, K, xq + m * K, dx + m * (K / BLOCK), sums.data());
    return 0;
}

// As trillm_q4_matmul (qmatmul.cpp), activations rounded to int8 per block of 32. K a multiple of 64.
int trillm_q4a8_matmul(const float* x, int64_t x_stride, int64_t M, int64_t K, const uint8_t* w, const float* scale,
                       const float* zero, int64_t group, int64_t N, const float* bias, float* y, int64_t y_stride) {
    const int64_t shift = group_shift(group);
    if (shift < 0 || K % group != 0 || K % PAIR != 0) return 1;
    matmul(Int4{w, scale, zero, K, shift}, x, x_stride, M, N, bias, y, y_stride);
    return 0;
}

// As trillm_q8_matmul, with w [N][K] in the pair layout (quant.py's pack_pairs). K a multiple of 64.
int trillm_q8a8_matmul(const float* x, int64_t x_stride, int64_t M, int64_t K, const int8_t* w, const float* scale,
                       int64_t N, const float* bias, float* y, int64_t y_stride) {
    if (K % PAIR != 0) return 1;
    matmul(Int8{w, scale, K}, x, x_stride, M, N, bias, y, y_stride);
    return 0;
}

}  // extern "C"
