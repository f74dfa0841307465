#include "grouped.h"

#include <ATen/ops/repeat_interleave.h>

#include "tensor_cache.h"

namespace condensed_ops {

at::Tensor expanded_group_indices(const at::Tensor& idx, int64_t group_size) {
  static TensorCache<at::Tensor> cache("expanded group indices");
  if (auto cached = cache.find({&idx}, group_size)) return *cached;
  at::Tensor expanded = at::repeat_interleave(idx, group_size, /*dim=*/0).contiguous();
  cache.insert({&idx}, group_size, expanded);
  return expanded;
}

at::Tensor condensed_linear_grouped_by_rows(const at::Tensor& x, const at::Tensor& values, const at::Tensor& idx,
                                            const std::optional<at::Tensor>& bias) {
  const int64_t group_size = values.size(1);
  return forward_op<false>().call(x, values.reshape({values.size(0) * group_size, values.size(2)}),
                      expanded_group_indices(idx, group_size), bias);
}

}  // namespace condensed_ops
