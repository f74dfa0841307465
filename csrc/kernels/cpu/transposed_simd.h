// The transposed strategy, written once over a SIMD vector type and compiled
// once per instruction set (condensed_linear_avx2.cpp, _avx512.cpp). Include
// only from files built with flags for that instruction set. Vec provides:
//   reg, kLanes, zero(), broadcast(float), load(const float*),
//   store(float*, reg), fmadd(a, b, acc) = a * b + acc, sum(reg) (horizontal).
#pragma once

#include <immintrin.h>

#include <algorithm>

#include "condensed_linear.h"

namespace condensed_ops::kernels::simd {

inline float load1(float v) { return v; }
inline float load1(BFloat16 v) { return to_float(v); }
inline float load1(Half v) { return _cvtsh_ss(v.bits); }

template <typename T> inline T store1(float v) { return from_float<T>(v); }
template <> inline Half store1<Half>(float v) { return Half{_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT)}; }

constexpr int kTileRows = int(kTransposedTileRows);

// The 8-wide helpers below are AVX2/F16C: both SIMD files are built with them.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline __m256 load8(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store8(BFloat16* p, __m256 v) {
  // Round to nearest even like from_float<BFloat16>; NaN stays a quiet NaN.
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  // packus interleaves 128-bit halves; the permute puts them back in order.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

// In-register transpose of an 8x8 float block (rows[i] becomes column i).
inline void transpose8x8(__m256 (&rows)[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    s[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    rows[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
    rows[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
  }
}

// xt[c * kTileRows + r] = x[r, c]; rows past the batch end read as zero so
// every FMA runs full width. Moves 8x8 blocks through registers: a column-wise
// scalar copy would rewrite each xt cache line kTileRows times.
inline void transpose_tile(const float* x, int64_t x_row_stride, int64_t rows, int64_t in_features, float* xt) {
  int64_t c = 0;
  for (; c + 8 <= in_features; c += 8) {
    for (int row0 = 0; row0 < kTileRows; row0 += 8) {
      __m256 block[8];
      for (int r = 0; r < 8; ++r) {
        block[r] = row0 + r < rows ? _mm256_loadu_ps(x + (row0 + r) * x_row_stride + c) : _mm256_setzero_ps();
      }
      transpose8x8(block);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(xt + (c + i) * kTileRows + row0, block[i]);
    }
  }
  for (; c < in_features; ++c) {
    for (int r = 0; r < kTileRows; ++r) xt[c * kTileRows + r] = r < rows ? x[r * x_row_stride + c] : 0.f;
  }
}

// Outputs are finished in groups of 8 so that results leave through 8x8
// transposes as whole 8-output row segments of y, not as strided scalars
// (scalar stores were half the run time at fan_in 77).
constexpr int kGroupOutputs = 8;
using GroupResult = float[kGroupOutputs][kTileRows];

// kOutputs rows of the weight against one tile: each weight is broadcast and
// multiplied into the tile's contiguous column of x, kTileRows / kLanes
// vectors at a time. The outputs' independent FMA chains hide FMA latency.
// Writes result[r][i] = sum for output o + r and tile row i.
template <class Vec, int kOutputs, typename scalar_t, typename index_t>
inline void transposed_block(const CondensedLinearProblem<scalar_t, index_t>& p, const float* xt, int64_t o,
                             float (*result)[kTileRows]) {
  constexpr int kVectors = kTileRows / Vec::kLanes;
  const scalar_t* values[kOutputs];
  const index_t* idx[kOutputs];
  int64_t length[kOutputs];
  typename Vec::reg acc[kOutputs][kVectors];
  for (int r = 0; r < kOutputs; ++r) {
    values[r] = p.values + p.row_begin(o + r);
    idx[r] = p.idx + p.row_begin(o + r);
    length[r] = p.row_end(o + r) - p.row_begin(o + r);
    for (int v = 0; v < kVectors; ++v) acc[r][v] = Vec::zero();
  }
  auto multiply_add = [&](int r, int64_t j) {
    const auto w = Vec::broadcast(load1(values[r][j]));
    const float* column = xt + int64_t(idx[r][j]) * kTileRows;
    for (int v = 0; v < kVectors; ++v) acc[r][v] = Vec::fmadd(w, Vec::load(column + v * Vec::kLanes), acc[r][v]);
  };
  // Interleave the rows over their common length (all of it at constant
  // fan-in); variable-length rows then finish one by one.
  const int64_t common = *std::min_element(length, length + kOutputs);
  for (int64_t j = 0; j < common; ++j) {
    for (int r = 0; r < kOutputs; ++r) multiply_add(r, j);
  }
  for (int r = 0; r < kOutputs; ++r) {
    for (int64_t j = common; j < length[r]; ++j) multiply_add(r, j);
  }
  for (int r = 0; r < kOutputs; ++r) {
    for (int v = 0; v < kVectors; ++v) Vec::store(result[r] + v * Vec::kLanes, acc[r][v]);
  }
}

// y[row, o..o+8) = result[.][row] + bias[o..o+8) for the tile's valid rows.
template <typename scalar_t>
inline void store_group(const GroupResult& result, const scalar_t* bias, scalar_t* y, int64_t out_features,
                        int64_t rows) {
  const __m256 bias8 = bias ? load8(bias) : _mm256_setzero_ps();
  for (int row0 = 0; row0 < rows; row0 += 8) {
    __m256 block[8];
    for (int r = 0; r < 8; ++r) block[r] = _mm256_load_ps(&result[r][row0]);
    transpose8x8(block);
    for (int i = 0; i < 8 && row0 + i < rows; ++i) {
      store8(y + (row0 + i) * out_features, _mm256_add_ps(block[i], bias8));
    }
  }
}

template <class Vec, int kOutputs, typename scalar_t, typename index_t>
void transposed(const CondensedLinearProblem<scalar_t, index_t>& p, int64_t batch_begin, int64_t out_begin,
                int64_t out_end, float* xt) {
  static_assert(kGroupOutputs % kOutputs == 0, "blocks must tile an output group");
  const int64_t rows = std::min<int64_t>(kTileRows, p.batch - batch_begin);
  transpose_tile(p.x + batch_begin * p.x_row_stride, p.x_row_stride, rows, p.in_features, xt);
  scalar_t* y = p.y + batch_begin * p.out_features;
  alignas(64) GroupResult result;
  int64_t o = out_begin;
  for (; o + kGroupOutputs <= out_end; o += kGroupOutputs) {
    for (int g = 0; g < kGroupOutputs; g += kOutputs) transposed_block<Vec, kOutputs>(p, xt, o + g, result + g);
    store_group(result, p.bias ? p.bias + o : nullptr, y + o, p.out_features, rows);
  }
  for (; o < out_end; ++o) {  // fewer than a group left: one output at a time
    transposed_block<Vec, 1>(p, xt, o, result);
    const float bias = p.bias ? load1(p.bias[o]) : 0.f;
    for (int64_t i = 0; i < rows; ++i) y[i * p.out_features + o] = store1<scalar_t>(result[0][i] + bias);
  }
}

// grad_values: one dot product over the batch per weight. The weight's
// grad_y row stays in L1 across its fan_in dots; two accumulators per dot
// keep two FMA chains in flight.
template <class Vec, typename index_t>
void grad_values(const GradValuesProblem<float, index_t>& p, int64_t out_begin, int64_t out_end) {
  static_assert(kGradValuesBatchMultiple % (2 * Vec::kLanes) == 0 || kGradValuesBatchMultiple == Vec::kLanes);
  for (int64_t o = out_begin; o < out_end; ++o) {
    const float* grad_y = p.grad_y_t + o * p.stride;
    for (int64_t j = 0; j < p.fan_in; ++j) {
      const float* x = p.x_t + int64_t(p.idx[o * p.fan_in + j]) * p.stride;
      auto acc0 = Vec::zero(), acc1 = Vec::zero();
      int64_t b = 0;
      for (; b + 2 * Vec::kLanes <= p.length; b += 2 * Vec::kLanes) {
        acc0 = Vec::fmadd(Vec::load(grad_y + b), Vec::load(x + b), acc0);
        acc1 = Vec::fmadd(Vec::load(grad_y + b + Vec::kLanes), Vec::load(x + b + Vec::kLanes), acc1);
      }
      if (b < p.length) acc0 = Vec::fmadd(Vec::load(grad_y + b), Vec::load(x + b), acc0);
      const float sum = Vec::sum(Vec::add(acc0, acc1));
      float& out = p.grad[o * p.fan_in + j];
      out = p.accumulate ? out + sum : sum;
    }
  }
}

}  // namespace condensed_ops::kernels::simd
