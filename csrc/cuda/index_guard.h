// CUDA index validation, split from the ops' glue.
//
// The kernels never read outside x whatever idx holds: each compares every
// index with in_features, skips a bad one and sets a per-device flag in pinned
// host memory. On top of that, to raise an IndexError on the call that passed
// the bad index (like the CPU ops do):
//  - the first time an idx tensor is seen (or after it was modified in place:
//    its version counter moved), one min/max reduction checks it and the host
//    waits for the two numbers. The result is cached per tensor, under the
//    rule every backend shares (index_validation.h), so steady state (the same
//    idx every step) costs no sync.
//  - a call captured into a CUDA graph cannot sync: it skips that check and
//    relies on the kernels' guard (int64 indices are clamped to [-1, in_features]
//    before narrowing, so that 2^32 + 5 cannot wrap into a valid column).
//  - whenever the kernels met a bad index (a captured call, or idx rewritten
//    through .data, which bypasses the version counter), the next condensed_ops
//    call on that device raises an IndexError saying so (reading the flag is a
//    host memory read, no sync). That earlier call's result skipped the bad
//    entries and is wrong.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <cuda_runtime_api.h>

#include "../index_validation.h"

namespace condensed_ops::cuda {

struct CallContext {
  c10::DeviceIndex device;
  cudaStream_t stream;
  bool capturing;
  int* flag;  // the device's bad-index flag for the kernels, or nullptr
};

// Entered by every op after the shape checks, under the device guard: raises
// the IndexError an earlier call's kernels left behind, then returns the
// current stream, whether it is capturing, and the flag.
CallContext begin_call(const at::Tensor& any_input);

// validate_indices (index_validation.h) with the CUDA scan, unless the call
// is being captured (no sync possible: the kernels' guard and flag take over).
void validate_indices(const at::Tensor& idx, int64_t in_features, WidthSource width, const CallContext& call);

}  // namespace condensed_ops::cuda
