// The Python extension module: loading it registers the ops (static
// initialisers in this library); its attributes report how it was built and
// which kernels run. Tensors never pass through here: they go through
// torch.ops.condensed_ops.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "cache_registry.h"
#include "cpu/cpu_glue.h"
#include "cpu/kernel_choice.h"
#include "kernel_options.h"
#include "kernels/cpu/cpu_kernels.h"

namespace py = pybind11;

namespace {

bool avx2_compiled() {
#if defined(CONDENSED_OPS_WITH_AVX2)
  return true;
#else
  return false;
#endif
}

bool avx512_compiled() {
#if defined(CONDENSED_OPS_WITH_AVX512)
  return true;
#else
  return false;
#endif
}

py::dict cpu_capabilities() {
  namespace cpu = condensed_ops::cpu;
  namespace k = condensed_ops::kernels;
  const cpu::Isa isa = cpu::active_isa();
  const cpu::SmallBatchChoice small_batch = cpu::small_batch_choice(isa);
  py::dict facts;
  facts["avx2_compiled"] = avx2_compiled();
  facts["avx2_supported"] = k::avx2::cpu_supports();
  facts["avx512_compiled"] = avx512_compiled();
  facts["avx512_supported"] = k::avx512::cpu_supports();
  facts["active_isa"] = cpu::isa_name(isa);
  facts["small_batch_max"] = cpu::kSmallBatchMax;
  facts["small_batch_kernel"] = cpu::strategy_name(small_batch.strategy);
  facts["small_batch_reason"] = small_batch.reason;
  // What another process must set to run the same small-batch kernel (same result bits).
  facts["small_batch_pin"] = "CONDENSED_OPS_CPU_SMALL_BATCH=" + cpu::strategy_name(small_batch.strategy);
  facts["window_width"] = cpu::window_width(isa);
  facts["window_max_batch"] = cpu::kWindowMaxBatch;
  // The AVX2 window kernel's x loads: "" until the first window-layout call times them.
  facts["window_x_loads"] = cpu::window_gathers_reason();
  py::dict options;
  for (const auto& [name, value] : condensed_ops::kernel_options()) options[py::str(name)] = value;
  facts["kernel_options"] = options;
  return facts;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "condensed_ops compiled core: registers torch.ops.condensed_ops.* and reports build facts";
  m.attr("__version__") = CONDENSED_OPS_VERSION;
#if defined(CONDENSED_OPS_WITH_CUDA)
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  // Batches up to this many rows run faster from the window layout (modules switch there).
  m.attr("WINDOW_MAX_BATCH") = condensed_ops::cpu::kWindowMaxBatch;
  m.def("cpu_capabilities", &cpu_capabilities,
        "What the CPU kernels were built with, what this CPU supports, which kernels run and why "
        "(the small-batch calibration runs on first call), and the kernel options in force.");
  m.def("_set_kernel_option", &condensed_ops::set_kernel_option, py::arg("name"), py::arg("value"),
        "Force a kernel path for this process: the same options as the CONDENSED_OPS_<NAME> environment variables.");
  m.def("_kernel_options", [] {
    py::dict options;
    for (const auto& [name, value] : condensed_ops::kernel_options()) options[py::str(name)] = value;
    return options;
  });
  m.def("_last_cpu_kernel", &condensed_ops::cpu::last_kernel_run,
        "The kernel this thread's last CPU op ran, as '<isa> <kernel>' (for tests).");
  m.def("_kernel_runs", [] {
    namespace cpu = condensed_ops::cpu;
    py::dict runs;
    for (const cpu::Isa isa : {cpu::Isa::Portable, cpu::Isa::Avx2, cpu::Isa::Avx512}) {
      runs[py::str(cpu::isa_name(isa))] = cpu::kernel_runs(isa);
    }
    return runs;
  }, "CPU ops each kernel flavour ran in this process (for the test summary).");
  m.def("_threads_used_by_parallel_for", &condensed_ops::cpu::threads_used_by_parallel_for, py::arg("items"));
  m.def("_cache_entries", [] {
    py::dict counts;
    for (const auto& [name, size] : condensed_ops::CacheRegistry::instance().entries()) counts[py::str(name)] = size;
    return counts;
  }, "Entries in each cache the ops have used so far (validated indices, column, window and expanded-group layouts).");
  m.def("_clear_caches", [] { condensed_ops::CacheRegistry::instance().clear_all(); },
        "Empty every cache (tests; frees the layouts' memory at once).");
}
