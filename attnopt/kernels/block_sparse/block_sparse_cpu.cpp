// Block-sparse attention forward on CPU over the kept key blocks, without gathering
// them (see attnopt/kernels/block_sparse/fused.py for the contract and the Python
// path that computes the same result).
//
// One work item is one query block of one (batch, head); items run in parallel
// (at::parallel_for). For query block j (row positions [a, e), query i at position
// i + offset) keeping key blocks c_1 < ... < c_n, in groups of kGroupBlocks blocks:
//   each key block is transposed into a per-thread [D, width] tile (in cache) and
//   scored, scores [rows, group keys] = (scale q) K_c^T, one brgemm per block;
//   hidden keys get -inf: the causal triangle (key position > query position), and
//   key_bias (0 / -inf per key, padding) where given;
//   an online softmax step (running row max and sum; what the output rows hold is
//   rescaled when the max grows), with a vectorised exp of our own;
//   out rows += P[:, block c] V_c, one accumulating brgemm per block, V read in place.
// Finally the rows are divided by their sums; rows that see no key are 0.
// q, k, v must be float32 with contiguous rows (last-dim stride 1); out float32 with
// contiguous rows. index/count are int32 [B, H, nQ, K] / [B, H, nQ], any strides.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "cpu_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

using at::Tensor;
using attnopt::mm_rm;
using attnopt::transpose;

// Kept key blocks scored at once: [block, kGroupBlocks * block] scores per thread.
constexpr int64_t kGroupBlocks = 4;

// One step of the online softmax over rows [nq, W] (leading dim ld) of scores: with m the
// running row max updated by this group's, scores become exp(s - m) in place, alpha[r]
// = exp(m_old - m) is the factor for what was accumulated before, and the running sum
// becomes sum * alpha + this group's sum. A row with no visible key yet keeps m = -inf
// and gets zero weights.
__attribute__((target_clones("avx512f", "avx2", "default"))) void softmax_numerators(
    float* sp, int64_t nq, int64_t W, int64_t ld, float* run_max, float* run_sum,
    float* alpha) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < nq; ++r) {
    float* row = sp + r * ld;
    float m = run_max[r];
#pragma omp simd reduction(max : m)
    for (int64_t s = 0; s < W; ++s) m = row[s] > m ? row[s] : m;
    if (m == neg_inf) {
      alpha[r] = 1.f;
      std::fill(row, row + W, 0.f);
      continue;
    }
    const float sum = attnopt::exp_shifted(row, W, m);
    alpha[r] = run_max[r] == neg_inf ? 0.f : std::exp(run_max[r] - m);
    run_sum[r] = run_sum[r] * alpha[r] + sum;
    run_max[r] = m;
  }
}

}  // namespace

void block_sparse_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& index, const Tensor& count,
    const c10::optional<Tensor>& key_bias,
    Tensor out,
    int64_t block, int64_t offset, int64_t first_block, int64_t row_start, int64_t row_end,
    bool causal, double scale) {
  for (const Tensor* t : {&q, &k, &v, static_cast<const Tensor*>(&out)}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->stride(3) == 1,
                "q, k, v and out must be 4-D float32 with contiguous rows");
  }
  TORCH_CHECK(index.dim() == 4 && index.scalar_type() == at::kInt, "index must be int32 4-D");
  TORCH_CHECK(count.dim() == 3 && count.scalar_type() == at::kInt, "count must be int32 3-D");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  const int64_t Hkv = k.size(1), M = k.size(2), Dv = v.size(3);
  const int64_t nQ = index.size(2);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(block > 0, "block must be positive");
  const int64_t R = H / Hkv;
  const float* bias = nullptr;
  int64_t Bm = 1, Hm = 1, bias_len = 0;
  if (key_bias.has_value()) {
    TORCH_CHECK(key_bias->dim() == 3 && key_bias->scalar_type() == at::kFloat &&
                    key_bias->is_contiguous() && key_bias->size(2) >= M,
                "key_bias must be contiguous float32 [Bm, Hm, >= M]");
    bias = key_bias->data_ptr<float>();
    Bm = key_bias->size(0);
    Hm = key_bias->size(1);
    bias_len = key_bias->size(2);
  }
  const int32_t* ip = index.data_ptr<int32_t>();
  const int32_t* cp = count.data_ptr<int32_t>();
  const auto is = index.strides();
  const auto cs = count.strides();
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides(), os = out.strides();
  const float fscale = static_cast<float>(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // Per-thread buffers, allocated here once (from the calling thread, whose allocator
  // can reuse what it freed earlier): scaled query rows, one transposed key block, a
  // group's scores (always with the same leading dim: brgemm kernels are generated
  // per shape and leading dims), and the running row max, sum and rescale factors.
  const int64_t G = kGroupBlocks, ld = G * block;
  const int64_t per_thread = block * D + D * block + block * ld + 3 * block;
  Tensor work = at::empty({at::get_num_threads(), per_thread}, q.options());

  at::parallel_for(0, B * H * nQ, 1, [&](int64_t begin, int64_t end) {
    float* base = work.data_ptr<float>() + at::get_thread_num() * per_thread;
    float* qbuf = base;
    float* kt = qbuf + block * D;
    float* sp = kt + D * block;
    float* run_max = sp + block * ld;
    float* run_sum = run_max + block;
    float* alpha = run_sum + block;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t j = item % nQ, bh = item / nQ, b = bh / H, h = bh % H, hk = h / R;
      const int64_t t0 = (first_block + j) * block;
      const int64_t a = std::max(t0, row_start), e = std::min(t0 + block, row_end);
      const int64_t nq = e - a;
      if (nq <= 0) continue;
      float* orow = op + b * os[0] + h * os[1] + (a - offset) * os[2];
      const int64_t n = cp[b * cs[0] + h * cs[1] + j * cs[2]];
      if (n <= 0) {  // no kept block: the rows are 0
        for (int64_t r = 0; r < nq; ++r) std::fill(orow + r * os[2], orow + r * os[2] + Dv, 0.f);
        continue;
      }
      const int32_t* idx = ip + b * is[0] + h * is[1] + j * is[2];
      const float* qrow = qp + b * qs[0] + h * qs[1] + (a - offset) * qs[2];
      for (int64_t r = 0; r < nq; ++r) {  // scaled query rows
        for (int64_t d = 0; d < D; ++d) qbuf[r * D + d] = qrow[r * qs[2] + d] * fscale;
      }
      const float* kh = kp + b * ks[0] + hk * ks[1];
      const float* vh = vp + b * vs[0] + hk * vs[1];
      const float* brow = nullptr;
      if (bias != nullptr) {
        brow = bias + (Bm == 1 ? 0 : b) * Hm * bias_len + (Hm == 1 ? 0 : h) * bias_len;
      }
      std::fill(run_max, run_max + block, neg_inf);
      std::fill(run_sum, run_sum + block, 0.f);
      for (int64_t g0 = 0; g0 < n; g0 += G) {
        const int64_t g1 = std::min(n, g0 + G);
        // Scores of the group's blocks, each key block transposed into a [D, width] tile
        // (in cache), into columns [col, col + width); then the hidden keys.
        int64_t col = 0;
        for (int64_t i = g0; i < g1; ++i) {
          const int64_t c = idx[i * is[3]], width = std::min(block, M - c * block);
          const int64_t k0 = c * block;
          transpose(kh + k0 * ks[2], ks[2], width, D, kt, width);
          mm_rm(nq, width, D, qbuf, D, kt, width, false, sp + col, ld);
          if (brow != nullptr) {
            for (int64_t r = 0; r < nq; ++r) {
              float* row = sp + r * ld + col;
              for (int64_t s = 0; s < width; ++s) row[s] += brow[k0 + s];
            }
          }
          if (causal && k0 + width - 1 > a) {  // some key after some query of the block
            for (int64_t r = 0; r < nq; ++r) {
              const int64_t seen = std::max<int64_t>(0, std::min(width, a + r - k0 + 1));
              float* row = sp + r * ld + col;
              for (int64_t s = seen; s < width; ++s) row[s] = neg_inf;
            }
          }
          col += width;
        }
        // Online softmax: numerators against the running row max; what the output rows
        // already hold is rescaled to it.
        softmax_numerators(sp, nq, col, ld, run_max, run_sum, alpha);
        if (g0 > 0) {
          for (int64_t r = 0; r < nq; ++r) {
            float* o = orow + r * os[2];
            const float f = alpha[r];
            for (int64_t c = 0; c < Dv; ++c) o[c] *= f;
          }
        }
        col = 0;
        for (int64_t i = g0; i < g1; ++i) {
          const int64_t c = idx[i * is[3]], width = std::min(block, M - c * block);
          mm_rm(nq, Dv, width, sp + col, ld, vh + c * block * vs[2], vs[2], i > 0, orow, os[2]);
          col += width;
        }
      }
      for (int64_t r = 0; r < nq; ++r) {  // divide by the row sums; rows seeing nothing: 0
        float* o = orow + r * os[2];
        const float inv = run_sum[r] > 0.f ? 1.f / run_sum[r] : 0.f;
        for (int64_t c = 0; c < Dv; ++c) o[c] *= inv;
      }
    }
    at::native::cpublas::brgemm_release(false);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_sparse_fwd", &block_sparse_fwd,
        "Block-sparse attention forward over the kept key blocks (see block_sparse_cpu.cpp)");
}
