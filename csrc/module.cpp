// The Python extension module: loading it registers the ops (static
// initialisers in this library); its attributes report how it was built.
// Tensors never pass through here: they go through torch.ops.condensed_ops.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>


#include "cpu/cpu_kernel_choice.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "condensed_ops compiled core: registers torch.ops.condensed_ops.* and reports build facts";
  m.attr("__version__") = CONDENSED_OPS_VERSION;
#if defined(CONDENSED_OPS_WITH_CUDA)
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cpu_capabilities", [] {
    py::dict facts;
    facts["avx2_compiled"] = condensed_ops::cpu::avx2_compiled();
    facts["avx2_supported"] = condensed_ops::cpu::avx2_supported();
    facts["avx512_supported"] = condensed_ops::cpu::avx512_supported();
    facts["active_isa"] = condensed_ops::cpu::active_isa();
    facts["gather_max_batch"] = condensed_ops::cpu::gather_max_batch();
    return facts;
  }, "What the CPU kernels were built with, what this CPU supports and which path runs.");
  m.def("_set_cpu_kernel", &condensed_ops::cpu::set_kernel_override, py::arg("isa") = "auto",
        py::arg("strategy") = "auto", "Force a CPU kernel flavour/strategy (tests and benchmarks only).");
  m.def("_threads_used_by_parallel_for", &condensed_ops::cpu::threads_used_by_parallel_for, py::arg("items"));
}
