// The grouped layout's backward, written once over a vector type
// (simd_common.h) and compiled per instruction set (avx2.cpp, avx512.cpp).
//
// A group's group_size outputs share its fan_in columns, so both gradients are
// small dense products per group over batch-contiguous copies (x_t, grad_y_t,
// grad_x_t: [features, stride]):
//   grad_values[G] [g, k] = grad_y_t[G's rows] [g, B] . x_t[idx[G]]ᵀ [B, k]
//   grad_x_t[idx[G]] [k, B] += values[G]ᵀ [k, g] . grad_y_t[G's rows] [g, B]
// Register blocks reuse every vector load over several rows or columns: the
// row layout's kernels load twice per multiply-add, these about once per two.
#pragma once

#include <algorithm>

#include "simd_common.h"

namespace condensed_ops::kernels::simd {

// Block shapes: AVX-512 has 32 vector registers, AVX2 16.
template <class Vec> constexpr int kValuesBlockRows = Vec::kLanes == 16 ? 4 : 2;  // x C = 4 accumulators each
constexpr int kValuesBlockColumns = 4;
// grad_y rows held in registers x batch vectors per pass (AVX2: 8 x 1, 6 x 2
// and 4 x 3 were no faster than 4 x 2 on Zen 4).
template <class Vec> constexpr int kInputBlockRows = Vec::kLanes == 16 ? 8 : 4;
constexpr int kInputBlockVectors = 2;
constexpr int64_t kInputBatchBlock = 64;  // batch positions per read of a group's weights

// grad_values of rows [r0, r0 + R) x columns `columns` (C of them, the first
// `columns_here` real) of group G: one dot product over the batch each.
template <class Vec, int R, int C, typename index_t>
void values_block(const GroupedGradValuesProblem<index_t>& p, int64_t G, int64_t r0, int64_t j0,
                  const int64_t (&columns)[C], int columns_here) {
  using reg = typename Vec::reg;
  reg acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) acc[r][c] = Vec::zero();
  }
  const float* grad_y[R];
  for (int r = 0; r < R; ++r) grad_y[r] = p.grad_y_t + (G * p.group_size + r0 + r) * p.stride;
  const float* x[C];
  for (int c = 0; c < C; ++c) x[c] = p.x_t + columns[c] * p.stride;
  for (int64_t b = 0; b < p.length; b += Vec::kLanes) {
    reg xv[C];
    for (int c = 0; c < C; ++c) xv[c] = Vec::load(x[c] + b);
    for (int r = 0; r < R; ++r) {
      const reg gy = Vec::load(grad_y[r] + b);
      for (int c = 0; c < C; ++c) acc[r][c] = Vec::fmadd(gy, xv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* out = p.grad + (G * p.group_size + r0 + r) * p.fan_in + j0;
    for (int c = 0; c < columns_here; ++c) {
      const float sum = Vec::sum(acc[r][c]);
      out[c] = p.accumulate ? out[c] + sum : sum;
    }
  }
}

// All rows of group G against columns [j0, j0 + C): the C columns' batch
// vectors are read from L2 once and from L1 for every further row block.
template <class Vec, typename index_t>
void values_columns(const GroupedGradValuesProblem<index_t>& p, int64_t G, int64_t j0, const index_t* group_idx) {
  constexpr int R = kValuesBlockRows<Vec>, C = kValuesBlockColumns;
  const int here = int(std::min<int64_t>(C, p.fan_in - j0));
  int64_t columns[C];
  // A short last block repeats its last column: computed, never stored.
  for (int c = 0; c < C; ++c) columns[c] = group_idx[j0 + std::min(c, here - 1)];
  int64_t r0 = 0;
  for (; r0 + R <= p.group_size; r0 += R) values_block<Vec, R, C>(p, G, r0, j0, columns, here);
  for (; r0 < p.group_size; ++r0) values_block<Vec, 1, C>(p, G, r0, j0, columns, here);
}

// Groups [group_begin, group_end); false at the first index outside [0, in_features).
template <class Vec, typename index_t>
bool grouped_grad_values(const GroupedGradValuesProblem<index_t>& p, int64_t group_begin, int64_t group_end) {
  const uint64_t limit = uint64_t(p.in_features);
  for (int64_t G = group_begin; G < group_end; ++G) {
    const index_t* group_idx = p.idx + G * p.fan_in;
    for (int64_t j = 0; j < p.fan_in; ++j) {
      if (uint64_t(int64_t(group_idx[j])) >= limit) return false;
    }
    for (int64_t j0 = 0; j0 < p.fan_in; j0 += kValuesBlockColumns) values_columns<Vec>(p, G, j0, group_idx);
  }
  return true;
}

// grad_x_t[idx[G, j], b0 .. b0 + V lanes) += sum over rows [r0, r0 + R) of
// values[G, r, j] * grad_y_t[G's row r, same batch]: the rows' grad_y vectors
// stay in registers across the group's fan_in columns.
template <class Vec, int R, int V, typename index_t>
bool input_block(const GroupedGradInputProblem<index_t>& p, int64_t G, int64_t r0, int64_t b0) {
  using reg = typename Vec::reg;
  reg grad_y[R][V];
  for (int r = 0; r < R; ++r) {
    const float* row = p.grad_y_t + (G * p.group_size + r0 + r) * p.stride + b0;
    for (int v = 0; v < V; ++v) grad_y[r][v] = Vec::load(row + v * Vec::kLanes);
  }
  const index_t* group_idx = p.idx + G * p.fan_in;
  const float* weights = p.values + (G * p.group_size + r0) * p.fan_in;
  const uint64_t limit = uint64_t(p.in_features);
  for (int64_t j = 0; j < p.fan_in; ++j) {
    const int64_t column = int64_t(group_idx[j]);
    if (uint64_t(column) >= limit) return false;
    reg acc[V];
    for (int v = 0; v < V; ++v) acc[v] = Vec::zero();
    for (int r = 0; r < R; ++r) {
      const reg w = Vec::broadcast(weights[r * p.fan_in + j]);
      for (int v = 0; v < V; ++v) acc[v] = Vec::fmadd(w, grad_y[r][v], acc[v]);
    }
    float* out = p.grad_x_t + column * p.stride + b0;
    for (int v = 0; v < V; ++v) Vec::store(out + v * Vec::kLanes, Vec::add(Vec::load(out + v * Vec::kLanes), acc[v]));
  }
  return true;
}

template <class Vec, int R, typename index_t>
bool input_rows(const GroupedGradInputProblem<index_t>& p, int64_t G, int64_t r0, int64_t b_begin, int64_t b_end) {
  constexpr int64_t kPass = kInputBlockVectors * Vec::kLanes;
  int64_t b0 = b_begin;
  for (; b0 + kPass <= b_end; b0 += kPass) {
    if (!input_block<Vec, R, kInputBlockVectors>(p, G, r0, b0)) return false;
  }
  for (; b0 < b_end; b0 += Vec::kLanes) {
    if (!input_block<Vec, R, 1>(p, G, r0, b0)) return false;
  }
  return true;
}

// Batch positions [b_begin, b_end) of grad_x_t (multiples of the vector width),
// every group: threads own disjoint batch ranges, so no two write one element.
// Batch blocks of kInputBatchBlock: a group's weights are read from memory once
// per block and from L1 for its passes; the block's slice of grad_x_t stays in L2.
template <class Vec, typename index_t>
bool grouped_grad_input(const GroupedGradInputProblem<index_t>& p, int64_t b_begin, int64_t b_end) {
  constexpr int R = kInputBlockRows<Vec>;
  for (int64_t block = b_begin; block < b_end; block += kInputBatchBlock) {
    const int64_t block_end = std::min(b_end, block + kInputBatchBlock);
    for (int64_t G = 0; G < p.groups; ++G) {
      int64_t r0 = 0;
      for (; r0 + R <= p.group_size; r0 += R) {
        if (!input_rows<Vec, R>(p, G, r0, block, block_end)) return false;
      }
      for (; r0 < p.group_size; ++r0) {
        if (!input_rows<Vec, 1>(p, G, r0, block, block_end)) return false;
      }
    }
  }
  return true;
}

}  // namespace condensed_ops::kernels::simd
