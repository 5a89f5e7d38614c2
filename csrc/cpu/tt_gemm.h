// Small dense GEMM kernels of the TT lookup (row-major, fp32 / fp64), compiled twice: a baseline
// x86-64 build (tt_gemm_base.cpp) and an AVX2+FMA build (tt_gemm_avx2.cpp); gemm_kernels<T>()
// picks one at first use with __builtin_cpu_supports, so the library still runs on CPUs without
// AVX2. Each kernel's summation order is fixed (it depends only on the shapes), so results are
// deterministic on a given machine.
#pragma once

#include <cstdint>

namespace ttdist {
namespace kern {

template <typename T>
struct GemmKernels {
  // C (M x N) = A (M x K) @ B (K x N).
  void (*nn)(int64_t M, int64_t K, int64_t N, const T* A, const T* B, T* C);
  // C (K x N) += A^T @ G, A (M x K), G (M x N).
  void (*tn_acc)(int64_t M, int64_t K, int64_t N, const T* A, const T* G, T* C);
  // C (M x K) += G (M x N) @ S^T, S (K x N).
  void (*nt_acc)(int64_t M, int64_t K, int64_t N, const T* G, const T* S, T* C);
  // One row of the middle-out backward of a three-core table (r_0 = r_3 = 1): A (q0 x r1),
  // B (r1 q1 x r2), C (r2 x q2) its core slices, g (q0 x q1 q2) its gradient; with
  // U = A^T g (r1 x q1 q2) and S = B @ C (r1 q1 x q2): dA += g @ S^T (S as r1 x q1 q2),
  // dB += U @ C^T (U as r1 q1 x q2), dC += B^T @ U. False (nothing written) for shapes it does
  // not vectorize (r1 or r2 not a multiple of the vector width, or too large).
  bool (*middle_out_acc)(int64_t q0, int64_t q1, int64_t q2, int64_t r1, int64_t r2, const T* A, const T* B,
                         const T* C, const T* g, T* dA, T* dB, T* dC);
  // The trie walk's backward of the m rows of a three-core table under one prefix (i_0, i_1):
  // A (q0 x r1), B (r1 q1 x r2) the prefix's core slices, C[k] (r2 x q2) row k's last one,
  // g[k] (q0 q1 x q2) row k's gradient; with P = A @ B (q0 q1 x r2, B as r1 x q1 r2) and
  // Y = sum_k g_k @ C[k]^T (q0 q1 x r2): dC[k] += P^T @ g_k, dB += A^T @ Y (Y as q0 x q1 r2),
  // dA += Y @ B^T (B as r1 x q1 r2). False (nothing written) for shapes it does not vectorize
  // (q other than (4, 4, 4), r2 other than the vector width, r1 not a multiple of it or too large).
  bool (*prefix_rows_acc)(int64_t q0, int64_t q1, int64_t q2, int64_t r1, int64_t r2, int64_t m, const T* A,
                          const T* B, const T* const* C, const T* const* g, T* dA, T* dB, T* const* dC);
  // Pooled sums of gathered rows: out[b * ld_out + e] = sum_{i in [offsets[b], offsets[b + 1])}
  // w[i] * rows[i][e] for b < sums, e < D (w null: weights 1; an empty range gives zeros). The
  // rows ahead are prefetched: they are gathered from buffers larger than the cache.
  void (*pool_rows)(int64_t sums, const int64_t* offsets, int64_t D, const T* const* rows, const T* w, T* out,
                    int64_t ld_out);
  const char* isa;
};

// The kernels for this CPU (selected once).
const GemmKernels<float>& gemm_kernels_f32();
const GemmKernels<double>& gemm_kernels_f64();

// Builds of the kernels (defined in tt_gemm_base.cpp / tt_gemm_avx2.cpp).
GemmKernels<float> gemm_kernels_f32_base();
GemmKernels<double> gemm_kernels_f64_base();
GemmKernels<float> gemm_kernels_f32_avx2();
GemmKernels<double> gemm_kernels_f64_avx2();

}  // namespace kern
}  // namespace ttdist
