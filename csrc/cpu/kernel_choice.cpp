#include "kernel_choice.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <random>
#include <vector>

#include "../kernel_options.h"
#include "../kernels/cpu/cpu_kernels.h"

namespace condensed_ops::cpu {
namespace {

namespace k = kernels;

#if defined(CONDENSED_OPS_WITH_AVX2)
// Times gather and scalar on one thread over a synthetic layer (1024 -> 1024,
// fan-in 102: 90% sparse, 400 KiB of weights, L2-resident like the layers that
// are not memory bound): best of 7 interleaved runs each.
SmallBatchChoice calibrate() {
  constexpr int64_t kIn = 1024, kOut = 1024, kFanIn = 102;
  std::mt19937 random(12345);
  std::vector<float> x(kIn), values(kOut * kFanIn), y(kOut);
  std::vector<int16_t> idx(kOut * kFanIn);
  std::uniform_real_distribution<float> unit(-1.f, 1.f);
  for (float& v : x) v = unit(random);
  for (float& v : values) v = unit(random);
  std::vector<int16_t> columns(kIn);
  for (int64_t c = 0; c < kIn; ++c) columns[c] = int16_t(c);
  for (int64_t o = 0; o < kOut; ++o) {
    std::shuffle(columns.begin(), columns.end(), random);
    std::sort(columns.begin(), columns.begin() + kFanIn);
    std::copy(columns.begin(), columns.begin() + kFanIn, idx.begin() + o * kFanIn);
  }
  const k::CondensedLinearProblem<float, int16_t> p{x.data(), kIn, values.data(), idx.data(), nullptr, y.data(),
                                                     1, kIn, kOut, kFanIn};
  auto seconds = [&](auto&& kernel) {
    const auto start = std::chrono::steady_clock::now();
    kernel(p, 0, kOut);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  double gather = 1e9, scalar = 1e9;
  for (int round = 0; round < 9; ++round) {
    const double g = seconds(k::avx2::gather<float, int16_t>);
    const double s = seconds(k::avx2::scalar<float, int16_t>);
    if (round >= 2) {  // the first rounds warm caches and clocks
      gather = std::min(gather, g);
      scalar = std::min(scalar, s);
    }
  }
  char reason[96];
  std::snprintf(reason, sizeof reason, "calibrated: gather %.1f us, scalar %.1f us", gather * 1e6, scalar * 1e6);
  return SmallBatchChoice{gather < scalar ? Strategy::Gather : Strategy::Scalar, reason};
}
#endif

}  // namespace

Isa active_isa() {
  switch (kernel_option<KernelOption::CpuIsa>()) {
    case CpuIsaChoice::Portable: return Isa::Portable;
    case CpuIsaChoice::Avx2: return Isa::Avx2;
    case CpuIsaChoice::Avx512: return Isa::Avx512;
    case CpuIsaChoice::Auto: break;
  }
  return k::avx512::cpu_supports() ? Isa::Avx512 : k::avx2::cpu_supports() ? Isa::Avx2 : Isa::Portable;
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "portable";
  }
}

std::string strategy_name(Strategy strategy) {
  switch (strategy) {
    case Strategy::Gather: return "gather";
    case Strategy::Scalar: return "scalar";
    default: return "tiled";
  }
}

SmallBatchChoice small_batch_choice(Isa isa) {
  if (isa == Isa::Portable) return SmallBatchChoice{Strategy::Scalar, "the portable flavour has no gather"};
  switch (kernel_option<KernelOption::CpuSmallBatch>()) {
    case CpuSmallBatchChoice::Gather: return SmallBatchChoice{Strategy::Gather, "forced by kernel option cpu_small_batch"};
    case CpuSmallBatchChoice::Scalar: return SmallBatchChoice{Strategy::Scalar, "forced by kernel option cpu_small_batch"};
    case CpuSmallBatchChoice::Auto: break;
  }
#if defined(CONDENSED_OPS_WITH_AVX2)
  static const SmallBatchChoice calibrated = calibrate();
  return calibrated;
#else
  return SmallBatchChoice{Strategy::Scalar, "built without AVX2"};
#endif
}

Strategy row_strategy(int64_t batch, Isa isa) {
  switch (kernel_option<KernelOption::CpuStrategy>()) {
    case CpuStrategyChoice::Gather: return isa == Isa::Portable ? Strategy::Scalar : Strategy::Gather;
    case CpuStrategyChoice::Scalar: return Strategy::Scalar;
    case CpuStrategyChoice::Tiled: return Strategy::Tiled;
    case CpuStrategyChoice::Auto: break;
  }
  return batch <= kSmallBatchMax ? small_batch_choice(isa).strategy : Strategy::Tiled;
}

int64_t window_width(Isa isa) { return isa == Isa::Avx512 ? k::kPermuteWindow : k::kScalarWindow; }

namespace {
std::mutex window_mutex;
int window_decision = -1;  // -1 undecided, 0 scalar loads, 1 gathers
std::string window_reason;
}  // namespace

bool window_gathers(const std::function<void(bool)>& time_run) {
  switch (kernel_option<KernelOption::CpuSmallBatch>()) {
    case CpuSmallBatchChoice::Gather: return true;
    case CpuSmallBatchChoice::Scalar: return false;
    case CpuSmallBatchChoice::Auto: break;
  }
  const std::lock_guard<std::mutex> lock(window_mutex);
  if (window_decision >= 0) return window_decision == 1;
  double best[2] = {1e30, 1e30};  // [scalar, gather], the fastest of three runs each, alternated
  for (int round = 0; round < 3; ++round) {
    for (int gather = 0; gather < 2; ++gather) {
      const auto start = std::chrono::steady_clock::now();
      time_run(gather == 1);
      best[gather] = std::min(best[gather], std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
  }
  window_decision = best[1] < best[0] ? 1 : 0;
  char reason[128];
  std::snprintf(reason, sizeof reason, "timed on the first layer: gathers %.1f us, scalar loads %.1f us",
                best[1] * 1e6, best[0] * 1e6);
  window_reason = reason;
  return window_decision == 1;
}

std::string window_gathers_reason() {
  switch (kernel_option<KernelOption::CpuSmallBatch>()) {
    case CpuSmallBatchChoice::Gather: return "gathers, forced by kernel option cpu_small_batch";
    case CpuSmallBatchChoice::Scalar: return "scalar loads, forced by kernel option cpu_small_batch";
    case CpuSmallBatchChoice::Auto: break;
  }
  const std::lock_guard<std::mutex> lock(window_mutex);
  if (window_decision < 0) return "";
  return std::string(window_decision == 1 ? "gathers" : "scalar loads") + ", " + window_reason;
}

namespace {
thread_local Isa last_isa = Isa::Portable;
thread_local const char* last_kernel = "none";
std::array<std::atomic<int64_t>, 3> runs_per_isa{};
}  // namespace

void note_kernel_run(Isa isa, const char* kernel) {
  last_isa = isa;
  last_kernel = kernel;
  runs_per_isa[size_t(isa)].fetch_add(1, std::memory_order_relaxed);
}

int64_t kernel_runs(Isa isa) { return runs_per_isa[size_t(isa)].load(std::memory_order_relaxed); }

std::string last_kernel_run() { return isa_name(last_isa) + " " + last_kernel; }

}  // namespace condensed_ops::cpu
