// AVX2+FMA+F16C kernels. This file is compiled with -mavx2 -mfma -mf16c and
// must stay free of torch headers: inline functions from those would be
// emitted here with AVX2 code and could be picked by the linker for callers
// that run on CPUs without it.
#include <immintrin.h>

#include <algorithm>

#include "cpu_kernels.h"
#include "grad_values_simd.h"
#include "grouped_backward_simd.h"
#include "scalar_kernel.h"
#include "simd_common.h"
#include "tiled_simd.h"
#include "type_pairs.h"

namespace condensed_ops::kernels::avx2 {
namespace {

using simd::Avx2Vec;
using simd::horizontal_sum;
using simd::load1;
using simd::load8;
using simd::store1;
using simd::store8;

template <typename scalar_t, typename index_t>
using Problem = CondensedLinearProblem<scalar_t, index_t>;

inline __m256i load8_index(const int16_t* p) {
  return _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i load8_index(const int32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
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

// ---- window: rows in lanes, x by scalar loads --------------------------------

// kRows batch rows against block b; the 16 lanes are two ymm halves. Every
// step builds its x vectors out of the window with two 8-lane gathers
// (kGather), or from 16 scalar loads where gathers are slow (Intel with the
// Downfall mitigation): those cost about three times the instructions.
template <int kRows, bool kGather, typename scalar_t>
bool window_rows(const WindowProblem<scalar_t>& p, int64_t b, int64_t row0) {
  const auto& layout = p.layout;
  const int64_t first = layout.block_steps[b];
  const int64_t available = layout.block_steps[b + 1] - first;
  const scalar_t* values = layout.values + first * kWindowLanes;
  const uint8_t* slots = layout.slots + first * kWindowLanes;
  const unsigned mask = unsigned(layout.window - 1);  // any slot stays inside its window
  __m256 acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  int64_t used = 0;
  for (int64_t w = 0; w < layout.windows; ++w) {
    const int64_t steps = layout.steps[b * layout.windows + w];
    if (steps < 0 || steps > available - used) return false;
    used += steps;
    const float* x[kRows];
    for (int r = 0; r < kRows; ++r) x[r] = p.x + (row0 + r) * p.x_row_stride + w * layout.window;
    for (int64_t s = 0; s < steps; ++s, values += kWindowLanes, slots += kWindowLanes) {
      const __m256 low = load8(values), high = load8(values + 8);
      if constexpr (kGather) {
        const __m128i slot_bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(slots));
        const __m256i slot_mask = _mm256_set1_epi32(int(mask));
        const __m256i slot_low = _mm256_and_si256(_mm256_cvtepu8_epi32(slot_bytes), slot_mask);
        const __m256i slot_high = _mm256_and_si256(_mm256_cvtepu8_epi32(_mm_srli_si128(slot_bytes, 8)), slot_mask);
        for (int r = 0; r < kRows; ++r) {
          acc[r][0] = _mm256_fmadd_ps(low, _mm256_i32gather_ps(x[r], slot_low, 4), acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(high, _mm256_i32gather_ps(x[r], slot_high, 4), acc[r][1]);
        }
        continue;
      }
      unsigned c[kWindowLanes];
      for (int l = 0; l < kWindowLanes; ++l) c[l] = slots[l] & mask;
      for (int r = 0; r < kRows; ++r) {
        const float* xr = x[r];
        const __m256 x_low = _mm256_setr_ps(xr[c[0]], xr[c[1]], xr[c[2]], xr[c[3]], xr[c[4]], xr[c[5]], xr[c[6]], xr[c[7]]);
        const __m256 x_high =
            _mm256_setr_ps(xr[c[8]], xr[c[9]], xr[c[10]], xr[c[11]], xr[c[12]], xr[c[13]], xr[c[14]], xr[c[15]]);
        acc[r][0] = _mm256_fmadd_ps(low, x_low, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(high, x_high, acc[r][1]);
      }
    }
  }
  if (used != available) return false;
  const int64_t o = b * kWindowLanes;
  const int64_t lanes = std::min(kWindowLanes, layout.out_features - o);
  for (int r = 0; r < kRows; ++r) {
    scalar_t* y = p.y + (row0 + r) * layout.out_features + o;
    if (lanes == kWindowLanes) {
      store8(y, _mm256_add_ps(acc[r][0], p.bias ? load8(p.bias + o) : _mm256_setzero_ps()));
      store8(y + 8, _mm256_add_ps(acc[r][1], p.bias ? load8(p.bias + o + 8) : _mm256_setzero_ps()));
      continue;
    }
    alignas(32) float sums[kWindowLanes];
    _mm256_store_ps(sums, acc[r][0]);
    _mm256_store_ps(sums + 8, acc[r][1]);
    for (int64_t l = 0; l < lanes; ++l) y[l] = store1<scalar_t>(sums[l] + (p.bias ? load1(p.bias[o + l]) : 0.f));
  }
  return true;
}

}  // namespace

template <typename scalar_t, typename index_t>
bool gather(const Problem<scalar_t, index_t>& p, int64_t out_begin, int64_t out_end) {
  for (int64_t o = out_begin; o < out_end; ++o) {
    const bool inside = for_row_groups(p.batch, [&](auto rows, int64_t row0) {
      return gather_output<decltype(rows)::value>(p, o, row0);
    });
    if (!inside) return false;
  }
  return true;
}

template <typename scalar_t, typename index_t>
bool scalar(const Problem<scalar_t, index_t>& p, int64_t out_begin, int64_t out_end) {
  return scalar_strategy::outputs(p, out_begin, out_end, [](scalar_t v) { return load1(v); });
}

// 16 ymm registers: 8 accumulators at every tile width.
template <typename scalar_t, typename index_t>
bool tiled(const Problem<scalar_t, index_t>& p, const BatchTile& tile, int64_t out_begin, int64_t out_end,
           float* scratch) {
  using simd::outputs_per_block;
  switch (tile.tile_rows) {
    case 8: return simd::tiled<Avx2Vec, 8, outputs_per_block(1, 8)>(p, tile, out_begin, out_end, scratch);
    case 16: return simd::tiled<Avx2Vec, 16, outputs_per_block(2, 8)>(p, tile, out_begin, out_end, scratch);
    default: return simd::tiled<Avx2Vec, 32, outputs_per_block(4, 8)>(p, tile, out_begin, out_end, scratch);
  }
}

// 8 accumulators: 8 or 4 rows of a group at 8- and 16-row tiles.
template <typename scalar_t, typename index_t>
bool grouped_tiled(const GroupedProblem<scalar_t, index_t>& p, const BatchTile& tile, int64_t out_begin,
                   int64_t out_end, float* scratch) {
  // 32-row tiles run as two 16-row ones: 4 rows x 2 vectors share each column
  // load (one cache line) instead of 2 x 4 (two lines), halving the traffic
  // from L2 into the registers (768 -> 3072 at batch 256: 1.6x).
  constexpr int64_t kSub = 16;
  if (tile.tile_rows > kSub) {
    for (int64_t r0 = 0; r0 < tile.rows; r0 += kSub) {
      const BatchTile sub{tile.batch_begin + r0, std::min(kSub, tile.rows - r0), kSub};
      if (!grouped_tiled(p, sub, out_begin, out_end, scratch)) return false;
    }
    return true;
  }
  return tile.tile_rows == 8 ? simd::grouped_tiled<Avx2Vec, 8, 8>(p, tile, out_begin, out_end, scratch)
                             : simd::grouped_tiled<Avx2Vec, 16, 4>(p, tile, out_begin, out_end, scratch);
}

using simd::transpose8x8;

void transpose(const float* src, int64_t src_stride, int64_t columns, int64_t row_begin, int64_t row_end, float* dst,
               int64_t dst_stride) {
  const auto scalar = [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = c0; c < c1; ++c) dst[c * dst_stride + r] = src[r * src_stride + c];
    }
  };
  const int64_t whole_columns = columns / 8 * 8;
  int64_t r0 = row_begin;
  for (; r0 + 8 <= row_end; r0 += 8) {
    // Two 8-row strips per pass where there are: a destination row then gets 16 floats.
    const int strips = r0 + 16 <= row_end ? 2 : 1;
    for (int64_t c0 = 0; c0 < whole_columns; c0 += 8) {
      for (int s = 0; s < strips; ++s) {
        __m256 block[8];
        for (int i = 0; i < 8; ++i) block[i] = _mm256_loadu_ps(src + (r0 + 8 * s + i) * src_stride + c0);
        transpose8x8(block);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (c0 + i) * dst_stride + r0 + 8 * s, block[i]);
      }
    }
    scalar(r0, r0 + 8 * strips, whole_columns, columns);
    r0 += 8 * (strips - 1);
  }
  scalar(r0, row_end, 0, columns);
}

template <typename index_t>
bool grad_values(const GradValuesProblem<float, index_t>& p, int64_t out_begin, int64_t out_end) {
  return simd::grad_values<Avx2Vec>(p, out_begin, out_end);
}
template bool grad_values<int16_t>(const GradValuesProblem<float, int16_t>&, int64_t, int64_t);
template bool grad_values<int32_t>(const GradValuesProblem<float, int32_t>&, int64_t, int64_t);

template <typename index_t>
bool grouped_grad_values(const GroupedGradValuesProblem<index_t>& p, int64_t group_begin, int64_t group_end) {
  return simd::grouped_grad_values<Avx2Vec>(p, group_begin, group_end);
}
template <typename index_t>
bool grouped_grad_input(const GroupedGradInputProblem<index_t>& p, int64_t batch_begin, int64_t batch_end) {
  return simd::grouped_grad_input<Avx2Vec>(p, batch_begin, batch_end);
}
template bool grouped_grad_values<int16_t>(const GroupedGradValuesProblem<int16_t>&, int64_t, int64_t);
template bool grouped_grad_values<int32_t>(const GroupedGradValuesProblem<int32_t>&, int64_t, int64_t);
template bool grouped_grad_input<int16_t>(const GroupedGradInputProblem<int16_t>&, int64_t, int64_t);
template bool grouped_grad_input<int32_t>(const GroupedGradInputProblem<int32_t>&, int64_t, int64_t);

template <typename scalar_t>
bool window(const WindowProblem<scalar_t>& p, int64_t block_begin, int64_t block_end) {
  return for_blocks_and_row_groups(block_begin, block_end, p.batch, [&](auto rows, int64_t b, int64_t row0) {
    return p.gather_x ? window_rows<decltype(rows)::value, true>(p, b, row0)
                      : window_rows<decltype(rows)::value, false>(p, b, row0);
  });
}

#define CONDENSED_OPS_INSTANTIATE(scalar_t, index_t)                                                              \
  template bool gather<scalar_t, index_t>(const Problem<scalar_t, index_t>&, int64_t, int64_t);                  \
  template bool scalar<scalar_t, index_t>(const Problem<scalar_t, index_t>&, int64_t, int64_t);                  \
  template bool tiled<scalar_t, index_t>(const Problem<scalar_t, index_t>&, const BatchTile&, int64_t, int64_t, \
                                         float*);                                                               \
  template bool grouped_tiled<scalar_t, index_t>(const GroupedProblem<scalar_t, index_t>&, const BatchTile&,     \
                                                 int64_t, int64_t, float*);
CONDENSED_OPS_FOR_EACH_SIMD_TYPE_PAIR(CONDENSED_OPS_INSTANTIATE)
#undef CONDENSED_OPS_INSTANTIATE

#define CONDENSED_OPS_INSTANTIATE(scalar_t) \
  template bool window<scalar_t>(const WindowProblem<scalar_t>&, int64_t, int64_t);
CONDENSED_OPS_FOR_EACH_SIMD_VALUE_TYPE(CONDENSED_OPS_INSTANTIATE)
#undef CONDENSED_OPS_INSTANTIATE

}  // namespace condensed_ops::kernels::avx2
