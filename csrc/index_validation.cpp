#include "index_validation.h"

#include <ATen/ops/nonzero.h>

#include "tensor_cache.h"

namespace condensed_ops {
namespace {

// Per idx tensor: the in_features it was checked against (every entry below it).
TensorCache<int64_t>& validated_indices() {
  static TensorCache<int64_t> cache("validated indices");
  return cache;
}

}  // namespace

void validate_indices(const at::Tensor& idx, int64_t in_features, WidthSource width, AllIndicesInside all_inside) {
  if (idx.numel() == 0) return;
  const auto bound = validated_indices().find({&idx}, 0);
  if (bound && *bound <= in_features) return;
  if (!all_inside(idx, in_features)) raise_index_error(idx, in_features, width);
  validated_indices().insert({&idx}, 0, in_features);
}

void raise_index_error(const at::Tensor& idx, int64_t in_features, WidthSource width) {
  forget_validated_indices(idx);
  // Rare and about to raise: plain tensor ops (a sync on CUDA) find the entry.
  const at::Tensor bad = idx.lt(0).logical_or_(idx.ge(in_features)).nonzero();
  if (bad.size(0) > 0) {
    const int64_t row = bad[0][0].item<int64_t>(), column = bad[0][1].item<int64_t>();
    TORCH_CHECK_INDEX(false, "condensed_linear: idx[", row, ", ", column, "] = ", idx[row][column].item<int64_t>(),
                      " is outside [0, in_features=", in_features, ")",
                      width == WidthSource::OfX ? " (in_features is x's last dimension: is x narrower than the layer?)"
                                                : "");
  }
  // A kernel met a bad index that is gone now: idx changed while the op ran.
  TORCH_CHECK_INDEX(false, "condensed_linear: idx held an index outside [0, in_features=", in_features,
                    ") while the op ran (was it modified concurrently?)");
}

void forget_validated_indices(const at::Tensor& idx) { validated_indices().forget(idx); }

}  // namespace condensed_ops
