// Every value type, and every (value type, index type) pair, the glue
// dispatches to: the explicit instantiation lists of the kernel files.
#pragma once

#define CONDENSED_OPS_FOR_EACH_VALUE_TYPE(X) \
  X(float)                                   \
  X(double)                                  \
  X(Half)                                    \
  X(BFloat16)

#define CONDENSED_OPS_FOR_EACH_TYPE_PAIR(X) \
  X(float, int16_t)                         \
  X(float, int32_t)                         \
  X(double, int16_t)                        \
  X(double, int32_t)                        \
  X(Half, int16_t)                          \
  X(Half, int32_t)                          \
  X(BFloat16, int16_t)                      \
  X(BFloat16, int32_t)

// The value types with SIMD flavours (float64 runs the portable kernels).
#define CONDENSED_OPS_FOR_EACH_SIMD_TYPE_PAIR(X) \
  X(float, int16_t)                              \
  X(float, int32_t)                              \
  X(Half, int16_t)                               \
  X(Half, int32_t)                               \
  X(BFloat16, int16_t)                           \
  X(BFloat16, int32_t)

#define CONDENSED_OPS_FOR_EACH_SIMD_VALUE_TYPE(X) \
  X(float)                                        \
  X(Half)                                         \
  X(BFloat16)
