// AVX-512F kernels for the transposed (large batch) strategy and grad_values. Compiled with
// -mavx512f -mfma -mf16c; like the AVX2 file it must stay free of torch headers.
// Only the transposed strategy has an AVX-512 flavour: its FMAs run twice as
// wide, while gathers measured no faster in zmm than in ymm.
#include <immintrin.h>

#include "condensed_linear.h"
#include "transposed_simd.h"

namespace condensed_ops::kernels::avx512 {
namespace {

struct Avx512Vec {
  using reg = __m512;
  static constexpr int kLanes = 16;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg broadcast(float v) { return _mm512_set1_ps(v); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg fmadd(reg a, reg b, reg acc) { return _mm512_fmadd_ps(a, b, acc); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static float sum(reg v) {  // (gcc 12's _mm512_reduce_add_ps warns spuriously)
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(v), high);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};
// 32 zmm registers: kBlockOutputs * (32 rows / 16 lanes) accumulators.
constexpr int kBlockOutputs = 8;

}  // namespace

template <typename scalar_t, typename index_t>
void transposed(const CondensedLinearProblem<scalar_t, index_t>& p, int64_t batch_begin, int64_t out_begin,
                int64_t out_end, float* scratch) {
  simd::transposed<Avx512Vec, kBlockOutputs>(p, batch_begin, out_begin, out_end, scratch);
}

template <typename index_t>
void grad_values(const GradValuesProblem<float, index_t>& p, int64_t out_begin, int64_t out_end) {
  simd::grad_values<Avx512Vec>(p, out_begin, out_end);
}
template void grad_values<int16_t>(const GradValuesProblem<float, int16_t>&, int64_t, int64_t);
template void grad_values<int32_t>(const GradValuesProblem<float, int32_t>&, int64_t, int64_t);

#define CONDENSED_OPS_INSTANTIATE(scalar_t, index_t)                                                       \
  template void transposed<scalar_t, index_t>(const CondensedLinearProblem<scalar_t, index_t>&, int64_t, \
                                              int64_t, int64_t, float*);

CONDENSED_OPS_INSTANTIATE(float, int16_t)
CONDENSED_OPS_INSTANTIATE(float, int32_t)
CONDENSED_OPS_INSTANTIATE(Half, int16_t)
CONDENSED_OPS_INSTANTIATE(Half, int32_t)
CONDENSED_OPS_INSTANTIATE(BFloat16, int16_t)
CONDENSED_OPS_INSTANTIATE(BFloat16, int32_t)
#undef CONDENSED_OPS_INSTANTIATE

}  // namespace condensed_ops::kernels::avx512
