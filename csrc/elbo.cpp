// Schedule-weighted cross-entropy over ragged per-column logits, with the logits gradient
// produced in the same pass (no softmax tensor). Contract: fastmdm/ops/reference.py
// (weighted_ce). Only masked columns are touched; unmasked segments of dlogits are zeroed
// once, here, so the wrapper can allocate dlogits uninitialized.
#include <atomic>

#include "common.h"

namespace fastmdm {
namespace {

// CE of one column's logits x[0..n) at `target`. When g is given it receives
// wgt * (softmax(x) - onehot(target)); its memory doubles as the exp(x - max) scratch.
inline float segment_ce(const float* __restrict x, int64_t n, int64_t target, float wgt,
                        float* __restrict g) {
    float mx = x[0];
#pragma omp simd reduction(max : mx)
    for (int64_t i = 1; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
    float sum = 0.0f;
    if (g) {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) {
            const float e = exp_nonpos(x[i] - mx);
            g[i] = e;
            sum += e;
        }
        const float scale = wgt / sum;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) g[i] *= scale;
        g[target] -= wgt;
    } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) sum += exp_nonpos(x[i] - mx);
    }
    return (mx - x[target]) + std::log(sum);
}

void weighted_ce(py::array logits, py::array targets, py::array weight, py::array mask,
                 py::array offsets, bool compute_grad, py::array loss, py::array ce,
                 py::array dlogits) {
    if (logits.ndim() != 2 || targets.ndim() != 2) {
        throw std::invalid_argument("fastmdm._C.weighted_ce: logits and targets must be 2-D");
    }
    const int64_t B = targets.shape(0), L = targets.shape(1), V = logits.shape(1);
    if (logits.shape(0) != B) {
        throw std::invalid_argument("fastmdm._C.weighted_ce: logits and targets differ in rows");
    }
    const float* xp = buffer<float>(logits, "logits");
    const int64_t* tp = buffer<int64_t>(targets, "targets");
    const float* wp = buffer<float>(weight, "weight");
    const bool* mp = buffer<bool>(mask, "mask");
    const int64_t* op = buffer<int64_t>(offsets, "offsets");
    check_size(weight, "weight", B * L);
    check_size(mask, "mask", B * L);
    check_size(offsets, "offsets", L + 1);
    if (op[0] != 0 || op[L] != V) {
        throw std::invalid_argument("fastmdm._C.weighted_ce: offsets must start at 0 and end at "
                                    "the logits width " + std::to_string(V));
    }
    for (int64_t l = 0; l < L; ++l) {
        if (op[l + 1] <= op[l]) {
            throw std::invalid_argument("fastmdm._C.weighted_ce: offsets must be strictly increasing");
        }
    }
    float* lossp = buffer<float>(loss, "loss", true);
    float* cep = buffer<float>(ce, "ce", true);
    check_size(loss, "loss", B);
    check_size(ce, "ce", B * L);
    float* gp = nullptr;
    if (compute_grad) {
        gp = buffer<float>(dlogits, "dlogits", true);
        check_size(dlogits, "dlogits", B * V);
    }
    std::atomic<int64_t> bad_target{-1};

    {
        py::gil_scoped_release release;
        // Rows differ in work (number of masked columns): dynamic chunks balance it.
#pragma omp parallel for schedule(dynamic, 16) num_threads(num_threads_for(B))
        for (int64_t b = 0; b < B; ++b) {
            const float* xrow = xp + b * V;
            float* grow = gp ? gp + b * V : nullptr;
            double row_loss = 0.0;
            int64_t zero_from = 0;  // start of the pending run of unmasked segments in grow
            for (int64_t l = 0; l < L; ++l) {
                const int64_t i = b * L + l;
                if (!mp[i]) {
                    cep[i] = 0.0f;
                    continue;
                }
                const int64_t lo = op[l], n = op[l + 1] - lo;
                const int64_t target = tp[i];
                if (target < 0 || target >= n) {
                    bad_target.store(i, std::memory_order_relaxed);
                    cep[i] = std::numeric_limits<float>::quiet_NaN();
                    continue;
                }
                if (grow && lo > zero_from) {
                    std::memset(grow + zero_from, 0, sizeof(float) * (lo - zero_from));
                }
                const float c = segment_ce(xrow + lo, n, target, wp[i], grow ? grow + lo : nullptr);
                zero_from = lo + n;
                cep[i] = c;
                row_loss += static_cast<double>(wp[i] * c);
            }
            if (grow && V > zero_from) std::memset(grow + zero_from, 0, sizeof(float) * (V - zero_from));
            lossp[b] = static_cast<float>(row_loss);
        }
    }
    const int64_t bad = bad_target.load();
    if (bad >= 0) {
        throw std::invalid_argument(
            "fastmdm._C.weighted_ce: targets[" + std::to_string(bad / L) + ", " +
            std::to_string(bad % L) + "] = " + std::to_string(tp[bad]) +
            " is out of range for its column (size " +
            std::to_string(op[bad % L + 1] - op[bad % L]) + ")");
    }
}

}  // namespace

void register_elbo(py::module_& m) {
    m.def("weighted_ce", &weighted_ce,
          "weighted CE over ragged logits (see fastmdm.ops.reference.weighted_ce)",
          py::arg("logits"), py::arg("targets"), py::arg("weight"), py::arg("mask"),
          py::arg("offsets"), py::arg("compute_grad"), py::arg("loss"), py::arg("ce"),
          py::arg("dlogits"));
}

}  // namespace fastmdm
