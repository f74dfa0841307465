// CUDA glue: checks, index validation, layouts, device and stream, kernel
// plans. The kernels (torch-free) live in csrc/kernels/cuda. Built only when
// torch has CUDA and nvcc exists.
//
// Index validation. The kernels never read outside x whatever idx holds: each
// compares every index with in_features, skips a bad one and sets a per-device
// flag in pinned host memory. On top of that, to raise an IndexError on the
// call that passed the bad index (like the CPU ops do):
//  - the first time an idx tensor is seen (or after it was modified in place:
//    its version counter moved), one min/max reduction checks it and the host
//    waits for the two numbers. The result is cached per tensor, so steady
//    state (the same idx every step, its layout created once) costs no sync.
//  - a call captured into a CUDA graph cannot sync: it skips that check and
//    relies on the kernels' guard (int64 indices are clamped to [-1, in_features]
//    before narrowing, so that 2^32 + 5 cannot wrap into a valid column).
//  - whenever the kernels met a bad index (a captured call, or idx rewritten
//    through .data, which bypasses the version counter), the next condensed_ops
//    call on that device raises an IndexError saying so (reading the flag is a
//    host memory read, no sync). That earlier call's result skipped the bad
//    entries and is wrong.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

#include "../op_checks.h"
#include "../kernels/cuda/condensed_linear_cuda.h"

namespace condensed_ops::cuda {
namespace {

namespace k = kernels::cuda;

// torch's c10::Half / c10::BFloat16 are bit-compatible with CUDA's types.
template <typename T> struct KernelType { using type = T; };
template <> struct KernelType<c10::Half> { using type = __half; };
template <> struct KernelType<c10::BFloat16> { using type = __nv_bfloat16; };

template <typename T>
auto* kernel_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename KernelType<T>::type*>(t.data_ptr<T>());
}

constexpr int kMaxDevices = C10_COMPILE_TIME_MAX_GPUS;

// grad_x by atomics up to this batch when determinism is not required: the
// transposed layout costs a sort per call, the atomics batch * entries adds.
// A first guess, to be measured on the GPU.
constexpr int64_t kScatterMaxBatch = 8;

// ---- device facts --------------------------------------------------------------

const k::DeviceLimits& device_limits(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::array<std::optional<k::DeviceLimits>, kMaxDevices> limits;
  std::lock_guard<std::mutex> lock(mutex);
  auto& entry = limits.at(device);
  if (!entry) {
    k::DeviceLimits l;
    C10_CUDA_CHECK(k::query_device_limits(device, &l));
    entry = l;
  }
  return *entry;
}

// Benchmarks and tests force a path through the environment, read per call:
// CONDENSED_OPS_CUDA_X = auto | shared | global (where x is read from),
// CONDENSED_OPS_CUDA_GRAD_INPUT = auto | scatter | transposed.
k::XAccess x_access() {
  const char* v = std::getenv("CONDENSED_OPS_CUDA_X");
  if (v == nullptr || std::strcmp(v, "auto") == 0 || *v == '\0') return k::XAccess::Auto;
  if (std::strcmp(v, "shared") == 0) return k::XAccess::Shared;
  if (std::strcmp(v, "global") == 0) return k::XAccess::Global;
  TORCH_CHECK_VALUE(false, "CONDENSED_OPS_CUDA_X must be auto, shared or global, got '", v, "'");
}

std::string grad_input_path() {
  const char* v = std::getenv("CONDENSED_OPS_CUDA_GRAD_INPUT");
  const std::string path = v == nullptr || *v == '\0' ? "auto" : v;
  TORCH_CHECK_VALUE(path == "auto" || path == "scatter" || path == "transposed",
                    "CONDENSED_OPS_CUDA_GRAD_INPUT must be auto, scatter or transposed, got '", path, "'");
  return path;
}

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// ---- the bad-index flag ----------------------------------------------------------

struct BadIndexFlag {
  volatile int* host = nullptr;
  int* device = nullptr;
};

std::mutex flags_mutex;
std::array<std::atomic<bool>, kMaxDevices> flag_ready{};
std::array<BadIndexFlag, kMaxDevices> flags;

// The device's flag, created on first use: one int of pinned host memory
// (through torch's pinned allocator), which kernels write through its device
// alias. Not created while capturing (no allocation then): kernels then run
// with no flag and still skip bad indices.
int* bad_index_flag(c10::DeviceIndex device, bool capturing) {
  if (flag_ready.at(device).load(std::memory_order_acquire)) return flags[device].device;
  if (capturing) return nullptr;
  std::lock_guard<std::mutex> lock(flags_mutex);
  if (!flag_ready[device].load(std::memory_order_relaxed)) {
    // Leaked on purpose: freeing pinned memory during interpreter shutdown can
    // run after the CUDA runtime is gone.
    auto* storage = new at::Tensor(at::zeros({1}, at::TensorOptions().dtype(at::kInt).pinned_memory(true)));
    void* device_alias = nullptr;
    if (cudaHostGetDevicePointer(&device_alias, storage->data_ptr(), 0) == cudaSuccess) {
      flags[device] = BadIndexFlag{static_cast<volatile int*>(storage->data_ptr<int>()), static_cast<int*>(device_alias)};
    } else {
      (void)cudaGetLastError();  // not sticky; kernels still skip bad indices
      TORCH_WARN_ONCE("condensed_ops: pinned memory is not mapped on this system; out-of-range indices in calls "
                      "that skip validation (CUDA graph capture) are skipped without an error");
    }
    flag_ready[device].store(true, std::memory_order_release);
  }
  return flags[device].device;
}

void raise_if_a_kernel_met_a_bad_index(c10::DeviceIndex device) {
  if (!flag_ready.at(device).load(std::memory_order_acquire)) return;
  volatile int* host = flags[device].host;
  if (host == nullptr || *host == 0) return;
  *host = 0;
  TORCH_CHECK_INDEX(false, "condensed_linear: an earlier call on cuda:", int(device),
                    " met an index outside [0, in_features) and skipped it (its result is wrong); it was not "
                    "validated before launch because it was captured in a CUDA graph or idx was modified without "
                    "bumping its version counter (e.g. through .data)");
}

// ---- index validation ------------------------------------------------------------

struct ValidatedIndex {
  // Holding a weak reference keeps the TensorImpl's memory, so no other
  // tensor can take its address while the entry lives.
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl;
  int64_t version;
  const void* data;
  int64_t bound;  // every entry lies in [0, bound)
};

std::mutex validated_mutex;
std::unordered_map<const c10::TensorImpl*, ValidatedIndex> validated;
constexpr size_t kMaxValidated = 1024;

bool known_valid(const at::Tensor& idx, int64_t in_features) {
  if (idx.is_inference()) return false;  // no version counter to trust
  std::lock_guard<std::mutex> lock(validated_mutex);
  const auto it = validated.find(idx.unsafeGetTensorImpl());
  if (it == validated.end()) return false;
  const ValidatedIndex& v = it->second;
  return !v.impl.expired() && v.version == idx._version() && v.data == idx.const_data_ptr() &&
         v.bound <= in_features;
}

void remember_valid(const at::Tensor& idx, int64_t bound) {
  if (idx.is_inference()) return;
  std::lock_guard<std::mutex> lock(validated_mutex);
  if (validated.size() >= kMaxValidated) {
    for (auto it = validated.begin(); it != validated.end();) it = it->second.impl.expired() ? validated.erase(it) : ++it;
    if (validated.size() >= kMaxValidated) validated.clear();
  }
  validated.insert_or_assign(
      idx.unsafeGetTensorImpl(),
      ValidatedIndex{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(idx.getIntrusivePtr()),
                     idx._version(), idx.const_data_ptr(), bound});
}

// Raises an IndexError naming the first entry of idx outside [0, in_features),
// unless this very tensor (same version) passed before or the stream is
// capturing (no sync possible: the kernels' guard and flag take over).
void validate_indices(const at::Tensor& idx, int64_t in_features, bool capturing) {
  if (idx.numel() == 0 || known_valid(idx, in_features) || capturing) return;
  const auto [lowest, highest] = idx.aminmax();
  const at::Tensor range = at::stack({lowest.to(at::kLong), highest.to(at::kLong)}).cpu();  // the one sync
  const int64_t low = range[0].item<int64_t>();
  const int64_t high = range[1].item<int64_t>();
  if (low < 0 || high >= in_features) {
    const at::Tensor bad = idx.lt(0).logical_or_(idx.ge(in_features)).nonzero()[0].cpu();
    const int64_t row = bad[0].item<int64_t>(), column = bad[1].item<int64_t>();
    TORCH_CHECK_INDEX(false, "condensed_linear: idx[", row, ", ", column, "] = ", idx[row][column].item<int64_t>(),
                      " is outside [0, in_features=", in_features, ")");
  }
  remember_valid(idx, high + 1);
}

// Packed loads need 16-byte aligned bases; a view with an odd storage offset
// gets a fresh (aligned) copy.
at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

// Contiguous, aligned int16/int32 indices for the kernels. int64 is clamped to
// [-1, in_features] before narrowing, even when validated (idx may have been
// rewritten through .data since): 2^32 + 5 must reach the kernels' guard as a
// bad index, not wrap into the valid column 5.
at::Tensor kernel_indices(const at::Tensor& idx, int64_t in_features) {
  if (idx.scalar_type() == at::kLong) return aligned_contiguous(idx.clamp(-1, in_features).to(at::kInt));
  return aligned_contiguous(idx);
}

// t [..., features] as [rows, features] with unit inner stride (any row stride).
at::Tensor as_rows(const at::Tensor& t, int64_t rows, int64_t features) {
  at::Tensor t_2d = t.reshape({rows, features});
  if (features > 1 && t_2d.stride(1) != 1) t_2d = t_2d.contiguous();
  return t_2d;
}

template <typename F>
void with_index_type(const at::Tensor& idx, F&& f) {
  idx.scalar_type() == at::kShort ? f(int16_t{}) : f(int32_t{});
}

struct CallContext {
  c10::DeviceIndex device;
  cudaStream_t stream;
  bool capturing;
  int* flag;
};

// Entered by every op after the shape checks, under the device guard.
CallContext begin_call(const at::Tensor& any_input) {
  const c10::DeviceIndex device = any_input.device().index();
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "condensed_linear: unsupported CUDA device index ", int(device));
  raise_if_a_kernel_met_a_bad_index(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const bool capturing = is_capturing(stream);
  return CallContext{device, stream, capturing, bad_index_flag(device, capturing)};
}

// ---- the ops ---------------------------------------------------------------------

at::Tensor condensed_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                 const std::optional<at::Tensor>& bias) {
  check_condensed_linear_inputs(x, values, idx, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const CallContext call = begin_call(x);
  const int64_t in_features = x.size(-1);
  const int64_t out_features = values.size(0);
  const int64_t fan_in = values.size(1);
  at::Tensor y = at::empty(condensed_linear_output_shape(x, values), x.options());
  // Checked on every call, even with nothing to compute, like the CPU ops.
  validate_indices(idx, in_features, call.capturing);
  if (y.numel() == 0) return y;
  const int64_t batch = y.numel() / out_features;
  const at::Tensor idx_c = kernel_indices(idx, in_features);
  const at::Tensor values_c = aligned_contiguous(values);
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor x_2d = as_rows(x, batch, in_features);
  const k::XAccess access = x_access();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "condensed_linear_cuda", [&] {
    using kernel_scalar_t = typename KernelType<scalar_t>::type;
    with_index_type(idx_c, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const k::ForwardProblem<kernel_scalar_t, index_t> p{
          kernel_ptr<scalar_t>(x_2d), x_2d.stride(0),
          kernel_ptr<scalar_t>(values_c), idx_c.data_ptr<index_t>(),
          bias_c.defined() ? kernel_ptr<scalar_t>(bias_c) : nullptr,
          kernel_ptr<scalar_t>(y), out_features,
          batch, in_features, out_features, fan_in,
          /*row_offsets=*/nullptr, call.flag};
      const k::LaunchPlan plan = k::plan_forward<kernel_scalar_t>(batch, in_features, out_features, double(fan_in),
                                                                  device_limits(call.device), access);
      C10_CUDA_CHECK(k::launch_forward(p, plan, call.stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

// grad_x = grad_y @ W.
at::Tensor condensed_linear_grad_input_cuda(const at::Tensor& grad_y, const at::Tensor& values, const at::Tensor& idx,
                                            int64_t in_features) {
  check_condensed_linear_grad_input_inputs(grad_y, values, idx, in_features);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const CallContext call = begin_call(grad_y);
  std::vector<int64_t> shape = grad_y.sizes().vec();
  shape.back() = in_features;
  at::Tensor grad_x = at::empty(shape, grad_y.options());
  validate_indices(idx, in_features, call.capturing);
  if (grad_x.numel() == 0) return grad_x;
  const int64_t out_features = values.size(0);
  const int64_t fan_in = values.size(1);
  const int64_t entries = out_features * fan_in;
  const int64_t batch = grad_x.numel() / in_features;
  if (entries == 0) return grad_x.zero_();
  const at::Tensor idx_c = kernel_indices(idx, in_features);
  const at::Tensor values_c = aligned_contiguous(values);
  const at::Tensor grad_y_2d = as_rows(grad_y, batch, out_features);
  const k::DeviceLimits& limits = device_limits(call.device);

  const std::string path = grad_input_path();
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const bool scatter = path == "scatter" || (path == "auto" && !deterministic && batch <= kScatterMaxBatch);
  if (scatter) at::globalContext().alertNotDeterministic("condensed_linear_grad_input (CONDENSED_OPS_CUDA_GRAD_INPUT=scatter)");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "condensed_linear_grad_input_cuda", [&] {
    using kernel_scalar_t = typename KernelType<scalar_t>::type;
    using acc = k::acc_t<kernel_scalar_t>;
    with_index_type(idx_c, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      if (scatter) {
        // Atomics add in float (double for double); 16-bit results round once at the end.
        constexpr bool in_place = std::is_same_v<acc, kernel_scalar_t>;
        const at::Tensor grad_x_acc =
            in_place ? grad_x.zero_() : at::zeros({batch, in_features}, grad_y.options().dtype(at::kFloat));
        const k::ScatterGradInputProblem<kernel_scalar_t, index_t> p{
            kernel_ptr<scalar_t>(grad_y_2d), grad_y_2d.stride(0), kernel_ptr<scalar_t>(values_c),
            idx_c.data_ptr<index_t>(), grad_x_acc.data_ptr<acc>(), batch, in_features, out_features, fan_in, call.flag};
        C10_CUDA_CHECK(k::launch_grad_input_scatter(p, limits, call.stream));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (!in_place) grad_x.view({batch, in_features}).copy_(grad_x_acc);
        return;
      }
      // Deterministic: W's transposed layout, then the forward kernels over it.
      TORCH_CHECK(entries <= std::numeric_limits<int32_t>::max(),
                  "condensed_linear: the deterministic CUDA grad_x handles fewer than 2^31 weights, got ", entries);
      size_t sort_bytes = 0;
      C10_CUDA_CHECK(k::transposed_layout_sort_bytes(entries, in_features, &sort_bytes));
      const auto int32 = grad_y.options().dtype(at::kInt);
      const at::Tensor keys = at::empty({2, entries}, int32);
      const at::Tensor positions = at::empty({2, entries}, int32);
      const at::Tensor rows = at::empty({entries}, int32);
      const at::Tensor sort_scratch = at::empty({int64_t(std::max<size_t>(sort_bytes, 1))}, grad_y.options().dtype(at::kByte));
      const at::Tensor column_offsets = at::empty({in_features + 1}, grad_y.options().dtype(at::kLong));
      const at::Tensor column_values = at::empty({entries}, values.options());
      k::TransposedLayoutProblem<kernel_scalar_t, index_t> t{};
      t.values = kernel_ptr<scalar_t>(values_c);
      t.idx = idx_c.data_ptr<index_t>();
      t.out_features = out_features;
      t.fan_in = fan_in;
      t.in_features = in_features;
      t.keys[0] = reinterpret_cast<uint32_t*>(keys[0].data_ptr<int32_t>());
      t.keys[1] = reinterpret_cast<uint32_t*>(keys[1].data_ptr<int32_t>());
      t.positions[0] = positions[0].data_ptr<int32_t>();
      t.positions[1] = positions[1].data_ptr<int32_t>();
      t.sort_scratch = sort_scratch.data_ptr();
      t.sort_scratch_bytes = sort_bytes;
      t.column_offsets = column_offsets.data_ptr<int64_t>();
      t.rows = rows.data_ptr<int32_t>();
      t.column_values = kernel_ptr<scalar_t>(column_values);
      t.bad_index_flag = call.flag;
      C10_CUDA_CHECK(k::build_transposed_layout(t, call.stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // rows < out_features by construction: the guard in the kernel never fires.
      const k::ForwardProblem<kernel_scalar_t, int32_t> p{
          kernel_ptr<scalar_t>(grad_y_2d), grad_y_2d.stride(0),
          kernel_ptr<scalar_t>(column_values), rows.data_ptr<int32_t>(), /*bias=*/nullptr,
          kernel_ptr<scalar_t>(grad_x), in_features,
          batch, out_features, in_features, /*fan_in=*/0,
          column_offsets.data_ptr<int64_t>(), call.flag};
      const k::LaunchPlan plan = k::plan_forward<kernel_scalar_t>(
          batch, out_features, in_features, double(entries) / double(in_features), limits, x_access());
      C10_CUDA_CHECK(k::launch_forward(p, plan, call.stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  validate_indices(idx, in_features, call.capturing);
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
    using kernel_scalar_t = typename KernelType<scalar_t>::type;
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
          kernel_ptr<scalar_t>(grad_y_2d), grad_y_2d.stride(0),
          kernel_ptr<scalar_t>(x_2d), x_2d.stride(0),
          idx_c.data_ptr<index_t>(), kernel_ptr<scalar_t>(grad),
          partial.defined() ? partial.data_ptr<acc>() : nullptr,
          batch, in_features, out_features, fan_in, call.flag};
      C10_CUDA_CHECK(k::launch_grad_values(p, plan, call.stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(condensed_ops, CUDA, m) {
  m.impl("condensed_linear", &condensed_linear_cuda);
  m.impl("condensed_linear_grad_input", &condensed_linear_grad_input_cuda);
  m.impl("condensed_linear_grad_values", &condensed_linear_grad_values_cuda);
}

}  // namespace condensed_ops::cuda
