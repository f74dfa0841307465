// The shape, dtype and device checks every backend runs before its kernels,
// with the messages the fake kernels (ops.py) repeat.
#include "op_checks.h"

#include <limits>
#include <string>

namespace condensed_ops {

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

namespace {

bool is_supported_value_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}
bool is_supported_index_dtype(at::ScalarType t) {
  return t == at::kShort || t == at::kInt || t == at::kLong;
}

void check_index_dtype(const char* op, const at::Tensor& idx) {
  TORCH_CHECK_TYPE(is_supported_index_dtype(idx.scalar_type()),
                   op, ": idx must be int16, int32 or int64, got ", dtype_name(idx.scalar_type()));
  TORCH_CHECK_VALUE(idx.dim() == 2, op, ": idx must be 2-D [out_features, fan_in], got shape ", idx.sizes());
}

void check_value_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_supported_value_dtype(t.scalar_type()), op, ": ", name,
                   " must be float32, float16, bfloat16 or float64, got ", dtype_name(t.scalar_type()));
}

// values/idx: the weight layout every op takes.
void check_weight_layout(const char* op, const at::Tensor& values, const at::Tensor& idx) {
  TORCH_CHECK_VALUE(values.dim() == 2, op, ": values must be 2-D [out_features, fan_in], got shape ", values.sizes());
  check_index_dtype(op, idx);
  TORCH_CHECK_VALUE(idx.sizes() == values.sizes(), op, ": idx must have the same shape as values, got idx ",
                    idx.sizes(), " and values ", values.sizes());
  check_value_dtype(op, "values", values);
}

// values [groups, group_size, fan_in] with idx [groups, fan_in]: the grouped layout.
void check_grouped_layout(const char* op, const at::Tensor& values, const at::Tensor& idx) {
  TORCH_CHECK_VALUE(values.dim() == 3, op, ": values must be 3-D [groups, group_size, fan_in], got shape ",
                    values.sizes());
  TORCH_CHECK_TYPE(is_supported_index_dtype(idx.scalar_type()),
                   op, ": idx must be int16, int32 or int64, got ", dtype_name(idx.scalar_type()));
  TORCH_CHECK_VALUE(idx.dim() == 2 && idx.size(0) == values.size(0) && idx.size(1) == values.size(2), op,
                    ": idx must be [groups, fan_in] = [", values.size(0), ", ", values.size(2),
                    "] for values of shape ", values.sizes(), ", got ", idx.sizes());
  check_value_dtype(op, "values", values);
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& reference,
                       const char* reference_name) {
  TORCH_CHECK_VALUE(t.device() == reference.device(), op, ": ", name, " must be on ", reference_name,
                    "'s device (", reference.device(), "), got ", t.device());
}

// `what` names where in_features comes from: "in_features (x's last dimension)"
// for ops that take x, "in_features" for those that take it as an argument.
void check_in_features(const char* op, int64_t in_features, const char* what = "in_features (x's last dimension)") {
  // Indices travel as int32 inside the kernels.
  TORCH_CHECK_VALUE(in_features >= 0 && in_features <= std::numeric_limits<int32_t>::max(),
                    op, ": ", what, " must be in [0, 2^31), got ", in_features);
}

// bias: [out_features] in dtype_source's dtype (values', or x's where there is no values), on x's device.
void check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t out_features, const at::Tensor& x,
                const at::Tensor& dtype_source, const char* dtype_source_possessive) {
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == out_features, op, ": bias must have shape [out_features] = [",
                    out_features, "], got ", b.sizes());
  TORCH_CHECK_TYPE(b.scalar_type() == dtype_source.scalar_type(), op, ": bias must have ", dtype_source_possessive,
                   " dtype (", dtype_name(dtype_source.scalar_type()), "), got ", dtype_name(b.scalar_type()));
  check_same_device(op, "bias", b, x, "x");
}

// x and bias against a checked weight layout of out_features outputs.
void check_input_and_bias(const char* op, const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                          const std::optional<at::Tensor>& bias, int64_t out_features) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dimension [..., in_features], got a scalar");
  TORCH_CHECK_TYPE(x.scalar_type() == values.scalar_type(), op, ": x and values must share a dtype, got x ",
                   dtype_name(x.scalar_type()), " and values ", dtype_name(values.scalar_type()));
  check_same_device(op, "values", values, x, "x");
  check_same_device(op, "idx", idx, x, "x");
  check_in_features(op, x.size(-1));
  check_bias(op, bias, out_features, x, values, "values'");
}

}  // namespace

void check_condensed_linear_inputs(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                   const std::optional<at::Tensor>& bias) {
  check_weight_layout("condensed_linear", values, idx);
  check_input_and_bias("condensed_linear", x, values, idx, bias, values.size(0));
}

void check_condensed_linear_grouped_inputs(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                           const std::optional<at::Tensor>& bias) {
  check_grouped_layout("condensed_linear_grouped", values, idx);
  check_input_and_bias("condensed_linear_grouped", x, values, idx, bias, values.size(0) * values.size(1));
}

void check_condensed_linear_grad_input_inputs(const at::Tensor& grad_y, const at::Tensor& values,
                                              const at::Tensor& idx, int64_t in_features) {
  constexpr const char* op = "condensed_linear";
  check_weight_layout(op, values, idx);
  TORCH_CHECK_VALUE(grad_y.dim() >= 1 && grad_y.size(-1) == values.size(0), op,
                    ": grad_y must be [..., out_features] with out_features = ", values.size(0), ", got shape ",
                    grad_y.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == values.scalar_type(), op, ": grad_y must have values' dtype (",
                   dtype_name(values.scalar_type()), "), got ", dtype_name(grad_y.scalar_type()));
  check_same_device(op, "values", values, grad_y, "grad_y");
  check_same_device(op, "idx", idx, grad_y, "grad_y");
  check_in_features(op, in_features, "in_features");
}

void check_condensed_linear_grad_values_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& idx) {
  constexpr const char* op = "condensed_linear";
  check_index_dtype(op, idx);
  check_value_dtype(op, "x", x);
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y must have x's dtype (",
                   dtype_name(x.scalar_type()), "), got ", dtype_name(grad_y.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= 1 && grad_y.dim() == x.dim() && grad_y.size(-1) == idx.size(0) &&
                        grad_y.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
                    op, ": grad_y must be x's leading dims + [out_features = ", idx.size(0), "], got grad_y ",
                    grad_y.sizes(), " and x ", x.sizes());
  check_same_device(op, "grad_y", grad_y, x, "x");
  check_same_device(op, "idx", idx, x, "x");
  check_in_features(op, x.size(-1));
}

void check_condensed_linear_grouped_grad_input_inputs(const at::Tensor& grad_y, const at::Tensor& values,
                                                      const at::Tensor& idx, int64_t in_features) {
  constexpr const char* op = "condensed_linear_grouped";
  check_grouped_layout(op, values, idx);
  const int64_t out_features = values.size(0) * values.size(1);
  TORCH_CHECK_VALUE(grad_y.dim() >= 1 && grad_y.size(-1) == out_features, op,
                    ": grad_y must be [..., out_features] with out_features = groups * group_size = ", out_features,
                    ", got shape ", grad_y.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == values.scalar_type(), op, ": grad_y must have values' dtype (",
                   dtype_name(values.scalar_type()), "), got ", dtype_name(grad_y.scalar_type()));
  check_same_device(op, "values", values, grad_y, "grad_y");
  check_same_device(op, "idx", idx, grad_y, "grad_y");
  check_in_features(op, in_features, "in_features");
}

void check_condensed_linear_grouped_grad_values_inputs(const at::Tensor& grad_y, const at::Tensor& x,
                                                       const at::Tensor& idx, int64_t group_size) {
  constexpr const char* op = "condensed_linear_grouped";
  check_index_dtype(op, idx);
  TORCH_CHECK_VALUE(idx.dim() == 2, op, ": idx must be 2-D [groups, fan_in], got shape ", idx.sizes());
  TORCH_CHECK_VALUE(group_size >= 1, op, ": group_size must be >= 1, got ", group_size);
  check_value_dtype(op, "x", x);
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y must have x's dtype (",
                   dtype_name(x.scalar_type()), "), got ", dtype_name(grad_y.scalar_type()));
  const int64_t out_features = idx.size(0) * group_size;
  TORCH_CHECK_VALUE(x.dim() >= 1 && grad_y.dim() == x.dim() && grad_y.size(-1) == out_features &&
                        grad_y.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
                    op, ": grad_y must be x's leading dims + [out_features = groups * group_size = ", out_features,
                    "], got grad_y ", grad_y.sizes(), " and x ", x.sizes());
  check_same_device(op, "grad_y", grad_y, x, "x");
  check_same_device(op, "idx", idx, x, "x");
  check_in_features(op, x.size(-1));
}

void check_pack_inputs(const at::Tensor& values, const at::Tensor& idx, int64_t in_features,
                       const std::optional<at::Tensor>& active_rows, int64_t out_features) {
  constexpr const char* op = "pack_for_inference";
  if (values.dim() == 3) {  // the grouped layout
    check_grouped_layout(op, values, idx);
  } else {
    check_weight_layout(op, values, idx);
  }
  check_same_device(op, "idx", idx, values, "values");
  check_in_features(op, in_features, "in_features");
  // Rows of the weight: a grouped layout's groups * group_size.
  const int64_t rows = values.dim() == 3 ? values.size(0) * values.size(1) : values.size(0);
  if (active_rows.has_value()) {
    const at::Tensor& active = *active_rows;
    TORCH_CHECK_TYPE(active.scalar_type() == at::kLong, op, ": active_rows must be int64, got ",
                     dtype_name(active.scalar_type()));
    TORCH_CHECK_VALUE(active.dim() == 1 && active.size(0) == rows, op,
                      ": active_rows must have one entry per row of values (", rows, "), got shape ", active.sizes());
    check_same_device(op, "active_rows", active, values, "values");
    TORCH_CHECK_VALUE(out_features >= rows, op, ": out_features must be >= the rows of values (", rows,
                      ") with active_rows, got ", out_features);
  } else {
    TORCH_CHECK_VALUE(out_features == rows, op, ": out_features must be the rows of values (", rows,
                      ") without active_rows, got ", out_features);
  }
}

void check_condensed_linear_packed_inputs(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                                          const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "condensed_linear_packed";
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dimension [..., in_features], got a scalar");
  check_value_dtype(op, "x", x);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte && packed.dim() == 1, op,
                   ": packed must be the 1-D uint8 tensor pack_for_inference returns, got ",
                   dtype_name(packed.scalar_type()), " of shape ", packed.sizes());
  check_same_device(op, "packed", packed, x, "x");
  TORCH_CHECK_VALUE(out_features >= 0, op, ": out_features must be >= 0, got ", out_features);
  check_in_features(op, x.size(-1));
  check_bias(op, bias, out_features, x, x, "x's");
}

std::vector<int64_t> condensed_linear_output_shape(const at::Tensor& x, int64_t out_features) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out_features;
  return shape;
}

std::vector<int64_t> condensed_linear_output_shape(const at::Tensor& x, const at::Tensor& values) {
  return condensed_linear_output_shape(x, values.size(0));
}

}  // namespace condensed_ops
