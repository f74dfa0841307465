#include "kernel_options.h"

#include <array>
#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include "kernels/cpu/cpu_kernels.h"

namespace condensed_ops {
namespace {

struct Spec {
  const char* name;
  const char* environment;
  std::vector<std::string> choices;
};

const std::array<Spec, size_t(KernelOption::kCount)>& specs() {
  static const std::array<Spec, size_t(KernelOption::kCount)> table{{
      {"cpu_isa", "CONDENSED_OPS_CPU_ISA", {"auto", "portable", "avx2", "avx512"}},
      {"cpu_strategy", "CONDENSED_OPS_CPU_STRATEGY", {"auto", "gather", "scalar", "tiled"}},
      {"cpu_small_batch", "CONDENSED_OPS_CPU_SMALL_BATCH", {"auto", "gather", "scalar"}},
      {"cuda_x", "CONDENSED_OPS_CUDA_X", {"auto", "shared", "global"}},
      {"cuda_grad_input", "CONDENSED_OPS_CUDA_GRAD_INPUT", {"auto", "scatter", "columns"}},
      {"cuda_lanes_per_row", "CONDENSED_OPS_CUDA_LANES_PER_ROW", {"auto", "1", "2", "4", "8", "16", "32"}},
      {"cuda_packs_in_flight", "CONDENSED_OPS_CUDA_PACKS_IN_FLIGHT", {"auto", "2", "4"}},
      {"cuda_splits", "CONDENSED_OPS_CUDA_SPLITS", {"auto", "1", "2", "4", "8"}},
      {"cuda_batch_tile", "CONDENSED_OPS_CUDA_BATCH_TILE", {"auto", "1", "2", "4", "8", "16"}},
      {"cuda_tuned", "CONDENSED_OPS_CUDA_TUNED", {"auto", "off"}},
  }};
  return table;
}

// The typed choices (kernel_options.h) follow the table's names.
static_assert(int(CpuIsaChoice::Avx512) == 3 && int(CpuStrategyChoice::Tiled) == 3 &&
              int(CpuSmallBatchChoice::Scalar) == 2 && int(CudaXChoice::Global) == 2 &&
              int(CudaGradInputChoice::Columns) == 2 && int(CudaTunedChoice::Off) == 1);

// Each option's choice index; -1 until first read.
struct Current {
  std::atomic<int> values[size_t(KernelOption::kCount)];
  Current() {
    for (auto& v : values) v.store(-1);
  }
};
std::atomic<int>& current(size_t option) {
  static Current all;
  return all.values[option];
}

std::string choices_text(const Spec& spec) {
  std::string text;
  for (size_t i = 0; i < spec.choices.size(); ++i) text += (i ? ", '" : "'") + spec.choices[i] + "'";
  return text;
}

bool runs_here(KernelOption option, const std::string& value) {
  if (option != KernelOption::CpuIsa) return true;
  if (value == "avx2") return kernels::avx2::cpu_supports();
  if (value == "avx512") return kernels::avx512::cpu_supports();
  return true;
}

int choice_index(KernelOption option, const std::string& value, const std::string& source) {
  const Spec& spec = specs()[size_t(option)];
  for (size_t i = 0; i < spec.choices.size(); ++i) {
    if (spec.choices[i] != value) continue;
    if (!runs_here(option, value)) {
      throw std::invalid_argument(source + " = '" + value + "' is not available on this CPU or build");
    }
    return int(i);
  }
  throw std::invalid_argument(source + " must be one of " + choices_text(spec) + ", got '" + value + "'");
}

}  // namespace

int kernel_option_index(KernelOption option) {
  std::atomic<int>& slot = current(size_t(option));
  int value = slot.load(std::memory_order_relaxed);
  if (value >= 0) return value;
  const Spec& spec = specs()[size_t(option)];
  const char* from_environment = std::getenv(spec.environment);
  value = from_environment == nullptr || *from_environment == '\0'
              ? 0
              : choice_index(option, from_environment, std::string("environment variable ") + spec.environment);
  slot.store(value, std::memory_order_relaxed);
  return value;
}

std::string kernel_option_value(KernelOption option) {
  return specs()[size_t(option)].choices[size_t(kernel_option_index(option))];
}

int kernel_option_number(KernelOption option) {
  const int index = kernel_option_index(option);
  return index == 0 ? 0 : std::stoi(specs()[size_t(option)].choices[size_t(index)]);
}

void set_kernel_option(const std::string& name, const std::string& value) {
  for (size_t i = 0; i < specs().size(); ++i) {
    if (specs()[i].name != name) continue;
    current(i).store(choice_index(KernelOption(i), value, "kernel option '" + name + "'"));
    return;
  }
  std::string names;
  for (const Spec& spec : specs()) names += (names.empty() ? "'" : ", '") + std::string(spec.name) + "'";
  throw std::invalid_argument("unknown kernel option '" + name + "'; the options are " + names);
}

std::vector<std::pair<std::string, std::string>> kernel_options() {
  std::vector<std::pair<std::string, std::string>> all;
  for (size_t i = 0; i < specs().size(); ++i) all.emplace_back(specs()[i].name, kernel_option_value(KernelOption(i)));
  return all;
}

}  // namespace condensed_ops
