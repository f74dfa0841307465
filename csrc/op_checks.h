// Torch-facing checks shared by the op registration and every backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

namespace condensed_ops {

// Each raises a Python-mapped c10 error (TypeError / ValueError) naming the
// argument for any malformed call. Index *values* are checked by each backend,
// on the device that holds them.
void check_condensed_linear_inputs(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                   const std::optional<at::Tensor>& bias);

// The grouped op: values [groups, group_size, fan_in] and idx [groups, fan_in]
// (every group_size consecutive outputs share one group's columns).
void check_condensed_linear_grouped_inputs(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                           const std::optional<at::Tensor>& bias);

// The backward ops' checks: grad_y [..., out_features] in values' dtype.
void check_condensed_linear_grad_input_inputs(const at::Tensor& grad_y, const at::Tensor& values,
                                              const at::Tensor& idx, int64_t in_features);
void check_condensed_linear_grad_values_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& idx);
// The grouped layout's backward ops: values [groups, group_size, fan_in] / group_size.
void check_condensed_linear_grouped_grad_input_inputs(const at::Tensor& grad_y, const at::Tensor& values,
                                                      const at::Tensor& idx, int64_t in_features);
void check_condensed_linear_grouped_grad_values_inputs(const at::Tensor& grad_y, const at::Tensor& x,
                                                       const at::Tensor& idx, int64_t group_size);

// The window layout's ops: building one, and running x through one. Whether
// packed really holds a layout is the backend's check (it reads the bytes).
void check_pack_inputs(const at::Tensor& values, const at::Tensor& idx, int64_t in_features,
                       const std::optional<at::Tensor>& active_rows, int64_t out_features);
void check_condensed_linear_packed_inputs(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                                          const std::optional<at::Tensor>& bias);

// A dtype as Python spells it ("torch.float32"), like the fake kernels' messages.
std::string dtype_name(at::ScalarType t);

// Output shape: x.shape[:-1] + [out_features].
std::vector<int64_t> condensed_linear_output_shape(const at::Tensor& x, int64_t out_features);
std::vector<int64_t> condensed_linear_output_shape(const at::Tensor& x, const at::Tensor& values);

}  // namespace condensed_ops
