// AVX2+FMA+F16C kernels. This file is compiled with -mavx2 -mfma -mf16c and
// must stay free of torch headers: inline functions from those would be
// emitted here with AVX2 code and could be picked by the linker for callers
// that run on CPUs without it.
#include <immintrin.h>

#include <algorithm>

#include "condensed_linear.h"
#include "transposed_simd.h"

namespace condensed_ops::kernels::avx2 {
namespace {

using simd::load1;
using simd::load8;
using simd::store1;

template <typename scalar_t, typename index_t>
using Problem = CondensedLinearProblem<scalar_t, index_t>;

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
  const int64_t begin = p.row_begin(o);
  const int64_t k = p.row_end(o) - begin;
  const scalar_t* values = p.values + begin;
  const index_t* idx = p.idx + begin;
  const float* x[kRows];
  __m256 acc[kRows];
  for (int r = 0; r < kRows; ++r) {
    x[r] = p.x + (row0 + r) * p.x_row_stride;
    acc[r] = _mm256_setzero_ps();
  }
  const __m256i limit = _mm256_set1_epi32(int32_t(p.in_features));
  __m256i inside = _mm256_set1_epi32(-1);
  int64_t j = 0;
  auto step = [&](int64_t at, __m256 (&sums)[kRows]) {
    __m256i columns = load8_index(idx + at);
    const __m256i ok = columns_inside(columns, limit);
    inside = _mm256_and_si256(inside, ok);
    columns = _mm256_and_si256(columns, ok);
    const __m256 w = load8(values + at);
    for (int r = 0; r < kRows; ++r) sums[r] = _mm256_fmadd_ps(w, _mm256_i32gather_ps(x[r], columns, 4), sums[r]);
  };
  // Two accumulator sets let consecutive gathers overlap instead of queueing
  // behind one FMA chain.
  __m256 acc2[kRows];
  for (int r = 0; r < kRows; ++r) acc2[r] = _mm256_setzero_ps();
  for (; j + 16 <= k; j += 16) {
    step(j, acc);
    step(j + 8, acc2);
  }
  if (j + 8 <= k) {
    step(j, acc);
    j += 8;
  }
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_add_ps(acc[r], acc2[r]);
  // The row's tail (k % 8 entries) as one masked gather. All rows' entries are
  // one contiguous block, so a full 8-wide load past this row's end stays
  // inside it whenever 8 more entries exist; lanes past the row are masked.
  const int64_t tail = k - j;
  const bool tail_vectorised = tail > 0 && begin + j + 8 <= p.entries();
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

struct Avx2Vec {
  using reg = __m256;
  static constexpr int kLanes = 8;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg broadcast(float v) { return _mm256_set1_ps(v); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg fmadd(reg a, reg b, reg acc) { return _mm256_fmadd_ps(a, b, acc); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static float sum(reg v) { return horizontal_sum(v); }
};
// kOutputs * (32 rows / 8 lanes) = 8 accumulators, plus the broadcast and the
// loads, fit the 16 ymm registers.
constexpr int kBlockOutputs = 2;

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
  simd::transposed<Avx2Vec, kBlockOutputs>(p, batch_begin, out_begin, out_end, scratch);
}

template <typename index_t>
void grad_values(const GradValuesProblem<float, index_t>& p, int64_t out_begin, int64_t out_end) {
  simd::grad_values<Avx2Vec>(p, out_begin, out_end);
}
template void grad_values<int16_t>(const GradValuesProblem<float, int16_t>&, int64_t, int64_t);
template void grad_values<int32_t>(const GradValuesProblem<float, int32_t>&, int64_t, int64_t);

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
