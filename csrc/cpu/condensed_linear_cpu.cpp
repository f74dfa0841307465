// CPU glue: checks, layout, index validation, thread split, kernel choice.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <set>
#include <stdexcept>
#include <vector>

#include "../condensed_linear.h"
#include "../kernels/cpu/condensed_linear.h"
#include "cpu_kernel_choice.h"

namespace condensed_ops::cpu {
namespace {

namespace k = kernels;

enum class Isa { Auto, Portable, Avx2, Avx512 };
enum class Strategy { Auto, Gather, Transposed };
std::atomic<Isa> isa_override{Isa::Auto};
std::atomic<Strategy> strategy_override{Strategy::Auto};

// Measured crossover (768<->3072, 90%, 1 thread, this repo's Xeon): gather
// costs ~50 us per extra row, one transposed tile costs the same for 1..16
// rows; gather wins up to 4 rows (237 vs 285 us) and loses from 5 (325 vs 288).
constexpr int64_t kGatherMaxBatch = 4;

// The widest flavour this CPU runs, unless a test forced one (set_kernel_override
// refuses flavours the CPU lacks). AVX-512 CPUs gather with the AVX2 kernels.
Isa active() {
  const Isa forced = isa_override.load();
  if (forced != Isa::Auto) return forced;
  return avx512_supported() ? Isa::Avx512 : avx2_supported() ? Isa::Avx2 : Isa::Portable;
}

bool use_gather(int64_t batch) {
  switch (strategy_override.load()) {
    case Strategy::Gather: return true;
    case Strategy::Transposed: return false;
    default: return batch <= kGatherMaxBatch;
  }
}

// Fails with IndexError naming the first entry of idx outside [0, in_features).
void check_index_range(const at::Tensor& idx, int64_t in_features) {
  const int64_t n = idx.numel();
  int64_t bad;
  switch (idx.scalar_type()) {
    case at::kShort: bad = k::first_index_out_of_range(idx.data_ptr<int16_t>(), n, in_features); break;
    case at::kInt: bad = k::first_index_out_of_range(idx.data_ptr<int32_t>(), n, in_features); break;
    default: bad = k::first_index_out_of_range(idx.data_ptr<int64_t>(), n, in_features); break;
  }
  if (bad >= 0) {
    const int64_t fan_in = idx.size(1);
    TORCH_CHECK_INDEX(false, "condensed_linear: idx[", bad / fan_in, ", ", bad % fan_in, "] = ",
                      idx.view(-1)[bad].item<int64_t>(), " is outside [0, in_features=", in_features, ")");
  }
}

// Returns false if the kernels met an index outside [0, in_features).
template <typename scalar_t, typename index_t>
bool run_gather(const k::CondensedLinearProblem<scalar_t, index_t>& p, Isa isa) {
  // ~32k multiply-adds per task keeps the fork/join cost small at batch 1.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.fan_in * p.batch));
  std::atomic<bool> all_inside{true};
  at::parallel_for(0, p.out_features, grain, [&](int64_t begin, int64_t end) {
    bool inside;
    if constexpr (!std::is_same_v<scalar_t, double>) {
#if defined(CONDENSED_OPS_WITH_AVX2)
      if (isa != Isa::Portable) {
        inside = k::avx2::gather(p, begin, end);
        if (!inside) all_inside = false;
        return;
      }
#endif
    }
    inside = k::portable::gather(p, begin, end);
    if (!inside) all_inside = false;
  });
  return all_inside;
}

// Reads x through idx without checking: run only after check_index_range.
template <typename scalar_t, typename index_t>
void run_transposed(const k::CondensedLinearProblem<scalar_t, index_t>& p, Isa isa) {
  using acc = k::acc_t<scalar_t>;
  constexpr int64_t kBlock = 8;  // keep chunk edges on the kernels' output groups
  const int64_t tiles = (p.batch + k::kTransposedTileRows - 1) / k::kTransposedTileRows;
  // Split outputs too when there are fewer tiles than threads can use; each
  // task re-transposes its tile, which costs in_features*16, not out*fan_in.
  const int64_t wanted_chunks = (2 * at::get_num_threads() + tiles - 1) / tiles;
  const int64_t out_chunks = std::clamp<int64_t>(wanted_chunks, 1, std::max<int64_t>(1, p.out_features / 64));
  const int64_t chunk_outputs = ((p.out_features + out_chunks - 1) / out_chunks + kBlock - 1) / kBlock * kBlock;
  at::parallel_for(0, tiles * out_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> scratch(k::transposed_scratch_size(p.in_features));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row0 = (task / out_chunks) * k::kTransposedTileRows;
      const int64_t out_begin = std::min(p.out_features, (task % out_chunks) * chunk_outputs);
      const int64_t out_end = std::min(p.out_features, out_begin + chunk_outputs);
      if (out_begin == out_end) continue;
      if constexpr (!std::is_same_v<scalar_t, double>) {
#if defined(CONDENSED_OPS_WITH_AVX2)
#if defined(CONDENSED_OPS_WITH_AVX512)
        if (isa == Isa::Avx512) {
          k::avx512::transposed(p, row0, out_begin, out_end, scratch.data());
          continue;
        }
#endif
        if (isa == Isa::Avx2) {
          k::avx2::transposed(p, row0, out_begin, out_end, scratch.data());
          continue;
        }
#endif
      }
      k::portable::transposed(p, row0, out_begin, out_end, scratch.data());
    }
  });
}

// torch's c10::Half / c10::BFloat16 are bit-compatible with the kernels' types.
template <typename T> struct KernelType { using type = T; };
template <> struct KernelType<c10::Half> { using type = k::Half; };
template <> struct KernelType<c10::BFloat16> { using type = k::BFloat16; };

at::Tensor condensed_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                const std::optional<at::Tensor>& bias) {
  check_condensed_linear_inputs(x, values, idx, bias);
  const int64_t in_features = x.size(-1);
  const int64_t out_features = values.size(0);
  at::Tensor y = at::empty(condensed_linear_output_shape(x, values), x.options());
  if (y.numel() == 0) return y;
  const int64_t batch = y.numel() / out_features;

  at::Tensor idx_c = idx.contiguous();
  const bool gather = use_gather(batch);
  // int64 narrows to int32 only after a range check, so 2^32 + 5 cannot wrap
  // into a valid column; the transposed kernels need the check anyway.
  if (!gather || idx_c.scalar_type() == at::kLong) check_index_range(idx_c, in_features);
  if (idx_c.scalar_type() == at::kLong) idx_c = idx_c.to(at::kInt);
  const at::Tensor values_c = values.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  // Kernels read x in the accumulator type with unit inner stride: 16-bit
  // inputs are widened once per call here, not once per gathered element.
  at::Tensor x_2d = x.reshape({batch, in_features});
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (x_2d.scalar_type() != acc_dtype || x_2d.stride(1) != 1) x_2d = x_2d.to(acc_dtype).contiguous();

  const Isa isa = active();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "condensed_linear_cpu", [&] {
    using kernel_scalar_t = typename KernelType<scalar_t>::type;
    using acc = k::acc_t<kernel_scalar_t>;
    auto launch = [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const k::CondensedLinearProblem<kernel_scalar_t, index_t> p{
          x_2d.data_ptr<acc>(),
          x_2d.stride(0),
          reinterpret_cast<const kernel_scalar_t*>(values_c.data_ptr<scalar_t>()),
          idx_c.data_ptr<index_t>(),
          bias_c.defined() ? reinterpret_cast<const kernel_scalar_t*>(bias_c.data_ptr<scalar_t>()) : nullptr,
          reinterpret_cast<kernel_scalar_t*>(y.data_ptr<scalar_t>()),
          batch,
          in_features,
          out_features,
          values.size(1)};
      if (!gather) return run_transposed(p, isa);
      // The gather kernels check indices as they load them; name the culprit.
      if (!run_gather(p, isa)) check_index_range(idx_c, in_features);
    };
    idx_c.scalar_type() == at::kShort ? launch(int16_t{}) : launch(int32_t{});
  });
  return y;
}

}  // namespace

void set_kernel_override(const std::string& isa, const std::string& strategy) {
  Isa new_isa;
  if (isa == "auto") new_isa = Isa::Auto;
  else if (isa == "portable") new_isa = Isa::Portable;
  else if (isa == "avx2") new_isa = Isa::Avx2;
  else if (isa == "avx512") new_isa = Isa::Avx512;
  else throw std::invalid_argument("isa must be 'auto', 'portable', 'avx2' or 'avx512', got '" + isa + "'");
  if ((new_isa == Isa::Avx2 && !avx2_supported()) || (new_isa == Isa::Avx512 && !avx512_supported())) {
    throw std::invalid_argument("isa '" + isa + "' is not available on this CPU or build");
  }
  Strategy new_strategy;
  if (strategy == "auto") new_strategy = Strategy::Auto;
  else if (strategy == "gather") new_strategy = Strategy::Gather;
  else if (strategy == "transposed") new_strategy = Strategy::Transposed;
  else throw std::invalid_argument("strategy must be 'auto', 'gather' or 'transposed', got '" + strategy + "'");
  isa_override = new_isa;
  strategy_override = new_strategy;
}

std::string active_isa() {
  switch (active()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "portable";
  }
}

bool avx2_compiled() {
#if defined(CONDENSED_OPS_WITH_AVX2)
  return true;
#else
  return false;
#endif
}

bool avx2_supported() { return avx2_compiled() && k::avx2::cpu_supports(); }
bool avx512_supported() { return avx2_supported() && k::avx512::cpu_supports(); }

int64_t gather_max_batch() { return kGatherMaxBatch; }

int64_t threads_used_by_parallel_for(int64_t items) {
  std::mutex mutex;
  std::set<int> threads;
  at::parallel_for(0, items, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mutex);
    threads.insert(at::get_thread_num());
  });
  return int64_t(threads.size());
}

TORCH_LIBRARY_IMPL(condensed_ops, CPU, m) { m.impl("condensed_linear", &condensed_linear_cpu); }

}  // namespace condensed_ops::cpu
