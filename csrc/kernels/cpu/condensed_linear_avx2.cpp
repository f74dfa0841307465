// AVX2+FMA+F16C kernels. This file is compiled with -mavx2 -mfma -mf16c and
// must stay free of torch headers: inline functions from those would be
// emitted here with AVX2 code and could be picked by the linker for callers
// that run on CPUs without it.
#include <immintrin.h>

#include <algorithm>

#include "condensed_linear.h"

namespace condensed_ops::kernels::avx2 {
namespace {

template <typename scalar_t, typename index_t>
using Problem = CondensedLinearProblem<scalar_t, index_t>;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline __m256 load8(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float load1(float v) { return v; }
inline float load1(BFloat16 v) { return to_float(v); }
inline float load1(Half v) { return _cvtsh_ss(v.bits); }

template <typename T> inline T store1(float v) { return from_float<T>(v); }
template <> inline Half store1<Half>(float v) { return Half{_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT)}; }

inline __m256i load8_index(const int16_t* p) {
  return _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i load8_index(const int32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
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

// ---- gather: few batch rows ------------------------------------------------

// Lanes whose column lies in [0, limit); a signed compare also rejects the
// negative values that sign-extended int16 indices produce.
inline __m256i columns_inside(__m256i columns, __m256i limit) {
  return _mm256_and_si256(_mm256_cmpgt_epi32(limit, columns), _mm256_cmpgt_epi32(columns, _mm256_set1_epi32(-1)));
}

// kRows batch rows share each index vector and weight load; their gathers are
// independent, which hides the gather latency. Out-of-range columns are
// replaced by column 0 (never read outside x) and reported through the result.
template <int kRows, typename scalar_t, typename index_t>
inline bool gather_output(const Problem<scalar_t, index_t>& p, int64_t o, int64_t row0) {
  const int64_t k = p.fan_in;
  const scalar_t* values = p.values + o * k;
  const index_t* idx = p.idx + o * k;
  const float* x[kRows];
  __m256 acc[kRows];
  for (int r = 0; r < kRows; ++r) {
    x[r] = p.x + (row0 + r) * p.x_row_stride;
    acc[r] = _mm256_setzero_ps();
  }
  const __m256i limit = _mm256_set1_epi32(int32_t(p.in_features));
  __m256i inside = _mm256_set1_epi32(-1);
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    __m256i columns = load8_index(idx + j);
    const __m256i ok = columns_inside(columns, limit);
    inside = _mm256_and_si256(inside, ok);
    columns = _mm256_and_si256(columns, ok);
    const __m256 w = load8(values + j);
    for (int r = 0; r < kRows; ++r) {
      acc[r] = _mm256_fmadd_ps(w, _mm256_i32gather_ps(x[r], columns, 4), acc[r]);
    }
  }
  // The fan_in tail (k % 8 entries) as one masked gather. values/idx are one
  // contiguous [out, k] block, so a full 8-wide load past this row's end stays
  // inside it whenever 8 more entries exist; lanes past the row are masked.
  const int64_t tail = k - j;
  const bool tail_vectorised = tail > 0 && o * k + j + 8 <= p.out_features * k;
  if (tail_vectorised) {
    const __m256i in_row = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(tail)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i columns = load8_index(idx + j);
    const __m256i ok = _mm256_and_si256(columns_inside(columns, limit), in_row);
    inside = _mm256_and_si256(inside, _mm256_or_si256(ok, _mm256_xor_si256(in_row, _mm256_set1_epi32(-1))));
    columns = _mm256_and_si256(columns, ok);
    const __m256 w = _mm256_and_ps(load8(values + j), _mm256_castsi256_ps(in_row));
    for (int r = 0; r < kRows; ++r) {
      const __m256 gathered = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x[r], columns, _mm256_castsi256_ps(ok), 4);
      acc[r] = _mm256_fmadd_ps(w, gathered, acc[r]);
    }
    j = k;
  }
  bool all_inside = _mm256_movemask_epi8(inside) == -1;
  float sum[kRows];
  for (int r = 0; r < kRows; ++r) sum[r] = horizontal_sum(acc[r]);
  for (; j < k; ++j) {  // the very last rows' tail, which has nothing after it to over-read
    const int64_t c = idx[j];
    if (c < 0 || c >= p.in_features) {
      all_inside = false;
      continue;
    }
    const float w = load1(values[j]);
    for (int r = 0; r < kRows; ++r) sum[r] += w * x[r][c];
  }
  const float bias = p.bias ? load1(p.bias[o]) : 0.f;
  for (int r = 0; r < kRows; ++r) p.y[(row0 + r) * p.out_features + o] = store1<scalar_t>(sum[r] + bias);
  return all_inside;
}

// ---- transposed: many batch rows -------------------------------------------

constexpr int kTileRows = int(kTransposedTileRows);
constexpr int kTileVectors = kTileRows / 8;
// Outputs computed together: kBlockOutputs * kTileVectors accumulators plus a
// broadcast register fit the 16 ymm registers with room for the loads.
constexpr int kBlockOutputs = 2;

// xt[c * kTileRows + r] = x[row0 + r, c]; rows past the batch end read as zero.
inline void transpose_tile(const float* x, int64_t x_row_stride, int64_t rows, int64_t in_features,
                           float* xt) {
  int64_t c = 0;
  if (rows == kTileRows) {
    for (; c + 8 <= in_features; c += 8) {
      for (int half = 0; half < kTileVectors; ++half) {
        __m256 block[8];
        for (int r = 0; r < 8; ++r) block[r] = _mm256_loadu_ps(x + (half * 8 + r) * x_row_stride + c);
        transpose8x8(block);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(xt + (c + i) * kTileRows + half * 8, block[i]);
      }
    }
  }
  for (; c < in_features; ++c) {
    for (int64_t r = 0; r < kTileRows; ++r) xt[c * kTileRows + r] = r < rows ? x[r * x_row_stride + c] : 0.f;
  }
}

template <int kOutputs, typename scalar_t, typename index_t>
inline void transposed_block(const Problem<scalar_t, index_t>& p, const float* xt, int64_t o,
                             int64_t row0, int64_t rows) {
  const scalar_t* values[kOutputs];
  const index_t* idx[kOutputs];
  __m256 acc[kOutputs][kTileVectors];
  for (int r = 0; r < kOutputs; ++r) {
    values[r] = p.values + (o + r) * p.fan_in;
    idx[r] = p.idx + (o + r) * p.fan_in;
    for (int v = 0; v < kTileVectors; ++v) acc[r][v] = _mm256_setzero_ps();
  }
  // The outputs' independent FMA chains interleave, covering FMA latency.
  for (int64_t j = 0; j < p.fan_in; ++j) {
    for (int r = 0; r < kOutputs; ++r) {
      const __m256 w = _mm256_set1_ps(load1(values[r][j]));
      const float* column = xt + int64_t(idx[r][j]) * kTileRows;
      for (int v = 0; v < kTileVectors; ++v) {
        acc[r][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(column + 8 * v), acc[r][v]);
      }
    }
  }
  alignas(32) float out[kOutputs][kTileRows];
  for (int r = 0; r < kOutputs; ++r) {
    for (int v = 0; v < kTileVectors; ++v) _mm256_store_ps(out[r] + 8 * v, acc[r][v]);
  }
  float bias[kOutputs];
  for (int r = 0; r < kOutputs; ++r) bias[r] = p.bias ? load1(p.bias[o + r]) : 0.f;
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* y = p.y + (row0 + i) * p.out_features + o;
    for (int r = 0; r < kOutputs; ++r) y[r] = store1<scalar_t>(out[r][i] + bias[r]);
  }
}

}  // namespace

template <typename scalar_t, typename index_t>
bool gather(const Problem<scalar_t, index_t>& p, int64_t out_begin, int64_t out_end) {
  bool all_inside = true;
  for (int64_t o = out_begin; o < out_end; ++o) {
    int64_t row = 0;
    for (; row + 4 <= p.batch; row += 4) all_inside &= gather_output<4>(p, o, row);
    switch (p.batch - row) {
      case 3: all_inside &= gather_output<3>(p, o, row); break;
      case 2: all_inside &= gather_output<2>(p, o, row); break;
      case 1: all_inside &= gather_output<1>(p, o, row); break;
      default: break;
    }
  }
  return all_inside;
}

template <typename scalar_t, typename index_t>
void transposed(const Problem<scalar_t, index_t>& p, int64_t batch_begin, int64_t out_begin,
                int64_t out_end, float* scratch) {
  const int64_t rows = std::min<int64_t>(kTileRows, p.batch - batch_begin);
  transpose_tile(p.x + batch_begin * p.x_row_stride, p.x_row_stride, rows, p.in_features, scratch);
  int64_t o = out_begin;
  for (; o + kBlockOutputs <= out_end; o += kBlockOutputs) {
    transposed_block<kBlockOutputs>(p, scratch, o, batch_begin, rows);
  }
  for (; o < out_end; ++o) transposed_block<1>(p, scratch, o, batch_begin, rows);
}

#define CONDENSED_OPS_INSTANTIATE(scalar_t, index_t)                                                    \
  template bool gather<scalar_t, index_t>(const Problem<scalar_t, index_t>&, int64_t, int64_t);        \
  template void transposed<scalar_t, index_t>(const Problem<scalar_t, index_t>&, int64_t, int64_t,     \
                                              int64_t, float*);

CONDENSED_OPS_INSTANTIATE(float, int16_t)
CONDENSED_OPS_INSTANTIATE(float, int32_t)
CONDENSED_OPS_INSTANTIATE(Half, int16_t)
CONDENSED_OPS_INSTANTIATE(Half, int32_t)
CONDENSED_OPS_INSTANTIATE(BFloat16, int16_t)
CONDENSED_OPS_INSTANTIATE(BFloat16, int32_t)
#undef CONDENSED_OPS_INSTANTIATE

}  // namespace condensed_ops::kernels::avx2
