// Launch planning and launching shared by the forward and backward kernels:
// the shared-memory budget, the batch tile, the slab size rule, the switch
// that turns a planned tile into a template argument, and the launch with its
// shared-memory opt-in. Host code; the emulator (tests/cuda_emulator) rewrites
// the launch syntax here like in the .cu files.
//
// The kernels with a batch-tile template take no __launch_bounds__: with it
// ptxas trades a few registers for 8-32 bytes of spills in half of the
// instantiations (sm_90, nvcc 13.0); without it none spill and all stay under
// 100 registers, well inside 256-thread blocks.
#pragma once

#include <algorithm>
#include <type_traits>
#include <utility>

#include "cuda_kernels.h"
#include "device_helpers.cuh"

namespace condensed_ops::kernels::cuda {

// Blocks for this many waves when the problem has them: a last, partial wave
// then idles at most ~1/kWaves of the GPU.
constexpr int64_t kWaves = 8;

inline int pow2_at_least(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p <<= 1;
  return p;
}

// Dynamic shared memory one block may plan for: kSharedBudget, or less where
// the device's opt-in limit is lower (keeping the runtime's reserved 1 KB).
inline size_t shared_budget(const DeviceLimits& limits) {
  return std::min<size_t>(kSharedBudget, size_t(std::max(0, limits.max_shared_bytes_per_block - 1024)));
}

// Bytes of a staged x slab of `tile` rows, rounded up to 16: whatever a kernel
// keeps after the slab (grad_values' sums) then starts 16-byte aligned for
// packed accesses. (The forward kernel keeps nothing after it; the <= 15
// bytes cost nothing there.)
template <typename scalar_t>
size_t slab_bytes(int64_t in_features, int tile) {
  return size_t(round_up(in_features * tile * int64_t(sizeof(scalar_t)), 16));
}

// The batch tile: the whole batch when it fits one pass (at most
// kMaxBatchTile), halved while the slab plus `reserved` bytes would not fit
// the budget, unless x is read from global memory anyway. *fits says whether
// the slab that is left fits.
template <typename scalar_t>
int plan_batch_tile(int64_t batch, int64_t in_features, size_t reserved, size_t budget, XAccess access, bool* fits) {
  int tile = std::min(pow2_at_least(std::max<int64_t>(batch, 1)), kMaxBatchTile<scalar_t>);
  *fits = slab_bytes<scalar_t>(in_features, tile) + reserved <= budget;
  if (access != XAccess::Global) {
    while (!*fits && tile > 1) {
      tile /= 2;
      *fits = slab_bytes<scalar_t>(in_features, tile) + reserved <= budget;
    }
  }
  return tile;
}

// Calls launch(std::integral_constant<int, kTile>{}) for a planned tile: the
// one place where the run-time tile becomes a template argument.
template <typename scalar_t, typename Launch>
cudaError_t with_batch_tile(int tile, Launch&& launch) {
  auto run = [&](auto tile_constant) -> cudaError_t {
    if constexpr (decltype(tile_constant)::value > kMaxBatchTile<scalar_t>) {
      return cudaErrorInvalidValue;
    } else {
      return launch(tile_constant);
    }
  };
  switch (tile) {
    case 1: return run(std::integral_constant<int, 1>{});
    case 2: return run(std::integral_constant<int, 2>{});
    case 4: return run(std::integral_constant<int, 4>{});
    case 8: return run(std::integral_constant<int, 8>{});
    case 16: return run(std::integral_constant<int, 16>{});
    default: return cudaErrorInvalidValue;
  }
}

// Launches kernel(args...) with `shared_bytes` of dynamic shared memory,
// raising the kernel's limit first when that passes the default 48 KB.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, unsigned threads, size_t shared_bytes,
                          cudaStream_t stream, Args&&... args) {
  if (shared_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, shared_bytes, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

}  // namespace condensed_ops::kernels::cuda
