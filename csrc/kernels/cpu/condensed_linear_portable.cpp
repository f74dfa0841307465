// Portable kernels: plain C++ that builds on any compiler and architecture.
// They double as the reference structure for the SIMD flavours.
#include <algorithm>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

#include "condensed_linear.h"

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

template <typename scalar_t, typename index_t>
bool gather(const CondensedLinearProblem<scalar_t, index_t>& p, int64_t out_begin, int64_t out_end) {
  using acc = acc_t<scalar_t>;
  bool all_inside = true;
  for (int64_t o = out_begin; o < out_end; ++o) {
    const scalar_t* values = p.values + p.row_begin(o);
    const index_t* idx = p.idx + p.row_begin(o);
    const int64_t length = p.row_end(o) - p.row_begin(o);
    const acc bias = p.bias ? acc(to_float(p.bias[o])) : acc(0);
    for (int64_t b = 0; b < p.batch; ++b) {
      const acc* x = p.x + b * p.x_row_stride;
      acc sum = 0;
      for (int64_t j = 0; j < length; ++j) {
        const int64_t c = idx[j];
        if (c < 0 || c >= p.in_features) {
          all_inside = false;
          continue;
        }
        sum += acc(to_float(values[j])) * x[c];
      }
      p.y[b * p.out_features + o] = from_acc<scalar_t>(sum + bias);
    }
  }
  return all_inside;
}

template <typename scalar_t, typename index_t>
void transposed(const CondensedLinearProblem<scalar_t, index_t>& p, int64_t batch_begin,
                int64_t out_begin, int64_t out_end, acc_t<scalar_t>* scratch) {
  using acc = acc_t<scalar_t>;
  constexpr int64_t kRows = kTransposedTileRows;
  const int64_t rows = std::min(kRows, p.batch - batch_begin);
  // xt[c * kRows + r] = x[batch_begin + r, c]; padding rows are zero so the
  // inner loop always runs the full, vectorisable tile width.
  acc* xt = scratch;
  for (int64_t c = 0; c < p.in_features; ++c) {
    for (int64_t r = 0; r < kRows; ++r) {
      xt[c * kRows + r] = r < rows ? p.x[(batch_begin + r) * p.x_row_stride + c] : acc(0);
    }
  }
  for (int64_t o = out_begin; o < out_end; ++o) {
    const scalar_t* values = p.values + p.row_begin(o);
    const index_t* idx = p.idx + p.row_begin(o);
    const int64_t length = p.row_end(o) - p.row_begin(o);
    acc sum[kRows] = {};
    for (int64_t j = 0; j < length; ++j) {
      const acc w = to_float(values[j]);
      const acc* column = xt + int64_t(idx[j]) * kRows;
      for (int64_t r = 0; r < kRows; ++r) sum[r] += w * column[r];
    }
    const acc bias = p.bias ? acc(to_float(p.bias[o])) : acc(0);
    for (int64_t r = 0; r < rows; ++r) {
      p.y[(batch_begin + r) * p.out_features + o] = from_acc<scalar_t>(sum[r] + bias);
    }
  }
}

template <typename acc, typename index_t>
void grad_values(const GradValuesProblem<acc, index_t>& p, int64_t out_begin, int64_t out_end) {
  for (int64_t o = out_begin; o < out_end; ++o) {
    const acc* grad_y = p.grad_y_t + o * p.stride;
    for (int64_t j = 0; j < p.fan_in; ++j) {
      const acc* x = p.x_t + int64_t(p.idx[o * p.fan_in + j]) * p.stride;
      acc sum = 0;
      for (int64_t b = 0; b < p.length; ++b) sum += grad_y[b] * x[b];
      acc& out = p.grad[o * p.fan_in + j];
      out = p.accumulate ? out + sum : sum;
    }
  }
}

}  // namespace portable

// Asked once per process: CPUID traps to the hypervisor in a VM (~8 us a
// call measured here), which would dominate a small layer's call.
bool avx2::cpu_supports() {
#if defined(CONDENSED_OPS_WITH_AVX2)
  static const bool supported = [] {
    // Every AVX2 CPU has F16C in practice, but the fp16 loads rely on it, so ask.
    unsigned eax, ebx, ecx, edx;
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
    return f16c && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return supported;
#else
  return false;
#endif
}

bool avx512::cpu_supports() {
#if defined(CONDENSED_OPS_WITH_AVX512)
  static const bool supported = avx2::cpu_supports() && __builtin_cpu_supports("avx512f");
  return supported;
#else
  return false;
#endif
}


template <typename index_t>
void transposed_column_offsets(const index_t* idx, int64_t entries, int64_t in_features, int64_t* column_offsets) {
  std::fill(column_offsets, column_offsets + in_features + 1, 0);
  for (int64_t e = 0; e < entries; ++e) ++column_offsets[int64_t(idx[e]) + 1];
  for (int64_t c = 0; c < in_features; ++c) column_offsets[c + 1] += column_offsets[c];
}

template <typename scalar_t, typename index_t, typename row_index_t>
void fill_transposed_columns(const scalar_t* values, const index_t* idx, int64_t out_features, int64_t fan_in,
                             const int64_t* column_offsets, int64_t column_begin, int64_t column_end,
                             row_index_t* rows, scalar_t* column_values) {
  // Visiting entries in (o, j) order keeps each column's outputs ascending.
  std::vector<int64_t> cursor(column_offsets + column_begin, column_offsets + column_end);
  for (int64_t o = 0; o < out_features; ++o) {
    for (int64_t j = 0; j < fan_in; ++j) {
      const int64_t c = idx[o * fan_in + j];
      if (c < column_begin || c >= column_end) continue;
      const int64_t at = cursor[c - column_begin]++;
      rows[at] = row_index_t(o);
      column_values[at] = values[o * fan_in + j];
    }
  }
}

// Every (value type, index type) pair the glue dispatches to, listed once.
#define CONDENSED_OPS_FOR_EACH_TYPE_PAIR(X) \
  X(float, int16_t)                         \
  X(float, int32_t)                         \
  X(double, int16_t)                        \
  X(double, int32_t)                        \
  X(Half, int16_t)                          \
  X(Half, int32_t)                          \
  X(BFloat16, int16_t)                      \
  X(BFloat16, int32_t)

#define CONDENSED_OPS_INSTANTIATE(scalar_t, index_t)                                                      \
  template bool portable::gather<scalar_t, index_t>(const CondensedLinearProblem<scalar_t, index_t>&,     \
                                                    int64_t, int64_t);                                    \
  template void portable::transposed<scalar_t, index_t>(                                                  \
      const CondensedLinearProblem<scalar_t, index_t>&, int64_t, int64_t, int64_t, acc_t<scalar_t>*);    \
  template void fill_transposed_columns<scalar_t, index_t, int16_t>(const scalar_t*, const index_t*, int64_t, \
                                                                    int64_t, const int64_t*, int64_t, int64_t, \
                                                                    int16_t*, scalar_t*);                      \
  template void fill_transposed_columns<scalar_t, index_t, int32_t>(const scalar_t*, const index_t*, int64_t, \
                                                                    int64_t, const int64_t*, int64_t, int64_t, \
                                                                    int32_t*, scalar_t*);
CONDENSED_OPS_FOR_EACH_TYPE_PAIR(CONDENSED_OPS_INSTANTIATE)
#undef CONDENSED_OPS_INSTANTIATE
#undef CONDENSED_OPS_FOR_EACH_TYPE_PAIR

template void transposed_column_offsets<int16_t>(const int16_t*, int64_t, int64_t, int64_t*);
template void transposed_column_offsets<int32_t>(const int32_t*, int64_t, int64_t, int64_t*);

template void portable::grad_values<float, int16_t>(const GradValuesProblem<float, int16_t>&, int64_t, int64_t);
template void portable::grad_values<float, int32_t>(const GradValuesProblem<float, int32_t>&, int64_t, int64_t);
template void portable::grad_values<double, int16_t>(const GradValuesProblem<double, int16_t>&, int64_t, int64_t);
template void portable::grad_values<double, int32_t>(const GradValuesProblem<double, int32_t>&, int64_t, int64_t);

template int64_t first_index_out_of_range<int16_t>(const int16_t*, int64_t, int64_t);
template int64_t first_index_out_of_range<int32_t>(const int32_t*, int64_t, int64_t);
template int64_t first_index_out_of_range<int64_t>(const int64_t*, int64_t, int64_t);

}  // namespace condensed_ops::kernels
