// What the CPU glue offers the pybind11 module (torch-free declarations).
#pragma once

#include <cstddef>
#include <cstdint>

namespace condensed_ops::cpu {

// Runs at::parallel_for from the same translation unit (and flags) as the
// kernels' glue and counts the threads that took part: proves OpenMP is live.
int64_t threads_used_by_parallel_for(int64_t items);

}  // namespace condensed_ops::cpu
