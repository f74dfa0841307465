// CUDA glue: checks, device limits, W's column layout (cached), device and
// stream, kernel plans, the ops. The kernels (torch-free) live in csrc/kernels/cuda; index
// validation and the bad-index flag in index_guard.cpp. Built only when torch
// has CUDA and nvcc exists.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

#include "../glue_common.h"
#include "../grouped.h"
#include "../kernel_options.h"
#include "../kernels/cuda/cuda_kernels.h"
#include "../op_checks.h"
#include "../tensor_cache.h"
#include "index_guard.h"

namespace condensed_ops::cuda {
namespace {

namespace k = kernels::cuda;

// torch's c10::Half / c10::BFloat16 are bit-compatible with CUDA's types.
using Kernel = KernelTypes<__half, __nv_bfloat16>;

// grad_x by atomics up to this batch when determinism is not required: the
// column layout costs a sort per call, the atomics batch * entries adds.
// A first guess, to be measured on the GPU.
constexpr int64_t kScatterMaxBatch = 8;

// ---- device facts --------------------------------------------------------------

const k::DeviceLimits& device_limits(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::array<std::optional<k::DeviceLimits>, C10_COMPILE_TIME_MAX_GPUS> limits;
  std::lock_guard<std::mutex> lock(mutex);
  auto& entry = limits.at(device);
  if (!entry) {
    k::DeviceLimits l;
    C10_CUDA_CHECK(k::query_device_limits(device, &l));
    entry = l;
  }
  return *entry;
}

// Where the kernels read x from: kernel option cuda_x (kernel_options.h).
k::XAccess x_access() {
  switch (kernel_option<KernelOption::CudaX>()) {
    case CudaXChoice::Shared: return k::XAccess::Shared;
    case CudaXChoice::Global: return k::XAccess::Global;
    case CudaXChoice::Auto: break;
  }
  return k::XAccess::Auto;
}

// The forward plan's forced choices: kernel options cuda_x and the forward
// variants (cuda_lanes_per_row, cuda_packs_in_flight, cuda_splits, cuda_batch_tile).
k::ForwardTuning forward_tuning() {
  k::ForwardTuning tuning;
  tuning.access = x_access();
  tuning.lanes_per_row = kernel_option_number(KernelOption::CudaLanesPerRow);
  tuning.packs_in_flight = kernel_option_number(KernelOption::CudaPacksInFlight);
  tuning.splits = kernel_option_number(KernelOption::CudaSplits);
  tuning.batch_tile = kernel_option_number(KernelOption::CudaBatchTile);
  return tuning;
}

// Plans and runs the forward kernels over p, with the scratch a split plan
// needs (freed on return: the caching allocator reuses it only for work
// queued after this on the same stream).
template <typename scalar_t, typename index_t>
void run_forward(k::ForwardProblem<scalar_t, index_t> p, double mean_row_length, const k::ForwardTuning& tuning,
                 bool use_table, const at::Tensor& like, const CallContext& call) {
  using acc = k::acc_t<scalar_t>;
  const k::LaunchPlan plan = k::plan_forward<scalar_t>(p.batch, p.in_features, p.out_features, mean_row_length,
                                                       device_limits(call.device), tuning, use_table);
  const int64_t partial_elements = k::forward_partial_elements(plan, p.batch, p.out_features);
  const at::Tensor partial = partial_elements > 0
                                 ? at::empty({partial_elements}, like.options().dtype(c10::CppTypeToScalarType<acc>::value))
                                 : at::Tensor();
  if (partial.defined()) p.partial = partial.data_ptr<acc>();
  C10_CUDA_CHECK(k::launch_forward(p, plan, call.stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Packed loads need 16-byte aligned bases; a view with an odd storage offset
// gets a fresh (aligned) copy.
at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

// Contiguous, aligned int16/int32 indices for the kernels (int64 narrowed
// like on every device: glue_common.h).
at::Tensor kernel_indices(const at::Tensor& idx, int64_t in_features) {
  return aligned_contiguous(narrow_indices(idx, in_features));
}

// t [..., features] as [rows, features] with unit inner stride (any row stride).
at::Tensor as_rows(const at::Tensor& t, int64_t rows, int64_t features) {
  at::Tensor t_2d = t.reshape({rows, features});
  if (features > 1 && t_2d.stride(1) != 1) t_2d = t_2d.contiguous();
  return t_2d;
}

// ---- the ops ---------------------------------------------------------------------

// The row layout's forward: values [rows, fan_in] over idx_rows (validated,
// or derived from a validated idx).
at::Tensor row_layout_forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx_rows,
                              const std::optional<at::Tensor>& bias, const CallContext& call) {
  const int64_t in_features = x.size(-1);
  const int64_t out_features = values.size(0);
  const int64_t fan_in = values.size(1);
  at::Tensor y = at::empty(condensed_linear_output_shape(x, out_features), x.options());
  if (y.numel() == 0) return y;
  const int64_t batch = y.numel() / out_features;
  const at::Tensor idx_c = kernel_indices(idx_rows, in_features);
  const at::Tensor values_c = aligned_contiguous(values);
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor x_2d = as_rows(x, batch, in_features);
  const k::ForwardTuning tuning = forward_tuning();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "condensed_linear_cuda", [&] {
    using kernel_scalar_t = Kernel::type<scalar_t>;
    with_index_type(idx_c, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const k::ForwardProblem<kernel_scalar_t, index_t> p{
          Kernel::ptr<scalar_t>(x_2d), x_2d.stride(0),
          Kernel::ptr<scalar_t>(values_c), idx_c.data_ptr<index_t>(),
          bias_c.defined() ? Kernel::ptr<scalar_t>(bias_c) : nullptr,
          Kernel::ptr<scalar_t>(y), out_features,
          batch, in_features, out_features, fan_in,
          /*row_offsets=*/nullptr, call.flag};
      run_forward(p, double(fan_in), tuning, kernel_option<KernelOption::CudaTuned>() == CudaTunedChoice::Auto, y,
                  call);
    });
  });
  return y;
}

at::Tensor condensed_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                 const std::optional<at::Tensor>& bias) {
  check_condensed_linear_inputs(x, values, idx, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const CallContext call = begin_call(x);
  // Checked on every call, even with nothing to compute, like the CPU ops.
  validate_indices(idx, x.size(-1), WidthSource::OfX, call);
  return row_layout_forward(x, values, idx, bias, call);
}

// grad_x by atomics: fast at small batch, summation order not fixed.
template <typename scalar_t, typename index_t>
void grad_input_scatter(const at::Tensor& grad_y_2d, const at::Tensor& values_c, const at::Tensor& idx_k,
                        const at::Tensor& grad_x, int64_t batch, int64_t in_features, const CallContext& call) {
  using kernel_scalar_t = Kernel::type<scalar_t>;
  using acc = k::acc_t<kernel_scalar_t>;
  // Atomics add in float (double for double); 16-bit results round once at the end.
  constexpr bool in_place = std::is_same_v<acc, kernel_scalar_t>;
  const at::Tensor grad_x_acc =
      in_place ? grad_x.zero_() : at::zeros({batch, in_features}, grad_y_2d.options().dtype(at::kFloat));
  const k::ScatterGradInputProblem<kernel_scalar_t, index_t> p{
      Kernel::ptr<scalar_t>(grad_y_2d), grad_y_2d.stride(0), Kernel::ptr<scalar_t>(values_c),
      idx_k.data_ptr<index_t>(), grad_x_acc.data_ptr<acc>(), batch, in_features, values_c.size(0), values_c.size(1),
      call.flag};
  C10_CUDA_CHECK(k::launch_grad_input_scatter(p, device_limits(call.device), call.stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!in_place) grad_x.view({batch, in_features}).copy_(grad_x_acc);
}

// ---- W's column layout, cached per idx version -------------------------------------

struct ColumnLayout {
  at::Tensor offsets;  // int64 [in_features + 1]
  at::Tensor rows;     // int32 [entries]: the output of each entry, by column
  at::Tensor sources;  // int32 [entries]: each entry's position in values
};

TensorCache<ColumnLayout>& column_layouts() {
  static TensorCache<ColumnLayout> cache("cuda column layouts");
  return cache;
}

// The layout of idx (the op's argument, the cache key) from its kernel indices
// idx_k: a stable radix sort on the device, once per idx version.
template <typename index_t>
ColumnLayout column_layout(const at::Tensor& idx, const at::Tensor& idx_k, int64_t in_features,
                           const CallContext& call) {
  if (auto cached = column_layouts().find({&idx}, in_features)) return *cached;
  const int64_t entries = idx_k.numel();
  TORCH_CHECK_VALUE(entries <= std::numeric_limits<int32_t>::max(),
                    "condensed_linear: the deterministic CUDA grad_x handles fewer than 2^31 weights, got ", entries);
  size_t sort_bytes = 0;
  C10_CUDA_CHECK(k::column_layout_sort_bytes(entries, in_features, &sort_bytes));
  const auto int32 = idx_k.options().dtype(at::kInt);
  const at::Tensor keys = at::empty({2, entries}, int32);
  const at::Tensor positions = at::empty({2, entries}, int32);
  const at::Tensor sort_scratch = at::empty({int64_t(std::max<size_t>(sort_bytes, 1))}, idx_k.options().dtype(at::kByte));
  ColumnLayout layout{at::empty({in_features + 1}, idx_k.options().dtype(at::kLong)), at::empty({entries}, int32),
                      at::empty({entries}, int32)};
  k::ColumnLayoutProblem<index_t> t{};
  t.idx = idx_k.data_ptr<index_t>();
  t.out_features = idx_k.size(0);
  t.fan_in = idx_k.size(1);
  t.in_features = in_features;
  t.keys[0] = reinterpret_cast<uint32_t*>(keys[0].data_ptr<int32_t>());
  t.keys[1] = reinterpret_cast<uint32_t*>(keys[1].data_ptr<int32_t>());
  t.positions[0] = positions[0].data_ptr<int32_t>();
  t.positions[1] = positions[1].data_ptr<int32_t>();
  t.sort_scratch = sort_scratch.data_ptr();
  t.sort_scratch_bytes = sort_bytes;
  t.column_offsets = layout.offsets.data_ptr<int64_t>();
  t.rows = layout.rows.data_ptr<int32_t>();
  t.sources = layout.sources.data_ptr<int32_t>();
  t.bad_index_flag = call.flag;
  C10_CUDA_CHECK(k::build_column_layout(t, call.stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  column_layouts().insert({&idx}, in_features, layout);  // (not while capturing: tensor_cache.h)
  return layout;
}

// grad_x deterministically: the forward kernels over W's column layout.
template <typename scalar_t, typename index_t>
void grad_input_by_columns(const at::Tensor& grad_y_2d, const at::Tensor& values_c, const at::Tensor& idx,
                           const at::Tensor& idx_k, const at::Tensor& grad_x, int64_t batch, int64_t in_features,
                           const CallContext& call) {
  using kernel_scalar_t = Kernel::type<scalar_t>;
  const int64_t out_features = values_c.size(0);
  const ColumnLayout layout = column_layout<index_t>(idx, idx_k, in_features, call);
  // The weights in column order: values change every step, the layout only with idx.
  const at::Tensor column_values = values_c.view(-1).index_select(0, layout.sources);
  // rows < out_features by construction: the guard in the kernel never fires.
  const k::ForwardProblem<kernel_scalar_t, int32_t> p{
      Kernel::ptr<scalar_t>(grad_y_2d), grad_y_2d.stride(0),
      Kernel::ptr<scalar_t>(column_values), layout.rows.data_ptr<int32_t>(), /*bias=*/nullptr,
      Kernel::ptr<scalar_t>(grad_x), in_features,
      batch, out_features, in_features, /*fan_in=*/0,
      layout.offsets.data_ptr<int64_t>(), call.flag};
  // The forward variants' options and the measured table are the forward op's
  // (its rows have constant length; these are W's columns): grad_x keeps the rule's plan.
  k::ForwardTuning tuning;
  tuning.access = x_access();
  run_forward(p, double(values_c.numel()) / double(in_features), tuning, /*use_table=*/false, grad_x, call);
}

// grad_x = grad_y @ W.
at::Tensor condensed_linear_grad_input_cuda(const at::Tensor& grad_y, const at::Tensor& values, const at::Tensor& idx,
                                            int64_t in_features) {
  check_condensed_linear_grad_input_inputs(grad_y, values, idx, in_features);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const CallContext call = begin_call(grad_y);
  at::Tensor grad_x = at::empty(grad_input_shape(grad_y, in_features), grad_y.options());
  validate_indices(idx, in_features, WidthSource::Argument, call);
  if (grad_x.numel() == 0) return grad_x;
  const int64_t batch = grad_x.numel() / in_features;
  if (values.numel() == 0) return grad_x.zero_();
  const at::Tensor idx_k = kernel_indices(idx, in_features);
  const at::Tensor values_c = aligned_contiguous(values);
  const at::Tensor grad_y_2d = as_rows(grad_y, batch, values.size(0));

  const CudaGradInputChoice path = kernel_option<KernelOption::CudaGradInput>();
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const bool scatter = path == CudaGradInputChoice::Scatter ||
                       (path == CudaGradInputChoice::Auto && !deterministic && batch <= kScatterMaxBatch);
  if (scatter) at::globalContext().alertNotDeterministic("condensed_linear_grad_input (kernel option cuda_grad_input=scatter)");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "condensed_linear_grad_input_cuda", [&] {
    with_index_type(idx_k, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      if (scatter) {
        grad_input_scatter<scalar_t, index_t>(grad_y_2d, values_c, idx_k, grad_x, batch, in_features, call);
      } else {
        grad_input_by_columns<scalar_t, index_t>(grad_y_2d, values_c, idx, idx_k, grad_x, batch, in_features, call);
      }
    });
  });
  return grad_x;
}

// grad_values[o, j] = sum_b grad_y[b, o] * x[b, idx[o, j]].
at::Tensor condensed_linear_grad_values_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& idx) {
  check_condensed_linear_grad_values_inputs(grad_y, x, idx);
  const c10::cuda::CUDAGuard guard(x.device());
  const CallContext call = begin_call(x);
  at::Tensor grad = at::empty(idx.sizes(), x.options());
  const int64_t in_features = x.size(-1);
  validate_indices(idx, in_features, WidthSource::OfX, call);
  if (grad.numel() == 0) return grad;
  const int64_t out_features = idx.size(0);
  const int64_t fan_in = idx.size(1);
  const int64_t batch = grad_y.numel() / out_features;
  if (batch == 0) return grad.zero_();
  const at::Tensor idx_c = kernel_indices(idx, in_features);
  const at::Tensor x_2d = as_rows(x, batch, in_features);
  const at::Tensor grad_y_2d = as_rows(grad_y, batch, out_features);
  const k::DeviceLimits& limits = device_limits(call.device);
  const k::XAccess access = x_access();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "condensed_linear_grad_values_cuda", [&] {
    using kernel_scalar_t = Kernel::type<scalar_t>;
    using acc = k::acc_t<kernel_scalar_t>;
    with_index_type(idx_c, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const k::LaunchPlan plan =
          k::plan_grad_values<kernel_scalar_t>(batch, in_features, out_features, fan_in, limits, access);
      const int64_t partial_elements = k::grad_values_partial_elements(plan, out_features * fan_in);
      const at::Tensor partial =
          partial_elements > 0 ? at::empty({partial_elements}, x.options().dtype(c10::CppTypeToScalarType<acc>::value))
                               : at::Tensor();
      const k::GradValuesProblem<kernel_scalar_t, index_t> p{
          Kernel::ptr<scalar_t>(grad_y_2d), grad_y_2d.stride(0),
          Kernel::ptr<scalar_t>(x_2d), x_2d.stride(0),
          idx_c.data_ptr<index_t>(), Kernel::ptr<scalar_t>(grad),
          partial.defined() ? partial.data_ptr<acc>() : nullptr,
          batch, in_features, out_features, fan_in, call.flag};
      C10_CUDA_CHECK(k::launch_grad_values(p, plan, call.stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

// Grouped layout: the tensor-core kernel for float16 / bfloat16 and the group
// sizes it takes (grouped_forward_supported); everything else through the
// per-row op on the expanded idx (grouped.h), the same sums.
at::Tensor condensed_linear_grouped_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                         const std::optional<at::Tensor>& bias) {
  check_condensed_linear_grouped_inputs(x, values, idx, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const CallContext call = begin_call(x);
  const int64_t in_features = x.size(-1);
  const int64_t groups = values.size(0), group_size = values.size(1), fan_in = values.size(2);
  const int64_t out_features = groups * group_size;
  // On the grouped idx, so that an error names idx[group, j].
  validate_indices(idx, in_features, WidthSource::OfX, call);
  const int64_t batch = x.numel() / std::max<int64_t>(in_features, 1);
  const bool half_precision = values.scalar_type() == at::kHalf || values.scalar_type() == at::kBFloat16;
  const k::DeviceLimits& limits = device_limits(call.device);
  const bool kernel = half_precision && (values.scalar_type() == at::kHalf
                                             ? k::grouped_forward_supported<__half>(batch, in_features, group_size, fan_in, limits)
                                             : k::grouped_forward_supported<__nv_bfloat16>(batch, in_features, group_size, fan_in, limits));
  if (!kernel) {
    // The row layout over the expansion of the validated idx (grouped.h, cached per idx version).
    return row_layout_forward(x, values.reshape({out_features, fan_in}), expanded_group_indices(idx, group_size), bias,
                              call);
  }

  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = out_features;
  at::Tensor y = at::empty(out_shape, x.options());
  if (y.numel() == 0) return y;
  // x transposed, rows padded to a multiple of 8 (16-byte copies), padding zeroed.
  const int64_t x_t_row = (batch + 7) / 8 * 8;
  const at::Tensor x_t = at::empty({in_features, x_t_row}, x.options());
  x_t.narrow(1, 0, batch).copy_(x.reshape({batch, in_features}).t());
  if (x_t_row > batch) x_t.narrow(1, batch, x_t_row - batch).zero_();
  const at::Tensor idx_c = kernel_indices(idx, in_features);
  const at::Tensor values_c = aligned_contiguous(values);
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "condensed_linear_grouped_cuda", [&] {
    if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      using kernel_scalar_t = Kernel::type<scalar_t>;
      with_index_type(idx_c, [&](auto index_tag) {
        using index_t = decltype(index_tag);
        const k::GroupedForwardProblem<kernel_scalar_t, index_t> p{
            Kernel::ptr<scalar_t>(x_t), x_t_row,
            Kernel::ptr<scalar_t>(values_c), idx_c.data_ptr<index_t>(),
            bias_c.defined() ? Kernel::ptr<scalar_t>(bias_c) : nullptr,
            Kernel::ptr<scalar_t>(y), out_features,
            batch, in_features, groups, group_size, fan_in, call.flag};
        C10_CUDA_CHECK(k::launch_grouped_forward(p, limits, call.stream));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(condensed_ops, CUDA, m) {
  m.impl("condensed_linear", &condensed_linear_cuda);
  m.impl("condensed_linear_grad_input", &condensed_linear_grad_input_cuda);
  m.impl("condensed_linear_grad_values", &condensed_linear_grad_values_cuda);
  m.impl("condensed_linear_grouped", &condensed_linear_grouped_cuda);
}

}  // namespace condensed_ops::cuda
