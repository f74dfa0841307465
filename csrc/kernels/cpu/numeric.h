// Torch-free value types for the CPU kernels: 16-bit float storage and the
// float32/float64 accumulator each value type is summed in.
#pragma once

#include <cstdint>
#include <cstring>

namespace condensed_ops::kernels {

// Bit-compatible with c10::Half / c10::BFloat16, so glue can reinterpret_cast
// tensor pointers without including torch here.
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float bits_to_float(uint32_t bits) { float f; std::memcpy(&f, &bits, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

inline float to_float(BFloat16 v) { return bits_to_float(uint32_t(v.bits) << 16); }

// IEEE fp16 <-> fp32 without F16C (the classic branch-light bit recipe): the
// portable path must build and be exact on any architecture.
inline float to_float(Half v) {
  const uint32_t w = uint32_t(v.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized);
  return bits_to_float(sign | magnitude);
}

inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }

template <typename T> T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }

template <> inline BFloat16 from_float<BFloat16>(float v) {
  const uint32_t bits = float_to_bits(v);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return BFloat16{0x7FC0};  // quiet NaN
  // Round to nearest, ties to even, like c10::BFloat16.
  return BFloat16{uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16)};
}

template <> inline Half from_float<Half>(float v) {
  const uint32_t w = float_to_bits(v);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  // Scaling by 2^112 then 2^-110 rounds the mantissa to fp16 precision in the
  // FPU (nearest-even) and saturates overflow to infinity.
  float base = ((v < 0 ? -v : v) * 0x1.0p+112f) * 0x1.0p-110f;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  return Half{uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

// Sums run in float32 for every 16/32-bit type and in float64 for float64.
template <typename T> struct Accumulate { using type = float; };
template <> struct Accumulate<double> { using type = double; };
template <typename T> using acc_t = typename Accumulate<T>::type;

template <typename T> inline T from_acc(acc_t<T> v) { return from_float<T>(v); }
template <> inline double from_acc<double>(double v) { return v; }

}  // namespace condensed_ops::kernels
