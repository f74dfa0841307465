// Torch-facing declarations shared by the op registration and every backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace condensed_ops {

// Raises a Python-mapped c10 error (TypeError / ValueError) naming the
// argument for any malformed call. Index *values* are checked by each backend,
// on the device that holds them.
void check_condensed_linear_inputs(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                   const std::optional<at::Tensor>& bias);

// Output shape: x.shape[:-1] + [out_features].
std::vector<int64_t> condensed_linear_output_shape(const at::Tensor& x, const at::Tensor& values);

}  // namespace condensed_ops
