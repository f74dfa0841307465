// The op schema and the checks every backend shares.
#include "condensed_linear.h"

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

namespace condensed_ops {

namespace {
bool is_supported_value_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}
bool is_supported_index_dtype(at::ScalarType t) {
  return t == at::kShort || t == at::kInt || t == at::kLong;
}
}  // namespace

void check_condensed_linear_inputs(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                   const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(values.dim() == 2, "condensed_linear: values must be 2-D [out_features, fan_in], got shape ",
                    values.sizes());
  TORCH_CHECK_VALUE(idx.dim() == 2, "condensed_linear: idx must be 2-D [out_features, fan_in], got shape ",
                    idx.sizes());
  TORCH_CHECK_VALUE(idx.sizes() == values.sizes(), "condensed_linear: idx must have the same shape as values, got idx ",
                    idx.sizes(), " and values ", values.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1, "condensed_linear: x must have at least 1 dimension [..., in_features], got a scalar");
  TORCH_CHECK_TYPE(is_supported_value_dtype(values.scalar_type()),
                   "condensed_linear: values must be float32, float16, bfloat16 or float64, got ",
                   values.scalar_type());
  TORCH_CHECK_TYPE(x.scalar_type() == values.scalar_type(), "condensed_linear: x and values must share a dtype, got x ",
                   x.scalar_type(), " and values ", values.scalar_type());
  TORCH_CHECK_TYPE(is_supported_index_dtype(idx.scalar_type()),
                   "condensed_linear: idx must be int16, int32 or int64, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(values.device() == x.device(), "condensed_linear: values must be on x's device (", x.device(),
                    "), got ", values.device());
  TORCH_CHECK_VALUE(idx.device() == x.device(), "condensed_linear: idx must be on x's device (", x.device(), "), got ",
                    idx.device());
  // Indices travel as int32 inside the kernels.
  TORCH_CHECK_VALUE(x.size(-1) <= std::numeric_limits<int32_t>::max(),
                    "condensed_linear: x's last dimension (in_features) must be below 2^31, got ", x.size(-1));
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == values.size(0),
                      "condensed_linear: bias must have shape [out_features] = [", values.size(0), "], got ",
                      b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == values.scalar_type(), "condensed_linear: bias must have values' dtype (",
                     values.scalar_type(), "), got ", b.scalar_type());
    TORCH_CHECK_VALUE(b.device() == x.device(), "condensed_linear: bias must be on x's device (", x.device(),
                      "), got ", b.device());
  }
}

std::vector<int64_t> condensed_linear_output_shape(const at::Tensor& x, const at::Tensor& values) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = values.size(0);
  return shape;
}

TORCH_LIBRARY(condensed_ops, m) {
  m.def("condensed_linear(Tensor x, Tensor values, Tensor idx, Tensor? bias=None) -> Tensor");
}

// No derivative yet: backward raises "not implemented" rather than silently
// returning no gradient.
TORCH_LIBRARY_IMPL(condensed_ops, Autograd, m) {
  m.impl("condensed_linear", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace condensed_ops
