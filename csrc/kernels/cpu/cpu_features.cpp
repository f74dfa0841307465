// Which SIMD flavours the running CPU can take. Built without SIMD flags.
#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

#include "cpu_kernels.h"

namespace condensed_ops::kernels {

// Asked once per process: CPUID traps to the hypervisor in a VM (~8 us a
// call measured), which would dominate a small layer's call.
bool avx2::cpu_supports() {
#if defined(CONDENSED_OPS_WITH_AVX2)
  static const bool supported = [] {
    // Every AVX2 CPU has F16C in practice, but the fp16 loads rely on it, so ask.
    unsigned eax, ebx, ecx, edx;
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
    return f16c && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return supported;
#else
  return false;
#endif
}

bool avx512::cpu_supports() {
#if defined(CONDENSED_OPS_WITH_AVX512)
  static const bool supported = avx2::cpu_supports() && __builtin_cpu_supports("avx512f");
  return supported;
#else
  return false;
#endif
}

}  // namespace condensed_ops::kernels
