// Batched RLOO score-function gradient for w. Contract: fastmdm/ops/reference.py (rloo_grad).
// Rows are split into fixed chunks (a function of B only), each reduced into its own double
// partial sum, and the partials are added in chunk order: the result is bitwise the same
// for every thread count. per_row writes each row's mean over its K samples to g[b, :]
// (one thread per row, so also independent of the thread count).
#include <algorithm>
#include <vector>

#include "common.h"

namespace fastmdm {
namespace {

// acc[l] = sum_k (f_bk - mean_{j!=k} f_bj) * score_bkl for row b, with a float32 advantage:
// exactly the reference's arithmetic.
inline void accumulate_row(const float* fp, const float* sp, int64_t b, int64_t K, int64_t L, float* acc) {
    float total = 0.0f;
    for (int64_t k = 0; k < K; ++k) total += fp[b * K + k];
    std::fill(acc, acc + L, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
        const float fk = fp[b * K + k];
        const float adv = fk - (total - fk) / static_cast<float>(K - 1);
        const float* s = sp + (b * K + k) * L;
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) acc[l] += adv * s[l];
    }
}

void rloo_grad(py::array f, py::array score, py::array g, bool per_row) {
    if (f.ndim() != 2 || score.ndim() != 3) {
        throw std::invalid_argument("fastmdm._C.rloo_grad: f must be [B, K] and score [B, K, L]");
    }
    const int64_t B = f.shape(0), K = f.shape(1), L = score.shape(2);
    if (score.shape(0) != B || score.shape(1) != K) {
        throw std::invalid_argument("fastmdm._C.rloo_grad: score must be [B, K, L] with [B, K] of f");
    }
    if (K < 2) throw std::invalid_argument("fastmdm._C.rloo_grad: RLOO needs K >= 2");
    const float* fp = buffer<float>(f, "f");
    const float* sp = buffer<float>(score, "score");
    float* gp = buffer<float>(g, "g", true);
    check_size(g, "g", per_row ? B * L : L);

    if (per_row) {
        py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(num_threads_for(B * K * L))
        for (int64_t b = 0; b < B; ++b) {
            float* out = gp + b * L;
            accumulate_row(fp, sp, b, K, L, out);
            for (int64_t l = 0; l < L; ++l) out[l] /= static_cast<float>(K);
        }
        return;
    }
    const int64_t chunk = std::max<int64_t>(64, (B + 255) / 256);
    const int64_t num_chunks = (B + chunk - 1) / chunk;
    std::vector<double> partial(static_cast<size_t>(num_chunks * L), 0.0);
    {
        py::gil_scoped_release release;
#pragma omp parallel num_threads(num_threads_for(B * K * L))
        {
            std::vector<float> acc(L);
#pragma omp for schedule(dynamic, 1)
            for (int64_t c = 0; c < num_chunks; ++c) {
                double* out = partial.data() + c * L;
                const int64_t b_end = std::min(B, (c + 1) * chunk);
                for (int64_t b = c * chunk; b < b_end; ++b) {
                    accumulate_row(fp, sp, b, K, L, acc.data());
#pragma omp simd
                    for (int64_t l = 0; l < L; ++l) out[l] += static_cast<double>(acc[l]);
                }
            }
        }
    }
    const double denom = static_cast<double>(B) * static_cast<double>(K);
    for (int64_t l = 0; l < L; ++l) {
        double s = 0.0;
        for (int64_t c = 0; c < num_chunks; ++c) s += partial[c * L + l];
        gp[l] = static_cast<float>(s / denom);
    }
}

}  // namespace

void register_rloo(py::module_& m) {
    m.def("rloo_grad", &rloo_grad, "RLOO gradient (see fastmdm.ops.reference.rloo_grad)",
          py::arg("f"), py::arg("score"), py::arg("g"), py::arg("per_row") = false);
}

}  // namespace fastmdm
