// Torch-free CUDA kernels for the condensed (constant fan-in) linear layer:
//
//   y[b, o] = bias[o] + sum_j values[o, j] * x[b, idx[o, j]]
//
// Plain C++ (no CUDA syntax): the glue, built by the host compiler, includes it.
// Everything takes raw device pointers, sizes, row strides and a cudaStream_t;
// the caller allocates (through torch), picks the stream and checks errors.
// Value types: float, double, __half, __nv_bfloat16 (bit-compatible with
// c10::Half / c10::BFloat16); index types: int16_t, int32_t. Sums run in
// float32 (float64 for double).
//
// One kernel family serves every batch size. A block copies a slab of
// `batch_tile` rows of x into shared memory, transposed (x_tile[c][b]), then
// streams its share of the weights once per slab with 16-byte loads: each
// weight is broadcast against the slab's batch_tile contiguous x values, which
// one shared-memory load fetches. Small batches are one slab (weights read
// exactly once); large batches are many slabs spread over gridDim.y. When x
// rows are too long for shared memory, the same kernels gather x through L1.
//
// Index safety: every kernel compares each index with in_features before using
// it. An entry outside [0, in_features) is skipped (it adds nothing) and sets
// *bad_index_flag = 1, so no kernel ever reads outside x, whatever idx holds.
// Raising the error is the glue's job (see csrc/cuda/condensed_linear_cuda.cpp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace condensed_ops::kernels::cuda {

template <typename T> struct Accumulator { using type = float; };
template <> struct Accumulator<double> { using type = double; };
template <typename T> using acc_t = typename Accumulator<T>::type;

// What the planners need to know about a device (read once per device).
struct DeviceLimits {
  int multiprocessors = 1;
  int max_shared_bytes_per_block = 48 * 1024;  // the opt-in limit
  int max_shared_bytes_per_multiprocessor = 48 * 1024;
  int max_grid_y = 65535;  // more batch slabs than this: blocks stride over them
  int compute_capability = 0;  // 10 * major + minor (80, 90, ...); 0: unknown (no measured table applies)
};
cudaError_t query_device_limits(int device, DeviceLimits* limits);

// Where the kernels read x from: Auto lets the planner choose; the others
// force a path (tests and benchmarks).
enum class XAccess { Auto, Shared, Global };

// How one launch is shaped; made by a planner, consumed by its launcher.
struct LaunchPlan {
  int batch_tile = 1;          // batch rows per pass (1, 2, 4, 8, 16)
  bool shared_x = true;        // x slab staged in shared memory, else gathered through L1
  int lanes_per_row = 1;       // lanes that share one output row (1..32, a power of two)
  int packs_in_flight = 2;     // forward: 16-byte weight packs a lane loads before it gathers (2, or 4 at tiles <= 4)
  int splits = 1;              // forward: blocks that share one row's fan-in (grid.z); > 1 sums through `partial`
  int threads = 256;
  int64_t work_per_block = 1;  // forward: output rows; grad_values: weight entries
  unsigned grid_x = 1;         // blocks over rows / entries
  unsigned grid_y = 1;         // blocks over batch slabs
  size_t shared_bytes = 0;
};

// Forward plan choices forced instead of the planner's rule (0: the rule's).
// The kernel options cuda_lanes_per_row, cuda_packs_in_flight, cuda_splits
// and cuda_batch_tile set them; benchmarks/cuda_sweep.py times the combinations.
struct ForwardTuning {
  XAccess access = XAccess::Auto;
  int lanes_per_row = 0;    // 1, 2, 4, 8, 16 or 32
  int packs_in_flight = 0;  // 2 or 4 (4 runs at batch tiles <= 4; larger tiles keep 2)
  int splits = 0;           // 1, 2, 4 or 8
  int batch_tile = 0;       // 1..16 (capped by the value type's largest tile); staged in shared memory up to the
                            // device's opt-in limit, not the planner's budget, else x is read through L1
};

// ---- forward ---------------------------------------------------------------

template <typename scalar_t, typename index_t>
struct ForwardProblem {
  const scalar_t* x;       // [batch, in_features], unit inner stride
  int64_t x_row_stride;    // may be 0 (an expanded x)
  const scalar_t* values;  // row o's weights: values[row_begin(o) .. row_end(o)); 16-byte aligned base
  const index_t* idx;      // their input columns, laid out like values; 16-byte aligned base
  const scalar_t* bias;    // [out_features], or nullptr
  scalar_t* y;             // [batch, out_features] with row stride y_row_stride
  int64_t y_row_stride;
  int64_t batch;
  int64_t in_features;     // <= INT32_MAX
  int64_t out_features;
  int64_t fan_in;          // constant fan-in: row o is [o * fan_in, (o + 1) * fan_in)
  // Variable-length rows instead (CSR, out_features + 1 entries, on the
  // device), or nullptr: grad_x runs as a forward pass over W's column layout.
  const int64_t* row_offsets;
  int* bad_index_flag;     // set to 1 when an index is outside [0, in_features); may be nullptr
  // Scratch [plan.splits, batch, out_features] when plan.splits > 1 (each
  // split's sums, added in split order by a second kernel), else unused.
  acc_t<scalar_t>* partial = nullptr;
};

// A variant measured fastest on one architecture (benchmarks/cuda_sweep.py
// --emit-table writes these; tuned_forward.inc holds the committed ones).
struct TunedForward {
  int compute_capability;  // 80, 90, ...
  int value_bytes;         // sizeof the value type: 2, 4 or 8
  int64_t batch, in_features, out_features, fan_in;
  ForwardTuning choice;    // its access is always Auto
};

// The entry of `table` for the same architecture and value size whose batch,
// in_features, out_features and fan_in are each within a factor of 2 of the
// problem's, nearest in the sum of |log2 ratios|; nullptr when none is (the
// planner's rule decides then, as on every GPU the table does not name).
const TunedForward* nearest_tuned_forward(const TunedForward* table, size_t entries, int compute_capability,
                                          int value_bytes, int64_t batch, int64_t in_features, int64_t out_features,
                                          double fan_in);

// The committed measurements (tuned_forward.inc).
const TunedForward* tuned_forward_table(size_t* entries);

// mean_row_length: fan_in, or entries / out_features for CSR rows. With no
// choice forced (tuning all 0 and Auto) and `use_table`, a measured variant
// from tuned_forward_table() for a near problem on this architecture wins
// over the rule.
template <typename scalar_t>
LaunchPlan plan_forward(int64_t batch, int64_t in_features, int64_t out_features, double mean_row_length,
                        const DeviceLimits& limits, const ForwardTuning& tuning = {}, bool use_table = true);

// Elements of the `partial` buffer the plan needs (0 when plan.splits == 1).
int64_t forward_partial_elements(const LaunchPlan& plan, int64_t batch, int64_t out_features);

// Writes every y[b, o] with b < batch, o < out_features. Returns the first CUDA error.
template <typename scalar_t, typename index_t>
cudaError_t launch_forward(const ForwardProblem<scalar_t, index_t>& p, const LaunchPlan& plan, cudaStream_t stream);

// ---- grad_values -----------------------------------------------------------
//
// grad_values[o, j] = sum_b grad_y[b, o] * x[b, idx[o, j]]: the same slab
// staging, with one dot product per weight accumulated in shared memory over
// the slabs a block owns. When the plan spreads slabs over gridDim.y > 1, each
// y-block writes float partial sums [grid_y, entries] and a second kernel adds
// them in a fixed order: deterministic, no atomics.

template <typename scalar_t, typename index_t>
struct GradValuesProblem {
  const scalar_t* grad_y;  // [batch, out_features], unit inner stride
  int64_t grad_y_row_stride;
  const scalar_t* x;       // [batch, in_features], unit inner stride
  int64_t x_row_stride;
  const index_t* idx;      // [out_features, fan_in], contiguous, 16-byte aligned
  scalar_t* grad;          // [out_features, fan_in], contiguous
  acc_t<scalar_t>* partial;  // [plan.grid_y, out_features * fan_in] when plan.grid_y > 1, else unused
  int64_t batch;
  int64_t in_features;
  int64_t out_features;
  int64_t fan_in;
  int* bad_index_flag;
};

template <typename scalar_t>
LaunchPlan plan_grad_values(int64_t batch, int64_t in_features, int64_t out_features, int64_t fan_in,
                            const DeviceLimits& limits, XAccess access);

// Elements of the `partial` buffer the plan needs (0 when grid_y == 1).
int64_t grad_values_partial_elements(const LaunchPlan& plan, int64_t entries);

template <typename scalar_t, typename index_t>
cudaError_t launch_grad_values(const GradValuesProblem<scalar_t, index_t>& p, const LaunchPlan& plan,
                               cudaStream_t stream);

// ---- grad_x = grad_y @ W -----------------------------------------------------
//
// Deterministic path: W's column (CSC) layout, built on the device by a
// stable radix sort of the entries by column (so each column lists its
// outputs in increasing order), then launch_forward over it with
// row_offsets = column_offsets and idx = rows. Every grad_x element is one
// fixed-order sum written by one lane: no atomics, bitwise reproducible.

template <typename index_t>
struct ColumnLayoutProblem {
  const index_t* idx;  // [out_features, fan_in], contiguous
  int64_t out_features;
  int64_t fan_in;
  int64_t in_features;
  // Scratch: two key and two position buffers of `entries` elements each, and
  // the sort's own scratch (column_layout_sort_bytes).
  uint32_t* keys[2];
  int32_t* positions[2];
  void* sort_scratch;
  size_t sort_scratch_bytes;
  // Result, a function of idx alone (the glue caches it per idx version):
  // column c's entries are [column_offsets[c], column_offsets[c + 1]) of rows
  // and sources; sources[p] is entry p's position in values, for every
  // p < entries (the weights in column order are values[sources]); entries
  // with a bad index come after column_offsets[in_features].
  int64_t* column_offsets;  // [in_features + 1]
  int32_t* rows;            // [entries]
  int32_t* sources;         // [entries]
  int* bad_index_flag;
};

// entries = out_features * fan_in must be < 2^31 (positions are int32).
cudaError_t column_layout_sort_bytes(int64_t entries, int64_t in_features, size_t* bytes);

template <typename index_t>
cudaError_t build_column_layout(const ColumnLayoutProblem<index_t>& p, cudaStream_t stream);

// Fast path for small batches when determinism is not required: one atomic
// add per (entry, batch row) into a zeroed accumulator grad_x_acc [batch, in_features].
template <typename scalar_t, typename index_t>
struct ScatterGradInputProblem {
  const scalar_t* grad_y;  // [batch, out_features], unit inner stride
  int64_t grad_y_row_stride;
  const scalar_t* values;  // [out_features, fan_in], contiguous
  const index_t* idx;      // [out_features, fan_in], contiguous
  acc_t<scalar_t>* grad_x_acc;  // [batch, in_features], contiguous, zeroed by the caller
  int64_t batch;
  int64_t in_features;
  int64_t out_features;
  int64_t fan_in;
  int* bad_index_flag;
};

template <typename scalar_t, typename index_t>
cudaError_t launch_grad_input_scatter(const ScatterGradInputProblem<scalar_t, index_t>& p, const DeviceLimits& limits,
                                      cudaStream_t stream);

// ---- grouped constant fan-in: tensor-core forward ----------------------------
//
// Groups of group_size consecutive outputs share one set of fan_in columns:
//   y[b, G * g + r] = bias[G * g + r] + sum_j values[G, r, j] * x[b, idx[G, j]]
// Per group this is a dense [g, fan_in] x [fan_in, batch] product over the
// gathered columns, which runs on the tensor cores (mma.sync m16n8k16, fp32
// accumulation): a block gathers the group's columns of x for a batch tile
// into shared memory (cp.async, several stages deep) and multiplies them with
// the group's weights, staged once per block.
//
// x comes transposed (x_t[c, b] = x[b, c]): one gathered column is then one
// contiguous run of batch values, copied 16 bytes at a time. (Gathering the
// column from x's rows would touch one 32-byte sector per 2-byte value.)

template <typename scalar_t, typename index_t>
struct GroupedForwardProblem {
  // x transposed, [in_features, x_t_row_stride]: x_t[c * x_t_row_stride + b] = x[b, c].
  // 16-byte aligned base; x_t_row_stride a multiple of 8 elements and
  // >= round_up(batch, 8). Entries [batch, round_up(batch, 8)) of a row are
  // read too (16-byte copies); they only reach outputs that are not written.
  const scalar_t* x_t;
  int64_t x_t_row_stride;
  const scalar_t* values;  // [groups, group_size, fan_in], contiguous, 16-byte aligned base
  const index_t* idx;      // [groups, fan_in], contiguous
  const scalar_t* bias;    // [groups * group_size], or nullptr
  scalar_t* y;             // [batch, groups * group_size] with row stride y_row_stride
  int64_t y_row_stride;
  int64_t batch;
  int64_t in_features;     // <= INT32_MAX
  int64_t groups;
  int64_t group_size;
  int64_t fan_in;
  int* bad_index_flag;     // set to 1 when an index is outside [0, in_features); may be nullptr
};

// Whether launch_grouped_forward takes this problem: __half / __nv_bfloat16
// values (false for float and double), group_size a multiple of 8 up to 64,
// and the group's weights plus the pipeline fitting the device's shared memory.
template <typename scalar_t>
bool grouped_forward_supported(int64_t batch, int64_t in_features, int64_t group_size, int64_t fan_in,
                               const DeviceLimits& limits);

// Writes every y[b, o] with b < batch, o < groups * group_size; returns
// cudaErrorInvalidValue for a problem grouped_forward_supported refuses.
template <typename scalar_t, typename index_t>
cudaError_t launch_grouped_forward(const GroupedForwardProblem<scalar_t, index_t>& p, const DeviceLimits& limits,
                                   cudaStream_t stream);

}  // namespace condensed_ops::kernels::cuda
