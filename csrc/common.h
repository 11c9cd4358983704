// Shared helpers for the fastmdm CPU kernels: buffer checks, the counter-based RNG,
// a vectorizable exp, and the per-op registration hooks called from module.cpp.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

// Hot loops are compiled for AVX-512, AVX2/FMA and the baseline, and the right clone is
// picked at load time (ifunc) where the toolchain supports it. The x86-64-vN levels are
// checked by CPU feature; "arch=haswell" would be checked by CPU model and so never run on
// AMD or on Intel parts newer than Haswell.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__GLIBC__)
#define FASTMDM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTMDM_CLONES
#endif

namespace fastmdm {

// Registration hooks, one per op file.
void register_masking(py::module_& m);
void register_elbo(py::module_& m);
void register_rloo(py::module_& m);
void register_ragged_head(py::module_& m);
void register_attention(py::module_& m);

// ---------------------------------------------------------------------------------------
// Buffer access. The Python wrapper (fastmdm/ops/cpu_backend.py) hands over C-contiguous
// numpy views of torch tensors; outputs are written in place, so a silent copy (what
// py::array_t would do on a dtype mismatch) must never happen: check and raise instead.
template <typename T>
inline T* buffer(py::array& a, const char* name, bool writable = false) {
    if (!a.dtype().equal(py::dtype::of<T>())) {
        throw std::invalid_argument(std::string("fastmdm._C: ") + name + " has dtype " +
                                    std::string(py::str(a.dtype())) + ", expected " +
                                    std::string(py::str(py::dtype::of<T>())));
    }
    if (!(a.flags() & py::array::c_style)) {
        throw std::invalid_argument(std::string("fastmdm._C: ") + name + " must be C-contiguous");
    }
    if (writable && !a.writeable()) {
        throw std::invalid_argument(std::string("fastmdm._C: output ") + name + " is read-only");
    }
    return static_cast<T*>(const_cast<void*>(a.data()));
}

inline void check_size(const py::array& a, const char* name, int64_t expected) {
    if (static_cast<int64_t>(a.size()) != expected) {
        throw std::invalid_argument(std::string("fastmdm._C: ") + name + " has " +
                                    std::to_string(a.size()) + " elements, expected " +
                                    std::to_string(expected));
    }
}

// ---------------------------------------------------------------------------------------
// Counter-based RNG: uniform(seed, i) = top 24 bits of splitmix64(mix(seed) + (i+1) * golden)
// scaled by 2^-24, exactly representable in float32 and in [0, 1). Depends only on
// (seed, flat index row * L + col), never on the thread that computes it.
inline uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

inline uint64_t seed_key(uint64_t seed) { return splitmix64(seed + 0x632BE59BD9B4E019ULL); }

inline float counter_uniform(uint64_t key, uint64_t index) {
    uint64_t h = splitmix64(key + (index + 1) * 0x9E3779B97F4A7C15ULL);
    return static_cast<float>(h >> 40) * (1.0f / 16777216.0f);
}

// ---------------------------------------------------------------------------------------
// exp(x) for x <= 0 (softmax after max subtraction), branch free so loops over it
// auto-vectorize: 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2] and a degree-6
// polynomial (relative error ~2e-7, close to float32 rounding). x is clamped at -87.3
// (result ~1e-38, negligible next to the max term 1). Rounding to the nearest integer uses
// the 1.5 * 2^23 trick, which vectorizes on plain SSE2 (nearbyint would not).
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline float exp_nonpos(float x) {
    const float kLog2e = 1.44269504088896341f;
    const float kLn2Hi = 0.693359375f;
    const float kLn2Lo = -2.12194440e-4f;
    x = x < -87.3f ? -87.3f : x;
    const float kRound = 12582912.0f;  // 1.5 * 2^23
    float n = (x * kLog2e + kRound) - kRound;
    float r = x - n * kLn2Hi;
    r = r - n * kLn2Lo;
    // Taylor/minimax coefficients (Cephes expf).
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

// Threads for a kernel doing `work` element-operations: 1 below ~2^18 (a fraction of a
// millisecond of work, less than what waking and joining the OpenMP team costs, and much
// less than a join costs when the cores are shared with other processes), else the team.
constexpr int64_t kParallelWork = int64_t{1} << 18;

inline int num_threads_for(int64_t work) {
#ifdef _OPENMP
    return work >= kParallelWork ? omp_get_max_threads() : 1;
#else
    (void)work;
    return 1;
#endif
}

}  // namespace fastmdm
