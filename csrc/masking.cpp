// Fused forward masking (t-space and order-space): one pass per row writes x_t, mask,
// weight and score. Contract: fastmdm/ops/reference.py (mask_tspace, mask_order).
#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "common.h"

namespace fastmdm {
namespace {

struct MaskOutputs {
    int64_t* x_t;
    bool* mask;
    float* weight;
    float* score;
};

MaskOutputs mask_outputs(py::array& x_t, py::array& mask, py::array& weight, py::array& score,
                         int64_t n) {
    check_size(x_t, "x_t", n);
    check_size(mask, "mask", n);
    check_size(weight, "weight", n);
    check_size(score, "score", n);
    return {buffer<int64_t>(x_t, "x_t", true), buffer<bool>(mask, "mask", true),
            buffer<float>(weight, "weight", true), buffer<float>(score, "score", true)};
}

// The inputs both masking ops share: tokens [B, L], w [L], mask ids [L], optional uniforms.
struct MaskInputs {
    int64_t B, L;
    const int64_t* x;
    const float* w;
    const int64_t* mask_id;
    const float* u;  // nullptr: draw from the counter-based stream of `key`
    uint64_t key;
    py::array u_owner;  // keeps the uniforms' buffer alive

    float uniform(int64_t i) const {
        return u ? u[i] : counter_uniform(key, static_cast<uint64_t>(i));
    }
};

MaskInputs mask_inputs(const char* op, py::array& x, py::array& w, py::array& mask_id,
                       py::object& u_obj, uint64_t seed) {
    if (x.ndim() != 2) throw std::invalid_argument(std::string("fastmdm._C.") + op + ": x must be [B, L]");
    MaskInputs in{x.shape(0), x.shape(1), buffer<int64_t>(x, "x"), buffer<float>(w, "w"),
                  buffer<int64_t>(mask_id, "mask_id"), nullptr, seed_key(seed), py::array()};
    check_size(w, "w", in.L);
    check_size(mask_id, "mask_id", in.L);
    if (!u_obj.is_none()) {
        in.u_owner = py::cast<py::array>(u_obj);
        in.u = buffer<float>(in.u_owner, "u");
        check_size(in.u_owner, "u", in.B * in.L);
    }
    return in;
}

// a / expm1(a), 1 at a = 0 (schedules.expm1_ratio).
inline float expm1_ratio(float a) { return a == 0.0f ? 1.0f : a / std::expm1(a); }

void mask_tspace(py::array x, py::array log_t, py::array w, py::array mask_id,
                 py::array time_weight, py::object u_obj, uint64_t seed, py::array x_t,
                 py::array mask, py::array weight, py::array score) {
    const MaskInputs in = mask_inputs("mask_tspace", x, w, mask_id, u_obj, seed);
    const int64_t B = in.B, L = in.L;
    const int64_t *xp = in.x, *idp = in.mask_id;
    const float* wp = in.w;
    const float* log_tp = buffer<float>(log_t, "log_t");
    const float* twp = buffer<float>(time_weight, "time_weight");
    check_size(log_t, "log_t", B);
    check_size(time_weight, "time_weight", B);
    MaskOutputs out = mask_outputs(x_t, mask, weight, score, B * L);

    py::gil_scoped_release release;
#pragma omp parallel for schedule(dynamic, 64) num_threads(num_threads_for(B * L))
    for (int64_t b = 0; b < B; ++b) {
        const float lt = log_tp[b];
        const float tw = twp[b];
        const int64_t base = b * L;
        for (int64_t l = 0; l < L; ++l) {
            const int64_t i = base + l;
            const float wl = wp[l];
            const float a = wl * lt;
            const float prob = std::exp(a);  // t^w
            const bool m = in.uniform(i) < prob;
            out.mask[i] = m;
            out.x_t[i] = m ? idp[l] : xp[i];
            out.weight[i] = m ? wl * tw : 0.0f;
            out.score[i] = m ? lt : prob * expm1_ratio(a) / wl;
        }
    }
}

void mask_order(py::array x, py::array w, py::array mask_id, py::object u_obj,
                py::array n_revealed, uint64_t seed, py::array x_t, py::array mask,
                py::array weight, py::array score) {
    const MaskInputs in = mask_inputs("mask_order", x, w, mask_id, u_obj, seed);
    const int64_t B = in.B, L = in.L;
    const int64_t *xp = in.x, *idp = in.mask_id;
    const float* wp = in.w;
    const int64_t* np_ = buffer<int64_t>(n_revealed, "n_revealed");
    check_size(n_revealed, "n_revealed", B);
    for (int64_t b = 0; b < B; ++b) {
        if (np_[b] < 0 || np_[b] >= L) {
            throw std::invalid_argument("fastmdm._C.mask_order: n_revealed[" + std::to_string(b) +
                                        "] = " + std::to_string(np_[b]) + " is outside [0, " +
                                        std::to_string(L - 1) + "]");
        }
    }
    MaskOutputs out = mask_outputs(x_t, mask, weight, score, B * L);
    const float tiny = std::numeric_limits<float>::min();  // torch.finfo(float32).tiny
    const float num_columns = static_cast<float>(L);

    py::gil_scoped_release release;
#pragma omp parallel num_threads(num_threads_for(B * L * 4))
    {
        std::vector<std::pair<float, int64_t>> keyed(L);  // (key, column), sorted = reveal order
        std::vector<int64_t> rank(L);
        std::vector<float> cum(L);  // C_r: sum over steps k <= r, k < n of 1 / D_k
#pragma omp for schedule(dynamic, 64)
        for (int64_t b = 0; b < B; ++b) {
            const int64_t base = b * L;
            const int64_t n = np_[b];
            for (int64_t l = 0; l < L; ++l) {
                float ui = in.uniform(base + l);
                ui = ui < tiny ? tiny : ui;
                keyed[l] = {-std::log(ui) / wp[l], l};  // exponential_keys
            }
            // Stable argsort by key: ties broken by column index, as torch.argsort(stable=True).
            if (L <= 32) {
                for (int64_t i = 1; i < L; ++i) {
                    auto item = keyed[i];
                    int64_t j = i - 1;
                    while (j >= 0 && keyed[j].first > item.first) {
                        keyed[j + 1] = keyed[j];
                        --j;
                    }
                    keyed[j + 1] = item;
                }
            } else {
                std::sort(keyed.begin(), keyed.end());
            }
            // D_k = sum of w over steps >= k (suffix sum in reveal order); the float32 rounding
            // of D_k, 1 / D_k and C mirrors the reference's cumsum (double accumulation).
            double suffix = 0.0;
            double hidden_total = 0.0;
            for (int64_t k = L - 1; k >= 0; --k) {
                suffix += static_cast<double>(wp[keyed[k].second]);
                cum[k] = static_cast<float>(suffix);  // D_k for now
                if (k == n) hidden_total = suffix;
            }
            double c = 0.0;
            for (int64_t k = 0; k < L; ++k) {
                if (k < n) c += static_cast<double>(1.0f / cum[k]);
                cum[k] = static_cast<float>(c);
                rank[keyed[k].second] = k;
            }
            const float hidden_w = static_cast<float>(hidden_total);
            for (int64_t l = 0; l < L; ++l) {
                const int64_t i = base + l;
                const int64_t r = rank[l];
                const bool m = r >= n;
                const float wl = wp[l];
                out.mask[i] = m;
                out.x_t[i] = m ? idp[l] : xp[i];
                out.weight[i] = m ? (num_columns * wl) / hidden_w : 0.0f;
                out.score[i] = (m ? 0.0f : 1.0f / wl) - cum[r];
            }
        }
    }
}

}  // namespace

void register_masking(py::module_& m) {
    m.def("mask_tspace", &mask_tspace, "t-space masking (see fastmdm.ops.reference.mask_tspace)",
          py::arg("x"), py::arg("log_t"), py::arg("w"), py::arg("mask_id"), py::arg("time_weight"),
          py::arg("u").none(true), py::arg("seed"), py::arg("x_t"), py::arg("mask"),
          py::arg("weight"), py::arg("score"));
    m.def("mask_order", &mask_order, "order-space masking (see fastmdm.ops.reference.mask_order)",
          py::arg("x"), py::arg("w"), py::arg("mask_id"), py::arg("u").none(true),
          py::arg("n_revealed"), py::arg("seed"), py::arg("x_t"), py::arg("mask"),
          py::arg("weight"), py::arg("score"));
    m.def("uniforms", [](uint64_t seed, py::array out) {
        float* p = buffer<float>(out, "out", true);
        const int64_t n = out.size();
        const uint64_t key = seed_key(seed);
        py::gil_scoped_release release;
        for (int64_t i = 0; i < n; ++i) p[i] = counter_uniform(key, static_cast<uint64_t>(i));
    }, "fill out (flat) with the uniforms the seeded masking ops draw", py::arg("seed"), py::arg("out"));
}

}  // namespace fastmdm
