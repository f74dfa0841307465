// AVX-512F kernels: tiled (twice the FMA width), grad_values, and window
// (permutes from x held in registers). Compiled with -mavx512f -mavx2 -mfma
// -mf16c; like the AVX2 file it must stay free of torch headers.
#include <immintrin.h>

#include <algorithm>

#include "cpu_kernels.h"
#include "grad_values_simd.h"
#include "grouped_backward_simd.h"
#include "simd_common.h"
#include "tiled_simd.h"
#include "type_pairs.h"

namespace condensed_ops::kernels::avx512 {
namespace {

using simd::load1;
using simd::store1;
using simd::store8;

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

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16(const Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// ---- window: permutes from x in registers ------------------------------------

// x[slot] for 16 lanes from a 64-slot window in four registers: vpermt2ps
// reads 32 slots (the low five bits), bit 5 picks the half.
inline __m512 window_lookup(const __m512 (&x)[4], __m512i slots, __mmask16 high_half) {
  const __m512 low = _mm512_permutex2var_ps(x[0], slots, x[1]);
  const __m512 high = _mm512_permutex2var_ps(x[2], slots, x[3]);
  return _mm512_mask_blend_ps(high_half, low, high);
}

// kRows batch rows against block b. Two accumulators per row (even and odd
// steps) keep two FMA chains in flight even for one row.
template <int kRows, typename scalar_t>
bool window_rows(const WindowProblem<scalar_t>& p, int64_t b, int64_t row0) {
  static_assert(kPermuteWindow == 64, "window_lookup holds 64 slots");
  const auto& layout = p.layout;
  const int64_t first = layout.block_steps[b];
  const int64_t available = layout.block_steps[b + 1] - first;
  const scalar_t* values = layout.values + first * kWindowLanes;
  const uint8_t* slots = layout.slots + first * kWindowLanes;
  __m512 acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const __m512i bit5 = _mm512_set1_epi32(32);
  int64_t used = 0;
  auto step = [&](const __m512 (&x)[kRows][4], int chain) {
    const __m512i s = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(slots)));
    const __mmask16 high_half = _mm512_test_epi32_mask(s, bit5);
    const __m512 w = load16(values);
    for (int r = 0; r < kRows; ++r) acc[r][chain] = _mm512_fmadd_ps(w, window_lookup(x[r], s, high_half), acc[r][chain]);
    values += kWindowLanes;
    slots += kWindowLanes;
  };
  for (int64_t w = 0; w < layout.windows; ++w) {
    const int64_t steps = layout.steps[b * layout.windows + w];
    if (steps < 0 || steps > available - used) return false;
    used += steps;
    __m512 x[kRows][4];
    for (int r = 0; r < kRows; ++r) {
      const float* xr = p.x + (row0 + r) * p.x_row_stride + w * kPermuteWindow;
      for (int q = 0; q < 4; ++q) x[r][q] = _mm512_loadu_ps(xr + 16 * q);
    }
    int64_t s = 0;
    for (; s + 2 <= steps; s += 2) {
      step(x, 0);
      step(x, 1);
    }
    if (s < steps) step(x, 0);
  }
  if (used != available) return false;
  const int64_t o = b * kWindowLanes;
  const int64_t lanes = std::min(kWindowLanes, layout.out_features - o);
  for (int r = 0; r < kRows; ++r) {
    alignas(64) float sums[kWindowLanes];
    _mm512_store_ps(sums, _mm512_add_ps(acc[r][0], acc[r][1]));
    scalar_t* y = p.y + (row0 + r) * layout.out_features + o;
    if (lanes == kWindowLanes) {
      for (int half = 0; half < 2; ++half) {
        const __m256 bias = p.bias ? simd::load8(p.bias + o + 8 * half) : _mm256_setzero_ps();
        store8(y + 8 * half, _mm256_add_ps(_mm256_load_ps(sums + 8 * half), bias));
      }
      continue;
    }
    for (int64_t l = 0; l < lanes; ++l) y[l] = store1<scalar_t>(sums[l] + (p.bias ? load1(p.bias[o + l]) : 0.f));
  }
  return true;
}

}  // namespace

// 32 zmm registers: up to 16 accumulators; 8-row tiles run 8-lane vectors.
template <typename scalar_t, typename index_t>
bool tiled(const CondensedLinearProblem<scalar_t, index_t>& p, const BatchTile& tile, int64_t out_begin,
           int64_t out_end, float* scratch) {
  using simd::outputs_per_block;
  switch (tile.tile_rows) {
    case 8: return simd::tiled<simd::Avx2Vec, 8, outputs_per_block(1, 8)>(p, tile, out_begin, out_end, scratch);
    case 16: return simd::tiled<Avx512Vec, 16, outputs_per_block(1, 16)>(p, tile, out_begin, out_end, scratch);
    default: return simd::tiled<Avx512Vec, 32, outputs_per_block(2, 16)>(p, tile, out_begin, out_end, scratch);
  }
}

// A group's rows share each column load: 8 rows x (32 tile rows / 16 lanes) = 16 accumulators.
template <typename scalar_t, typename index_t>
bool grouped_tiled(const GroupedProblem<scalar_t, index_t>& p, const BatchTile& tile, int64_t out_begin,
                   int64_t out_end, float* scratch) {
  switch (tile.tile_rows) {
    case 8: return simd::grouped_tiled<simd::Avx2Vec, 8, 8>(p, tile, out_begin, out_end, scratch);
    case 16: return simd::grouped_tiled<Avx512Vec, 16, 8>(p, tile, out_begin, out_end, scratch);
    default: return simd::grouped_tiled<Avx512Vec, 32, 8>(p, tile, out_begin, out_end, scratch);
  }
}

template <typename index_t>
bool grad_values(const GradValuesProblem<float, index_t>& p, int64_t out_begin, int64_t out_end) {
  return simd::grad_values<Avx512Vec>(p, out_begin, out_end);
}
template bool grad_values<int16_t>(const GradValuesProblem<float, int16_t>&, int64_t, int64_t);
template bool grad_values<int32_t>(const GradValuesProblem<float, int32_t>&, int64_t, int64_t);

template <typename index_t>
bool grouped_grad_values(const GroupedGradValuesProblem<index_t>& p, int64_t group_begin, int64_t group_end) {
  return simd::grouped_grad_values<Avx512Vec>(p, group_begin, group_end);
}
template <typename index_t>
bool grouped_grad_input(const GroupedGradInputProblem<index_t>& p, int64_t batch_begin, int64_t batch_end) {
  return simd::grouped_grad_input<Avx512Vec>(p, batch_begin, batch_end);
}
template bool grouped_grad_values<int16_t>(const GroupedGradValuesProblem<int16_t>&, int64_t, int64_t);
template bool grouped_grad_values<int32_t>(const GroupedGradValuesProblem<int32_t>&, int64_t, int64_t);
template bool grouped_grad_input<int16_t>(const GroupedGradInputProblem<int16_t>&, int64_t, int64_t);
template bool grouped_grad_input<int32_t>(const GroupedGradInputProblem<int32_t>&, int64_t, int64_t);

// Needs layout.window == kPermuteWindow (the glue sends other widths to avx2).
template <typename scalar_t>
bool window(const WindowProblem<scalar_t>& p, int64_t block_begin, int64_t block_end) {
  if (p.layout.window != kPermuteWindow) return false;
  return for_blocks_and_row_groups(block_begin, block_end, p.batch, [&](auto rows, int64_t b, int64_t row0) {
    return window_rows<decltype(rows)::value>(p, b, row0);
  });
}

#define CONDENSED_OPS_INSTANTIATE(scalar_t, index_t)                                                       \
  template bool tiled<scalar_t, index_t>(const CondensedLinearProblem<scalar_t, index_t>&, const BatchTile&, \
                                         int64_t, int64_t, float*);                                        \
  template bool grouped_tiled<scalar_t, index_t>(const GroupedProblem<scalar_t, index_t>&, const BatchTile&, \
                                                 int64_t, int64_t, float*);
CONDENSED_OPS_FOR_EACH_SIMD_TYPE_PAIR(CONDENSED_OPS_INSTANTIATE)
#undef CONDENSED_OPS_INSTANTIATE

#define CONDENSED_OPS_INSTANTIATE(scalar_t) \
  template bool window<scalar_t>(const WindowProblem<scalar_t>&, int64_t, int64_t);
CONDENSED_OPS_FOR_EACH_SIMD_VALUE_TYPE(CONDENSED_OPS_INSTANTIATE)
#undef CONDENSED_OPS_INSTANTIATE

}  // namespace condensed_ops::kernels::avx512
