"""Builds the C++ CPU kernels in csrc/ into fastmdm._C (pybind11, OpenMP where available).

The extension takes numpy buffers, not torch tensors, so it has no dependency on the torch
C++ ABI and one build works with any torch version.
"""
import glob
import os
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def _compiler_accepts(flag: str) -> bool:
    """True when the C++ compiler accepts `flag` (probes -fopenmp, which macOS clang lacks)."""
    import subprocess
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(){return omp_get_max_threads()>0?0:1;}\n")
        try:
            return subprocess.run([cxx, flag, src, "-o", os.path.join(d, "probe")],
                                  capture_output=True).returncode == 0
        except OSError:
            return False


compile_args = ["-O3", "-std=c++17"]
link_args = []
if sys.platform != "win32" and _compiler_accepts("-fopenmp"):
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")

setup(
    ext_modules=[
        Pybind11Extension(
            "fastmdm._C",
            sorted(glob.glob("csrc/*.cpp")),
            include_dirs=["csrc"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    ],
    cmdclass={"build_ext": build_ext},
)
