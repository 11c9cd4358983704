// fastmdm._C: the C++ CPU kernels. Each op file registers its functions here.
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastmdm CPU kernels (numpy buffers in, numpy buffers out; no torch ABI)";
#ifdef _OPENMP
    m.attr("has_openmp") = true;
#else
    m.attr("has_openmp") = false;
#endif
    fastmdm::register_masking(m);
    fastmdm::register_elbo(m);
    fastmdm::register_rloo(m);
    m.def("num_threads", []() { return fastmdm::num_threads_for(2); },
          "OpenMP threads the kernels use (1 without OpenMP)");
}
