// Ragged per-column output heads fused with the weighted cross entropy, and the matching
// Gumbel-max sampler, with per-cell token restrictions and the log of the probability mass
// they let through. Contract: fastmdm/ops/reference.py (ragged_head_ce, ragged_head_sample).
//
// Selected cells (masked ones for the loss, the requested ones for sampling) are counting-
// sorted by column and processed in tiles of up to 64 cells of one column. The cells are the
// vector lanes, so a 2-value column vectorizes as well as a 10,000-value one. A tile's logits
// X [K][cells] = W_l H^T + b_l are computed once (at most ~512 KiB: wide columns get 16-cell
// tiles) and turned in place into G = d loss / d logits, from which grad_h = G^T W_l and
// grad_W_l += G H follow. Three passes of K_l * d multiply-adds per cell; nothing of size
// N x V or N x L x Kmax ever exists.
//
// Parallel work is a list of tasks (column, group of its cells). The groups of one column
// add their grad_W / grad_b rows into separate buffers that are summed in group order, and
// the number of groups depends on the work only, never on the thread count: results are
// bitwise the same for any number of threads.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "fp-contract=fast")
// Vec values never cross a non-inlined call, so the AVX-512 ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

#include "common.h"

namespace fastmdm {
namespace {

constexpr int64_t kLanes = 16;                       // cells per vector group
constexpr int64_t kMaxTileCells = 64;
constexpr int64_t kTileFloats = int64_t{1} << 17;    // a tile's logits (512 KiB) unless K > 8192
constexpr int64_t kGroupWork = int64_t{1} << 22;     // multiply-adds per group of a column
constexpr int64_t kMaxGroups = 16;
constexpr int kBlock = 4;                            // values (or features) per register block

#if defined(__GNUC__)
#define FASTMDM_INLINE __attribute__((always_inline)) inline
#else
#define FASTMDM_INLINE inline
#endif

struct Heads {
    const float* weight;     // [V, d]
    const float* bias;       // [V]
    const int64_t* offsets;  // [L + 1]
    int64_t L, V, d;
    int64_t size(int64_t l) const { return offsets[l + 1] - offsets[l]; }
    const float* column_weight(int64_t l) const { return weight + offsets[l] * d; }
    const float* column_bias(int64_t l) const { return bias + offsets[l]; }
};

Heads make_heads(py::array& weight, py::array& bias, py::array& offsets, int64_t L, const char* op) {
    if (weight.ndim() != 2) throw std::invalid_argument(std::string("fastmdm._C.") + op + ": head_weight must be 2-D");
    const int64_t V = weight.shape(0), d = weight.shape(1);
    const Heads heads{buffer<float>(weight, "head_weight"), buffer<float>(bias, "head_bias"),
                      buffer<int64_t>(offsets, "offsets"), L, V, d};
    check_size(bias, "head_bias", V);
    check_size(offsets, "offsets", L + 1);
    if (heads.offsets[0] != 0 || heads.offsets[L] != V) {
        throw std::invalid_argument(std::string("fastmdm._C.") + op + ": offsets must start at 0 and end at V = " +
                                    std::to_string(V));
    }
    for (int64_t l = 0; l < L; ++l) {
        if (heads.size(l) <= 0) {
            throw std::invalid_argument(std::string("fastmdm._C.") + op + ": offsets must be strictly increasing");
        }
    }
    return heads;
}

// Cells counting-sorted by column: column l's cells are cells[start[l] .. start[l + 1]),
// in increasing order. column_of(i) gives cell i's column, or -1 to leave it out.
struct CellsByColumn {
    std::vector<int64_t> cells, start;
};

template <typename ColumnOf>
CellsByColumn group_by_column(int64_t count, int64_t L, ColumnOf column_of) {
    CellsByColumn g;
    g.start.assign(L + 1, 0);
    for (int64_t i = 0; i < count; ++i) {
        const int64_t c = column_of(i);
        if (c >= 0) ++g.start[c + 1];
    }
    for (int64_t l = 0; l < L; ++l) g.start[l + 1] += g.start[l];
    g.cells.resize(g.start[L]);
    std::vector<int64_t> next(g.start.begin(), g.start.end() - 1);
    for (int64_t i = 0; i < count; ++i) {
        const int64_t c = column_of(i);
        if (c >= 0) g.cells[next[c]++] = i;
    }
    return g;
}

struct Task {
    int64_t column, begin, end, group;  // cells[begin, end) of `column`, its group-th group
};

// Every column's cells in groups of about kGroupWork multiply-adds (at least kLanes cells,
// at most kMaxGroups groups), largest first so dynamic scheduling balances the threads.
std::vector<Task> plan_tasks(const CellsByColumn& g, const Heads& heads, std::vector<int64_t>& groups) {
    std::vector<Task> tasks;
    groups.assign(heads.L, 0);
    for (int64_t l = 0; l < heads.L; ++l) {
        const int64_t n = g.start[l + 1] - g.start[l];
        if (n == 0) continue;
        const int64_t work = n * heads.size(l) * heads.d;
        const int64_t wanted = std::min({(work + kGroupWork - 1) / kGroupWork, kMaxGroups,
                                         (n + kLanes - 1) / kLanes});
        const int64_t per = (n + std::max<int64_t>(wanted, 1) - 1) / std::max<int64_t>(wanted, 1);
        for (int64_t b = 0; b < n; b += per) {
            tasks.push_back({l, g.start[l] + b, g.start[l] + std::min(n, b + per), groups[l]++});
        }
    }
    std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& a, const Task& b) {
        return (a.end - a.begin) * heads.size(a.column) > (b.end - b.begin) * heads.size(b.column);
    });
    return tasks;
}

int64_t cells_per_tile(int64_t K) {
    return std::clamp(kTileFloats / K / kLanes * kLanes, kLanes, kMaxTileCells);
}

// Thread-private scratch for one tile: transposed states ht [d][lanes], logits x [K][lanes].
struct Tile {
    std::vector<float> ht, x;
    int64_t lanes = 0;
    float* row(int64_t k) { return x.data() + k * lanes; }
    const float* row(int64_t k) const { return x.data() + k * lanes; }
};

// kLanes floats as one value; GCC/clang lower it to the widest vectors of each clone.
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

FASTMDM_INLINE Vec load(const float* p) {
    Vec v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

FASTMDM_INLINE void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// x[k][i0 + j] = b[k] + W[k] . state of lane i0 + j, for R consecutive values k.
template <int R>
FASTMDM_INLINE void logits_block(const float* __restrict w, const float* __restrict b, int64_t d,
                                 const float* __restrict ht, int64_t lanes, int64_t i0,
                                 float* __restrict x) {
    Vec acc[R];
    for (int r = 0; r < R; ++r) acc[r] = Vec{} + b[r];
    for (int64_t dd = 0; dd < d; ++dd) {
        const Vec hv = load(ht + dd * lanes + i0);
        for (int r = 0; r < R; ++r) acc[r] += w[r * d + dd] * hv;
    }
    for (int r = 0; r < R; ++r) store(x + r * lanes + i0, acc[r]);
}

FASTMDM_INLINE void prefetch_row(const float* row, int64_t d) {
    for (int64_t f = 0; f < d; f += 64 / sizeof(float)) __builtin_prefetch(row + f);
}

// The logits of `count` cells of column l (rows h + cell * d), lanes past count on zero states.
FASTMDM_CLONES void tile_logits(const Heads& heads, int64_t l, const float* h, const int64_t* cells,
                                int64_t count, Tile& t) {
    const int64_t d = heads.d, K = heads.size(l);
    t.lanes = (count + kLanes - 1) / kLanes * kLanes;
    t.ht.assign(d * t.lanes, 0.0f);
    t.x.resize(K * t.lanes);
    // The cells' states are scattered over h (stride L * d): prefetch a few cells ahead.
    constexpr int64_t kAhead = 8;
    for (int64_t i = 0; i < std::min(count, kAhead); ++i) prefetch_row(h + cells[i] * d, d);
    for (int64_t i = 0; i < count; ++i) {
        if (i + kAhead < count) prefetch_row(h + cells[i + kAhead] * d, d);
        const float* state = h + cells[i] * d;
        for (int64_t dd = 0; dd < d; ++dd) t.ht[dd * t.lanes + i] = state[dd];
    }
    const float* w = heads.column_weight(l);
    const float* b = heads.column_bias(l);
    for (int64_t i0 = 0; i0 < t.lanes; i0 += kLanes) {
        int64_t k = 0;
        for (; k + kBlock <= K; k += kBlock) logits_block<kBlock>(w + k * d, b + k, d, t.ht.data(), t.lanes, i0, t.row(k));
        for (; k < K; ++k) logits_block<1>(w + k * d, b + k, d, t.ht.data(), t.lanes, i0, t.row(k));
    }
}

// Per lane: lse over the K logits of the tile.
FASTMDM_CLONES void tile_logsumexp(Tile& t, int64_t K, float* __restrict lse) {
    const int64_t lanes = t.lanes;
    float mx[kMaxTileCells], sum[kMaxTileCells];
    std::copy(t.row(0), t.row(0) + lanes, mx);
    for (int64_t k = 1; k < K; ++k) {
        const float* x = t.row(k);
        for (int64_t i = 0; i < lanes; ++i) mx[i] = x[i] > mx[i] ? x[i] : mx[i];
    }
    std::fill(sum, sum + lanes, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
        const float* x = t.row(k);
#pragma omp simd
        for (int64_t i = 0; i < lanes; ++i) sum[i] += exp_nonpos(x[i] - mx[i]);
    }
    for (int64_t i = 0; i < lanes; ++i) lse[i] = mx[i] + std::log(sum[i]);
}

// In place: x[k][i] = wgt[i] * (softmax - onehot(target[i])), and grad_b[k] += sum_i x[k][i].
FASTMDM_CLONES void tile_dlogits(Tile& t, int64_t K, const float* lse, const float* wgt,
                                 const int64_t* target, int64_t count, float* __restrict grad_b) {
    const int64_t lanes = t.lanes;
    for (int64_t k = 0; k < K; ++k) {
        float* x = t.row(k);
#pragma omp simd
        for (int64_t i = 0; i < lanes; ++i) x[i] = wgt[i] * exp_nonpos(x[i] - lse[i]);
    }
    for (int64_t i = 0; i < count; ++i) t.row(target[i])[i] -= wgt[i];
    for (int64_t k = 0; k < K; ++k) {
        const float* x = t.row(k);
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < lanes; ++i) s += x[i];
        grad_b[k] += s;
    }
}

// grad_h of the tile's cells: lane j of acc[r] = sum_k W[k][dd0 + r] g[k][i0 + j].
template <int R>
FASTMDM_INLINE void grad_h_block(const float* __restrict w, int64_t K, int64_t d, int64_t dd0,
                                 const float* __restrict g, int64_t lanes, int64_t i0,
                                 const int64_t* cells, int64_t count, float* __restrict grad_h) {
    Vec acc[R];
    for (int r = 0; r < R; ++r) acc[r] = Vec{};
    for (int64_t k = 0; k < K; ++k) {
        const Vec gv = load(g + k * lanes + i0);
        for (int r = 0; r < R; ++r) acc[r] += w[k * d + dd0 + r] * gv;
    }
    const int64_t valid = std::min<int64_t>(kLanes, count - i0);
    for (int64_t j = 0; j < valid; ++j)
        for (int r = 0; r < R; ++r) grad_h[cells[i0 + j] * d + dd0 + r] = acc[r][j];
}

FASTMDM_CLONES void tile_grad_h(const Heads& heads, int64_t l, Tile& t, const int64_t* cells,
                                int64_t count, float* grad_h) {
    const int64_t d = heads.d, K = heads.size(l);
    const float* w = heads.column_weight(l);
    for (int64_t i0 = 0; i0 < count; i0 += kLanes) {
        int64_t dd = 0;
        for (; dd + kBlock <= d; dd += kBlock) grad_h_block<kBlock>(w, K, d, dd, t.x.data(), t.lanes, i0, cells, count, grad_h);
        for (; dd < d; ++dd) grad_h_block<1>(w, K, d, dd, t.x.data(), t.lanes, i0, cells, count, grad_h);
    }
}

// grad_w[k + r][dd0 + j] += sum_i g[k + r][i] h[cell_i][dd0 + j], for R consecutive values k.
template <int R>
FASTMDM_INLINE void grad_w_block(const Tile& t, int64_t k, int64_t d, int64_t dd0, const float* h,
                                 const int64_t* cells, int64_t count, float* __restrict grad_w) {
    Vec acc[R];
    for (int r = 0; r < R; ++r) acc[r] = load(grad_w + (k + r) * d + dd0);
    const float* g = t.x.data() + k * t.lanes;
    for (int64_t i = 0; i < count; ++i) {
        const Vec hv = load(h + cells[i] * d + dd0);
        for (int r = 0; r < R; ++r) acc[r] += g[r * t.lanes + i] * hv;
    }
    for (int r = 0; r < R; ++r) store(grad_w + (k + r) * d + dd0, acc[r]);
}

FASTMDM_CLONES void tile_grad_w(const Heads& heads, int64_t l, Tile& t, const float* h,
                                const int64_t* cells, int64_t count, float* __restrict grad_w) {
    const int64_t d = heads.d, K = heads.size(l);
    for (int64_t dd0 = 0; dd0 + kLanes <= d; dd0 += kLanes) {
        int64_t k = 0;
        for (; k + kBlock <= K; k += kBlock) grad_w_block<kBlock>(t, k, d, dd0, h, cells, count, grad_w);
        for (; k < K; ++k) grad_w_block<1>(t, k, d, dd0, h, cells, count, grad_w);
    }
    for (int64_t dd = d / kLanes * kLanes; dd < d; ++dd) {  // the last d % kLanes features
        for (int64_t k = 0; k < K; ++k) {
            const float* g = t.row(k);
            float s = grad_w[k * d + dd];
            for (int64_t i = 0; i < count; ++i) s += g[i] * h[cells[i] * d + dd];
            grad_w[k * d + dd] = s;
        }
    }
}

void ragged_head_ce(py::array h, py::array weight, py::array bias, py::array offsets,
                    py::array targets, py::array cell_weight, py::array mask, bool compute_grad,
                    py::array loss, py::array ce, py::array grad_h, py::array grad_weight,
                    py::array grad_bias) {
    if (h.ndim() != 3) throw std::invalid_argument("fastmdm._C.ragged_head_ce: h must be [N, L, d]");
    const int64_t N = h.shape(0), L = h.shape(1);
    const Heads heads = make_heads(weight, bias, offsets, L, "ragged_head_ce");
    if (h.shape(2) != heads.d) throw std::invalid_argument("fastmdm._C.ragged_head_ce: h and head_weight differ in width");
    const int64_t d = heads.d;
    const float* hp = buffer<float>(h, "h");
    const int64_t* tp = buffer<int64_t>(targets, "targets");
    const float* wp = buffer<float>(cell_weight, "weight");
    const bool* mp = buffer<bool>(mask, "mask");
    check_size(targets, "targets", N * L);
    check_size(cell_weight, "weight", N * L);
    check_size(mask, "mask", N * L);
    float* lossp = buffer<float>(loss, "loss", true);
    float* cep = buffer<float>(ce, "ce", true);
    check_size(loss, "loss", N);
    check_size(ce, "ce", N * L);
    float *ghp = nullptr, *gwp = nullptr, *gbp = nullptr;
    if (compute_grad) {  // zero-filled by the caller
        ghp = buffer<float>(grad_h, "grad_h", true);
        gwp = buffer<float>(grad_weight, "grad_weight", true);
        gbp = buffer<float>(grad_bias, "grad_bias", true);
        check_size(grad_h, "grad_h", N * L * d);
        check_size(grad_weight, "grad_weight", heads.V * d);
        check_size(grad_bias, "grad_bias", heads.V);
    }
    std::atomic<int64_t> bad_target{-1};
    {
        py::gil_scoped_release release;
        std::fill(cep, cep + N * L, 0.0f);
        const CellsByColumn g = group_by_column(N * L, L, [&](int64_t i) { return mp[i] ? i % L : -1; });
        std::vector<int64_t> groups;
        const std::vector<Task> tasks = plan_tasks(g, heads, groups);
        // Group 0 of every column writes into grad_weight / grad_bias; groups >= 1 into `extra`.
        std::vector<int64_t> extra_at(L + 1, 0);
        for (int64_t l = 0; l < L; ++l) {
            extra_at[l + 1] = extra_at[l] + (compute_grad ? std::max<int64_t>(groups[l] - 1, 0) * heads.size(l) * (d + 1) : 0);
        }
        std::vector<float> extra(extra_at[L], 0.0f);
        int64_t total_work = 0;
        for (const Task& task : tasks) total_work += (task.end - task.begin) * heads.size(task.column) * d;
#pragma omp parallel num_threads(num_threads_for(total_work))
        {
            Tile tile;
            float lse[kMaxTileCells], wgt[kMaxTileCells];
            int64_t target[kMaxTileCells];
#pragma omp for schedule(dynamic, 1) nowait
            for (size_t ti = 0; ti < tasks.size(); ++ti) {
                const Task& task = tasks[ti];
                const int64_t l = task.column, K = heads.size(l), per_tile = cells_per_tile(K);
                float *gw = nullptr, *gb = nullptr;
                if (compute_grad) {
                    if (task.group == 0) {
                        gw = gwp + heads.offsets[l] * d;
                        gb = gbp + heads.offsets[l];
                    } else {
                        gw = extra.data() + extra_at[l] + (task.group - 1) * K * (d + 1);
                        gb = gw + K * d;
                    }
                }
                for (int64_t c0 = task.begin; c0 < task.end; c0 += per_tile) {
                    const int64_t* cells = g.cells.data() + c0;
                    const int64_t count = std::min(per_tile, task.end - c0);
                    bool ok = true;
                    for (int64_t i = 0; i < count; ++i) {
                        target[i] = tp[cells[i]];
                        wgt[i] = wp[cells[i]];
                        if (target[i] < 0 || target[i] >= K) {
                            bad_target.store(cells[i], std::memory_order_relaxed);
                            ok = false;
                        }
                    }
                    if (!ok) continue;
                    std::fill(wgt + count, wgt + kMaxTileCells, 0.0f);
                    tile_logits(heads, l, hp, cells, count, tile);
                    tile_logsumexp(tile, K, lse);
                    for (int64_t i = 0; i < count; ++i) cep[cells[i]] = lse[i] - tile.row(target[i])[i];
                    if (!compute_grad) continue;
                    tile_dlogits(tile, K, lse, wgt, target, count, gb);
                    tile_grad_h(heads, l, tile, cells, count, ghp);
                    tile_grad_w(heads, l, tile, hp, cells, count, gw);
                }
            }
        }
        // One parallel region with one barrier (cheap when the cores are shared); the rest
        // is O(N L + extra rows) and runs serially. Extra groups are added in group order.
        for (int64_t l = 0; l < L && compute_grad; ++l) {
            const int64_t K = heads.size(l);
            float* gw = gwp + heads.offsets[l] * d;
            float* gb = gbp + heads.offsets[l];
            for (int64_t group = 1; group < groups[l]; ++group) {
                const float* part = extra.data() + extra_at[l] + (group - 1) * K * (d + 1);
                for (int64_t e = 0; e < K * d; ++e) gw[e] += part[e];
                for (int64_t k = 0; k < K; ++k) gb[k] += part[K * d + k];
            }
        }
        for (int64_t n = 0; n < N; ++n) {
            double row = 0.0;
            for (int64_t l = 0; l < L; ++l) row += static_cast<double>(wp[n * L + l]) * cep[n * L + l];
            lossp[n] = static_cast<float>(row);
        }
    }
    const int64_t bad = bad_target.load();
    if (bad >= 0) {
        throw std::invalid_argument(
            "fastmdm._C.ragged_head_ce: targets[" + std::to_string(bad / L) + ", " + std::to_string(bad % L) +
            "] = " + std::to_string(tp[bad]) + " is out of range for its column (size " +
            std::to_string(heads.size(bad % L)) + ")");
    }
}

// Gumbel noise for value `index` (flat over cells x V) of the seeded stream.
inline float gumbel(uint64_t key, uint64_t index) {
    const float u = counter_uniform(key, index) + 0.5f / 16777216.0f;  // in (0, 1)
    return -std::log(-std::log(u));
}

// log sum_k p_k exp(lw_k) for lane i of the tile, p = softmax(x * inv_t): the two
// logsumexps as (max_r - max_f) + log(sum_r / sum_f), which keeps a mass close to 1 accurate
// to float32 rounding instead of to the rounding of two large logsumexps. -inf when every
// value is forbidden. Forbidden values are skipped (exp_nonpos would give them ~1e-38).
float restricted_log_mass(Tile& t, int64_t K, int64_t i, float inv_t, const float* lw) {
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    float max_f = kNegInf, max_r = kNegInf;
    for (int64_t k = 0; k < K; ++k) {
        const float y = t.row(k)[i] * inv_t;
        max_f = std::max(max_f, y);
        if (lw[k] != kNegInf) max_r = std::max(max_r, y + lw[k]);
    }
    if (max_r == kNegInf) return kNegInf;
    float sum_f = 0.0f, sum_r = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
        const float y = t.row(k)[i] * inv_t;
        sum_f += exp_nonpos(y - max_f);
        if (lw[k] != kNegInf) sum_r += exp_nonpos(y + lw[k] - max_r);
    }
    return (max_r - max_f) + std::log(sum_r / sum_f);
}

// log_weights / restriction: py::none() for an unrestricted call, else float32 [C, V] and
// int64 [M] with entries in -1..C-1; log_mass [M] is written for every cell (0 unrestricted).
void ragged_head_sample(py::array h, py::array columns, py::array weight, py::array bias,
                        py::array offsets, double temperature, uint64_t seed, py::object log_weights,
                        py::object restriction, py::array values, py::array log_mass) {
    if (h.ndim() != 2 || columns.ndim() != 1) {
        throw std::invalid_argument("fastmdm._C.ragged_head_sample: h must be [M, d] and columns [M]");
    }
    const int64_t M = h.shape(0), L = offsets.size() - 1;
    const Heads heads = make_heads(weight, bias, offsets, L, "ragged_head_sample");
    if (h.shape(1) != heads.d) throw std::invalid_argument("fastmdm._C.ragged_head_sample: h and head_weight differ in width");
    if (!(temperature >= 0.0)) throw std::invalid_argument("fastmdm._C.ragged_head_sample: temperature must be >= 0");
    const float* hp = buffer<float>(h, "h");
    const int64_t* cp = buffer<int64_t>(columns, "columns");
    int64_t* out = buffer<int64_t>(values, "values", true);
    float* mass = buffer<float>(log_mass, "log_mass", true);
    check_size(columns, "columns", M);
    check_size(values, "values", M);
    check_size(log_mass, "log_mass", M);
    for (int64_t m = 0; m < M; ++m) {
        if (cp[m] < 0 || cp[m] >= L) {
            throw std::invalid_argument("fastmdm._C.ragged_head_sample: columns[" + std::to_string(m) + "] = " +
                                        std::to_string(cp[m]) + " is outside 0.." + std::to_string(L - 1));
        }
    }
    if (log_weights.is_none() != restriction.is_none()) {
        throw std::invalid_argument("fastmdm._C.ragged_head_sample: pass both log_weights and restriction, or neither");
    }
    const float* lwp = nullptr;
    const int64_t* rp = nullptr;
    py::array lw_array, r_array;  // held here: the kernel reads their buffers
    if (!log_weights.is_none()) {
        lw_array = log_weights.cast<py::array>();
        r_array = restriction.cast<py::array>();
        if (lw_array.ndim() != 2 || lw_array.shape(1) != heads.V) {
            throw std::invalid_argument("fastmdm._C.ragged_head_sample: log_weights must be [C, V = " +
                                        std::to_string(heads.V) + "]");
        }
        lwp = buffer<float>(lw_array, "log_weights");
        rp = buffer<int64_t>(r_array, "restriction");
        check_size(r_array, "restriction", M);
        const int64_t C = lw_array.shape(0);
        for (int64_t m = 0; m < M; ++m) {
            if (rp[m] < -1 || rp[m] >= C) {
                throw std::invalid_argument("fastmdm._C.ragged_head_sample: restriction[" + std::to_string(m) +
                                            "] = " + std::to_string(rp[m]) + " is outside -1.." +
                                            std::to_string(C - 1));
            }
        }
    }
    const uint64_t key = seed_key(seed);
    const float inv_t = temperature > 0.0 ? static_cast<float>(1.0 / temperature) : 1.0f;
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    py::gil_scoped_release release;
    const CellsByColumn g = group_by_column(M, L, [&](int64_t m) { return cp[m]; });
    std::vector<int64_t> groups;
    const std::vector<Task> tasks = plan_tasks(g, heads, groups);
    int64_t total_work = 0;
    for (const Task& task : tasks) total_work += (task.end - task.begin) * heads.size(task.column) * heads.d;
#pragma omp parallel num_threads(num_threads_for(total_work))
    {
        Tile tile;
        float best[kMaxTileCells];
        int64_t arg[kMaxTileCells];
        const float* lw[kMaxTileCells];  // the cell's log weights over its column, or nullptr
#pragma omp for schedule(dynamic, 1) nowait
        for (size_t ti = 0; ti < tasks.size(); ++ti) {
            const Task& task = tasks[ti];
            const int64_t l = task.column, K = heads.size(l), per_tile = cells_per_tile(K);
            for (int64_t c0 = task.begin; c0 < task.end; c0 += per_tile) {
                const int64_t* cells = g.cells.data() + c0;
                const int64_t count = std::min(per_tile, task.end - c0);
                tile_logits(heads, l, hp, cells, count, tile);
                std::fill(best, best + count, kNegInf);
                std::fill(arg, arg + count, 0);
                for (int64_t i = 0; i < count; ++i) {
                    const int64_t r = rp ? rp[cells[i]] : -1;
                    lw[i] = r >= 0 ? lwp + r * heads.V + heads.offsets[l] : nullptr;
                }
                for (int64_t k = 0; k < K; ++k) {
                    const float* x = tile.row(k);
                    for (int64_t i = 0; i < count; ++i) {
                        float v = temperature > 0.0
                            ? x[i] * inv_t + gumbel(key, static_cast<uint64_t>(cells[i]) * heads.V + heads.offsets[l] + k)
                            : x[i];
                        if (lw[i] != nullptr) {  // at temperature 0 the weights only forbid
                            const float w = lw[i][k];
                            v = temperature > 0.0 ? v + w : (w == kNegInf ? kNegInf : v);
                        }
                        if (v > best[i]) {
                            best[i] = v;
                            arg[i] = k;
                        }
                    }
                }
                for (int64_t i = 0; i < count; ++i) {
                    out[cells[i]] = arg[i];
                    float log_mass_i = 0.0f;
                    if (lw[i] != nullptr) {
                        log_mass_i = best[i] == kNegInf ? kNegInf
                                   : temperature > 0.0 ? restricted_log_mass(tile, K, i, inv_t, lw[i]) : 0.0f;
                    }
                    mass[cells[i]] = log_mass_i;
                }
            }
        }
    }
}

}  // namespace

void register_ragged_head(py::module_& m) {
    m.def("ragged_head_ce", &ragged_head_ce,
          "ragged heads + weighted CE without logits (see fastmdm.ops.reference.ragged_head_ce)",
          py::arg("h"), py::arg("head_weight"), py::arg("head_bias"), py::arg("offsets"),
          py::arg("targets"), py::arg("weight"), py::arg("mask"), py::arg("compute_grad"),
          py::arg("loss"), py::arg("ce"), py::arg("grad_h"), py::arg("grad_head_weight"),
          py::arg("grad_head_bias"));
    m.def("ragged_head_sample", &ragged_head_sample,
          "Gumbel-max draws from ragged heads (see fastmdm.ops.reference.ragged_head_sample)",
          py::arg("h"), py::arg("columns"), py::arg("head_weight"), py::arg("head_bias"),
          py::arg("offsets"), py::arg("temperature"), py::arg("seed"), py::arg("log_weights"),
          py::arg("restriction"), py::arg("values"), py::arg("log_mass"));
}

}  // namespace fastmdm
