// The tiled strategy, written once over a vector type (simd_common.h) and
// compiled per instruction set (avx2.cpp, avx512.cpp). Include only from files
// built with flags for that instruction set.
#pragma once

#include <algorithm>
#include <type_traits>

#include "simd_common.h"

namespace condensed_ops::kernels::simd {

// xt[c * kTileRows + r] = x[r, c]; rows past the batch end read as zero so
// every FMA runs full width. Moves 8x8 blocks through registers: a column-wise
// scalar copy would rewrite each xt cache line kTileRows times.
template <int kTileRows>
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
using GroupResult = float[kGroupOutputs][kMaxTileRows];

// kOutputs rows of the weight against one tile: each weight is broadcast and
// multiplied into the tile's contiguous column of x, kTileRows / kLanes
// vectors at a time. The outputs' independent FMA chains hide FMA latency.
// Writes result[r][i] = sum for output o + r and tile row i; returns false,
// at once, at an index outside [0, in_features) (the caller raises).
template <class Vec, int kTileRows, int kOutputs, typename scalar_t, typename index_t>
inline bool tiled_block(const CondensedLinearProblem<scalar_t, index_t>& p, const float* xt, int64_t o,
                        float (*result)[kMaxTileRows]) {
  static_assert(kTileRows % Vec::kLanes == 0, "a tile column is whole vectors");
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
  const uint64_t limit = uint64_t(p.in_features);
  auto multiply_add = [&](int r, int64_t c, int64_t j) {
    const auto w = Vec::broadcast(load1(values[r][j]));
    const float* column = xt + c * kTileRows;
    for (int v = 0; v < kVectors; ++v) acc[r][v] = Vec::fmadd(w, Vec::load(column + v * Vec::kLanes), acc[r][v]);
  };
  // Interleave the rows over their common length (all of it at constant
  // fan-in); variable-length rows then finish one by one. The index check is
  // one compare and a branch never taken (negative c fails it too).
  const int64_t common = *std::min_element(length, length + kOutputs);
  for (int64_t j = 0; j < common; ++j) {
    for (int r = 0; r < kOutputs; ++r) {
      const int64_t c = idx[r][j];
      if (uint64_t(c) >= limit) return false;
      multiply_add(r, c, j);
    }
  }
  for (int r = 0; r < kOutputs; ++r) {
    for (int64_t j = common; j < length[r]; ++j) {
      const int64_t c = idx[r][j];
      if (uint64_t(c) >= limit) return false;
      multiply_add(r, c, j);
    }
  }
  for (int r = 0; r < kOutputs; ++r) {
    for (int v = 0; v < kVectors; ++v) Vec::store(result[r] + v * Vec::kLanes, acc[r][v]);
  }
  return true;
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

// One tile of kTileRows rows (tile.rows of them real) against outputs
// [out_begin, out_end), kOutputs rows of the weight at a time.
template <class Vec, int kTileRows, int kOutputs, typename scalar_t, typename index_t>
bool tiled(const CondensedLinearProblem<scalar_t, index_t>& p, const BatchTile& tile, int64_t out_begin,
           int64_t out_end, float* xt) {
  static_assert(kGroupOutputs % kOutputs == 0, "blocks must tile an output group");
  transpose_tile<kTileRows>(p.x + tile.batch_begin * p.x_row_stride, p.x_row_stride, tile.rows, p.in_features, xt);
  scalar_t* y = p.y + tile.batch_begin * p.out_features;
  alignas(64) GroupResult result = {};  // (zeroed: gcc cannot see that the tail reads only written rows)
  int64_t o = out_begin;
  for (; o + kGroupOutputs <= out_end; o += kGroupOutputs) {
    for (int g = 0; g < kGroupOutputs; g += kOutputs) {
      if (!tiled_block<Vec, kTileRows, kOutputs>(p, xt, o + g, result + g)) return false;
    }
    store_group(result, p.bias ? p.bias + o : nullptr, y + o, p.out_features, tile.rows);
  }
  for (; o < out_end; ++o) {  // fewer than a group left: one output at a time
    if (!tiled_block<Vec, kTileRows, 1>(p, xt, o, result)) return false;
    const float bias = p.bias ? load1(p.bias[o]) : 0.f;
    for (int64_t i = 0; i < tile.rows; ++i) y[i * p.out_features + o] = store1<scalar_t>(result[0][i] + bias);
  }
  return true;
}

// ---- grouped: kRows outputs of one group share every loaded column -------------------

// kRows consecutive outputs of `group`, from its row `first_row`, against one
// tile: each column of the tile is loaded once and multiplied by the kRows
// weights that read it, so a block of kRows x kVectors accumulators costs
// kVectors loads + kRows broadcasts per column (a per-row block: 1 + kVectors
// per output). Writes result[r][i] for tile row i; false at a bad index.
template <class Vec, int kTileRows, int kRows, typename scalar_t, typename index_t>
inline bool grouped_block(const GroupedProblem<scalar_t, index_t>& p, const float* xt, int64_t group,
                          int64_t first_row, float (*result)[kMaxTileRows]) {
  static_assert(kTileRows % Vec::kLanes == 0, "a tile column is whole vectors");
  constexpr int kVectors = kTileRows / Vec::kLanes;
  const index_t* idx = p.idx + group * p.fan_in;
  const scalar_t* values[kRows];
  typename Vec::reg acc[kRows][kVectors];
  for (int r = 0; r < kRows; ++r) {
    values[r] = p.values + (group * p.group_size + first_row + r) * p.fan_in;
    for (int v = 0; v < kVectors; ++v) acc[r][v] = Vec::zero();
  }
  const uint64_t limit = uint64_t(p.in_features);
  for (int64_t j = 0; j < p.fan_in; ++j) {
    const int64_t c = idx[j];
    if (uint64_t(c) >= limit) return false;
    const float* column = xt + c * kTileRows;
    typename Vec::reg x[kVectors];
    for (int v = 0; v < kVectors; ++v) x[v] = Vec::load(column + v * Vec::kLanes);
    for (int r = 0; r < kRows; ++r) {
      const auto w = Vec::broadcast(load1(values[r][j]));
      for (int v = 0; v < kVectors; ++v) acc[r][v] = Vec::fmadd(w, x[v], acc[r][v]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVectors; ++v) Vec::store(result[r] + v * Vec::kLanes, acc[r][v]);
  }
  return true;
}

// Outputs [o, o + count) (inside one group) in blocks of kMaxRows, then 4, 2, 1.
template <class Vec, int kTileRows, int kMaxRows, typename scalar_t, typename index_t>
inline bool grouped_run(const GroupedProblem<scalar_t, index_t>& p, const float* xt, int64_t o, int64_t count,
                        float (*result)[kMaxTileRows]) {
  const int64_t group = o / p.group_size;
  int64_t row = o % p.group_size, done = 0;
  auto blocks = [&](auto rows) {
    constexpr int kRows = decltype(rows)::value;
    for (; count - done >= kRows; done += kRows, row += kRows) {
      if (!grouped_block<Vec, kTileRows, kRows>(p, xt, group, row, result + done)) return false;
    }
    return true;
  };
  if constexpr (kMaxRows >= 8) {
    if (!blocks(std::integral_constant<int, 8>{})) return false;
  }
  return blocks(std::integral_constant<int, 4>{}) && blocks(std::integral_constant<int, 2>{}) &&
         blocks(std::integral_constant<int, 1>{});
}

// One tile of kTileRows rows against outputs [out_begin, out_end): groups of 8
// outputs (cut where a group of the layout ends) leave through store_group.
template <class Vec, int kTileRows, int kMaxRows, typename scalar_t, typename index_t>
bool grouped_tiled(const GroupedProblem<scalar_t, index_t>& p, const BatchTile& tile, int64_t out_begin,
                   int64_t out_end, float* xt) {
  transpose_tile<kTileRows>(p.x + tile.batch_begin * p.x_row_stride, p.x_row_stride, tile.rows, p.in_features, xt);
  const int64_t out_features = p.out_features();
  scalar_t* y = p.y + tile.batch_begin * out_features;
  alignas(64) GroupResult result = {};
  auto outputs = [&](int64_t o, int64_t count) {  // count <= kGroupOutputs, maybe across groups
    for (int64_t done = 0; done < count;) {
      const int64_t in_group = std::min(count - done, p.group_size - (o + done) % p.group_size);
      if (!grouped_run<Vec, kTileRows, kMaxRows>(p, xt, o + done, in_group, result + done)) return false;
      done += in_group;
    }
    return true;
  };
  int64_t o = out_begin;
  for (; o + kGroupOutputs <= out_end; o += kGroupOutputs) {
    if (!outputs(o, kGroupOutputs)) return false;
    store_group(result, p.bias ? p.bias + o : nullptr, y + o, out_features, tile.rows);
  }
  if (o < out_end) {
    if (!outputs(o, out_end - o)) return false;
    for (int64_t r = 0; r < out_end - o; ++r) {
      const float bias = p.bias ? load1(p.bias[o + r]) : 0.f;
      for (int64_t i = 0; i < tile.rows; ++i) y[i * out_features + o + r] = store1<scalar_t>(result[r][i] + bias);
    }
  }
  return true;
}

// Outputs per block: as many as `accumulators` vector registers hold at this
// tile width, at most 4: each output walks its own values and idx pointers,
// and 8 outputs' 16 pointers spill the general-purpose registers (measured
// 8% slower at 768 -> 3072, batch 256).
constexpr int outputs_per_block(int vectors_per_column, int accumulators) {
  return std::min(4, accumulators / vectors_per_column);
}

}  // namespace condensed_ops::kernels::simd
