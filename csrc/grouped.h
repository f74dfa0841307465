// The grouped layout's device-agnostic pieces: every group_size consecutive
// outputs share one group's fan_in columns (values [groups, group_size, fan_in],
// idx [groups, fan_in]). It is the row layout with each group's idx row
// repeated group_size times, which is how everything without a grouped kernel
// runs it (the backward ops, small batches, dtypes a backend's grouped kernel
// lacks).
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
// group_size times. Cached per idx version (tensor_cache.h), so the per-row
// ops' own caches (validated indices, W's column layout) see the same tensor
// on every call.
at::Tensor expanded_group_indices(const at::Tensor& idx, int64_t group_size);

// condensed_linear_grouped through the per-row op on (values as
// [groups * group_size, fan_in], expanded idx): the same sums. Validate idx
// first, so that an error names the grouped entry.
at::Tensor condensed_linear_grouped_by_rows(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                            const std::optional<at::Tensor>& bias);

}  // namespace condensed_ops
