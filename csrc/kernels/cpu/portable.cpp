// Portable kernels: plain C++ that builds on any compiler and architecture.
// They double as the reference structure for the SIMD flavours.
#include <algorithm>
#include <type_traits>

#include "cpu_kernels.h"
#include "scalar_kernel.h"
#include "type_pairs.h"

namespace condensed_ops::kernels {

template <typename index_t>
int64_t first_index_out_of_range(const index_t* idx, int64_t count, int64_t limit) {
  if (count == 0) return -1;
  // A min/max reduction in the index's own width vectorises well (8-16 lanes
  // a cycle); the slow search for the culprit only runs when something is wrong.
  index_t lowest = idx[0], highest = idx[0];
  for (int64_t i = 0; i < count; ++i) {
    const index_t c = idx[i];  // ternaries, not std::min: gcc 12 vectorises only these
    lowest = c < lowest ? c : lowest;
    highest = c > highest ? c : highest;
  }
  if (lowest >= 0 && int64_t(highest) < limit) return -1;
  for (int64_t i = 0; i < count; ++i) {
    if (idx[i] < 0 || int64_t(idx[i]) >= limit) return i;
  }
  return -1;
}

namespace portable {

// xt[c * kWidth + r] = x[batch_begin + r, c]; padding rows are zero so the
// inner loops always run the full tile width.
template <int kWidth, typename acc>
void transpose_tile(const acc* x, int64_t x_row_stride, const BatchTile& tile, int64_t in_features, acc* xt) {
  for (int64_t c = 0; c < in_features; ++c) {
    for (int64_t r = 0; r < kWidth; ++r) xt[c * kWidth + r] = r < tile.rows ? x[(tile.batch_begin + r) * x_row_stride + c] : acc(0);
  }
}


template <typename scalar_t, typename index_t>
bool scalar(const CondensedLinearProblem<scalar_t, index_t>& p, int64_t out_begin, int64_t out_end) {
  return scalar_strategy::outputs(p, out_begin, out_end, [](scalar_t v) { return acc_t<scalar_t>(to_float(v)); });
}

// One tile at a compile-time width, so the compiler vectorises the row loop.
template <int kWidth, typename scalar_t, typename index_t>
bool tiled_width(const CondensedLinearProblem<scalar_t, index_t>& p, const BatchTile& tile, int64_t out_begin,
                 int64_t out_end, acc_t<scalar_t>* xt) {
  using acc = acc_t<scalar_t>;
  transpose_tile<kWidth>(p.x, p.x_row_stride, tile, p.in_features, xt);
  const uint64_t limit = uint64_t(p.in_features);
  for (int64_t o = out_begin; o < out_end; ++o) {
    const scalar_t* values = p.values + p.row_begin(o);
    const index_t* idx = p.idx + p.row_begin(o);
    const int64_t length = p.row_end(o) - p.row_begin(o);
    acc sum[kWidth] = {};
    for (int64_t j = 0; j < length; ++j) {
      const int64_t c = idx[j];
      if (uint64_t(c) >= limit) return false;
      const acc w = to_float(values[j]);
      const acc* column = xt + c * kWidth;
      for (int r = 0; r < kWidth; ++r) sum[r] += w * column[r];
    }
    const acc bias = p.bias ? acc(to_float(p.bias[o])) : acc(0);
    for (int64_t r = 0; r < tile.rows; ++r) {
      p.y[(tile.batch_begin + r) * p.out_features + o] = from_acc<scalar_t>(sum[r] + bias);
    }
  }
  return true;
}

// f(std::integral_constant<int, width>) for the tile's width (8, 16 or 32).
template <class F>
bool with_tile_width(const BatchTile& tile, F&& f) {
  switch (tile.tile_rows) {
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    default: return f(std::integral_constant<int, 32>{});
  }
}

template <typename scalar_t, typename index_t>
bool tiled(const CondensedLinearProblem<scalar_t, index_t>& p, const BatchTile& tile, int64_t out_begin,
           int64_t out_end, acc_t<scalar_t>* scratch) {
  return with_tile_width(tile, [&](auto width) {
    return tiled_width<decltype(width)::value>(p, tile, out_begin, out_end, scratch);
  });
}

// The grouped layout, one group's rows at a time against each loaded column.
template <int kWidth, typename scalar_t, typename index_t>
bool grouped_tiled_width(const GroupedProblem<scalar_t, index_t>& p, const BatchTile& tile, int64_t out_begin,
                         int64_t out_end, acc_t<scalar_t>* xt) {
  using acc = acc_t<scalar_t>;
  constexpr int64_t kRows = 4;
  transpose_tile<kWidth>(p.x, p.x_row_stride, tile, p.in_features, xt);
  const uint64_t limit = uint64_t(p.in_features);
  const int64_t out_features = p.out_features();
  for (int64_t o = out_begin; o < out_end;) {
    const int64_t group = o / p.group_size;
    const int64_t rows = std::min({kRows, out_end - o, (group + 1) * p.group_size - o});
    const index_t* idx = p.idx + group * p.fan_in;
    const scalar_t* values = p.values + o * p.fan_in;  // row o of [groups * group_size, fan_in]
    acc sum[kRows][kWidth] = {};
    for (int64_t j = 0; j < p.fan_in; ++j) {
      const int64_t c = idx[j];
      if (uint64_t(c) >= limit) return false;
      const acc* column = xt + c * kWidth;
      for (int64_t r = 0; r < rows; ++r) {
        const acc w = to_float(values[r * p.fan_in + j]);
        for (int i = 0; i < kWidth; ++i) sum[r][i] += w * column[i];
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const acc bias = p.bias ? acc(to_float(p.bias[o + r])) : acc(0);
      for (int64_t i = 0; i < tile.rows; ++i) {
        p.y[(tile.batch_begin + i) * out_features + o + r] = from_acc<scalar_t>(sum[r][i] + bias);
      }
    }
    o += rows;
  }
  return true;
}

template <typename scalar_t, typename index_t>
bool grouped_tiled(const GroupedProblem<scalar_t, index_t>& p, const BatchTile& tile, int64_t out_begin,
                   int64_t out_end, acc_t<scalar_t>* scratch) {
  return with_tile_width(tile, [&](auto width) {
    return grouped_tiled_width<decltype(width)::value>(p, tile, out_begin, out_end, scratch);
  });
}

template <typename acc, typename index_t>
bool grad_values(const GradValuesProblem<acc, index_t>& p, int64_t out_begin, int64_t out_end) {
  const uint64_t limit = uint64_t(p.in_features);
  for (int64_t o = out_begin; o < out_end; ++o) {
    const acc* grad_y = p.grad_y_t + o * p.stride;
    for (int64_t j = 0; j < p.fan_in; ++j) {
      const int64_t c = p.idx[o * p.fan_in + j];
      if (uint64_t(c) >= limit) return false;
      const acc* x = p.x_t + c * p.stride;
      acc sum = 0;
      for (int64_t b = 0; b < p.length; ++b) sum += grad_y[b] * x[b];
      acc& out = p.grad[o * p.fan_in + j];
      out = p.accumulate ? out + sum : sum;
    }
  }
  return true;
}

template <typename scalar_t>
bool window(const WindowProblem<scalar_t>& p, int64_t block_begin, int64_t block_end) {
  using acc = acc_t<scalar_t>;
  const auto& layout = p.layout;
  const int64_t mask = layout.window - 1;  // any slot stays inside its window
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t first = layout.block_steps[b];
    const int64_t available = layout.block_steps[b + 1] - first;
    const int64_t o = b * kWindowLanes;
    const int64_t lanes = std::min(kWindowLanes, layout.out_features - o);
    for (int64_t row = 0; row < p.batch; ++row) {
      const scalar_t* values = layout.values + first * kWindowLanes;
      const uint8_t* slots = layout.slots + first * kWindowLanes;
      acc sum[kWindowLanes] = {};
      int64_t used = 0;
      for (int64_t w = 0; w < layout.windows; ++w) {
        const int64_t steps = layout.steps[b * layout.windows + w];
        if (steps < 0 || steps > available - used) return false;
        used += steps;
        const acc* x = p.x + row * p.x_row_stride + w * layout.window;
        for (int64_t s = 0; s < steps; ++s, values += kWindowLanes, slots += kWindowLanes) {
          for (int64_t l = 0; l < kWindowLanes; ++l) sum[l] += acc(to_float(values[l])) * x[slots[l] & mask];
        }
      }
      if (used != available) return false;
      for (int64_t l = 0; l < lanes; ++l) {
        const acc bias = p.bias ? acc(to_float(p.bias[o + l])) : acc(0);
        p.y[row * layout.out_features + o + l] = from_acc<scalar_t>(sum[l] + bias);
      }
    }
  }
  return true;
}

}  // namespace portable

#define CONDENSED_OPS_INSTANTIATE(scalar_t, index_t)                                                        \
  template bool portable::scalar<scalar_t, index_t>(const CondensedLinearProblem<scalar_t, index_t>&,       \
                                                    int64_t, int64_t);                                      \
  template bool portable::tiled<scalar_t, index_t>(const CondensedLinearProblem<scalar_t, index_t>&,        \
                                                   const BatchTile&, int64_t, int64_t, acc_t<scalar_t>*);   \
  template bool portable::grouped_tiled<scalar_t, index_t>(const GroupedProblem<scalar_t, index_t>&,        \
                                                           const BatchTile&, int64_t, int64_t, acc_t<scalar_t>*);
CONDENSED_OPS_FOR_EACH_TYPE_PAIR(CONDENSED_OPS_INSTANTIATE)
#undef CONDENSED_OPS_INSTANTIATE

#define CONDENSED_OPS_INSTANTIATE(scalar_t) \
  template bool portable::window<scalar_t>(const WindowProblem<scalar_t>&, int64_t, int64_t);
CONDENSED_OPS_FOR_EACH_VALUE_TYPE(CONDENSED_OPS_INSTANTIATE)
#undef CONDENSED_OPS_INSTANTIATE

template bool portable::grad_values<float, int16_t>(const GradValuesProblem<float, int16_t>&, int64_t, int64_t);
template bool portable::grad_values<float, int32_t>(const GradValuesProblem<float, int32_t>&, int64_t, int64_t);
template bool portable::grad_values<double, int16_t>(const GradValuesProblem<double, int16_t>&, int64_t, int64_t);
template bool portable::grad_values<double, int32_t>(const GradValuesProblem<double, int32_t>&, int64_t, int64_t);

template int64_t first_index_out_of_range<int16_t>(const int16_t*, int64_t, int64_t);
template int64_t first_index_out_of_range<int32_t>(const int32_t*, int64_t, int64_t);
template int64_t first_index_out_of_range<int64_t>(const int64_t*, int64_t, int64_t);

}  // namespace condensed_ops::kernels
