// Index validation, one rule for every backend.
//
// An idx tensor is scanned once per version: a pass is cached (tensor_cache.h)
// with the bound it was checked against, and any later call at least that wide
// trusts it. A failure forgets the tensor and raises an IndexError naming the
// first bad entry, with the same text on every device. Backends supply only
// the scan (a CPU loop; a CUDA min/max reduction and one sync) and decide when
// not to validate at all (a CUDA call being captured into a graph, which
// cannot sync). The kernels check every index they read anyway: a write
// through .data or numpy bypasses the version counter.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace condensed_ops {

// Where in_features came from, for the message: x's width, or an argument.
enum class WidthSource { OfX, Argument };

// A backend's scan: true if every entry of idx lies in [0, in_features).
using AllIndicesInside = bool (*)(const at::Tensor& idx, int64_t in_features);

// Raises IndexError naming the first entry of idx outside [0, in_features),
// unless this tensor, at this version, passed a check at most this wide.
void validate_indices(const at::Tensor& idx, int64_t in_features, WidthSource width, AllIndicesInside all_inside);

// Forgets idx's pass and raises the IndexError naming its first bad entry (or,
// when none is left, saying idx changed while the op ran). For a kernel that
// met a bad index after validation said there was none.
[[noreturn]] void raise_index_error(const at::Tensor& idx, int64_t in_features, WidthSource width);

// Forgets idx's pass: the next validate_indices scans it again.
void forget_validated_indices(const at::Tensor& idx);

}  // namespace condensed_ops
