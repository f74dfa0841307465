// CUDA index validation: the per-device bad-index flag and the CUDA scan
// (see index_guard.h).
#include "index_guard.h"

#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <atomic>
#include <mutex>

#include "../cache_registry.h"

namespace condensed_ops::cuda {
namespace {

constexpr int kMaxDevices = C10_COMPILE_TIME_MAX_GPUS;

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Caches of CUDA tensors keep nothing computed while capturing (cache_registry.h).
const bool capture_check_registered = [] {
  CacheRegistry::instance().set_cuda_capture_check(
      [] { return is_capturing(c10::cuda::getCurrentCUDAStream().stream()); });
  return true;
}();

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

// The CUDA scan behind validate_indices: one min/max reduction, and the host
// waits for the two numbers.
bool all_indices_inside(const at::Tensor& idx, int64_t in_features) {
  const auto [lowest, highest] = idx.aminmax();
  const at::Tensor range = at::stack({lowest.to(at::kLong), highest.to(at::kLong)}).cpu();  // the one sync
  return range[0].item<int64_t>() >= 0 && range[1].item<int64_t>() < in_features;
}

}  // namespace

CallContext begin_call(const at::Tensor& any_input) {
  const c10::DeviceIndex device = any_input.device().index();
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "condensed_linear: unsupported CUDA device index ", int(device));
  raise_if_a_kernel_met_a_bad_index(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const bool capturing = is_capturing(stream);
  return CallContext{device, stream, capturing, bad_index_flag(device, capturing)};
}

void validate_indices(const at::Tensor& idx, int64_t in_features, WidthSource width, const CallContext& call) {
  if (!call.capturing) condensed_ops::validate_indices(idx, in_features, width, all_indices_inside);
}

}  // namespace condensed_ops::cuda
