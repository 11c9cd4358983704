// fastmdm._C: the C++ CPU kernels. Each op file registers its functions here.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastmdm CPU kernels (numpy buffers in, numpy buffers out; no torch ABI)";
#ifdef _OPENMP
    m.attr("has_openmp") = true;
#else
    m.attr("has_openmp") = false;
#endif
}
