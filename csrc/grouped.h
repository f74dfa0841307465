// The grouped layout's device-agnostic pieces: every group_size consecutive
// outputs share one group's fan_in columns (values [groups, group_size, fan_in],
// idx [groups, fan_in]). It is the row layout with each group's idx row
// repeated group_size times (expanded_group_indices).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

namespace condensed_ops {

using ForwardOp = c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&)>;

// The dispatcher's handle of condensed_linear, or of condensed_linear_grouped.
template <bool kGrouped>
const ForwardOp& forward_op() {
  static const ForwardOp op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(kGrouped ? "condensed_ops::condensed_linear_grouped" : "condensed_ops::condensed_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  return op;
}

// idx [groups, fan_in] -> [groups * group_size, fan_in], each row repeated
// group_size times: how the grouped layout runs where a backend has no grouped
// kernel (small batches, the backward). Cached per idx version
// (tensor_cache.h), so the per-row ops' own caches (validated indices, W's
// column layout) see the same tensor on every call.
at::Tensor expanded_group_indices(const at::Tensor& idx, int64_t group_size);

// The grouped backward ops by the row layout's (every backend without grouped
// backward kernels, and shapes where those do not pay): checked, then the
// row ops over the expanded indices.
at::Tensor grouped_grad_input_by_rows(const at::Tensor& grad_y, const at::Tensor& values, const at::Tensor& idx,
                                      int64_t in_features);
at::Tensor grouped_grad_values_by_rows(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& idx,
                                       int64_t group_size);

}  // namespace condensed_ops
