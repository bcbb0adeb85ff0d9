// Causal linear attention on CPU, fused over chunks: one pass per head with the running
// state kept in cache (see attnopt/kernels/linear/fused.py for the contract and the
// Python fallback that computes the same sums).
//
// Positions: query row r of `q` sits at position q_pos0 + r, key/value row s of `k`/`v`
// at k_pos0 + s; query position p sees key positions <= p. Chunk boundaries are
// p_begin, p_begin + C, ... < p_end. For each (batch, query head), in order:
//   num = phi(q_c) . S + tril(phi(q_c) phi(k_c)^T) . [v_c, 1]      (columns Dv: den)
//   out = num[:, :Dv] / (num[:, Dv] + eps)   (eps == 0: rows with den == 0 get 0)
//   S  += phi(k_c)^T . [v_c, 1]
// where S [F, Dv+1] is the state carried in and out through `state`. `phi_mode` 0 takes
// q and k as features already; 1 applies elu(x)+1, 2 relu(x) on the fly. `valid`
// (float 0/1 [Bm, Hm, Lk], Bm in {1, B}, Hm in {1, H}) multiplies the key features.
// Heads run in parallel (at::parallel_for); each head's matmuls are single-threaded
// and touch only per-thread buffers of a few chunks.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "cpu_common.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using at::Tensor;
using attnopt::mm_rm;

using attnopt::phi_rows;
constexpr int64_t kGiven = attnopt::kPhiGiven;
constexpr int64_t kRelu = attnopt::kPhiRelu;

// dst [L, F] float32 <- phi(src [L, F]) (any float dtype, any strides on either side).
void load_features(Tensor& dst, const Tensor& src, int64_t mode) {
  if (mode == kGiven) {
    dst.copy_(src);
  } else if (mode == kRelu) {
    at::clamp_min_out(dst, src.to(at::kFloat), 0.0);
  } else {
    // elu(x) + 1 == exp(min(x, 0)) + max(x, 0), both vectorised ATen kernels.
    Tensor x = src.to(at::kFloat);
    at::clamp_max_out(dst, x, 0.0);
    dst.exp_();
    dst.add_(x.clamp_min(0.0));
  }
}

// Query features [L, F] (row-major, ld F) and key features transposed [F, L] (ld ldk) of
// rows src [L, D]: fp32 rows go through the loops above, anything else through ATen.
void load_queries(float* dst, const Tensor& src, int64_t mode) {
  const int64_t L = src.size(0), F = src.size(1);
  if (src.scalar_type() == at::kFloat && src.stride(1) == 1) {
    phi_rows(src.data_ptr<float>(), src.stride(0), L, F, dst, F, mode);
    return;
  }
  Tensor d = at::from_blob(dst, {L, F}, src.options().dtype(at::kFloat));
  load_features(d, src, mode);
}

void load_keys_transposed(float* dst, int64_t ldk, const Tensor& src, int64_t mode) {
  const int64_t L = src.size(0), F = src.size(1);
  if (src.scalar_type() == at::kFloat && src.stride(1) == 1) {
    attnopt::transpose(src.data_ptr<float>(), src.stride(0), L, F, dst, ldk);
    phi_rows(dst, ldk, F, L, dst, ldk, mode);
    return;
  }
  Tensor d = at::from_blob(dst, {F, L}, {ldk, 1}, src.options().dtype(at::kFloat));
  load_features(d, src.t(), mode);
}

}  // namespace

void causal_linear_chunks(
    const Tensor& q, int64_t q_pos0,
    const Tensor& k, int64_t k_pos0,
    const Tensor& v,
    const c10::optional<Tensor>& valid,
    Tensor out, int64_t out_row0,
    Tensor state,
    int64_t p_begin, int64_t p_end, int64_t chunk, int64_t block_chunks,
    int64_t phi_mode, double eps) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D");
  TORCH_CHECK(out.dim() == 4 && state.dim() == 4, "out and state must be 4-D");
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous(),
              "state must be contiguous float32");
  TORCH_CHECK(chunk > 0 && block_chunks > 0, "chunk and block_chunks must be positive");
  TORCH_CHECK(phi_mode >= kGiven && phi_mode <= kRelu, "phi_mode must be 0, 1 or 2");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3);
  const int64_t F = state.size(2);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(state.size(0) == B && state.size(1) == H && state.size(3) == Dv + 1,
              "state must be [B, H, F, Dv + 1]");
  TORCH_CHECK(phi_mode != kGiven || (q.size(3) == F && k.size(3) == F),
              "given features must have F columns");
  TORCH_CHECK(out.size(0) == B && out.size(1) == H && out.size(3) == Dv,
              "out must be [B, H, N, Dv]");
  const int64_t R = H / Hkv;
  const int64_t rows = chunk * block_chunks;
  const int64_t w = Dv + 1;  // state row: S[f, :Dv], then z[f]
  const float feps = static_cast<float>(eps);
  int64_t Bm = 1, Hm = 1;
  if (valid.has_value()) {
    TORCH_CHECK(valid->dim() == 3 && valid->size(2) == Lk, "valid must be [Bm, Hm, Lk]");
    Bm = valid->size(0);
    Hm = valid->size(1);
  }

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const auto opts = q.options().dtype(at::kFloat);
    Tensor qf = at::empty({rows, F}, opts);
    Tensor kt = at::empty({F, rows}, opts);  // phi(k) transposed: brgemm takes no transposes
    Tensor vbuf = at::empty({rows, Dv}, opts);
    Tensor nbuf = at::empty({chunk, Dv}, opts);
    std::vector<float> scores(chunk * chunk), den(chunk);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, hk = h / R;
      float* S = state[b][h].data_ptr<float>();  // [F, w]
      Tensor qh = q[b][h], kh = k[b][hk], vh = v[b][hk], oh = out[b][h];
      Tensor mh;
      if (valid.has_value()) mh = (*valid)[Bm == 1 ? 0 : b][Hm == 1 ? 0 : h];
      // Values and output rows are used in place when they are fp32 rows.
      const bool v_direct = vh.scalar_type() == at::kFloat && vh.stride(1) == 1;
      const bool o_direct = oh.scalar_type() == at::kFloat && oh.stride(1) == 1;
      for (int64_t P0 = p_begin; P0 < p_end; P0 += rows) {
        const int64_t P1 = std::min(P0 + rows, p_end);
        const int64_t ka = std::max(P0, k_pos0), kb = std::min(P1, k_pos0 + Lk);
        const int64_t qa = std::max(P0, q_pos0), qb = std::min(P1, q_pos0 + Lq);
        const float* vp = nullptr;
        int64_t ldv = Dv;
        if (kb > ka) {
          load_keys_transposed(kt.data_ptr<float>(), rows, kh.narrow(0, ka - k_pos0, kb - ka),
                               phi_mode);
          if (mh.defined()) {
            kt.narrow(1, 0, kb - ka).mul_(mh.narrow(0, ka - k_pos0, kb - ka).unsqueeze(0));
          }
          if (v_direct) {
            vp = vh.data_ptr<float>() + (ka - k_pos0) * vh.stride(0);
            ldv = vh.stride(0);
          } else {
            vbuf.narrow(0, 0, kb - ka).copy_(vh.narrow(0, ka - k_pos0, kb - ka));
            vp = vbuf.data_ptr<float>();
          }
        }
        if (qb > qa) {
          load_queries(qf.data_ptr<float>(), qh.narrow(0, qa - q_pos0, qb - qa), phi_mode);
        }
        const float* ktp = kt.data_ptr<float>();
        for (int64_t p0 = P0; p0 < P1; p0 += chunk) {
          const int64_t p1 = std::min(p0 + chunk, P1);
          const int64_t cka = std::max(p0, ka), ckb = std::min(p1, kb);
          const int64_t cqa = std::max(p0, qa), cqb = std::min(p1, qb);
          const int64_t nk = ckb - cka, nq = cqb - cqa;
          const float* kc = ktp + (cka - ka);         // [F, nk], ld rows
          const float* vc = vp + (cka - ka) * ldv;   // [nk, Dv], ld ldv
          if (nq > 0) {
            const float* qc = qf.data_ptr<float>() + (cqa - qa) * F;
            const int64_t row0 = cqa - q_pos0 + out_row0;
            float* np = o_direct ? oh.data_ptr<float>() + row0 * oh.stride(0)
                                 : nbuf.data_ptr<float>();
            const int64_t ldn = o_direct ? oh.stride(0) : Dv;
            mm_rm(nq, Dv, F, qc, F, S, w, false, np, ldn);  // phi(q) S
            for (int64_t r = 0; r < nq; ++r) {  // phi(q) z
              float acc = 0.f;
              for (int64_t f = 0; f < F; ++f) acc += qc[r * F + f] * S[f * w + Dv];
              den[r] = acc;
            }
            if (nk > 0) {
              float* sc = scores.data();
              mm_rm(nq, nk, F, qc, F, kc, rows, false, sc, nk);
              // Key s (position cka + s) is visible to row r (position cqa + r) when
              // s <= r + d; hidden scores become 0, visible ones add to the normaliser.
              const int64_t d = cqa - cka;
              for (int64_t r = 0; r < nq; ++r) {
                const int64_t seen = std::min<int64_t>(nk, std::max<int64_t>(0, r + d + 1));
                float* row = sc + r * nk;
                float acc = 0.f;
                for (int64_t s = 0; s < seen; ++s) acc += row[s];
                for (int64_t s = seen; s < nk; ++s) row[s] = 0.f;
                den[r] += acc;
              }
              mm_rm(nq, Dv, nk, sc, nk, vc, ldv, true, np, ldn);
            }
            for (int64_t r = 0; r < nq; ++r) {
              const float inv = feps != 0.f ? 1.f / (den[r] + feps)
                                            : (den[r] > 0.f ? 1.f / den[r] : 1.f);
              float* row = np + r * ldn;
              for (int64_t c = 0; c < Dv; ++c) row[c] *= inv;
            }
            if (!o_direct) oh.narrow(0, row0, nq).copy_(nbuf.narrow(0, 0, nq));
          }
          if (nk > 0) {
            mm_rm(F, Dv, nk, kc, rows, vc, ldv, true, S, w);  // S += phi(k)^T v
            for (int64_t f = 0; f < F; ++f) {  // z += phi(k)^T 1
              float acc = 0.f;
              for (int64_t s = 0; s < nk; ++s) acc += kc[f * rows + s];
              S[f * w + Dv] += acc;
            }
          }
        }
      }
    }
    at::native::cpublas::brgemm_release(false);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("causal_linear_chunks", &causal_linear_chunks,
        "Fused causal linear attention over chunks (see causal_cpu.cpp)");
}
