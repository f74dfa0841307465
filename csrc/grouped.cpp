#include "grouped.h"

#include <ATen/ops/repeat_interleave.h>

#include "op_checks.h"
#include "tensor_cache.h"

namespace condensed_ops {

at::Tensor expanded_group_indices(const at::Tensor& idx, int64_t group_size) {
  static TensorCache<at::Tensor> cache("expanded group indices");
  if (auto cached = cache.find({&idx}, group_size)) return *cached;
  at::Tensor expanded = at::repeat_interleave(idx, group_size, /*dim=*/0).contiguous();
  cache.insert({&idx}, group_size, expanded);
  return expanded;
}

at::Tensor grouped_grad_input_by_rows(const at::Tensor& grad_y, const at::Tensor& values, const at::Tensor& idx,
                                      int64_t in_features) {
  check_condensed_linear_grouped_grad_input_inputs(grad_y, values, idx, in_features);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("condensed_ops::condensed_linear_grad_input", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt)>();
  return op.call(grad_y, values.reshape({values.size(0) * values.size(1), values.size(2)}),
                 expanded_group_indices(idx, values.size(1)), c10::SymInt(in_features));
}

at::Tensor grouped_grad_values_by_rows(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& idx,
                                       int64_t group_size) {
  check_condensed_linear_grouped_grad_values_inputs(grad_y, x, idx, group_size);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("condensed_ops::condensed_linear_grad_values", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_y, x, expanded_group_indices(idx, group_size)).view({idx.size(0), group_size, idx.size(1)});
}

}  // namespace condensed_ops
