// The ops' schemas and their autograd (C++, so a TorchScript model loaded
// without importing the package still trains).
#include "grouped.h"
#include "op_checks.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <numeric>

namespace condensed_ops {

// Gradients for x, values and bias (idx is structure, not a parameter), from
// the backward ops of the layout: per-row, or grouped (on backends without
// grouped backward kernels those run the row layout's on the expanded indices).
template <bool kGrouped>
class CondensedLinearFunction : public torch::autograd::Function<CondensedLinearFunction<kGrouped>> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& idx, const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, values, idx});
    ctx->saved_data["has_bias"] = bias.has_value();
    return forward_op<kGrouped>().call(x, values, idx, bias);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    static const auto grad_input_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("condensed_ops::condensed_linear_grad_input", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt)>();
    static const auto grad_values_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("condensed_ops::condensed_linear_grad_values", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
    static const auto grouped_grad_input_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("condensed_ops::condensed_linear_grouped_grad_input", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt)>();
    static const auto grouped_grad_values_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("condensed_ops::condensed_linear_grouped_grad_values", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& values = saved[1];
    const at::Tensor& idx = saved[2];
    const at::Tensor& grad_y = grad_outputs[0];
    at::Tensor grad_x, grad_values, grad_bias;
    if constexpr (kGrouped) {
      if (ctx->needs_input_grad(0)) grad_x = grouped_grad_input_op.call(grad_y, values, idx, x.sym_size(-1));
      if (ctx->needs_input_grad(1)) grad_values = grouped_grad_values_op.call(grad_y, x, idx, values.sym_size(1));
    } else {
      if (ctx->needs_input_grad(0)) grad_x = grad_input_op.call(grad_y, values, idx, x.sym_size(-1));
      if (ctx->needs_input_grad(1)) grad_values = grad_values_op.call(grad_y, x, idx);
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) {
      std::vector<int64_t> leading(grad_y.dim() - 1);
      std::iota(leading.begin(), leading.end(), 0);
      grad_bias = leading.empty() ? grad_y.clone() : grad_y.sum(leading);
    }
    return {grad_x, grad_values, at::Tensor(), grad_bias};
  }
};

template <bool kGrouped>
at::Tensor condensed_linear_autograd(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                     const std::optional<at::Tensor>& bias) {
  using Function = CondensedLinearFunction<kGrouped>;
  // Inference skips the autograd node (a few microseconds, most of a small layer's call).
  const bool needs_graph = at::GradMode::is_enabled() && (x.requires_grad() || values.requires_grad() ||
                                                           (bias.has_value() && bias->requires_grad()));
  if (needs_graph) return Function::apply(x, values, idx, bias);
  at::AutoDispatchBelowADInplaceOrView guard;
  return forward_op<kGrouped>().call(x, values, idx, bias);
}

// Under autocast the op runs like F.linear: x, values and bias (float32 ones;
// float64 stays) are cast to the autocast dtype. cached_cast keeps the cast
// of a leaf weight that requires grad for the rest of the autocast region, so
// a layer called several times per step casts its values once.
template <c10::DeviceType kDevice, bool kGrouped>
at::Tensor condensed_linear_autocast(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                     const std::optional<at::Tensor>& bias) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  return forward_op<kGrouped>().call(at::autocast::cached_cast(dtype, x, kDevice),
                                                     at::autocast::cached_cast(dtype, values, kDevice), idx,
                                                     at::autocast::cached_cast(dtype, bias, kDevice));
}

// Modules keep int16 indices as bytes (DDP's backends cannot broadcast int16;
// modules.py) and read them through a view. TorchScript cannot spell a dtype
// view (Tensor.view(dtype)), so scripted modules call this op instead.
at::Tensor index_view(const at::Tensor& storage, c10::SymIntArrayRef shape) {
  return (storage.scalar_type() == at::kByte ? storage.view(at::kShort) : storage).view_symint(shape);
}

TORCH_LIBRARY(condensed_ops, m) {
  m.def("condensed_linear(Tensor x, Tensor values, Tensor idx, Tensor? bias=None) -> Tensor");
  // Grouped layout: values [groups, group_size, fan_in], idx [groups, fan_in];
  // the group_size consecutive outputs of a group share its columns.
  m.def("condensed_linear_grouped(Tensor x, Tensor values, Tensor idx, Tensor? bias=None) -> Tensor");
  // The backward ops, public so other autograd code (or a custom kernel) can reuse them.
  m.def("condensed_linear_grad_input(Tensor grad_y, Tensor values, Tensor idx, SymInt in_features) -> Tensor");
  m.def("condensed_linear_grad_values(Tensor grad_y, Tensor x, Tensor idx) -> Tensor");
  // The grouped layout's: values [groups, group_size, fan_in] / grad_values [groups, group_size, fan_in].
  m.def("condensed_linear_grouped_grad_input(Tensor grad_y, Tensor values, Tensor idx, SymInt in_features) -> Tensor");
  m.def("condensed_linear_grouped_grad_values(Tensor grad_y, Tensor x, Tensor idx, SymInt group_size) -> Tensor");
  // Inference on CPU: (values, idx) rearranged once into the window layout (a
  // uint8 tensor, cached per version of its sources), then run from it. With
  // active_rows (output of each row), the layout has all out_features outputs,
  // the others (ablated neurons) computing just their bias.
  m.def("pack_for_inference(Tensor values, Tensor idx, SymInt in_features, Tensor? active_rows=None, "
        "SymInt? out_features=None) -> Tensor");
  m.def("condensed_linear_packed(Tensor x, Tensor packed, SymInt out_features, Tensor? bias=None) -> Tensor");
  // The two above as one call (CPU): the layout is fetched from (or built into) the
  // cache inside, so the op's output shape follows from its inputs' shapes.
  m.def("condensed_linear_windowed(Tensor x, Tensor values, Tensor idx, SymInt out_features, Tensor? bias=None, "
        "Tensor? active_rows=None) -> Tensor");
  m.def("index_view(Tensor(a) storage, SymInt[] shape) -> Tensor(a)");
}

TORCH_LIBRARY_IMPL(condensed_ops, CompositeImplicitAutograd, m) {
  m.impl("index_view", &index_view);
}

// Backends without grouped backward kernels (CUDA) run the row layout's; the CPU registers its own.
TORCH_LIBRARY_IMPL(condensed_ops, CompositeExplicitAutograd, m) {
  m.impl("condensed_linear_grouped_grad_input", &grouped_grad_input_by_rows);
  m.impl("condensed_linear_grouped_grad_values", &grouped_grad_values_by_rows);
}

TORCH_LIBRARY_IMPL(condensed_ops, AutocastCPU, m) {
  m.impl("condensed_linear", &condensed_linear_autocast<c10::DeviceType::CPU, false>);
  m.impl("condensed_linear_grouped", &condensed_linear_autocast<c10::DeviceType::CPU, true>);
}
TORCH_LIBRARY_IMPL(condensed_ops, AutocastCUDA, m) {
  m.impl("condensed_linear", &condensed_linear_autocast<c10::DeviceType::CUDA, false>);
  m.impl("condensed_linear_grouped", &condensed_linear_autocast<c10::DeviceType::CUDA, true>);
}

TORCH_LIBRARY_IMPL(condensed_ops, Autograd, m) {
  m.impl("condensed_linear", &condensed_linear_autograd<false>);
  m.impl("condensed_linear_grouped", &condensed_linear_autograd<true>);
  // No double backward: differentiating the backward ops raises "not implemented".
  m.impl("condensed_linear_grad_input", torch::autograd::autogradNotImplementedFallback());
  m.impl("condensed_linear_grad_values", torch::autograd::autogradNotImplementedFallback());
  m.impl("condensed_linear_grouped_grad_input", torch::autograd::autogradNotImplementedFallback());
  m.impl("condensed_linear_grouped_grad_values", torch::autograd::autogradNotImplementedFallback());
  // Inference only: a gradient through the window layout raises "not implemented".
  m.impl("pack_for_inference", torch::autograd::autogradNotImplementedFallback());
  m.impl("condensed_linear_packed", torch::autograd::autogradNotImplementedFallback());
  m.impl("condensed_linear_windowed", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace condensed_ops
