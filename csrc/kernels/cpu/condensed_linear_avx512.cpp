// AVX-512F kernels for the transposed (large batch) strategy. Compiled with
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
};
// 32 zmm registers: kBlockOutputs * (32 rows / 16 lanes) accumulators.
constexpr int kBlockOutputs = 8;

}  // namespace

template <typename scalar_t, typename index_t>
void transposed(const CondensedLinearProblem<scalar_t, index_t>& p, int64_t batch_begin, int64_t out_begin,
                int64_t out_end, float* scratch) {
  simd::transposed<Avx512Vec, kBlockOutputs>(p, batch_begin, out_begin, out_end, scratch);
}

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
