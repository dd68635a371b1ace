// Decode attention over the paged KV cache: every decoding sequence of a step in one call.
//
// One query row per sequence attends over its own keys, read in place from the
// cache through its block table (no gather copy, no padding), token by token in
// cache order (each token's K/V row of all KV heads is contiguous), every query
// head of the row against its GQA group's KV head.
// Scores, softmax and the weighted sum are float32 whatever the cache dtype.
//
// Batch invariance by construction: a sequence's result depends only on its
// own query, keys and values, and every reduction runs in a fixed order (dot
// products in 16 fixed lanes, then the lanes summed in order), so it is the
// same bits whichever other sequences share the call.
//
// Sequences are shared among OpenMP threads (one sequence, one thread: the
// split never changes a result). Built with -fopenmp, the library links
// libgomp.so.1, which resolves to the copy torch has already loaded, so it
// shares torch's thread pool and thread count instead of adding threads.
//
// Plain C ABI (loaded with ctypes; trillm/engine/native.py compiles it for the
// CPU it runs on), no torch headers: it builds in about a second.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "numerics.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using trillm::bf16_to_float;
using trillm::exp_f32;
using trillm::float_to_bf16;

constexpr int kLanes = 16;

// The most keys any sequence of the call attends (the size of the per-thread score buffer).
inline int64_t longest_len(const int32_t* lens, int64_t n) {
    int64_t longest = 0;
    for (int64_t s = 0; s < n; ++s) longest = lens[s] > longest ? lens[s] : longest;
    return longest;
}

struct F32 {
    using T = float;
    static inline float load(T x) { return x; }
    static inline T store(float x) { return x; }
    static inline const float* row(const T* src, float*, int64_t) { return src; }  // no conversion
};

struct BF16 {
    using T = uint16_t;
    static inline float load(T x) { return bf16_to_float(x); }
    static inline T store(float x) { return float_to_bf16(x); }
    static inline const float* row(const T* src, float* buffer, int64_t count) {
        for (int64_t i = 0; i < count; ++i) buffer[i] = bf16_to_float(src[i]);
        return buffer;
    }
};

template <typename C>
void decode(const typename C::T* q, int64_t q_row_stride, const typename C::T* k_cache, const typename C::T* v_cache,
            const int32_t* tables, int64_t max_blocks, const int32_t* lens, const int32_t* rows, int64_t n,
            int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale,
            typename C::T* out, int64_t out_row_stride) {
    using T = typename C::T;
    const int64_t group = heads / kv_heads;
    const int64_t d = head_dim;
    const int64_t token_stride = kv_heads * d;  // one token's K (or V) row, all KV heads
    const int64_t longest = longest_len(lens, n);
#pragma omp parallel if (n > 1)
    {
    std::vector<float> qf(heads * d), acc(heads * d), row(token_stride), scores(heads * longest), inv_sum(heads);
    std::vector<int64_t> kv_of(heads);  // query head -> its KV head (no division in the token loops)
    for (int64_t h = 0; h < heads; ++h) kv_of[h] = h / group;
#pragma omp for schedule(dynamic, 1)
    for (int64_t s = 0; s < n; ++s) {
        const int64_t len = lens[s];
        const int32_t* table = tables + s * max_blocks;
        const T* q_row = q + rows[s] * q_row_stride;
        T* out_row = out + rows[s] * out_row_stride;
        for (int64_t i = 0; i < heads * d; ++i) qf[i] = C::load(q_row[i]) * scale;
        // scores[h, t] = q_h . k_t (k of head h's KV head), token by token in cache order
        for (int64_t t0 = 0, b = 0; t0 < len; t0 += block_size, ++b) {
            const int64_t count = len - t0 < block_size ? len - t0 : block_size;
            const T* k_block = k_cache + static_cast<int64_t>(table[b]) * block_size * token_stride;
            for (int64_t tt = 0; tt < count; ++tt) {
                const float* k = C::row(k_block + tt * token_stride, row.data(), token_stride);
                for (int64_t h = 0; h < heads; ++h) {
                    const float* qh = &qf[h * d];
                    const float* kh = k + kv_of[h] * d;
                    float lane[kLanes] = {0.f};
                    int64_t i = 0;
                    for (; i + kLanes <= d; i += kLanes)
                        for (int j = 0; j < kLanes; ++j) lane[j] += qh[i + j] * kh[i + j];
                    for (int j = 0; i < d; ++i, ++j) lane[j] += qh[i] * kh[i];
                    for (int w = kLanes / 2; w > 0; w /= 2)  // a fixed tree: 4 dependent adds, not 15
                        for (int j = 0; j < w; ++j) lane[j] += lane[j + w];
                    scores[h * len + t0 + tt] = lane[0];
                }
            }
        }
        // softmax over t, per query head
        for (int64_t h = 0; h < heads; ++h) {
            float* sh = &scores[h * len];
            float top = -INFINITY;
            for (int64_t t = 0; t < len; ++t) top = sh[t] > top ? sh[t] : top;
            for (int64_t t = 0; t < len; ++t) sh[t] = exp_f32(sh[t] - top);
            float sum = 0.f;
            for (int64_t t = 0; t < len; ++t) sum += sh[t];
            inv_sum[h] = 1.f / sum;
        }
        // out_h = sum_t p[h, t] v_t / sum_t p[h, t]
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t t0 = 0, b = 0; t0 < len; t0 += block_size, ++b) {
            const int64_t count = len - t0 < block_size ? len - t0 : block_size;
            const T* v_block = v_cache + static_cast<int64_t>(table[b]) * block_size * token_stride;
            for (int64_t tt = 0; tt < count; ++tt) {
                const float* v = C::row(v_block + tt * token_stride, row.data(), token_stride);
                for (int64_t h = 0; h < heads; ++h) {
                    const float p = scores[h * len + t0 + tt];
                    const float* vh = v + kv_of[h] * d;
                    float* ah = &acc[h * d];
                    for (int64_t i = 0; i < d; ++i) ah[i] += p * vh[i];
                }
            }
        }
        for (int64_t h = 0; h < heads; ++h)
            for (int64_t i = 0; i < d; ++i) out_row[h * d + i] = C::store(acc[h * d + i] * inv_sum[h]);
    }
    }  // omp parallel
}

#if defined(__AVX512F__)
template <typename C> inline __m512 load16(const typename C::T* p);
template <> inline __m512 load16<F32>(const float* p) { return _mm512_loadu_ps(p); }
template <> inline __m512 load16<BF16>(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
}

// exp_f32 (numerics.h) on 16 lanes, the same operations in the same order (no fused multiply-adds),
// so each lane's bits are the scalar function's.
inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// Softmax's numerators in place: s[t] = exp(s[t] - max s), 16 lanes at a time; returns their sum.
inline float exp_shifted(float* s, int64_t len) {
    __m512 top16 = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < len; t += 16) {
        const __mmask16 live = tail_mask(len - t);
        top16 = _mm512_mask_max_ps(top16, live, top16, _mm512_maskz_loadu_ps(live, s + t));
    }
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(top16));
    __m512 sum16v = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; t += 16) {
        const __mmask16 live = tail_mask(len - t);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + t), top));
        _mm512_mask_storeu_ps(s + t, live, e);
        sum16v = _mm512_mask_add_ps(sum16v, live, sum16v, e);
    }
    return _mm512_reduce_add_ps(sum16v);
}

// Lane t of the result = the sum of a[t]'s 16 lanes, for 16 vectors at once (about 45 shuffles
// and adds where 16 horizontal sums take about 150). Every a[t] goes through the same tree
// (lanes i and i + 2 of each 128-bit quarter, then the two pairs, then quarters 0 + 2 and
// 1 + 3, then those two), so a score's bits do not depend on its place among the 16.
inline __m512 sum16(const __m512* a) {
    __m512 quads[4];
    for (int g = 0; g < 4; ++g) {
        const __m512* x = a + 4 * g;
        const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
        const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
        // each 128-bit quarter q: (sum_q x0, sum_q x1, sum_q x2, sum_q x3)
        quads[g] = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
    }
    const __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// The AVX-512 path, for head_dim = 16 * NV, HT query heads of one KV head at a time (HT divides the
// heads per KV head; HT * NV <= 16 accumulators): each chunk of 16 keys is widened to float32 once
// for the HT heads (in L1), and each value row is read once into HT x NV accumulators. A head's
// operations and their order do not depend on HT, so neither do its bits.
template <typename C, int NV, int HT>
void decode_avx512(const typename C::T* q, int64_t q_row_stride, const typename C::T* k_cache,
                   const typename C::T* v_cache, const int32_t* tables, int64_t max_blocks, const int32_t* lens,
                   const int32_t* rows, int64_t n, int64_t heads, int64_t kv_heads, int64_t block_size, float scale,
                   typename C::T* out, int64_t out_row_stride) {
    using T = typename C::T;
    constexpr int64_t d = 16 * NV;
    const int64_t group = heads / kv_heads;
    const int64_t token_stride = kv_heads * d;
    const int64_t longest = longest_len(lens, n);
#pragma omp parallel if (n > 1)
    {
    std::vector<float> scores(HT * longest);
    alignas(64) float kf[16 * d];
    alignas(64) float qf[HT * d];
#pragma omp for schedule(dynamic, 1)
    for (int64_t s = 0; s < n; ++s) {
        const int64_t len = lens[s];
        const int32_t* table = tables + s * max_blocks;
        const T* q_row = q + rows[s] * q_row_stride;
        T* out_row = out + rows[s] * out_row_stride;
        for (int64_t h0 = 0; h0 < heads; h0 += HT) {
            const int64_t kv_offset = (h0 / group) * d;
            const __m512 sc = _mm512_set1_ps(scale);
            for (int h = 0; h < HT; ++h)
                for (int v = 0; v < NV; ++v)
                    _mm512_store_ps(qf + h * d + 16 * v, _mm512_mul_ps(load16<C>(q_row + (h0 + h) * d + 16 * v), sc));
            // scores[h, t] = q_h . k_t, 16 keys' scores at a time in one vector (sum16)
            for (int64_t t0 = 0, b = 0; t0 < len; t0 += block_size, ++b) {
                const int64_t count = len - t0 < block_size ? len - t0 : block_size;
                const T* k = k_cache + static_cast<int64_t>(table[b]) * block_size * token_stride + kv_offset;
                for (int64_t c0 = 0; c0 < count; c0 += 16) {
                    const int m = count - c0 < 16 ? static_cast<int>(count - c0) : 16;
                    for (int tt = 0; tt < m; ++tt)
                        for (int v = 0; v < NV; ++v)
                            _mm512_store_ps(kf + tt * d + 16 * v, load16<C>(k + (c0 + tt) * token_stride + 16 * v));
                    for (int h = 0; h < HT; ++h) {
                        const float* qh = qf + h * d;
                        __m512 acc[16];
                        for (int tt = 0; tt < 16; ++tt) {
                            if (tt >= m) {
                                acc[tt] = _mm512_setzero_ps();
                                continue;
                            }
                            acc[tt] = _mm512_mul_ps(_mm512_load_ps(qh), _mm512_load_ps(kf + tt * d));
                            for (int v = 1; v < NV; ++v)
                                acc[tt] = _mm512_fmadd_ps(_mm512_load_ps(qh + 16 * v), _mm512_load_ps(kf + tt * d + 16 * v),
                                                          acc[tt]);
                        }
                        _mm512_mask_storeu_ps(&scores[h * longest + t0 + c0], tail_mask(m), sum16(acc));
                    }
                }
            }
            float inv_sum[HT];
            for (int h = 0; h < HT; ++h) inv_sum[h] = 1.f / exp_shifted(&scores[h * longest], len);
            // out_h = sum_t p[h, t] v_t / sum_t p[h, t]
            __m512 o[HT][NV];
            for (int h = 0; h < HT; ++h)
                for (int v = 0; v < NV; ++v) o[h][v] = _mm512_setzero_ps();
            for (int64_t t0 = 0, b = 0; t0 < len; t0 += block_size, ++b) {
                const int64_t count = len - t0 < block_size ? len - t0 : block_size;
                const T* vr = v_cache + static_cast<int64_t>(table[b]) * block_size * token_stride + kv_offset;
                for (int64_t tt = 0; tt < count; ++tt, vr += token_stride) {
                    __m512 vv[NV];
                    for (int v = 0; v < NV; ++v) vv[v] = load16<C>(vr + 16 * v);
                    for (int h = 0; h < HT; ++h) {
                        const __m512 p = _mm512_set1_ps(scores[h * longest + t0 + tt]);
                        for (int v = 0; v < NV; ++v) o[h][v] = _mm512_fmadd_ps(p, vv[v], o[h][v]);
                    }
                }
            }
            for (int h = 0; h < HT; ++h) {
                alignas(64) float result[d];
                const __m512 inv = _mm512_set1_ps(inv_sum[h]);
                for (int v = 0; v < NV; ++v) _mm512_store_ps(result + 16 * v, _mm512_mul_ps(o[h][v], inv));
                T* dst = out_row + (h0 + h) * d;
                for (int64_t i = 0; i < d; ++i) dst[i] = C::store(result[i]);
            }
        }
    }
    }  // omp parallel
}
#endif

template <typename C>
void dispatch(const typename C::T* q, int64_t q_row_stride, const typename C::T* k_cache, const typename C::T* v_cache,
              const int32_t* tables, int64_t max_blocks, const int32_t* lens, const int32_t* rows, int64_t n,
              int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale,
              typename C::T* out, int64_t out_row_stride) {
#if defined(__AVX512F__)
    // HT: the most query heads of one KV head taken together (dividing the group, HT * NV <= 16)
    const int64_t group = heads / kv_heads;
#define TRILLM_AVX512(NV, HT)                                                                                  \
    if (group % (HT) == 0)                                                                                     \
        return decode_avx512<C, NV, HT>(q, q_row_stride, k_cache, v_cache, tables, max_blocks, lens, rows, n, heads, \
                                        kv_heads, block_size, scale, out, out_row_stride);
    if (head_dim == 64) {
        TRILLM_AVX512(4, 4) TRILLM_AVX512(4, 3) TRILLM_AVX512(4, 2) TRILLM_AVX512(4, 1)
    }
    if (head_dim == 128) {
        TRILLM_AVX512(8, 2) TRILLM_AVX512(8, 1)
    }
#undef TRILLM_AVX512
#endif
    decode<C>(q, q_row_stride, k_cache, v_cache, tables, max_blocks, lens, rows, n, heads, kv_heads, head_dim,
              block_size, scale, out, out_row_stride);
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 bfloat16 (q, caches and out alike). Returns 0, or -1 for an unknown dtype.
// q: row rows[s] of a [*, q_row_stride] matrix whose first heads * head_dim entries are the
// query heads; caches: [blocks, block_size, kv_heads, head_dim]; tables: [n, max_blocks];
// out: row rows[s] of a [*, out_row_stride] matrix, heads * head_dim entries written.
int trillm_paged_decode(int dtype, const void* q, int64_t q_row_stride, const void* k_cache, const void* v_cache,
                        const int32_t* tables, int64_t max_blocks, const int32_t* lens, const int32_t* rows,
                        int64_t n, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size,
                        float scale, void* out, int64_t out_row_stride) {
    if (dtype == 0) {
        dispatch<F32>(static_cast<const float*>(q), q_row_stride, static_cast<const float*>(k_cache),
                    static_cast<const float*>(v_cache), tables, max_blocks, lens, rows, n, heads, kv_heads,
                    head_dim, block_size, scale, static_cast<float*>(out), out_row_stride);
        return 0;
    }
    if (dtype == 1) {
        dispatch<BF16>(static_cast<const uint16_t*>(q), q_row_stride, static_cast<const uint16_t*>(k_cache),
                     static_cast<const uint16_t*>(v_cache), tables, max_blocks, lens, rows, n, heads, kv_heads,
                     head_dim, block_size, scale, static_cast<uint16_t*>(out), out_row_stride);
        return 0;
    }
    return -1;
}

}  // extern "C"
