// The op schema and the checks every backend shares.
#include "condensed_linear.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <numeric>

namespace condensed_ops {

namespace {
// Dtypes named as Python spells them, like the fake kernels' messages.
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

bool is_supported_value_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}
bool is_supported_index_dtype(at::ScalarType t) {
  return t == at::kShort || t == at::kInt || t == at::kLong;
}

void check_index_dtype(const at::Tensor& idx) {
  TORCH_CHECK_TYPE(is_supported_index_dtype(idx.scalar_type()),
                   "condensed_linear: idx must be int16, int32 or int64, got ", dtype_name(idx.scalar_type()));
  TORCH_CHECK_VALUE(idx.dim() == 2, "condensed_linear: idx must be 2-D [out_features, fan_in], got shape ",
                    idx.sizes());
}

// values/idx: the weight layout every op takes.
void check_weight_layout(const at::Tensor& values, const at::Tensor& idx) {
  TORCH_CHECK_VALUE(values.dim() == 2, "condensed_linear: values must be 2-D [out_features, fan_in], got shape ",
                    values.sizes());
  check_index_dtype(idx);
  TORCH_CHECK_VALUE(idx.sizes() == values.sizes(), "condensed_linear: idx must have the same shape as values, got idx ",
                    idx.sizes(), " and values ", values.sizes());
  TORCH_CHECK_TYPE(is_supported_value_dtype(values.scalar_type()),
                   "condensed_linear: values must be float32, float16, bfloat16 or float64, got ",
                   dtype_name(values.scalar_type()));
}

void check_same_device(const char* name, const at::Tensor& t, const at::Tensor& reference, const char* reference_name) {
  TORCH_CHECK_VALUE(t.device() == reference.device(), "condensed_linear: ", name, " must be on ", reference_name,
                    "'s device (", reference.device(), "), got ", t.device());
}

void check_in_features(int64_t in_features) {
  // Indices travel as int32 inside the kernels.
  TORCH_CHECK_VALUE(in_features >= 0 && in_features <= std::numeric_limits<int32_t>::max(),
                    "condensed_linear: in_features (x's last dimension) must be in [0, 2^31), got ", in_features);
}

}  // namespace

void check_condensed_linear_inputs(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                   const std::optional<at::Tensor>& bias) {
  check_weight_layout(values, idx);
  TORCH_CHECK_VALUE(x.dim() >= 1, "condensed_linear: x must have at least 1 dimension [..., in_features], got a scalar");
  TORCH_CHECK_TYPE(x.scalar_type() == values.scalar_type(), "condensed_linear: x and values must share a dtype, got x ",
                   dtype_name(x.scalar_type()), " and values ", dtype_name(values.scalar_type()));
  check_same_device("values", values, x, "x");
  check_same_device("idx", idx, x, "x");
  check_in_features(x.size(-1));
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == values.size(0),
                      "condensed_linear: bias must have shape [out_features] = [", values.size(0), "], got ",
                      b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == values.scalar_type(), "condensed_linear: bias must have values' dtype (",
                     dtype_name(values.scalar_type()), "), got ", dtype_name(b.scalar_type()));
    check_same_device("bias", b, x, "x");
  }
}

void check_condensed_linear_grad_input_inputs(const at::Tensor& grad_y, const at::Tensor& values,
                                              const at::Tensor& idx, int64_t in_features) {
  check_weight_layout(values, idx);
  TORCH_CHECK_VALUE(grad_y.dim() >= 1 && grad_y.size(-1) == values.size(0),
                    "condensed_linear: grad_y must be [..., out_features] with out_features = ", values.size(0),
                    ", got shape ", grad_y.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == values.scalar_type(), "condensed_linear: grad_y must have values' dtype (",
                   dtype_name(values.scalar_type()), "), got ", dtype_name(grad_y.scalar_type()));
  check_same_device("values", values, grad_y, "grad_y");
  check_same_device("idx", idx, grad_y, "grad_y");
  check_in_features(in_features);
}

void check_condensed_linear_grad_values_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& idx) {
  check_index_dtype(idx);
  TORCH_CHECK_TYPE(is_supported_value_dtype(x.scalar_type()),
                   "condensed_linear: x must be float32, float16, bfloat16 or float64, got ", dtype_name(x.scalar_type()));
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), "condensed_linear: grad_y must have x's dtype (",
                   dtype_name(x.scalar_type()), "), got ", dtype_name(grad_y.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= 1 && grad_y.dim() == x.dim() && grad_y.size(-1) == idx.size(0) &&
                        grad_y.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
                    "condensed_linear: grad_y must be x's leading dims + [out_features = ", idx.size(0),
                    "], got grad_y ", grad_y.sizes(), " and x ", x.sizes());
  check_same_device("grad_y", grad_y, x, "x");
  check_same_device("idx", idx, x, "x");
  check_in_features(x.size(-1));
}

std::vector<int64_t> condensed_linear_output_shape(const at::Tensor& x, const at::Tensor& values) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = values.size(0);
  return shape;
}

// Gradients for x, values and bias (idx is structure, not a parameter), in C++
// so a TorchScript model loaded without importing the package still trains.
class CondensedLinearFunction : public torch::autograd::Function<CondensedLinearFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& idx, const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, values, idx});
    ctx->saved_data["has_bias"] = bias.has_value();
    return forward_op().call(x, values, idx, bias);
  }

  static const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const std::optional<at::Tensor>&)>&
  forward_op() {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("condensed_ops::condensed_linear", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const std::optional<at::Tensor>&)>();
    return op;
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
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& values = saved[1];
    const at::Tensor& idx = saved[2];
    const at::Tensor& grad_y = grad_outputs[0];
    at::Tensor grad_x, grad_values, grad_bias;
    if (ctx->needs_input_grad(0)) grad_x = grad_input_op.call(grad_y, values, idx, x.sym_size(-1));
    if (ctx->needs_input_grad(1)) grad_values = grad_values_op.call(grad_y, x, idx);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) {
      std::vector<int64_t> leading(grad_y.dim() - 1);
      std::iota(leading.begin(), leading.end(), 0);
      grad_bias = leading.empty() ? grad_y.clone() : grad_y.sum(leading);
    }
    return {grad_x, grad_values, at::Tensor(), grad_bias};
  }
};

at::Tensor condensed_linear_autograd(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                     const std::optional<at::Tensor>& bias) {
  // Inference skips the autograd node (a few microseconds, most of a small layer's call).
  const bool needs_graph = at::GradMode::is_enabled() && (x.requires_grad() || values.requires_grad() ||
                                                           (bias.has_value() && bias->requires_grad()));
  if (needs_graph) return CondensedLinearFunction::apply(x, values, idx, bias);
  at::AutoDispatchBelowADInplaceOrView guard;
  return CondensedLinearFunction::forward_op().call(x, values, idx, bias);
}

TORCH_LIBRARY(condensed_ops, m) {
  m.def("condensed_linear(Tensor x, Tensor values, Tensor idx, Tensor? bias=None) -> Tensor");
  // The backward ops, public so other autograd code (or a custom kernel) can reuse them.
  m.def("condensed_linear_grad_input(Tensor grad_y, Tensor values, Tensor idx, SymInt in_features) -> Tensor");
  m.def("condensed_linear_grad_values(Tensor grad_y, Tensor x, Tensor idx) -> Tensor");
}

TORCH_LIBRARY_IMPL(condensed_ops, Autograd, m) {
  m.impl("condensed_linear", &condensed_linear_autograd);
  // No double backward: differentiating the backward ops raises "not implemented".
  m.impl("condensed_linear_grad_input", torch::autograd::autogradNotImplementedFallback());
  m.impl("condensed_linear_grad_values", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace condensed_ops
