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

}  // namespace condensed_ops
