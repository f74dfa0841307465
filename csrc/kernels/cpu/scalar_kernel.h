// The scalar strategy: each output row walks its entries once and reads x by
// plain loads, for every batch row at once. Gather-free, so its speed does not
// hang on how a CPU implements gathers. Written once, instantiated by the
// portable file and by the AVX2 one (F16C widening, FMA).
#pragma once

#include <cstdint>

#include "cpu_kernels.h"

namespace condensed_ops::kernels::scalar_strategy {

// kRows batch rows of output o; Widen turns a stored value into acc. Returns
// false, at once, at an index outside [0, in_features) (the caller raises).
template <int kRows, typename scalar_t, typename index_t, class Widen>
inline bool output_rows(const CondensedLinearProblem<scalar_t, index_t>& p, int64_t o, int64_t row0, Widen widen) {
  using acc = acc_t<scalar_t>;
  // Independent partial sums, so consecutive adds do not wait on each other.
  constexpr int kChains = kRows >= 4 ? 1 : (kRows == 1 ? 4 : 2);
  const int64_t begin = p.row_begin(o);
  const int64_t length = p.row_end(o) - begin;
  const scalar_t* values = p.values + begin;
  const index_t* idx = p.idx + begin;
  const acc* x[kRows];
  acc sum[kRows][kChains];
  for (int r = 0; r < kRows; ++r) {
    x[r] = p.x + (row0 + r) * p.x_row_stride;
    for (int c = 0; c < kChains; ++c) sum[r][c] = acc(0);
  }
  const uint64_t limit = uint64_t(p.in_features);
  int64_t j = 0;
  for (; j + kChains <= length; j += kChains) {
    for (int c = 0; c < kChains; ++c) {
      const int64_t column = idx[j + c];
      if (uint64_t(column) >= limit) return false;  // also negative; never taken for valid idx
      const acc w = widen(values[j + c]);
      for (int r = 0; r < kRows; ++r) sum[r][c] += w * x[r][column];
    }
  }
  for (; j < length; ++j) {
    const int64_t column = idx[j];
    if (uint64_t(column) >= limit) return false;
    const acc w = widen(values[j]);
    for (int r = 0; r < kRows; ++r) sum[r][0] += w * x[r][column];
  }
  const acc bias = p.bias ? acc(widen(p.bias[o])) : acc(0);
  for (int r = 0; r < kRows; ++r) {
    acc total = sum[r][0];
    for (int c = 1; c < kChains; ++c) total += sum[r][c];
    p.y[(row0 + r) * p.out_features + o] = from_acc<scalar_t>(total + bias);
  }
  return true;
}

template <typename scalar_t, typename index_t, class Widen>
bool outputs(const CondensedLinearProblem<scalar_t, index_t>& p, int64_t out_begin, int64_t out_end, Widen widen) {
  for (int64_t o = out_begin; o < out_end; ++o) {
    const bool inside = for_row_groups(p.batch, [&](auto rows, int64_t row0) {
      return output_rows<decltype(rows)::value>(p, o, row0, widen);
    });
    if (!inside) return false;
  }
  return true;
}

}  // namespace condensed_ops::kernels::scalar_strategy
