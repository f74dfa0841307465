// Torch-free CPU kernels for the condensed (constant fan-in) linear layer:
//
//   y[b, o] = bias[o] + sum_j values[o, j] * x[b, idx[o, j]]
//
// Two strategies, each in a portable and an AVX2+FMA flavour:
//  - gather:     for few batch rows. Streams values/idx once and gathers x.
//  - transposed: for many batch rows. Transposes a tile of batch rows so that
//                x[tile, c] is contiguous, then broadcasts each weight against
//                whole vectors of batch rows: no gathers, one FMA per load.
// Callers split the work (outputs, batch tiles) across threads; every kernel
// entry point handles one piece and touches nothing outside it.
#pragma once

#include <cstdint>

#include "numeric.h"

namespace condensed_ops::kernels {

template <typename scalar_t, typename index_t>
struct CondensedLinearProblem {
  const acc_t<scalar_t>* x;  // [batch, in_features] in the accumulator type, unit inner stride
  int64_t x_row_stride;
  const scalar_t* values;    // row o's weights: values[row_begin(o) .. row_end(o))
  const index_t* idx;        // their input columns, laid out like values
  const scalar_t* bias;      // [out_features], or nullptr
  scalar_t* y;               // [batch, out_features], contiguous
  int64_t batch;
  int64_t in_features;
  int64_t out_features;
  int64_t fan_in;            // constant fan-in: row o is [o * fan_in, (o + 1) * fan_in)
  // Variable-length rows instead (CSR, out_features + 1 entries), or nullptr.
  // The backward pass uses them to run grad_x = grad_y @ W as a forward pass
  // over the transposed layout, whose rows (input columns) differ in length.
  const int64_t* row_offsets = nullptr;

  int64_t row_begin(int64_t o) const { return row_offsets ? row_offsets[o] : o * fan_in; }
  int64_t row_end(int64_t o) const { return row_offsets ? row_offsets[o + 1] : (o + 1) * fan_in; }
  int64_t entries() const { return row_offsets ? row_offsets[out_features] : out_features * fan_in; }
};

// Batch rows per transposed tile and the scratch one tile needs (in elements
// of the accumulator type). Shared by both flavours so callers size one buffer.
constexpr int64_t kTransposedTileRows = 32;
inline int64_t transposed_scratch_size(int64_t in_features) {
  return in_features * kTransposedTileRows;
}

// Index validation. `gather` checks each index as it loads it (the check hides
// under the gathers, and a separate pass would cost ~10% at batch 1): it never
// reads outside x and returns false if any index was out of range. `transposed`
// reads idx once per batch tile and trusts it: callers must validate first with
// this pass. Returns the position of the first entry outside [0, limit), or -1.
template <typename index_t>
int64_t first_index_out_of_range(const index_t* idx, int64_t count, int64_t limit);

// ---- backward -----------------------------------------------------------
//
// grad_x = grad_y @ W runs the forward kernels over W's transposed layout:
// for each input column, the outputs that read it and their weights, in
// increasing output order, so every sum has one fixed order (deterministic,
// and no two threads ever write the same grad_x element).
// Built by a counting sort in two steps: column_offsets (in_features + 1
// entries) from a histogram, then each thread fills a range of columns
// (every thread reads all of idx but writes only its columns' entries).
template <typename index_t>
void transposed_column_offsets(const index_t* idx, int64_t entries, int64_t in_features, int64_t* column_offsets);

template <typename scalar_t, typename index_t, typename row_index_t>
void fill_transposed_columns(const scalar_t* values, const index_t* idx, int64_t out_features, int64_t fan_in,
                             const int64_t* column_offsets, int64_t column_begin, int64_t column_end,
                             row_index_t* rows, scalar_t* column_values);

// grad_values[o, j] = sum_b grad_y[b, o] * x[b, idx[o, j]], from the transposed
// (batch-contiguous) x_t [in_features, stride] and grad_y_t [out_features,
// stride]: one dot product of `length` contiguous elements per weight. Adds to
// grad when `accumulate`, so callers can walk the batch in cache-sized chunks.
// length must be a multiple of kGradValuesBatchMultiple (pad with zeros).
constexpr int64_t kGradValuesBatchMultiple = 16;
template <typename acc, typename index_t>
struct GradValuesProblem {
  const acc* x_t;
  const acc* grad_y_t;
  int64_t stride;
  int64_t length;
  const index_t* idx;  // [out_features, fan_in], every entry validated
  int64_t fan_in;
  acc* grad;           // [out_features, fan_in]
  bool accumulate;
};

namespace portable {
template <typename scalar_t, typename index_t>
bool gather(const CondensedLinearProblem<scalar_t, index_t>& p, int64_t out_begin, int64_t out_end);

template <typename scalar_t, typename index_t>
void transposed(const CondensedLinearProblem<scalar_t, index_t>& p, int64_t batch_begin,
                int64_t out_begin, int64_t out_end, acc_t<scalar_t>* scratch);

template <typename acc, typename index_t>
void grad_values(const GradValuesProblem<acc, index_t>& p, int64_t out_begin, int64_t out_end);
}  // namespace portable

// AVX2+FMA+F16C flavour for float, Half and BFloat16 values. Built only when
// CMake defines CONDENSED_OPS_WITH_AVX2 (x86-64), and called only when
// cpu_supports() says the running CPU has those extensions.
namespace avx2 {
bool cpu_supports();  // defined outside the -mavx2 file, so safe to call anywhere

template <typename scalar_t, typename index_t>
bool gather(const CondensedLinearProblem<scalar_t, index_t>& p, int64_t out_begin, int64_t out_end);

template <typename scalar_t, typename index_t>
void transposed(const CondensedLinearProblem<scalar_t, index_t>& p, int64_t batch_begin,
                int64_t out_begin, int64_t out_end, float* scratch);

template <typename index_t>
void grad_values(const GradValuesProblem<float, index_t>& p, int64_t out_begin, int64_t out_end);
}  // namespace avx2

// AVX-512F flavour of the transposed strategy and grad_values (same value types as avx2).
// Built when CMake defines CONDENSED_OPS_WITH_AVX512.
namespace avx512 {
bool cpu_supports();

template <typename scalar_t, typename index_t>
void transposed(const CondensedLinearProblem<scalar_t, index_t>& p, int64_t batch_begin,
                int64_t out_begin, int64_t out_end, float* scratch);

template <typename index_t>
void grad_values(const GradValuesProblem<float, index_t>& p, int64_t out_begin, int64_t out_end);
}  // namespace avx512

}  // namespace condensed_ops::kernels
