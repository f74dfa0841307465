// Switches that force a kernel path: for tests, benchmarks, and a machine
// where the automatic choice is wrong. One mechanism for every device: each
// option starts from its environment variable (CONDENSED_OPS_<NAME>, e.g.
// CONDENSED_OPS_CPU_STRATEGY=scalar), read on first use, and
// set_kernel_option (Python: condensed_ops._C._set_kernel_option) changes it
// for the process. Every option's first choice is "auto". Torch-free.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace condensed_ops {

enum class KernelOption : int {
  CpuIsa,         // auto | portable | avx2 | avx512: the widest the CPU runs
  CpuStrategy,    // auto | gather | scalar | tiled: the row layout's kernel at every batch size
  CpuSmallBatch,  // auto | gather | scalar: the small-batch kernel (auto: calibrated)
  CudaX,          // auto | shared | global: where the CUDA kernels read x from
  CudaGradInput,  // auto | scatter | columns: CUDA grad_x by atomics, or over W's column layout
  kCount,
};

// The index of the option's current value among its choices (0 = "auto").
// Throws std::invalid_argument if its environment variable holds no choice.
int kernel_option(KernelOption option);
std::string kernel_option_value(KernelOption option);

// Throws std::invalid_argument naming the option and its choices, or saying
// that this CPU or build cannot run the value.
void set_kernel_option(const std::string& name, const std::string& value);

// Every option's name and current value.
std::vector<std::pair<std::string, std::string>> kernel_options();

}  // namespace condensed_ops
