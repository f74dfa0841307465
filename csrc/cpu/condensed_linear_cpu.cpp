// CPU glue: checks, layout, index validation, thread split, kernel choice.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
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

// torch's c10::Half / c10::BFloat16 are bit-compatible with the kernels' types.
template <typename T> struct KernelType { using type = T; };
template <> struct KernelType<c10::Half> { using type = k::Half; };
template <> struct KernelType<c10::BFloat16> { using type = k::BFloat16; };

enum class Isa { Auto, Portable, Avx2, Avx512 };
enum class Strategy { Auto, Gather, Transposed };
std::atomic<Isa> isa_override{Isa::Auto};
std::atomic<Strategy> strategy_override{Strategy::Auto};

// Measured crossover (768<->3072, 90%, 1 thread, this repo's Xeon, 16-row tiles): gather
// costs ~50 us per extra row, one transposed tile costs the same for 1..32
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
  const int64_t mean_row_length = p.entries() / std::max<int64_t>(1, p.out_features);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, mean_row_length * p.batch));
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
  // Threads split the outputs, each walking all tiles over its own slice of
  // the weights: a slice stays in that core's L2 across tiles, where splitting
  // by tiles would make every core stream all weights once per tile. Each
  // task re-transposes its tile, which costs in_features * tile rows, not out * fan_in.
  const int64_t out_chunks =
      std::clamp<int64_t>(at::get_num_threads(), 1, std::max<int64_t>(1, p.out_features / 64));
  const int64_t chunk_outputs = ((p.out_features + out_chunks - 1) / out_chunks + kBlock - 1) / kBlock * kBlock;
  at::parallel_for(0, tiles * out_chunks, 1, [&](int64_t begin, int64_t end) {
    // 64-byte aligned (torch's CPU allocator): a tile column is one cache
    // line, and a malloc'd buffer (16-byte aligned) splits every zmm load in two.
    const at::Tensor scratch_tensor = at::empty({k::transposed_scratch_size(p.in_features)},
                                                at::TensorOptions().dtype(c10::CppTypeToScalarType<acc>::value));
    acc* scratch = scratch_tensor.data_ptr<acc>();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row0 = (task % tiles) * k::kTransposedTileRows;  // chunk-major: a thread keeps its slice
      const int64_t out_begin = std::min(p.out_features, (task / tiles) * chunk_outputs);
      const int64_t out_end = std::min(p.out_features, out_begin + chunk_outputs);
      if (out_begin == out_end) continue;
      if constexpr (!std::is_same_v<scalar_t, double>) {
#if defined(CONDENSED_OPS_WITH_AVX2)
#if defined(CONDENSED_OPS_WITH_AVX512)
        if (isa == Isa::Avx512) {
          k::avx512::transposed(p, row0, out_begin, out_end, scratch);
          continue;
        }
#endif
        if (isa == Isa::Avx2) {
          k::avx2::transposed(p, row0, out_begin, out_end, scratch);
          continue;
        }
#endif
      }
      k::portable::transposed(p, row0, out_begin, out_end, scratch);
    }
  });
}

// Contiguous int16/int32 indices for the kernels. int64 narrows only after a
// range check, so 2^32 + 5 cannot wrap into a valid column.
at::Tensor kernel_indices(const at::Tensor& idx, int64_t in_features, bool validate) {
  at::Tensor contiguous = idx.contiguous();
  if (validate || contiguous.scalar_type() == at::kLong) check_index_range(contiguous, in_features);
  return contiguous.scalar_type() == at::kLong ? contiguous.to(at::kInt) : contiguous;
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// t [..., features] as [rows, features] in the accumulator type with unit inner
// stride: 16-bit inputs are widened once per call, not once per gathered element.
at::Tensor rows_in_acc_type(const at::Tensor& t, int64_t rows, int64_t features) {
  at::Tensor t_2d = t.reshape({rows, features});
  const auto acc = acc_dtype(t.scalar_type());
  if (t_2d.scalar_type() != acc || t_2d.stride(1) != 1) t_2d = t_2d.to(acc).contiguous();
  return t_2d;
}

template <typename F>
void with_index_type(const at::Tensor& idx, F&& f) {
  idx.scalar_type() == at::kShort ? f(int16_t{}) : f(int32_t{});
}

template <typename T>
auto* kernel_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename KernelType<T>::type*>(t.data_ptr<T>());
}

// Runs whichever strategy suits the batch. Gather checks indices as it loads
// them; transposed needs them validated beforehand (`validated`).
template <typename scalar_t, typename index_t>
void run_forward(const k::CondensedLinearProblem<scalar_t, index_t>& p, bool gather, Isa isa,
                 const at::Tensor& idx, bool validated) {
  if (!gather) {
    TORCH_INTERNAL_ASSERT(validated, "transposed kernels need validated indices");
    return run_transposed(p, isa);
  }
  if (!run_gather(p, isa)) check_index_range(idx, p.in_features);  // raises, naming the culprit
}

at::Tensor condensed_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                const std::optional<at::Tensor>& bias) {
  check_condensed_linear_inputs(x, values, idx, bias);
  const int64_t in_features = x.size(-1);
  const int64_t out_features = values.size(0);
  at::Tensor y = at::empty(condensed_linear_output_shape(x, values), x.options());
  const int64_t batch = out_features ? y.numel() / out_features : 0;
  const bool gather = use_gather(batch);
  // Gather checks indices as it reads x; with nothing to read (no output, or
  // no columns at all) it cannot, so check here: bad idx fails on every call.
  const bool validate = !gather || y.numel() == 0 || in_features == 0;
  const at::Tensor idx_c = kernel_indices(idx, in_features, validate);
  if (y.numel() == 0) return y;
  const at::Tensor values_c = values.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor x_2d = rows_in_acc_type(x, batch, in_features);
  const Isa isa = active();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "condensed_linear_cpu", [&] {
    using kernel_scalar_t = typename KernelType<scalar_t>::type;
    using acc = k::acc_t<kernel_scalar_t>;
    with_index_type(idx_c, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const k::CondensedLinearProblem<kernel_scalar_t, index_t> p{
          x_2d.data_ptr<acc>(), x_2d.stride(0),
          kernel_ptr<scalar_t>(values_c), idx_c.data_ptr<index_t>(),
          bias_c.defined() ? kernel_ptr<scalar_t>(bias_c) : nullptr,
          kernel_ptr<scalar_t>(y),
          batch, in_features, out_features, values.size(1)};
      run_forward(p, gather, isa, idx_c, validate);
    });
  });
  return y;
}

// grad_x = grad_y @ W: the forward kernels over W's transposed layout.
at::Tensor condensed_linear_grad_input_cpu(const at::Tensor& grad_y, const at::Tensor& values, const at::Tensor& idx,
                                           int64_t in_features) {
  check_condensed_linear_grad_input_inputs(grad_y, values, idx, in_features);
  std::vector<int64_t> shape = grad_y.sizes().vec();
  shape.back() = in_features;
  at::Tensor grad_x = at::empty(shape, grad_y.options());
  // The counting sort indexes by column, so validate before it.
  const at::Tensor idx_c = kernel_indices(idx, in_features, /*validate=*/true);
  if (grad_x.numel() == 0) return grad_x;
  const int64_t out_features = values.size(0);
  const int64_t fan_in = values.size(1);
  const int64_t batch = grad_x.numel() / in_features;

  const at::Tensor values_c = values.contiguous();
  const at::Tensor grad_y_2d = rows_in_acc_type(grad_y, batch, out_features);
  const at::Tensor column_offsets = at::empty({in_features + 1}, at::kLong);
  const at::Tensor rows =
      at::empty({out_features * fan_in}, out_features <= INT16_MAX + 1 ? at::kShort : at::kInt);
  const at::Tensor column_values = at::empty({out_features * fan_in}, values.options());
  const bool gather = use_gather(batch);
  const Isa isa = active();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "condensed_linear_grad_input_cpu", [&] {
    using kernel_scalar_t = typename KernelType<scalar_t>::type;
    using acc = k::acc_t<kernel_scalar_t>;
    with_index_type(idx_c, [&](auto index_tag) {
      with_index_type(rows, [&](auto row_tag) {
        using index_t = decltype(index_tag);
        using row_index_t = decltype(row_tag);
        k::transposed_column_offsets(idx_c.data_ptr<index_t>(), out_features * fan_in, in_features,
                                     column_offsets.data_ptr<int64_t>());
        at::parallel_for(0, in_features, /*grain_size=*/64, [&](int64_t begin, int64_t end) {
          k::fill_transposed_columns(kernel_ptr<scalar_t>(values_c), idx_c.data_ptr<index_t>(), out_features, fan_in,
                                     column_offsets.data_ptr<int64_t>(), begin, end, rows.data_ptr<row_index_t>(),
                                     kernel_ptr<scalar_t>(column_values));
        });
        k::CondensedLinearProblem<kernel_scalar_t, row_index_t> p{
            grad_y_2d.data_ptr<acc>(), grad_y_2d.stride(0),
            kernel_ptr<scalar_t>(column_values), rows.data_ptr<row_index_t>(), nullptr,
            kernel_ptr<scalar_t>(grad_x),
            batch, out_features, in_features, 0};
        p.row_offsets = column_offsets.data_ptr<int64_t>();
        run_forward(p, gather, isa, rows, /*validated=*/true);  // rows < out_features by construction
      });
    });
  });
  return grad_x;
}

// grad_values[o, j] = sum_b grad_y[b, o] * x[b, idx[o, j]]: one dot product per
// weight over batch-contiguous (transposed) copies of x and grad_y.
at::Tensor condensed_linear_grad_values_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& idx) {
  check_condensed_linear_grad_values_inputs(grad_y, x, idx);
  at::Tensor grad = at::empty(idx.sizes(), x.options());
  const int64_t in_features = x.size(-1);
  const at::Tensor idx_c = kernel_indices(idx, in_features, /*validate=*/true);
  if (grad.numel() == 0) return grad;
  const int64_t out_features = idx.size(0);
  const int64_t fan_in = idx.size(1);
  const int64_t batch = grad_y.numel() / out_features;
  if (batch == 0) return grad.zero_();

  const auto acc = acc_dtype(x.scalar_type());
  // Zero-padded to whole vectors so the dot products need no tails.
  const int64_t padded = (batch + k::kGradValuesBatchMultiple - 1) / k::kGradValuesBatchMultiple *
                         k::kGradValuesBatchMultiple;
  const at::Tensor x_t = at::zeros({in_features, padded}, x.options().dtype(acc));
  x_t.narrow(1, 0, batch).copy_(x.reshape({batch, in_features}).t());
  const at::Tensor grad_y_t = at::zeros({out_features, padded}, x.options().dtype(acc));
  grad_y_t.narrow(1, 0, batch).copy_(grad_y.reshape({batch, out_features}).t());
  const at::Tensor grad_acc = grad.scalar_type() == acc ? grad : at::empty(idx.sizes(), x.options().dtype(acc));

  // Batch chunks of 256 keep a chunk of x_t (in_features KiB) in L2 across all outputs.
  constexpr int64_t kChunk = 256;
  const Isa isa = active();
  AT_DISPATCH_FLOATING_TYPES(acc, "condensed_linear_grad_values_cpu", [&] {
    with_index_type(idx_c, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      for (int64_t b0 = 0; b0 < padded; b0 += kChunk) {
        const k::GradValuesProblem<scalar_t, index_t> p{
            x_t.data_ptr<scalar_t>() + b0, grad_y_t.data_ptr<scalar_t>() + b0, padded,
            std::min(kChunk, padded - b0), idx_c.data_ptr<index_t>(), fan_in, grad_acc.data_ptr<scalar_t>(),
            /*accumulate=*/b0 > 0};
        const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, fan_in * p.length));
        at::parallel_for(0, out_features, grain, [&](int64_t begin, int64_t end) {
          if constexpr (std::is_same_v<scalar_t, float>) {
#if defined(CONDENSED_OPS_WITH_AVX512)
            if (isa == Isa::Avx512) return k::avx512::grad_values(p, begin, end);
#endif
#if defined(CONDENSED_OPS_WITH_AVX2)
            if (isa == Isa::Avx2) return k::avx2::grad_values(p, begin, end);
#endif
          }
          k::portable::grad_values(p, begin, end);
        });
      }
    });
  });
  if (!grad_acc.is_same(grad)) grad.copy_(grad_acc);
  return grad;
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

TORCH_LIBRARY_IMPL(condensed_ops, CPU, m) {
  m.impl("condensed_linear", &condensed_linear_cpu);
  m.impl("condensed_linear_grad_input", &condensed_linear_grad_input_cpu);
  m.impl("condensed_linear_grad_values", &condensed_linear_grad_values_cpu);
}

}  // namespace condensed_ops::cpu
