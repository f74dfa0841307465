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
  CpuIsa,         // the instruction set (auto: the widest the CPU runs)
  CpuStrategy,    // the row layout's kernel at every batch size
  CpuSmallBatch,  // the small-batch kernel (auto: calibrated)
  CudaX,          // where the CUDA kernels read x from
  CudaGradInput,  // CUDA grad_x by atomics, or over W's column layout
  CudaLanesPerRow,     // CUDA forward: lanes that share one output row
  CudaPacksInFlight,   // CUDA forward: 16-byte weight packs a lane loads before it gathers
  CudaSplits,          // CUDA forward: blocks that share one row's fan-in
  CudaBatchTile,       // CUDA forward: batch rows per pass
  CudaTuned,           // CUDA forward: the measured table (tuned_forward.inc) before the rule, or the rule alone
  kCount,
};

// Each option's choices, in the order of its names in kernel_options.cpp's
// one table (checked there by count).
enum class CpuIsaChoice { Auto, Portable, Avx2, Avx512 };
enum class CpuStrategyChoice { Auto, Gather, Scalar, Tiled };
enum class CpuSmallBatchChoice { Auto, Gather, Scalar };
enum class CudaXChoice { Auto, Shared, Global };
enum class CudaGradInputChoice { Auto, Scatter, Columns };
enum class CudaTunedChoice { Auto, Off };

template <KernelOption option> struct ChoiceOf;
template <> struct ChoiceOf<KernelOption::CpuIsa> { using type = CpuIsaChoice; };
template <> struct ChoiceOf<KernelOption::CpuStrategy> { using type = CpuStrategyChoice; };
template <> struct ChoiceOf<KernelOption::CpuSmallBatch> { using type = CpuSmallBatchChoice; };
template <> struct ChoiceOf<KernelOption::CudaX> { using type = CudaXChoice; };
template <> struct ChoiceOf<KernelOption::CudaGradInput> { using type = CudaGradInputChoice; };
template <> struct ChoiceOf<KernelOption::CudaTuned> { using type = CudaTunedChoice; };

// The index of the option's current value among its choices (0 = "auto").
// Throws std::invalid_argument if its environment variable holds no choice.
int kernel_option_index(KernelOption option);
std::string kernel_option_value(KernelOption option);

// The option's current choice, typed:
//   switch (kernel_option<KernelOption::CudaX>()) { case CudaXChoice::Shared: ... }
template <KernelOption option>
typename ChoiceOf<option>::type kernel_option() {
  return typename ChoiceOf<option>::type(kernel_option_index(option));
}

// The numeric options' value (the CUDA forward variants): 0 for "auto".
int kernel_option_number(KernelOption option);

// Throws std::invalid_argument naming the option and its choices, or saying
// that this CPU or build cannot run the value.
void set_kernel_option(const std::string& name, const std::string& value);

// Every option's name and current value.
std::vector<std::pair<std::string, std::string>> kernel_options();

}  // namespace condensed_ops
