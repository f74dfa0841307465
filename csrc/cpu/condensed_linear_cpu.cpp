// CPU glue: checks, index validation, layouts and their caches, thread split,
// kernel choice. The kernels (torch-free) live in csrc/kernels/cpu.
//
// Every op validates idx through prepare_indices (the rule is device-agnostic:
// index_validation.h). The kernels still check every index they read; a
// kernel that met a bad one makes the op rescan and raise the IndexError
// naming it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <mutex>
#include <set>
#include <type_traits>
#include <vector>

#include "../glue_common.h"
#include "../grouped.h"
#include "../index_validation.h"
#include "../kernels/cpu/cpu_kernels.h"
#include "../op_checks.h"
#include "../tensor_cache.h"
#include "cpu_glue.h"
#include "kernel_choice.h"

namespace condensed_ops::cpu {
namespace {

namespace k = kernels;

using Kernel = KernelTypes<k::Half, k::BFloat16>;

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// t [..., features] as [rows, features] in the accumulator type with unit inner
// stride: 16-bit inputs are widened once per call, not once per element read.
at::Tensor rows_in_acc_type(const at::Tensor& t, int64_t rows, int64_t features) {
  at::Tensor t_2d = t.reshape({rows, features});
  const auto acc = acc_dtype(t.scalar_type());
  if (t_2d.scalar_type() != acc || t_2d.stride(1) != 1) t_2d = t_2d.to(acc).contiguous();
  return t_2d;
}

// Splits [0, n) for at::parallel_for with about `work_per_item` multiply-adds
// per item: ~32k per task keeps the fork/join cost small at batch 1.
int64_t grain_for(int64_t work_per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item)); }

// at::parallel_for over [begin, end) where each chunk returns whether its
// kernel read only valid indices (or layout data); true if every chunk did.
template <typename Chunk>
bool parallel_all(int64_t begin, int64_t end, int64_t grain, const Chunk& chunk) {
  std::atomic<bool> all{true};
  at::parallel_for(begin, end, grain, [&](int64_t chunk_begin, int64_t chunk_end) {
    if (!chunk(chunk_begin, chunk_end)) all = false;
  });
  return all;
}

// ---- indices -------------------------------------------------------------------

// The CPU scan behind validate_indices (index_validation.h).
bool all_indices_inside(const at::Tensor& idx, int64_t in_features) {
  const at::Tensor contiguous = idx.contiguous();
  const int64_t n = contiguous.numel();
  switch (contiguous.scalar_type()) {
    case at::kShort: return k::first_index_out_of_range(contiguous.data_ptr<int16_t>(), n, in_features) < 0;
    case at::kInt: return k::first_index_out_of_range(contiguous.data_ptr<int32_t>(), n, in_features) < 0;
    default: return k::first_index_out_of_range(contiguous.data_ptr<int64_t>(), n, in_features) < 0;
  }
}

// idx validated, as the kernels' contiguous int16/int32 indices.
at::Tensor prepare_indices(const at::Tensor& idx, int64_t in_features, WidthSource width = WidthSource::OfX) {
  validate_indices(idx, in_features, width, all_indices_inside);
  return narrow_indices(idx, in_features);
}

// ---- the row layout's kernels -----------------------------------------------------

// Gather or scalar over all batch rows, threads splitting the outputs.
template <typename scalar_t, typename index_t>
bool run_row_walk(const k::CondensedLinearProblem<scalar_t, index_t>& p, Strategy strategy, Isa isa) {
  // Gather and scalar have AVX2 flavours only; double has the portable ones.
  // One decision, both reported and run.
  const Isa flavour = std::is_same_v<scalar_t, double> || isa == Isa::Portable ? Isa::Portable : Isa::Avx2;
  const bool gather = flavour == Isa::Avx2 && strategy == Strategy::Gather;
  note_kernel_run(flavour, gather ? "gather" : "scalar");
  const int64_t mean_row_length = p.entries() / std::max<int64_t>(1, p.out_features);
  return parallel_all(0, p.out_features, grain_for(mean_row_length * p.batch), [&](int64_t begin, int64_t end) {
    if constexpr (!std::is_same_v<scalar_t, double>) {
#if defined(CONDENSED_OPS_WITH_AVX2)
      if (flavour == Isa::Avx2) return gather ? k::avx2::gather(p, begin, end) : k::avx2::scalar(p, begin, end);
#endif
    }
    return k::portable::scalar(p, begin, end);
  });
}

// The batch in tiles of 32 rows, the last one 8, 16 or 32 wide.
std::vector<k::BatchTile> batch_tiles(int64_t batch) {
  std::vector<k::BatchTile> tiles;
  for (int64_t row = 0; row < batch; row += k::kMaxTileRows) {
    const int64_t rows = std::min(k::kMaxTileRows, batch - row);
    tiles.push_back(k::BatchTile{row, rows, k::tile_rows_for(rows)});
  }
  return tiles;
}

// One tile's outputs [out_begin, out_end) on the widest kernel `isa` allows.
template <typename scalar_t, typename index_t>
bool run_tile(const k::CondensedLinearProblem<scalar_t, index_t>& p, const k::BatchTile& tile, int64_t out_begin,
              int64_t out_end, k::acc_t<scalar_t>* scratch, Isa isa) {
  if constexpr (!std::is_same_v<scalar_t, double>) {
#if defined(CONDENSED_OPS_WITH_AVX2)
#if defined(CONDENSED_OPS_WITH_AVX512)
    if (isa == Isa::Avx512) return k::avx512::tiled(p, tile, out_begin, out_end, scratch);
#endif
    if (isa == Isa::Avx2) return k::avx2::tiled(p, tile, out_begin, out_end, scratch);
#endif
  }
  return k::portable::tiled(p, tile, out_begin, out_end, scratch);
}

// The same over the grouped layout.
template <typename scalar_t, typename index_t>
bool run_tile(const k::GroupedProblem<scalar_t, index_t>& p, const k::BatchTile& tile, int64_t out_begin,
              int64_t out_end, k::acc_t<scalar_t>* scratch, Isa isa) {
  if constexpr (!std::is_same_v<scalar_t, double>) {
#if defined(CONDENSED_OPS_WITH_AVX2)
#if defined(CONDENSED_OPS_WITH_AVX512)
    if (isa == Isa::Avx512) return k::avx512::grouped_tiled(p, tile, out_begin, out_end, scratch);
#endif
    if (isa == Isa::Avx2) return k::avx2::grouped_tiled(p, tile, out_begin, out_end, scratch);
#endif
  }
  return k::portable::grouped_tiled(p, tile, out_begin, out_end, scratch);
}

// The bytes of a problem's weights (values and indices).
template <typename scalar_t, typename index_t>
int64_t weight_bytes(const k::CondensedLinearProblem<scalar_t, index_t>& p) {
  return p.entries() * int64_t(sizeof(scalar_t) + sizeof(index_t));
}
template <typename scalar_t, typename index_t>
int64_t weight_bytes(const k::GroupedProblem<scalar_t, index_t>& p) {
  return p.groups * p.fan_in * (p.group_size * int64_t(sizeof(scalar_t)) + int64_t(sizeof(index_t)));
}

// Either layout's problem (its batch, in_features and out_features), tiled.
template <class Problem>
bool run_tiled(const Problem& p, int64_t out_features, Isa isa, const char* kernel) {
  using acc = std::remove_const_t<std::remove_pointer_t<decltype(p.x)>>;
  note_kernel_run(std::is_same_v<acc, double> ? Isa::Portable : isa, kernel);
  constexpr int64_t kBlock = 8;  // keep chunk edges on the kernels' output groups
  const std::vector<k::BatchTile> tiles = batch_tiles(p.batch);
  const int64_t n_tiles = int64_t(tiles.size());
  // The outputs are cut into slices of about kChunkBytes of weights (at least
  // one per thread), and a thread walks all tiles over one slice before the
  // next: the slice stays in its core's L2 across tiles, where one slice per
  // thread made large layers stream all their weights from memory once per
  // tile (4096 -> 14336 at batch 256, 1 thread, Zen 4: the row layout 1.13x
  // faster under AVX-512, grouped g = 8 1.4x under AVX2). Each task re-transposes its tile,
  // which costs in_features * tile rows, not out * fan_in.
  constexpr int64_t kChunkBytes = int64_t(2) << 20;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t weights = weight_bytes(p);
  const int64_t slices = std::max<int64_t>(1, (weights + kChunkBytes - 1) / kChunkBytes);
  const int64_t out_chunks = std::clamp<int64_t>((slices + threads - 1) / threads * threads, 1,
                                                 std::max<int64_t>(1, out_features / 64));
  const int64_t chunk_outputs = ((out_features + out_chunks - 1) / out_chunks + kBlock - 1) / kBlock * kBlock;
  return parallel_all(0, n_tiles * out_chunks, 1, [&](int64_t begin, int64_t end) {
    // 64-byte aligned (torch's CPU allocator): a tile column is one cache
    // line, and a malloc'd buffer (16-byte aligned) splits every zmm load in two.
    const at::Tensor scratch_tensor = at::empty({k::tile_scratch_size(p.in_features)},
                                                at::TensorOptions().dtype(c10::CppTypeToScalarType<acc>::value));
    acc* scratch = scratch_tensor.data_ptr<acc>();
    bool ok = true;
    for (int64_t task = begin; task < end; ++task) {
      const k::BatchTile& tile = tiles[task % n_tiles];  // chunk-major: a thread keeps its slice
      const int64_t out_begin = std::min(out_features, (task / n_tiles) * chunk_outputs);
      const int64_t out_end = std::min(out_features, out_begin + chunk_outputs);
      if (out_begin == out_end) continue;
      ok &= run_tile(p, tile, out_begin, out_end, scratch, isa);
    }
    return ok;
  });
}

// Runs the row layout's kernel for the batch; false if one met a bad index.
template <typename scalar_t, typename index_t>
bool run_rows(const k::CondensedLinearProblem<scalar_t, index_t>& p) {
  const Isa isa = active_isa();
  const Strategy strategy = row_strategy(p.batch, isa);
  return strategy == Strategy::Tiled ? run_tiled(p, p.out_features, isa, "tiled") : run_row_walk(p, strategy, isa);
}

// ---- W's column layout, cached per idx version -------------------------------------

struct ColumnLayout {
  at::Tensor offsets;  // int64 [in_features + 1]
  at::Tensor rows;     // int16/int32 [entries]: the output of each entry, by column
  at::Tensor sources;  // int32 [entries]: each entry's position in values
};

TensorCache<ColumnLayout>& column_layouts() {
  static TensorCache<ColumnLayout> cache("cpu column layouts");
  return cache;
}

// `idx` is the op's argument (the cache key), `idx_k` its kernel indices.
ColumnLayout column_layout(const at::Tensor& idx, const at::Tensor& idx_k, int64_t in_features) {
  if (auto cached = column_layouts().find({&idx}, in_features)) return *cached;
  const int64_t out_features = idx.size(0);
  const int64_t fan_in = idx.size(1);
  const int64_t entries = out_features * fan_in;
  TORCH_CHECK_VALUE(entries <= std::numeric_limits<int32_t>::max(),
                    "condensed_linear: the CPU grad_x handles fewer than 2^31 weights, got ", entries);
  ColumnLayout layout{at::empty({in_features + 1}, at::kLong),
                      at::empty({entries}, out_features <= INT16_MAX + 1 ? at::kShort : at::kInt),
                      at::empty({entries}, at::kInt)};
  bool inside = true;
  with_index_type(idx_k, [&](auto index_tag) {
    with_index_type(layout.rows, [&](auto row_tag) {
      using index_t = decltype(index_tag);
      using row_index_t = decltype(row_tag);
      const index_t* columns = idx_k.data_ptr<index_t>();
      inside = k::column_offsets(columns, entries, in_features, layout.offsets.data_ptr<int64_t>());
      if (!inside) return;
      inside = parallel_all(0, in_features, /*grain=*/64, [&](int64_t begin, int64_t end) {
        return k::fill_columns(columns, out_features, fan_in, in_features, layout.offsets.data_ptr<int64_t>(), begin,
                               end, layout.rows.data_ptr<row_index_t>(), layout.sources.data_ptr<int32_t>());
      });
    });
  });
  if (!inside) raise_index_error(idx, in_features, WidthSource::Argument);
  column_layouts().insert({&idx}, in_features, layout);
  return layout;
}

// ---- the window layout, cached per (values, idx) version ------------------------------

// Keyed by (values, idx, active_rows) and (in_features, out_features, window).
TensorCache<at::Tensor, 3, std::array<int64_t, 3>>& window_layouts() {
  static TensorCache<at::Tensor, 3, std::array<int64_t, 3>> cache("cpu window layouts");
  return cache;
}

// source_row[o]: the row of (values, idx) that output o computes, -1 for an
// ablated one; empty when output o is row o.
// Undefined if idx holds an index outside [0, in_features) (checked as it is
// read: the caller raises).
template <typename scalar_t, typename index_t>
at::Tensor build_window_layout(const scalar_t* values, const index_t* idx, const std::vector<int64_t>& source_row,
                               int64_t out_features, int64_t fan_in, int64_t in_features, int64_t window) {
  const int64_t* rows = source_row.empty() ? nullptr : source_row.data();
  const int64_t blocks = (out_features + k::kWindowLanes - 1) / k::kWindowLanes;
  const int64_t windows = k::windows_for(in_features, window);
  std::vector<int32_t> steps(blocks * windows);
  const bool counted = parallel_all(0, blocks, grain_for(k::kWindowLanes * fan_in), [&](int64_t begin, int64_t end) {
    return k::count_window_steps(idx, rows, out_features, fan_in, in_features, window, windows, begin, end,
                                 steps.data());
  });
  if (!counted) return at::Tensor();
  std::vector<int64_t> block_steps(blocks + 1, 0);
  for (int64_t b = 0; b < blocks; ++b) {
    int64_t sum = 0;
    for (int64_t w = 0; w < windows; ++w) sum += steps[b * windows + w];
    block_steps[b + 1] = block_steps[b] + sum;
  }
  const k::WindowLayoutHeader header = k::plan_window_layout(
      k::value_type_of<scalar_t>(), int32_t(sizeof(scalar_t)), window, in_features, out_features, block_steps[blocks]);
  at::Tensor blob = at::empty({header.bytes}, at::kByte);
  uint8_t* bytes = blob.data_ptr<uint8_t>();
  std::memset(bytes, 0, header.values_at);  // header, tables and the padding between them
  std::memcpy(bytes, &header, sizeof header);
  std::memcpy(bytes + header.block_steps_at, block_steps.data(), block_steps.size() * sizeof(int64_t));
  std::memcpy(bytes + header.steps_at, steps.data(), steps.size() * sizeof(int32_t));
  std::memset(bytes + header.slots_at + header.total_steps * k::kWindowLanes, 0,
              header.bytes - header.slots_at - header.total_steps * k::kWindowLanes);
  const bool filled = parallel_all(0, blocks, grain_for(k::kWindowLanes * fan_in), [&](int64_t begin, int64_t end) {
    return k::fill_window_blocks(values, idx, rows, fan_in, bytes, begin, end);
  });
  return filled ? blob : at::Tensor();
}

// ---- the ops -----------------------------------------------------------------------

// The row layout's forward: values [rows, fan_in] over the validated kernel
// indices idx_k; `idx` is the op's argument, which an error names.
at::Tensor row_layout_forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx_k,
                              const std::optional<at::Tensor>& bias, const at::Tensor& idx) {
  const int64_t in_features = x.size(-1);
  const int64_t out_features = values.size(0);
  at::Tensor y = at::empty(condensed_linear_output_shape(x, out_features), x.options());
  if (y.numel() == 0) return y;
  const int64_t batch = y.numel() / out_features;
  const at::Tensor values_c = values.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor x_2d = rows_in_acc_type(x, batch, in_features);
  bool inside = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "condensed_linear_cpu", [&] {
    using kernel_scalar_t = Kernel::type<scalar_t>;
    using acc = k::acc_t<kernel_scalar_t>;
    with_index_type(idx_k, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const k::CondensedLinearProblem<kernel_scalar_t, index_t> p{
          x_2d.data_ptr<acc>(), x_2d.stride(0),
          Kernel::ptr<scalar_t>(values_c), idx_k.data_ptr<index_t>(),
          bias_c.defined() ? Kernel::ptr<scalar_t>(bias_c) : nullptr,
          Kernel::ptr<scalar_t>(y),
          batch, in_features, out_features, values.size(1)};
      inside = run_rows(p);
    });
  });
  if (!inside) raise_index_error(idx, in_features, WidthSource::OfX);
  return y;
}

at::Tensor condensed_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                const std::optional<at::Tensor>& bias) {
  check_condensed_linear_inputs(x, values, idx, bias);
  // Validated even with nothing to compute: bad idx fails on every call.
  const at::Tensor idx_k = prepare_indices(idx, x.size(-1));
  return row_layout_forward(x, values, idx_k, bias, idx);
}

// The grouped layout's tiled kernel wherever the row layout would tile (from
// two batch rows); fewer rows gain nothing from sharing a column load, so
// they run the row layout's kernels on the expanded indices (grouped.h).
at::Tensor condensed_linear_grouped_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                        const std::optional<at::Tensor>& bias) {
  check_condensed_linear_grouped_inputs(x, values, idx, bias);
  const int64_t in_features = x.size(-1);
  const int64_t groups = values.size(0), group_size = values.size(1), fan_in = values.size(2);
  const int64_t out_features = groups * group_size;
  // Validated here, once, so that an error names the grouped entry idx[group, j].
  const at::Tensor idx_k = prepare_indices(idx, in_features);
  const int64_t batch = in_features > 0 ? x.numel() / in_features : 0;
  const Isa isa = active_isa();
  if (out_features == 0 || batch == 0 || row_strategy(batch, isa) != Strategy::Tiled) {
    // The expansion of a validated idx (cached per idx version): not validated again.
    const at::Tensor rows_k = narrow_indices(expanded_group_indices(idx, group_size), in_features);
    return row_layout_forward(x, values.reshape({out_features, fan_in}), rows_k, bias, idx);
  }
  at::Tensor y = at::empty(condensed_linear_output_shape(x, out_features), x.options());
  const at::Tensor values_c = values.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor x_2d = rows_in_acc_type(x, batch, in_features);
  bool inside = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "condensed_linear_grouped_cpu", [&] {
    using kernel_scalar_t = Kernel::type<scalar_t>;
    using acc = k::acc_t<kernel_scalar_t>;
    with_index_type(idx_k, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const k::GroupedProblem<kernel_scalar_t, index_t> p{
          x_2d.data_ptr<acc>(), x_2d.stride(0),
          Kernel::ptr<scalar_t>(values_c), idx_k.data_ptr<index_t>(),
          bias_c.defined() ? Kernel::ptr<scalar_t>(bias_c) : nullptr,
          Kernel::ptr<scalar_t>(y),
          batch, in_features, groups, group_size, fan_in};
      inside = run_tiled(p, out_features, isa, "grouped_tiled");
    });
  });
  if (!inside) raise_index_error(idx, in_features, WidthSource::OfX);
  return y;
}

// grad_x = grad_y @ W: the row layout's kernels over W's column layout.
at::Tensor condensed_linear_grad_input_cpu(const at::Tensor& grad_y, const at::Tensor& values, const at::Tensor& idx,
                                           int64_t in_features) {
  check_condensed_linear_grad_input_inputs(grad_y, values, idx, in_features);
  at::Tensor grad_x = at::empty(grad_input_shape(grad_y, in_features), grad_y.options());
  const at::Tensor idx_k = prepare_indices(idx, in_features, WidthSource::Argument);
  if (grad_x.numel() == 0) return grad_x;
  const int64_t out_features = values.size(0);
  const int64_t entries = values.numel();
  const int64_t batch = grad_x.numel() / in_features;

  const ColumnLayout layout = column_layout(idx, idx_k, in_features);
  const at::Tensor values_c = values.contiguous();
  const at::Tensor column_values = at::empty({entries}, values.options());
  const at::Tensor grad_y_2d = rows_in_acc_type(grad_y, batch, out_features);
  bool inside = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "condensed_linear_grad_input_cpu", [&] {
    using kernel_scalar_t = Kernel::type<scalar_t>;
    using acc = k::acc_t<kernel_scalar_t>;
    at::parallel_for(0, entries, /*grain_size=*/32768, [&](int64_t begin, int64_t end) {
      k::gather_column_values(Kernel::ptr<scalar_t>(values_c), layout.sources.data_ptr<int32_t>(), begin, end,
                              Kernel::ptr<scalar_t>(column_values));
    });
    with_index_type(layout.rows, [&](auto row_tag) {
      using row_index_t = decltype(row_tag);
      k::CondensedLinearProblem<kernel_scalar_t, row_index_t> p{
          grad_y_2d.data_ptr<acc>(), grad_y_2d.stride(0),
          Kernel::ptr<scalar_t>(column_values), layout.rows.data_ptr<row_index_t>(), nullptr,
          Kernel::ptr<scalar_t>(grad_x),
          batch, out_features, in_features, 0};
      p.row_offsets = layout.offsets.data_ptr<int64_t>();
      inside = run_rows(p);  // rows < out_features by construction
    });
  });
  TORCH_INTERNAL_ASSERT(inside, "condensed_linear: W's column layout holds a row outside [0, out_features)");
  return grad_x;
}

int64_t padded_batch(int64_t batch) {
  return (batch + k::kGradValuesBatchMultiple - 1) / k::kGradValuesBatchMultiple * k::kGradValuesBatchMultiple;
}

// dst [columns, ...] (row stride dst_stride) = src [rows, columns]ᵀ, float32:
// the AVX2 blocked transpose where the CPU has it (torch's strided copy runs
// at 4-8 GB/s on these shapes), torch's copy elsewhere.
void transpose_into(const at::Tensor& src, const at::Tensor& dst) {
  const int64_t rows = src.size(0), columns = src.size(1);
#if defined(CONDENSED_OPS_WITH_AVX2)
  if (src.scalar_type() == at::kFloat && dst.scalar_type() == at::kFloat && src.stride(1) == 1 &&
      dst.stride(1) == 1 && active_isa() != Isa::Portable) {
    const float* s = src.const_data_ptr<float>();
    float* d = dst.data_ptr<float>();
    at::parallel_for(0, (rows + 15) / 16, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, columns)),
                     [&](int64_t begin, int64_t end) {
                       k::avx2::transpose(s, src.stride(0), columns, begin * 16, std::min(rows, end * 16), d,
                                          dst.stride(0));
                     });
    return;
  }
#endif
  dst.copy_(src.t());
}

// t [..., features] as a batch-contiguous copy [features, padded] in the
// accumulator type, zero past the batch. (Written once: zeroing it all first
// costs as much again as the transpose.)
at::Tensor batch_contiguous(const at::Tensor& t, int64_t batch, int64_t features, int64_t padded) {
  const at::Tensor t_t = at::empty({features, padded}, t.options().dtype(acc_dtype(t.scalar_type())));
  transpose_into(t.reshape({batch, features}), t_t.narrow(1, 0, batch));
  if (padded > batch) t_t.narrow(1, batch, padded - batch).zero_();
  return t_t;
}

// grad_values[o, j] = sum_b grad_y[b, o] * x[b, idx[o, j]]: one dot product per
// weight over batch-contiguous (transposed) copies of x and grad_y.
at::Tensor condensed_linear_grad_values_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& idx) {
  check_condensed_linear_grad_values_inputs(grad_y, x, idx);
  at::Tensor grad = at::empty(idx.sizes(), x.options());
  const int64_t in_features = x.size(-1);
  const at::Tensor idx_k = prepare_indices(idx, in_features);
  if (grad.numel() == 0) return grad;
  const int64_t out_features = idx.size(0);
  const int64_t fan_in = idx.size(1);
  const int64_t batch = grad_y.numel() / out_features;
  if (batch == 0) return grad.zero_();

  const auto acc = acc_dtype(x.scalar_type());
  // Zero-padded to whole vectors so the dot products need no tails.
  const int64_t padded = padded_batch(batch);
  const at::Tensor x_t = batch_contiguous(x, batch, in_features, padded);
  const at::Tensor grad_y_t = batch_contiguous(grad_y, batch, out_features, padded);
  const at::Tensor grad_acc = grad.scalar_type() == acc ? grad : at::empty(idx.sizes(), x.options().dtype(acc));

  // Batch chunks of 256 keep a chunk of x_t (in_features KiB) in L2 across all outputs.
  constexpr int64_t kChunk = 256;
  const Isa isa = active_isa();
  note_kernel_run(acc == at::kFloat ? isa : Isa::Portable, "grad_values");
  bool inside = true;
  AT_DISPATCH_FLOATING_TYPES(acc, "condensed_linear_grad_values_cpu", [&] {
    with_index_type(idx_k, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      for (int64_t b0 = 0; b0 < padded; b0 += kChunk) {
        const k::GradValuesProblem<scalar_t, index_t> p{
            x_t.data_ptr<scalar_t>() + b0, grad_y_t.data_ptr<scalar_t>() + b0, padded,
            std::min(kChunk, padded - b0), idx_k.data_ptr<index_t>(), in_features, fan_in,
            grad_acc.data_ptr<scalar_t>(), /*accumulate=*/b0 > 0};
        inside = inside && parallel_all(0, out_features, grain_for(fan_in * p.length), [&](int64_t begin, int64_t end) {
          if constexpr (std::is_same_v<scalar_t, float>) {
#if defined(CONDENSED_OPS_WITH_AVX512)
            if (isa == Isa::Avx512) return k::avx512::grad_values(p, begin, end);
#endif
#if defined(CONDENSED_OPS_WITH_AVX2)
            if (isa == Isa::Avx2) return k::avx2::grad_values(p, begin, end);
#endif
          }
          return k::portable::grad_values(p, begin, end);
        });
      }
    });
  });
  if (!inside) raise_index_error(idx, in_features, WidthSource::OfX);
  if (!grad_acc.is_same(grad)) grad.copy_(grad_acc);
  return grad;
}

// The grouped layout's backward kernels: float32, an AVX2 or AVX-512 CPU, a
// batch of at least one vector (smaller ones share too little), groups of 2
// or more. Everything else runs the row layout's (grouped.h).
bool grouped_backward_runs(at::ScalarType dtype, int64_t batch, int64_t group_size, Isa isa) {
  return dtype == at::kFloat && isa != Isa::Portable && batch >= k::kGradValuesBatchMultiple && group_size >= 2;
}

// grad_x = grad_y @ W over the grouped layout: per group a [B, g] x [g, k]
// product added into grad_x's k columns; threads own batch ranges.
at::Tensor condensed_linear_grouped_grad_input_cpu(const at::Tensor& grad_y, const at::Tensor& values,
                                                   const at::Tensor& idx, int64_t in_features) {
  check_condensed_linear_grouped_grad_input_inputs(grad_y, values, idx, in_features);
  const int64_t groups = values.size(0), group_size = values.size(1), fan_in = values.size(2);
  const int64_t out_features = groups * group_size;
  const int64_t batch = out_features > 0 ? grad_y.numel() / out_features : 0;
  const Isa isa = active_isa();
  // Threads split the batch in 16-row units here: with fewer units than
  // threads the row layout's kernels (split over columns) keep all busy.
  const bool every_thread_busy = padded_batch(batch) / k::kGradValuesBatchMultiple >= at::get_num_threads();
  if (!grouped_backward_runs(values.scalar_type(), batch, group_size, isa) || !every_thread_busy || in_features == 0) {
    return grouped_grad_input_by_rows(grad_y, values, idx, in_features);
  }
  const at::Tensor idx_k = prepare_indices(idx, in_features, WidthSource::Argument);
  const int64_t padded = padded_batch(batch);
  const at::Tensor grad_y_t = batch_contiguous(grad_y, batch, out_features, padded);
  const at::Tensor grad_x_t = at::zeros({in_features, padded}, grad_y.options());
  const at::Tensor values_c = values.contiguous();
  note_kernel_run(isa, "grouped_grad_input");
  bool inside = true;
  with_index_type(idx_k, [&](auto index_tag) {
    using index_t = decltype(index_tag);
    const k::GroupedGradInputProblem<index_t> p{grad_y_t.data_ptr<float>(), padded, values_c.data_ptr<float>(),
                                                idx_k.data_ptr<index_t>(), in_features, groups, group_size, fan_in,
                                                grad_x_t.data_ptr<float>()};
    // Units of one batch vector (16 floats); each thread streams every weight once per 32 rows.
    constexpr int64_t kUnit = k::kGradValuesBatchMultiple;
    inside = parallel_all(0, padded / kUnit, /*grain=*/1, [&](int64_t begin, int64_t end) {
#if defined(CONDENSED_OPS_WITH_AVX512)
      if (isa == Isa::Avx512) return k::avx512::grouped_grad_input(p, begin * kUnit, end * kUnit);
#endif
#if defined(CONDENSED_OPS_WITH_AVX2)
      if (isa == Isa::Avx2) return k::avx2::grouped_grad_input(p, begin * kUnit, end * kUnit);
#endif
      return false;
    });
  });
  if (!inside) raise_index_error(idx, in_features, WidthSource::Argument);
  at::Tensor grad_x = at::empty(grad_input_shape(grad_y, in_features), grad_y.options());
  transpose_into(grad_x_t.narrow(1, 0, batch), grad_x.view({batch, in_features}));
  return grad_x;
}

// grad_values over the grouped layout: per group a [g, B] x [B, k] product.
at::Tensor condensed_linear_grouped_grad_values_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                    const at::Tensor& idx, int64_t group_size) {
  check_condensed_linear_grouped_grad_values_inputs(grad_y, x, idx, group_size);
  const int64_t in_features = x.size(-1);
  const int64_t groups = idx.size(0), fan_in = idx.size(1), out_features = groups * group_size;
  const int64_t batch = out_features > 0 ? grad_y.numel() / out_features : 0;
  const Isa isa = active_isa();
  if (!grouped_backward_runs(x.scalar_type(), batch, group_size, isa) || fan_in == 0 || groups == 0) {
    return grouped_grad_values_by_rows(grad_y, x, idx, group_size);
  }
  const at::Tensor idx_k = prepare_indices(idx, in_features);
  const int64_t padded = padded_batch(batch);
  const at::Tensor x_t = batch_contiguous(x, batch, in_features, padded);
  const at::Tensor grad_y_t = batch_contiguous(grad_y, batch, out_features, padded);
  at::Tensor grad = at::empty({groups, group_size, fan_in}, x.options());
  note_kernel_run(isa, "grouped_grad_values");
  // Batch chunks of 256 keep a chunk of x_t (in_features KiB) in L2 across all groups.
  constexpr int64_t kChunk = 256;
  bool inside = true;
  with_index_type(idx_k, [&](auto index_tag) {
    using index_t = decltype(index_tag);
    for (int64_t b0 = 0; b0 < padded && inside; b0 += kChunk) {
      const k::GroupedGradValuesProblem<index_t> p{
          {x_t.data_ptr<float>() + b0, grad_y_t.data_ptr<float>() + b0, padded, std::min(kChunk, padded - b0),
           idx_k.data_ptr<index_t>(), in_features, fan_in, grad.data_ptr<float>(), /*accumulate=*/b0 > 0},
          group_size};
      inside = parallel_all(0, groups, grain_for(group_size * fan_in * p.length), [&](int64_t begin, int64_t end) {
#if defined(CONDENSED_OPS_WITH_AVX512)
        if (isa == Isa::Avx512) return k::avx512::grouped_grad_values(p, begin, end);
#endif
#if defined(CONDENSED_OPS_WITH_AVX2)
        if (isa == Isa::Avx2) return k::avx2::grouped_grad_values(p, begin, end);
#endif
        return false;
      });
    }
  });
  if (!inside) raise_index_error(idx, in_features, WidthSource::OfX);
  return grad;
}

// Output o's source row (-1: ablated), from active_rows (the output of each
// row of values); empty when there is none.
std::vector<int64_t> source_rows(const std::optional<at::Tensor>& active_rows, int64_t rows, int64_t out_features) {
  if (!active_rows.has_value()) return {};
  const at::Tensor active = active_rows->contiguous();
  std::vector<int64_t> source_row(out_features, -1);
  const int64_t* outputs = active.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = outputs[r];
    TORCH_CHECK_VALUE(o >= 0 && o < out_features && source_row[o] < 0, "pack_for_inference: active_rows must be ",
                      "distinct outputs in [0, out_features=", out_features, "), got active_rows[", r, "] = ", o,
                      o >= 0 && o < out_features ? " twice" : "");
    source_row[o] = r;
  }
  return source_row;
}

// The window layout of (values, idx) for this CPU, cached per version of the
// tensors it comes from.
at::Tensor pack_for_inference_cpu(const at::Tensor& values, const at::Tensor& idx, int64_t in_features,
                                  const std::optional<at::Tensor>& active_rows, std::optional<int64_t> out_features) {
  const bool grouped = values.dim() == 3;
  const int64_t rows = grouped ? values.size(0) * values.size(1) : values.size(0);
  const int64_t outputs = out_features.value_or(rows);
  check_pack_inputs(values, idx, in_features, active_rows, outputs);
  const int64_t window = window_width(active_isa());
  const at::Tensor no_tensor;
  const TensorCache<at::Tensor, 3, std::array<int64_t, 3>>::Sources sources{
      &values, &idx, active_rows.has_value() ? &*active_rows : &no_tensor};
  const std::array<int64_t, 3> key{in_features, outputs, window};
  if (auto cached = window_layouts().find(sources, key)) return *cached;
  // Scanned on every build, not trusted from the validation cache: a layout
  // outlives the call, so it must never be built from an index rewritten
  // through .data since idx was validated. (An error names idx[group, j].)
  forget_validated_indices(idx);
  at::Tensor idx_k = prepare_indices(idx, in_features, WidthSource::Argument);
  // A grouped layout packs as its rows, each group's indices repeated
  // (grouped.h), expanded afresh for the same reason.
  if (grouped) idx_k = at::repeat_interleave(idx_k, values.size(1), /*dim=*/0).contiguous();
  const std::vector<int64_t> source_row = source_rows(active_rows, rows, outputs);
  const at::Tensor values_c = values.reshape({rows, values.size(-1)}).contiguous();
  at::Tensor blob;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "pack_for_inference_cpu", [&] {
    with_index_type(idx_k, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      blob = build_window_layout(Kernel::ptr<scalar_t>(values_c), idx_k.data_ptr<index_t>(), source_row, outputs,
                                 values.size(-1), in_features, window);
    });
  });
  if (!blob.defined()) raise_index_error(idx, in_features, WidthSource::Argument);
  window_layouts().insert(sources, key, blob);
  return blob;
}

at::ScalarType scalar_type_of(k::ValueType t) {
  switch (t) {
    case k::ValueType::Float64: return at::kDouble;
    case k::ValueType::Float16: return at::kHalf;
    case k::ValueType::BFloat16: return at::kBFloat16;
    default: return at::kFloat;
  }
}

template <typename scalar_t>
bool run_window(k::WindowProblem<scalar_t> p, Isa isa) {
  // AVX-512 reads 64-wide windows from registers; other windows take the AVX2
  // kernel, with gathers of x where they timed faster here (window_gathers).
  // One decision, both reported and run.
  const Isa flavour = std::is_same_v<scalar_t, double> || isa == Isa::Portable ? Isa::Portable
                      : isa == Isa::Avx512 && p.layout.window == k::kPermuteWindow ? Isa::Avx512
                                                                                    : Isa::Avx2;
  const int64_t mean_block_steps = p.layout.total_steps / std::max<int64_t>(1, p.layout.blocks);
  const int64_t grain = grain_for(mean_block_steps * k::kWindowLanes * p.batch);
  const auto run = [&](const k::WindowProblem<scalar_t>& problem) {
    return parallel_all(0, problem.layout.blocks, grain, [&](int64_t begin, int64_t end) {
      if constexpr (!std::is_same_v<scalar_t, double>) {
#if defined(CONDENSED_OPS_WITH_AVX2)
#if defined(CONDENSED_OPS_WITH_AVX512)
        if (flavour == Isa::Avx512) return k::avx512::window(problem, begin, end);
#endif
        if (flavour == Isa::Avx2) return k::avx2::window(problem, begin, end);
#endif
      }
      return k::portable::window(problem, begin, end);
    });
  };
  if (flavour == Isa::Avx2) {
    p.gather_x = window_gathers([&](bool gather) {
      k::WindowProblem<scalar_t> timed = p;
      timed.gather_x = gather;
      run(timed);
    });
  }
  note_kernel_run(flavour, p.gather_x ? "window_gather" : "window");
  return run(p);
}

at::Tensor condensed_linear_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                                       const std::optional<at::Tensor>& bias) {
  check_condensed_linear_packed_inputs(x, packed, out_features, bias);
  const at::Tensor blob = packed.contiguous();
  const char* damage = k::check_window_layout(blob.data_ptr<uint8_t>(), blob.numel());
  TORCH_CHECK_VALUE(damage == nullptr, "condensed_linear_packed: packed is not a window layout made by ",
                    "pack_for_inference: ", damage);
  const at::ScalarType packed_dtype = scalar_type_of(k::read_window_header(blob.data_ptr<uint8_t>()).value_type);
  TORCH_CHECK_TYPE(x.scalar_type() == packed_dtype, "condensed_linear_packed: x is ", dtype_name(x.scalar_type()),
                   " but packed holds ", dtype_name(packed_dtype), " values: x must have the dtype of the values ",
                   "it was packed from");
  const k::WindowLayoutHeader header = k::read_window_header(blob.data_ptr<uint8_t>());
  const int64_t in_features = x.size(-1);
  TORCH_CHECK_VALUE(header.in_features == in_features && header.out_features == out_features,
                    "condensed_linear_packed: packed holds a ", header.in_features, " -> ", header.out_features,
                    " layer, but x has in_features = ", in_features, " and out_features = ", out_features);
  at::Tensor y = at::empty(condensed_linear_output_shape(x, out_features), x.options());
  if (y.numel() == 0) return y;
  const int64_t batch = y.numel() / out_features;
  const at::Tensor x_2d = x.reshape({batch, in_features});
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const Isa isa = active_isa();
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "condensed_linear_packed_cpu", [&] {
    using kernel_scalar_t = Kernel::type<scalar_t>;
    using acc = k::acc_t<kernel_scalar_t>;
    // x once into windows (each window's last slot zero), widened to acc.
    const at::Tensor x_acc = x_2d.to(acc_dtype(x.scalar_type())).contiguous();
    const int64_t row_stride = header.windows * header.window;
    const at::Tensor x_windows = at::empty({batch, row_stride}, x_acc.options());
    at::parallel_for(0, batch, grain_for(in_features), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        k::scatter_into_windows(x_acc.data_ptr<acc>() + row * in_features, in_features, header.window,
                                header.windows, x_windows.data_ptr<acc>() + row * row_stride);
      }
    });
    const k::WindowProblem<kernel_scalar_t> p{
        x_windows.data_ptr<acc>(), row_stride, k::view_window_layout<kernel_scalar_t>(blob.data_ptr<uint8_t>()),
        bias_c.defined() ? Kernel::ptr<scalar_t>(bias_c) : nullptr, Kernel::ptr<scalar_t>(y), batch};
    ok = run_window(p, isa);
  });
  TORCH_CHECK_VALUE(ok, "condensed_linear_packed: packed is damaged (its step counts disagree with its block table)");
  return y;
}

// pack_for_inference then condensed_linear_packed, as one op: its output's shape
// follows from its inputs' shapes (the layout's size depends on idx's data), so a
// compiled graph holds it without a break.
at::Tensor condensed_linear_windowed_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                         int64_t out_features, const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& active_rows) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "condensed_linear_windowed: x must have at least 1 dimension [..., in_features], ",
                    "got a scalar");
  const at::Tensor packed = pack_for_inference_cpu(values, idx, x.size(-1), active_rows, out_features);
  return condensed_linear_packed_cpu(x, packed, out_features, bias);
}

}  // namespace

int64_t threads_used_by_parallel_for(int64_t items) {
  std::mutex mutex;
  std::set<int> threads;
  at::parallel_for(0, items, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mutex);
    threads.insert(at::get_thread_num());
  });
  return int64_t(threads.size());
}

TORCH_LIBRARY_IMPL(condensed_ops, CPU, m) {
  m.impl("condensed_linear", &condensed_linear_cpu);
  m.impl("condensed_linear_grouped", &condensed_linear_grouped_cpu);
  m.impl("condensed_linear_grad_input", &condensed_linear_grad_input_cpu);
  m.impl("condensed_linear_grad_values", &condensed_linear_grad_values_cpu);
  m.impl("condensed_linear_grouped_grad_input", &condensed_linear_grouped_grad_input_cpu);
  m.impl("condensed_linear_grouped_grad_values", &condensed_linear_grouped_grad_values_cpu);
  m.impl("pack_for_inference", &pack_for_inference_cpu);
  m.impl("condensed_linear_packed", &condensed_linear_packed_cpu);
  m.impl("condensed_linear_windowed", &condensed_linear_windowed_cpu);
}

}  // namespace condensed_ops::cpu
