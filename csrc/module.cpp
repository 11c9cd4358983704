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
    fastmdm::register_ragged_head(m);
    fastmdm::register_attention(m);
    m.def("num_threads", []() { return fastmdm::num_threads_for(fastmdm::kParallelWork); },
          "OpenMP threads the kernels use (1 without OpenMP)");
    m.def("set_num_threads", [](int n) {
        if (n < 1) throw std::invalid_argument("fastmdm._C.set_num_threads: n must be >= 1");
#ifdef _OPENMP
        omp_set_num_threads(n);
#endif
    }, "set the OpenMP threads of the kernels (for tests: results do not depend on it)",
          py::arg("n"));
}
