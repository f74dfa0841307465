// Torch-facing helpers every backend's glue shares: kernel value types,
// index-type dispatch and the index narrowing policy.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace condensed_ops {

// torch's c10::Half / c10::BFloat16 as the backend's bit-compatible kernel
// types (HalfT, BFloat16T); every other type as itself.
template <typename T, typename HalfT, typename BFloat16T>
struct KernelTypeOf { using type = T; };
template <typename HalfT, typename BFloat16T>
struct KernelTypeOf<c10::Half, HalfT, BFloat16T> { using type = HalfT; };
template <typename HalfT, typename BFloat16T>
struct KernelTypeOf<c10::BFloat16, HalfT, BFloat16T> { using type = BFloat16T; };

// A backend's view of tensors as kernel pointers:
//   using Kernel = KernelTypes<__half, __nv_bfloat16>;
//   Kernel::type<scalar_t>* p = Kernel::ptr<scalar_t>(tensor);
template <typename HalfT, typename BFloat16T>
struct KernelTypes {
  template <typename T>
  using type = typename KernelTypeOf<T, HalfT, BFloat16T>::type;

  template <typename T>
  static type<T>* ptr(const at::Tensor& t) {
    return reinterpret_cast<type<T>*>(t.data_ptr<T>());
  }
};

// Calls f(int16_t{}) or f(int32_t{}) for a kernel index tensor.
template <typename F>
void with_index_type(const at::Tensor& idx, F&& f) {
  idx.scalar_type() == at::kShort ? f(int16_t{}) : f(int32_t{});
}

// Contiguous int16/int32 indices for the kernels. int64 is clamped to
// [-1, in_features] before narrowing: 2^32 + 5 must reach the kernels' guard
// as a bad index, not wrap into the valid column 5 (idx may have changed since
// it was validated, through .data).
inline at::Tensor narrow_indices(const at::Tensor& idx, int64_t in_features) {
  if (idx.scalar_type() == at::kLong) return idx.clamp(-1, in_features).to(at::kInt).contiguous();
  return idx.contiguous();
}

// grad_x's shape: grad_y's leading dims + [in_features].
inline std::vector<int64_t> grad_input_shape(const at::Tensor& grad_y, int64_t in_features) {
  std::vector<int64_t> shape = grad_y.sizes().vec();
  shape.back() = in_features;
  return shape;
}

}  // namespace condensed_ops
