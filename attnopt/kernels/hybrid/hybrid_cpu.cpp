// Hybrid softmax-window + linear attention forward on CPU, fused (see
// attnopt/kernels/hybrid/fused.py for the contract; the semantics are those of
// attnopt/kernels/hybrid/reference.py).
//
// Query i sits at position p = i + offset. Window keys p - window < j <= p and sink keys
// j < sinks (j <= p) get exp(scale q.k); older keys sinks <= j <= p - window get
// phi(q).phi(k) (elu(x)+1 or relu(x)); both share one normaliser, with per-head log
// weights log g / log(1 - g) (0 / 0 without a mix), combined in log space:
//   m = max(max_win(s) + log g, l),  l = log(sum_old phi.phi) + log(1 - g),
//   out = (sum_win e^(s + log g - m) v + e^(l - m) num_lin / den_lin) / (sum_win ... + e^(l - m)).
// One work item is one (batch, head); items run in parallel. Rows go in chunks of C:
// the linear state S [F, Dv + 1] holds the old keys of the chunk's first row, the
// chunk's own band of newly old keys is a strictly lower triangle, and the window and
// sink keys of the chunk (at most window + C - 1 + sinks) are scored in one tile.
// q, k, v: float32 with contiguous rows; out float32 [B, H, N, Dv] with contiguous rows.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_common.h"

namespace {

using at::Tensor;
using attnopt::mm_rm;
using attnopt::transpose;

constexpr int64_t kGiven = attnopt::kPhiGiven;
constexpr int64_t kElu = attnopt::kPhiElu;
constexpr int64_t kRelu = attnopt::kPhiRelu;

void phi_inplace(float* x, int64_t n, int64_t mode) { attnopt::phi_rows(x, n, 1, n, x, n, mode); }

}  // namespace

void hybrid_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                const c10::optional<Tensor>& qphi, const c10::optional<Tensor>& kphi,
                int64_t kphi_begin, const c10::optional<Tensor>& valid,
                const c10::optional<Tensor>& log_g, const c10::optional<Tensor>& log_1g,
                Tensor out, Tensor states, int64_t offset, int64_t window, int64_t sinks,
                int64_t chunk, int64_t phi_mode, double scale, int64_t row_begin,
                int64_t row_end, int64_t init_begin, int64_t init_end) {
  for (const Tensor* t : {&q, &k, &v, static_cast<const Tensor*>(&out)}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->stride(3) == 1,
                "q, k, v and out must be 4-D float32 with contiguous rows");
  }
  TORCH_CHECK(window >= 1 && sinks >= 0 && chunk >= 1, "bad window, sinks or chunk");
  TORCH_CHECK(phi_mode == kGiven || phi_mode == kElu || phi_mode == kRelu,
              "phi_mode must be 0 (features given), 1 (elu) or 2 (relu)");
  const bool given = phi_mode == kGiven;
  TORCH_CHECK(!given || (qphi.has_value() && kphi.has_value()),
              "phi_mode 0 needs qphi and kphi");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), M = k.size(2), Dv = v.size(3);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "query heads must be a multiple of kv heads");
  const int64_t R = H / Hkv, C = chunk, w = Dv + 1;
  const int64_t F = given ? qphi->size(3) : D;
  const float* qphp = nullptr;
  const float* kphp = nullptr;
  int64_t kphi_len = 0;
  if (given) {
    TORCH_CHECK(qphi->is_contiguous() && kphi->is_contiguous() &&
                    qphi->scalar_type() == at::kFloat && kphi->scalar_type() == at::kFloat &&
                    qphi->size(2) == row_end - row_begin && kphi->size(3) == F,
                "qphi [B, H, rows, F] and kphi [B, Hkv, keys, F] must be contiguous float32");
    qphp = qphi->data_ptr<float>();
    kphp = kphi->data_ptr<float>();
    kphi_len = kphi->size(2);
  }
  TORCH_CHECK(states.is_contiguous() && states.scalar_type() == at::kFloat &&
                  states.numel() == B * H * F * w,
              "states must be contiguous float32 [B * H, F * (Dv + 1)]");
  const float* vm = nullptr;
  int64_t Bm = 1, Hm = 1;
  if (valid.has_value()) {
    TORCH_CHECK(valid->dim() == 3 && valid->size(2) == M && valid->is_contiguous() &&
                    valid->scalar_type() == at::kFloat,
                "valid must be contiguous float32 [Bm, Hm, M]");
    vm = valid->data_ptr<float>();
    Bm = valid->size(0);
    Hm = valid->size(1);
  }
  const float* lg = log_g.has_value() ? log_g->data_ptr<float>() : nullptr;
  const float* l1g = log_1g.has_value() ? log_1g->data_ptr<float>() : nullptr;
  const float fscale = static_cast<float>(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t NW = std::min(M, window + C - 1) + std::min(sinks, M);  // window tile keys
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides(), os = out.strides();
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();

  // Per-thread buffers, allocated once here.
  const int64_t per_thread = C * F + C * D + F * C + C * w + C * C + C * w + D * NW + C * NW +
                             NW + C;
  Tensor work = at::empty({at::get_num_threads(), per_thread}, q.options());

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    float* base = work.data_ptr<float>() + at::get_thread_num() * per_thread;
    float* qf = base;               // [C, F]  phi(q)
    float* qsc = qf + C * F;        // [C, D]  scale * q
    float* kt = qsc + C * D;        // [F, C]  phi(k) of the chunk's newly old keys
    float* vb = kt + F * C;         // [C, w]  their [v, 1]
    float* band = vb + C * w;       // [C, C]  linear scores of the band
    float* lin = band + C * C;      // [C, w]  [num_lin, den_lin] per row
    float* ktw = lin + C * w;       // [D, NW] window and sink keys, transposed
    float* sw = ktw + D * NW;       // [C, NW] their scores
    float* keyw = sw + C * NW;      // [NW]    their 0/1 validity (as float)
    float* rowd = keyw + NW;        // [C]    row normalisers
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, hk = h / R;
      float* S = states.data_ptr<float>() + bh * F * w;
      const float* qh = qp + b * qs[0] + h * qs[1];
      const float* kh = kp + b * ks[0] + hk * ks[1];
      const float* vh = vp + b * vs[0] + hk * vs[1];
      float* oh = op + b * os[0] + h * os[1];
      const float* mrow = vm == nullptr ? nullptr
                                        : vm + (Bm == 1 ? 0 : b) * Hm * M + (Hm == 1 ? 0 : h) * M;
      const float log_gh = lg == nullptr ? 0.f : lg[h];
      const float log_1gh = l1g == nullptr ? 0.f : l1g[h];
      auto linear_valid = [&](int64_t j) -> float {
        if (j < sinks || j < 0 || j >= M) return 0.f;
        return mrow == nullptr ? 1.f : mrow[j];
      };
      // phi(k) of key positions [lo, hi), transposed into dst (leading dim C).
      const float* kph = given ? kphp + (b * Hkv + hk) * kphi_len * F : nullptr;
      auto key_features = [&](int64_t lo, int64_t hi, float* dst) {
        if (given) {
          TORCH_CHECK(lo >= kphi_begin && hi <= kphi_begin + kphi_len,
                      "kphi does not cover key positions [", lo, ", ", hi, ")");
          transpose(kph + (lo - kphi_begin) * F, F, hi - lo, F, dst, C);
          return;
        }
        transpose(kh + lo * ks[2], ks[2], hi - lo, F, dst, C);
        for (int64_t f = 0; f < F; ++f) phi_inplace(dst + f * C, hi - lo, phi_mode);
      };
      // kt [F, C] <- masked phi(k) and vb [C, w] <- [v, 1] of key positions [a, a + n)
      // (n <= C); positions outside [0, M), sinks and padding give zero features.
      auto load_linear_keys = [&](int64_t a, int64_t n) {
        std::fill(kt, kt + F * C, 0.f);
        std::fill(vb, vb + C * w, 0.f);
        const int64_t lo = std::max<int64_t>(a, 0), hi = std::min<int64_t>(a + n, M);
        if (hi <= lo) return;
        key_features(lo, hi, kt + (lo - a));
        for (int64_t j = lo; j < hi; ++j) {
          const float m = linear_valid(j);
          for (int64_t f = 0; f < F; ++f) kt[f * C + (j - a)] *= m;
          std::copy(vh + j * vs[2], vh + j * vs[2] + Dv, vb + (j - a) * w);
          vb[(j - a) * w + Dv] = 1.f;
        }
      };
      // Adds keys [a, e) (old for every later row) to S.
      auto add_old = [&](int64_t a, int64_t e) {
        for (int64_t c0 = a; c0 < e; c0 += C) {
          const int64_t n = std::min(e, c0 + C) - c0;
          load_linear_keys(c0, n);
          mm_rm(F, w, n, kt, C, vb, w, true, S, w);
        }
      };
      // Old keys before the first row (the caller passes [sinks, offset - window + 1)
      // or part of it); S carries over between calls.
      if (init_end > init_begin) add_old(init_begin, init_end);
      for (int64_t r0 = row_begin; r0 < row_end; r0 += C) {
        const int64_t r1 = std::min(row_end, r0 + C), nq = r1 - r0;
        const int64_t P0 = r0 + offset;  // position of the chunk's first row
        // Queries: phi(q) and scale * q.
        for (int64_t r = 0; r < nq; ++r) {
          const float* x = qh + (r0 + r) * qs[2];
          if (!given) std::copy(x, x + D, qf + r * F);
          for (int64_t d = 0; d < D; ++d) qsc[r * D + d] = x[d] * fscale;
        }
        if (given) {
          const float* src = qphp + ((b * H + h) * (row_end - row_begin) + (r0 - row_begin)) * F;
          std::copy(src, src + nq * F, qf);
        } else {
          phi_inplace(qf, nq * F, phi_mode);
        }
        // Linear part: the state (old keys of row 0) and the band of keys that become
        // old within the chunk: key T0 + 1 + s is old for row r when s < r.
        const int64_t T0 = P0 - window;
        mm_rm(nq, w, F, qf, F, S, w, false, lin, w);
        {
          // Keys T0 + 1 .. T0 + nq: old for later rows of the chunk, and all of them for
          // the next chunk.
          load_linear_keys(T0 + 1, nq);
          if (nq > 1) {
            mm_rm(nq, nq, F, qf, F, kt, C, false, band, nq);
            for (int64_t r = 0; r < nq; ++r) {
              for (int64_t s = r; s < nq; ++s) band[r * nq + s] = 0.f;
            }
            mm_rm(nq, w, nq, band, nq, vb, w, true, lin, w);
          }
          // After the chunk every one of these nq keys is old for the next chunk's rows.
          mm_rm(F, w, nq, kt, C, vb, w, true, S, w);
        }
        // Window and sink keys of the chunk: [wa, wb) and [0, sa).
        const int64_t wa = std::max<int64_t>(0, P0 - window + 1);
        const int64_t wb = std::min<int64_t>(M, P0 + nq);
        const int64_t sa = std::min(sinks, std::min(wa, M));
        const int64_t nwin = std::max<int64_t>(0, wb - wa), nw = sa + nwin;
        if (nw > 0) {
          if (sa > 0) transpose(kh, ks[2], sa, D, ktw, nw);
          if (nwin > 0) transpose(kh + wa * ks[2], ks[2], nwin, D, ktw + sa, nw);
          for (int64_t t = 0; t < nw; ++t) {
            const int64_t j = t < sa ? t : wa + (t - sa);
            keyw[t] = mrow == nullptr ? 1.f : mrow[j];
          }
          mm_rm(nq, nw, D, qsc, D, ktw, nw, false, sw, nw);
        }
        for (int64_t r = 0; r < nq; ++r) {
          const int64_t p = P0 + r;
          float* row = sw + r * nw;
          float mw = neg_inf;
          for (int64_t t = 0; t < nw; ++t) {
            const int64_t j = t < sa ? t : wa + (t - sa);
            const bool seen = keyw[t] != 0.f && j <= p && (j < sinks || j > p - window);
            row[t] = seen ? row[t] + log_gh : neg_inf;
            mw = row[t] > mw ? row[t] : mw;
          }
          const float den_lin = lin[r * w + Dv];
          const float ell = den_lin > 0.f ? std::log(den_lin) + log_1gh : neg_inf;
          const float m = std::max(mw, ell);
          if (m == neg_inf) {  // no key at all
            rowd[r] = 0.f;
            std::fill(row, row + nw, 0.f);
            continue;
          }
          const float wl = ell == neg_inf ? 0.f : std::exp(ell - m);
          const float sum = nw > 0 ? attnopt::exp_shifted(row, nw, m) : 0.f;
          rowd[r] = sum + wl;
          // Keep the linear part's factor where lin's den was: wl / den_lin.
          lin[r * w + Dv] = wl > 0.f ? wl / den_lin : 0.f;
        }
        float* orow = oh + r0 * os[2];
        if (nw > 0) {
          if (sa > 0) mm_rm(nq, Dv, sa, sw, nw, vh, vs[2], false, orow, os[2]);
          if (nwin > 0) {
            mm_rm(nq, Dv, nwin, sw + sa, nw, vh + wa * vs[2], vs[2], sa > 0, orow, os[2]);
          }
        } else {
          for (int64_t r = 0; r < nq; ++r) std::fill(orow + r * os[2], orow + r * os[2] + Dv, 0.f);
        }
        for (int64_t r = 0; r < nq; ++r) {
          float* o = orow + r * os[2];
          const float f = lin[r * w + Dv];
          const float inv = rowd[r] > 0.f ? 1.f / rowd[r] : 0.f;
          const float* nl = lin + r * w;
          for (int64_t c = 0; c < Dv; ++c) o[c] = (o[c] + f * nl[c]) * inv;
        }
      }
    }
    at::native::cpublas::brgemm_release(false);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("hybrid_fwd", &hybrid_fwd,
        "Hybrid softmax-window + linear attention forward (see hybrid_cpu.cpp)");
}
