// Helpers shared by attnopt's C++ CPU kernels (header-only; every kernel source that
// includes it is rebuilt when it changes, see attnopt/kernels/_cpp.py).

#pragma once

#include <ATen/native/CPUBlas.h>

// at::native::cpublas::brgemm on float (oneDNN's micro-kernel where the CPU has it, a
// BLAS gemm otherwise); torch builds without it cannot build these kernels.
#ifndef CPUBLAS_BRGEMM_F32F32F32
#error "this torch has no float at::native::cpublas::brgemm; attnopt uses its PyTorch kernels"
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ATTNOPT_X86 1
#endif

namespace attnopt {

// Row-major C[m, n] (+)= A[m, k] . B[k, n] with leading dims (oneDNN brgemm via torch).
inline void mm_rm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                  const float* b, int64_t ldb, bool add, float* c, int64_t ldc) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, b, c, false);
}

// dst[d * ldd + s] = src[s * lds + d] for s < rows, d < cols.
inline void transpose_scalar(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                      int64_t ldd) {
  for (int64_t s0 = 0; s0 < rows; s0 += 16) {  // 16-row strips stay in L1
    const int64_t s1 = std::min(rows, s0 + 16);
    for (int64_t d = 0; d < cols; ++d) {
      for (int64_t s = s0; s < s1; ++s) dst[d * ldd + s] = src[s * lds + d];
    }
  }
}

#ifdef ATTNOPT_X86
// The same with AVX2 8x8 register transposes; edges that are not whole 8x8 tiles go
// through the scalar loop.
__attribute__((target("avx2"))) inline void transpose_avx2(const float* src, int64_t lds,
                                                     int64_t rows, int64_t cols, float* dst,
                                                     int64_t ldd) {
  const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  for (int64_t s = 0; s < r8; s += 8) {
    for (int64_t d = 0; d < c8; d += 8) {
      const float* a = src + s * lds + d;
      __m256 r0 = _mm256_loadu_ps(a), r1 = _mm256_loadu_ps(a + lds);
      __m256 r2 = _mm256_loadu_ps(a + 2 * lds), r3 = _mm256_loadu_ps(a + 3 * lds);
      __m256 r4 = _mm256_loadu_ps(a + 4 * lds), r5 = _mm256_loadu_ps(a + 5 * lds);
      __m256 r6 = _mm256_loadu_ps(a + 6 * lds), r7 = _mm256_loadu_ps(a + 7 * lds);
      const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
      const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
      const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
      const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
      float* o = dst + d * ldd + s;
      _mm256_storeu_ps(o, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(o + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(o + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(o + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(o + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(o + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(o + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(o + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
  }
  if (c8 < cols) transpose_scalar(src + c8, lds, r8, cols - c8, dst + c8 * ldd, ldd);
  if (r8 < rows) transpose_scalar(src + r8 * lds, lds, rows - r8, cols, dst + r8, ldd);
}
#endif

inline void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
               int64_t ldd) {
#ifdef ATTNOPT_X86
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return transpose_avx2(src, lds, rows, cols, dst, ldd);
#endif
  transpose_scalar(src, lds, rows, cols, dst, ldd);
}

// exp(x) for x <= 0 (softmax numerators), to about 2 ulp: x = n ln2 + r with |r| <=
// ln2/2, exp(r) by a degree-6 polynomial (Cephes' expf coefficients), 2^n from the
// exponent bits; below -87 (or -inf) exactly 0. Plain arithmetic, so the loops that
// call it vectorise.
inline float exp_nonpositive(float x) {
  const float big = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504f + big;
  const float n = t - big;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.f;
  int32_t ti, bi;
  std::memcpy(&ti, &t, 4);
  std::memcpy(&bi, &big, 4);
  const int32_t bits = (ti - bi + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return x < -87.f ? 0.f : y * scale;
}

// Feature maps of linear attention computed in the kernels (the Python side names them
// by these numbers); kPhiGiven: the features come precomputed.
constexpr int64_t kPhiGiven = 0;
constexpr int64_t kPhiElu = 1;
constexpr int64_t kPhiRelu = 2;

// dst[r * ldd + c] = phi(src[r * lds + c]) for fp32 rows (in place when dst == src):
// elu(x) + 1 (x + 1 above 0, exp(x) below), relu(x), or a copy for kPhiGiven.
__attribute__((target_clones("avx512f", "avx2", "default"))) static void phi_rows(
    const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd,
    int64_t mode) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = src + r * lds;
    float* y = dst + r * ldd;
    if (mode == kPhiElu) {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        const float e = exp_nonpositive(x[c] < 0.f ? x[c] : 0.f);
        y[c] = x[c] > 0.f ? x[c] + 1.f : e;
      }
    } else if (mode == kPhiRelu) {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) y[c] = x[c] > 0.f ? x[c] : 0.f;
    } else if (x != y) {
      std::copy(x, x + cols, y);
    }
  }
}

// row[s] = exp(row[s] - m) for s < n (every row[s] <= m, -inf allowed); returns their sum.
__attribute__((target_clones("avx512f", "avx2", "default"))) static float exp_shifted(
    float* row, int64_t n, float m) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t s = 0; s < n; ++s) {
    const float e = exp_nonpositive(row[s] - m);
    row[s] = e;
    sum += e;
  }
  return sum;
}

}  // namespace attnopt
