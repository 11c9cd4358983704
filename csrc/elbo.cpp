// Schedule-weighted cross-entropy over ragged per-column logits, with the logits gradient
// produced in the same pass (no softmax tensor). Contract: fastmdm/ops/reference.py
// (weighted_ce). Only masked columns are touched; unmasked segments of dlogits are zeroed
// once, here, so the wrapper can allocate dlogits uninitialized.
// The softmax loops must vectorize: GCC only if-converts the clamp and max below when FP
// ops may be assumed not to trap (we never enable FP exceptions), hence this pragma; the
// row kernel is also cloned per instruction set (FASTMDM_CLONES).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "fp-contract=fast")
#endif

#include <algorithm>
#include <atomic>
#include <limits>

#include "common.h"

namespace fastmdm {
namespace {

// CE of one column's logits x[0..n) at `target`. When g is given it receives
// wgt * (softmax(x) - onehot(target)); its memory doubles as the exp(x - max) scratch.
__attribute__((always_inline)) inline float segment_ce(const float* __restrict x, int64_t n, int64_t target, float wgt,
                        float* __restrict g) {
    // Max with 8 independent lanes (maps onto maxps; an omp simd max reduction does not).
    float m8[8];
    for (int j = 0; j < 8; ++j) m8[j] = x[0];
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int j = 0; j < 8; ++j) m8[j] = x[i + j] > m8[j] ? x[i + j] : m8[j];
    }
    for (; i < n; ++i) m8[0] = x[i] > m8[0] ? x[i] : m8[0];
    for (int j = 0; j < 4; ++j) m8[j] = m8[j + 4] > m8[j] ? m8[j + 4] : m8[j];
    float mx = m8[0];
    for (int j = 1; j < 4; ++j) mx = m8[j] > mx ? m8[j] : mx;
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

struct CeArgs {
    const float* logits;
    const int64_t* targets;
    const float* weight;
    const bool* mask;
    const int64_t* offsets;
    int64_t L, V;
    float* loss;
    float* ce;
    float* dlogits;  // nullptr when no gradient is wanted
    std::atomic<int64_t>* bad_target;
};

// Rows [b0, b1): loss, ce and (optionally) dlogits, each element written exactly once.
FASTMDM_CLONES void ce_rows(const CeArgs& a, int64_t b0, int64_t b1) {
    const int64_t L = a.L, V = a.V;
    for (int64_t b = b0; b < b1; ++b) {
        const float* xrow = a.logits + b * V;
        float* grow = a.dlogits ? a.dlogits + b * V : nullptr;
        double row_loss = 0.0;
        int64_t zero_from = 0;  // start of the pending run of unmasked segments in grow
        for (int64_t l = 0; l < L; ++l) {
            const int64_t i = b * L + l;
            if (!a.mask[i]) {
                a.ce[i] = 0.0f;
                continue;
            }
            const int64_t lo = a.offsets[l], n = a.offsets[l + 1] - lo;
            const int64_t target = a.targets[i];
            if (target < 0 || target >= n) {
                a.bad_target->store(i, std::memory_order_relaxed);
                a.ce[i] = std::numeric_limits<float>::quiet_NaN();
                continue;  // its dlogits segment is zeroed with the next run
            }
            if (grow && lo > zero_from) {
                std::memset(grow + zero_from, 0, sizeof(float) * (lo - zero_from));
            }
            const float c = segment_ce(xrow + lo, n, target, a.weight[i], grow ? grow + lo : nullptr);
            zero_from = lo + n;
            a.ce[i] = c;
            row_loss += static_cast<double>(a.weight[i] * c);
        }
        if (grow && V > zero_from) std::memset(grow + zero_from, 0, sizeof(float) * (V - zero_from));
        a.loss[b] = static_cast<float>(row_loss);
    }
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
    const CeArgs args{xp, tp, wp, mp, op, L, V, lossp, cep, gp, &bad_target};
    {
        py::gil_scoped_release release;
        // Rows differ in work (number of masked columns): dynamic chunks balance it.
        const int64_t chunk = 16, num_chunks = (B + chunk - 1) / chunk;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads_for(B * V))
        for (int64_t c = 0; c < num_chunks; ++c) {
            ce_rows(args, c * chunk, std::min(B, (c + 1) * chunk));
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
