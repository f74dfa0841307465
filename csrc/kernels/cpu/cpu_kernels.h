// Torch-free CPU kernels for the condensed (constant fan-in) linear layer:
//
//   y[b, o] = bias[o] + sum_j values[o, j] * x[b, idx[o, j]]
//
// Over the row layout (values, idx), three strategies:
//  - gather: SIMD hardware gathers of x, a few batch rows at a time. Fast
//    where gathers are (e.g. Zen 5, Sapphire Rapids); slow where the Gather
//    Data Sampling mitigation or microcode makes them (Skylake-SP .. Ice Lake).
//  - scalar: the same walk with scalar loads of x: never depends on gathers.
//  - tiled: for many batch rows. Copies a tile of batch rows transposed
//    (xt[c][r], contiguous in r) and broadcasts each weight against whole
//    vectors of the tile's rows: no gathers, one FMA per load.
// Over the window layout (window_layout.h, built once per weight):
//  - window: rows interleaved one per SIMD lane, x read through small windows
//    of columns (permutes of registers with AVX-512, scalar loads otherwise).
//
// Index safety: every kernel compares each index it reads with in_features
// before use and stops at a bad one, returning false (its outputs are then
// incomplete), so no kernel reads outside x whatever idx holds. The glue
// validates idx up front (once per tensor version) and turns a kernel's false
// into an IndexError.
//
// Callers split the work (outputs, batch tiles, row blocks) across threads;
// every kernel handles one piece and touches nothing outside it.
#pragma once

#include <cstdint>
#include <type_traits>

#include "numeric.h"
#include "window_layout.h"

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
  // grad_x = grad_y @ W runs as a forward pass over W's column layout, whose
  // rows (W's input columns) differ in length.
  const int64_t* row_offsets = nullptr;

  int64_t row_begin(int64_t o) const { return row_offsets ? row_offsets[o] : o * fan_in; }
  int64_t row_end(int64_t o) const { return row_offsets ? row_offsets[o + 1] : (o + 1) * fan_in; }
  int64_t entries() const { return row_offsets ? row_offsets[out_features] : out_features * fan_in; }
};

// The grouped layout: every group_size consecutive outputs share one group's
// fan_in columns, so each x column a tile loads serves group_size outputs.
template <typename scalar_t, typename index_t>
struct GroupedProblem {
  const acc_t<scalar_t>* x;  // [batch, in_features] in the accumulator type, unit inner stride
  int64_t x_row_stride;
  const scalar_t* values;    // [groups, group_size, fan_in]
  const index_t* idx;        // [groups, fan_in]
  const scalar_t* bias;      // [out_features], or nullptr
  scalar_t* y;               // [batch, out_features], contiguous
  int64_t batch;
  int64_t in_features;
  int64_t groups;
  int64_t group_size;
  int64_t fan_in;

  int64_t out_features() const { return groups * group_size; }
};

// ---- tiled: tiles of 8, 16 or 32 batch rows ------------------------------------

// A tile is `rows` batch rows from `batch_begin`, computed `tile_rows` wide
// (the rows past `rows` are zero padding): the narrowest supported width that
// holds the rows, so a batch of 5 pays for 8 rows, not 32.
constexpr int64_t kMaxTileRows = 32;
constexpr int64_t kTileWidths[] = {8, 16, 32};
inline int64_t tile_rows_for(int64_t rows) { return rows <= 8 ? 8 : rows <= 16 ? 16 : 32; }
struct BatchTile {
  int64_t batch_begin;
  int64_t rows;
  int64_t tile_rows;
};
// Scratch one tile needs, in elements of the accumulator type.
inline int64_t tile_scratch_size(int64_t in_features) { return in_features * kMaxTileRows; }

// ---- index checks ----------------------------------------------------------------

// The position of the first entry outside [0, limit), or -1. A min/max
// reduction first (vectorises), the search only when something is wrong.
template <typename index_t>
int64_t first_index_out_of_range(const index_t* idx, int64_t count, int64_t limit);

// ---- W's column layout (CSC), for grad_x -----------------------------------------
//
// For each input column, the outputs that read it in increasing output order,
// so every grad_x sum has one fixed order (deterministic, and no two threads
// write the same grad_x element). Built by a counting sort: column_offsets
// (in_features + 1 entries) from a histogram, then each thread fills a range
// of columns (reads all of idx, writes only its columns' entries). `sources`
// gives each entry's position in values, so a cached layout serves new values.
// Both return false (and leave the layout incomplete) if an index lies
// outside [0, in_features).
template <typename index_t>
bool column_offsets(const index_t* idx, int64_t entries, int64_t in_features, int64_t* offsets);

template <typename index_t, typename row_index_t>
bool fill_columns(const index_t* idx, int64_t out_features, int64_t fan_in, int64_t in_features,
                  const int64_t* offsets, int64_t column_begin, int64_t column_end, row_index_t* rows,
                  int32_t* sources);

// column_values[e] = values[sources[e]] for e in [begin, end).
template <typename scalar_t>
void gather_column_values(const scalar_t* values, const int32_t* sources, int64_t begin, int64_t end,
                          scalar_t* column_values);

// ---- grad_values ------------------------------------------------------------------
//
// grad_values[o, j] = sum_b grad_y[b, o] * x[b, idx[o, j]], from batch-contiguous
// copies x_t [in_features, stride] and grad_y_t [out_features, stride]: one dot
// product of `length` contiguous elements per weight. Adds to grad when
// `accumulate`, so callers can walk the batch in cache-sized chunks. length must
// be a multiple of kGradValuesBatchMultiple (pad with zeros). A bad index
// stops it (false).
constexpr int64_t kGradValuesBatchMultiple = 16;
template <typename acc, typename index_t>
struct GradValuesProblem {
  const acc* x_t;
  const acc* grad_y_t;
  int64_t stride;
  int64_t length;
  const index_t* idx;  // [out_features, fan_in]
  int64_t in_features;
  int64_t fan_in;
  acc* grad;           // [out_features, fan_in]
  bool accumulate;
};

// ---- the window layout's kernels ------------------------------------------------

template <typename scalar_t>
struct WindowProblem {
  const acc_t<scalar_t>* x;  // [batch, x_row_stride]: x scattered into windows (window_layout.h)
  int64_t x_row_stride;      // >= layout.windows * layout.window
  WindowLayoutView<scalar_t> layout;
  const scalar_t* bias;      // [out_features], or nullptr
  scalar_t* y;               // [batch, out_features], contiguous
  int64_t batch;
  // AVX2 flavour: x's window values by hardware gathers (where this CPU's
  // calibration found gathers faster than scalar loads), else 16 scalar loads.
  bool gather_x = false;
};

// ---- batch rows in groups ------------------------------------------------------------

// Calls rows(std::integral_constant<int, n>{}, first_row) over the batch in
// groups of n = 4 rows (then 3, 2 or 1), so kernels can keep n rows' sums in
// registers with n known at compile time. Stops at the first false.
template <class Rows>
inline bool for_row_groups(int64_t batch, Rows&& rows) {
  int64_t row = 0;
  for (; row + 4 <= batch; row += 4) {
    if (!rows(std::integral_constant<int, 4>{}, row)) return false;
  }
  switch (batch - row) {
    case 3: return rows(std::integral_constant<int, 3>{}, row);
    case 2: return rows(std::integral_constant<int, 2>{}, row);
    case 1: return rows(std::integral_constant<int, 1>{}, row);
    default: return true;
  }
}

// The window kernels' walk: for_row_groups over the batch for every block in
// [block_begin, block_end); rows(n, block, first_row) as above.
template <class Rows>
inline bool for_blocks_and_row_groups(int64_t block_begin, int64_t block_end, int64_t batch, Rows&& rows) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    if (!for_row_groups(batch, [&](auto n, int64_t row0) { return rows(n, b, row0); })) return false;
  }
  return true;
}

// ---- the grouped layout's backward (float32) ---------------------------------------
//
// From batch-contiguous copies, like grad_values: grad_y_t [groups * group_size,
// stride], x_t and grad_x_t [in_features, stride]; length and the batch ranges
// are multiples of kGradValuesBatchMultiple (zero padding).
//   grad_values[G, r, j] = sum_b grad_y_t[G * group_size + r, b] * x_t[idx[G, j], b]
//   grad_x_t[idx[G, j], b] += sum_r values[G, r, j] * grad_y_t[G * group_size + r, b]
// A bad index stops either (false). grad_values' problem, with idx [groups,
// fan_in] and grad [groups, group_size, fan_in]:
template <typename index_t>
struct GroupedGradValuesProblem : GradValuesProblem<float, index_t> {
  int64_t group_size;
};

template <typename index_t>
struct GroupedGradInputProblem {
  const float* grad_y_t;
  int64_t stride;
  const float* values;  // [groups, group_size, fan_in]
  const index_t* idx;   // [groups, fan_in]
  int64_t in_features;
  int64_t groups;
  int64_t group_size;
  int64_t fan_in;
  float* grad_x_t;      // added to
};

// ---- flavours ---------------------------------------------------------------------

namespace portable {
template <typename scalar_t, typename index_t>
bool scalar(const CondensedLinearProblem<scalar_t, index_t>& p, int64_t out_begin, int64_t out_end);

template <typename scalar_t, typename index_t>
bool tiled(const CondensedLinearProblem<scalar_t, index_t>& p, const BatchTile& tile, int64_t out_begin,
           int64_t out_end, acc_t<scalar_t>* scratch);

template <typename acc, typename index_t>
bool grad_values(const GradValuesProblem<acc, index_t>& p, int64_t out_begin, int64_t out_end);

// The tiled strategy over the grouped layout: outputs [out_begin, out_end) of one tile.
template <typename scalar_t, typename index_t>
bool grouped_tiled(const GroupedProblem<scalar_t, index_t>& p, const BatchTile& tile, int64_t out_begin,
                   int64_t out_end, acc_t<scalar_t>* scratch);

// Any window width; false if the layout's step counts are inconsistent.
template <typename scalar_t>
bool window(const WindowProblem<scalar_t>& p, int64_t block_begin, int64_t block_end);
}  // namespace portable

// AVX2+FMA+F16C flavour for float, Half and BFloat16 values. Built only when
// CMake defines CONDENSED_OPS_WITH_AVX2 (x86-64), and called only when
// cpu_supports() says the running CPU has those extensions.
namespace avx2 {
bool cpu_supports();  // defined outside the -mavx2 file, so safe to call anywhere

template <typename scalar_t, typename index_t>
bool gather(const CondensedLinearProblem<scalar_t, index_t>& p, int64_t out_begin, int64_t out_end);

// The portable scalar strategy with F16C widening and FMA.
template <typename scalar_t, typename index_t>
bool scalar(const CondensedLinearProblem<scalar_t, index_t>& p, int64_t out_begin, int64_t out_end);

template <typename scalar_t, typename index_t>
bool tiled(const CondensedLinearProblem<scalar_t, index_t>& p, const BatchTile& tile, int64_t out_begin,
           int64_t out_end, float* scratch);

template <typename index_t>
bool grad_values(const GradValuesProblem<float, index_t>& p, int64_t out_begin, int64_t out_end);

template <typename scalar_t, typename index_t>
bool grouped_tiled(const GroupedProblem<scalar_t, index_t>& p, const BatchTile& tile, int64_t out_begin,
                   int64_t out_end, float* scratch);

template <typename index_t>
bool grouped_grad_values(const GroupedGradValuesProblem<index_t>& p, int64_t group_begin, int64_t group_end);

template <typename index_t>
bool grouped_grad_input(const GroupedGradInputProblem<index_t>& p, int64_t batch_begin, int64_t batch_end);

// Any window width, x by scalar loads.
template <typename scalar_t>
bool window(const WindowProblem<scalar_t>& p, int64_t block_begin, int64_t block_end);

// dst[c * dst_stride + r] = src[r * src_stride + c] for rows [row_begin,
// row_end) of src and all `columns`: 8x8 register transposes, 16 source rows
// at a time so each destination row gets whole 64-byte lines. Threads take
// disjoint row ranges.
void transpose(const float* src, int64_t src_stride, int64_t columns, int64_t row_begin, int64_t row_end, float* dst,
               int64_t dst_stride);
}  // namespace avx2

// AVX-512F flavour of tiled, grouped_tiled, grad_values, the grouped backward and window (permutes need a window of
// kPermuteWindow columns). Built when CMake defines CONDENSED_OPS_WITH_AVX512.
namespace avx512 {
bool cpu_supports();

template <typename scalar_t, typename index_t>
bool tiled(const CondensedLinearProblem<scalar_t, index_t>& p, const BatchTile& tile, int64_t out_begin,
           int64_t out_end, float* scratch);

template <typename scalar_t, typename index_t>
bool grouped_tiled(const GroupedProblem<scalar_t, index_t>& p, const BatchTile& tile, int64_t out_begin,
                   int64_t out_end, float* scratch);

template <typename index_t>
bool grad_values(const GradValuesProblem<float, index_t>& p, int64_t out_begin, int64_t out_end);

template <typename index_t>
bool grouped_grad_values(const GroupedGradValuesProblem<index_t>& p, int64_t group_begin, int64_t group_end);

template <typename index_t>
bool grouped_grad_input(const GroupedGradInputProblem<index_t>& p, int64_t batch_begin, int64_t batch_end);

template <typename scalar_t>
bool window(const WindowProblem<scalar_t>& p, int64_t block_begin, int64_t block_end);
}  // namespace avx512

}  // namespace condensed_ops::kernels
