// Which CPU kernel flavour and strategy condensed_linear uses. Plain C++ so the
// pybind11 module can expose it without torch headers.
#pragma once

#include <cstdint>
#include <string>

namespace condensed_ops::cpu {

// "auto" picks the fastest available; the others force a path (for tests and
// benchmarks). Both throw std::invalid_argument on unknown names.
void set_kernel_override(const std::string& isa, const std::string& strategy);
std::string active_isa();  // "avx512", "avx2" or "portable", after overrides
bool avx2_compiled();
bool avx2_supported();    // compiled in and this CPU has AVX2+FMA+F16C
bool avx512_supported();  // ... and AVX-512F (used for the transposed strategy)

// Batch sizes up to this use the gather strategy, larger ones the transposed.
int64_t gather_max_batch();

// Runs at::parallel_for from the same translation unit (and flags) as the
// kernels' glue and counts the threads that took part: proves OpenMP is live.
int64_t threads_used_by_parallel_for(int64_t items);

}  // namespace condensed_ops::cpu
