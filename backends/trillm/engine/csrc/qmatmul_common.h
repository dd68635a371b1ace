// What qmatmul.cpp (float32 activations) and qmatmul_a8.cpp (int8 activations) share: the
// block of 32 inputs, the int4 group sizes, how a call's output is cut into work (columns in
// chunks shared among OpenMP threads, rows in tiles of up to 4), the bias, and the AVX2
// paths' 8-lane reduction. None of it changes an output element's arithmetic.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace trillm::qmatmul {

constexpr int64_t BLOCK = 32;
constexpr int64_t COL_CHUNK = 32;  // columns per thread work item
constexpr int64_t ROW_TILE = 4;

// log2(group / BLOCK) for the int4 group sizes the kernels take (32, 64, 128), else -1.
inline int64_t group_shift(int64_t group) { return group == 32 ? 0 : group == 64 ? 1 : group == 128 ? 2 : -1; }

inline float with_bias(float v, const float* bias, int64_t n) { return bias ? v + bias[n] : v; }

// Calls chunk(n_begin, n_end) for columns [0, N) in chunks of COL_CHUNK, shared among OpenMP
// threads (a chunk's weights stay in cache while every row tile passes over them).
template <class Chunk>
void for_column_chunks(int64_t N, const Chunk& chunk) {
    const int64_t chunks = (N + COL_CHUNK - 1) / COL_CHUNK;
#pragma omp parallel for schedule(static) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t n_begin = c * COL_CHUNK;
        chunk(n_begin, n_begin + COL_CHUNK < N ? n_begin + COL_CHUNK : N);
    }
}

// Calls tile(std::integral_constant<int, MT>{}, m0) for rows [0, M) in tiles of MT = ROW_TILE
// rows, the last tile 1-3 rows.
template <class Tile>
void for_row_tiles(int64_t M, const Tile& tile) {
    for (int64_t m0 = 0; m0 < M; m0 += ROW_TILE) {
        switch (M - m0 < ROW_TILE ? M - m0 : ROW_TILE) {
            case 1: tile(std::integral_constant<int, 1>{}, m0); break;
            case 2: tile(std::integral_constant<int, 2>{}, m0); break;
            case 3: tile(std::integral_constant<int, 3>{}, m0); break;
            default: tile(std::integral_constant<int, 4>{}, m0); break;
        }
    }
}

#if defined(__AVX2__)
inline float reduce8(__m256 v) {  // lanes (0+4, 1+5, 2+6, 3+7), then pairs, then the last two
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}
#endif

}  // namespace trillm::qmatmul
