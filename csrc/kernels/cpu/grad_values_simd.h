// grad_values written once over a vector type (simd_common.h) and compiled
// per instruction set (avx2.cpp, avx512.cpp).
#pragma once

#include "simd_common.h"

namespace condensed_ops::kernels::simd {

// One dot product over the batch per weight. The weight's grad_y row stays in
// L1 across its fan_in dots; two accumulators per dot keep two FMA chains in flight.
template <class Vec, typename index_t>
bool grad_values(const GradValuesProblem<float, index_t>& p, int64_t out_begin, int64_t out_end) {
  static_assert(kGradValuesBatchMultiple % (2 * Vec::kLanes) == 0 || kGradValuesBatchMultiple == Vec::kLanes);
  const uint64_t limit = uint64_t(p.in_features);
  for (int64_t o = out_begin; o < out_end; ++o) {
    const float* grad_y = p.grad_y_t + o * p.stride;
    for (int64_t j = 0; j < p.fan_in; ++j) {
      const int64_t c = p.idx[o * p.fan_in + j];
      if (uint64_t(c) >= limit) return false;
      const float* x = p.x_t + c * p.stride;
      auto acc0 = Vec::zero(), acc1 = Vec::zero();
      int64_t b = 0;
      for (; b + 2 * Vec::kLanes <= p.length; b += 2 * Vec::kLanes) {
        acc0 = Vec::fmadd(Vec::load(grad_y + b), Vec::load(x + b), acc0);
        acc1 = Vec::fmadd(Vec::load(grad_y + b + Vec::kLanes), Vec::load(x + b + Vec::kLanes), acc1);
      }
      if (b < p.length) acc0 = Vec::fmadd(Vec::load(grad_y + b), Vec::load(x + b), acc0);
      const float sum = Vec::sum(Vec::add(acc0, acc1));
      float& out = p.grad[o * p.fan_in + j];
      out = p.accumulate ? out + sum : sum;
    }
  }
  return true;
}

}  // namespace condensed_ops::kernels::simd
