// CPU kernels of the ttdist TT lookup ops.
//
// Symbols: T tables, F features (each feature reads one table: feature_table_map[f]), B bags per
// feature, N looked-up indices. Table t has d_t cores; core k has layout (p_k, r_k, q_k, r_{k+1})
// with r_0 = r_d = 1 (0-based here). Row i has digits (i_0..i_{d-1}), row-major over p (i_0 most
// significant); W[i, :] = S_0(i_0) x S_1(i_1) x ... x S_{d-1}(i_{d-1}) where S_k(i) is the
// (r_k, q_k * r_{k+1}) slice of core k.
//
// One batch of one table is processed as a trie walk over its *sorted unique* rows: rows that
// share leading digits share the prefix products P_k = S_0 x ... x S_k (shape (q_0..q_k, r_{k+1})),
// so each prefix is computed once per batch, not once per lookup. The backward walks the same
// trie in reverse mode: the gradient of a shared prefix is accumulated over its children and pushed
// into its core slice once. Duplicate indices are summed before any core is touched, so every
// result is deterministic for a given number of threads.
#include "tt_lookup_cpu.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <memory>
#include <type_traits>

#include "tt_gemm.h"

namespace ttdist {
namespace {

using at::Tensor;

// fp32 / fp64 products go to the vectorized kernels of tt_gemm.h (AVX2 when the CPU has it);
// the loops below serve the mixed bf16 -> fp32 case.
template <typename acc_t, typename scalar_t>
constexpr bool kFastGemm = std::is_same_v<acc_t, scalar_t> && (std::is_same_v<acc_t, float> || std::is_same_v<acc_t, double>);

template <typename T>
inline const kern::GemmKernels<T>& fast_gemm() {
  if constexpr (std::is_same_v<T, float>) return kern::gemm_kernels_f32();
  else return kern::gemm_kernels_f64();
}

// C (M x N) = A (M x K) @ B (K x N); B is read as scalar_t and accumulated in acc_t.
template <typename acc_t, typename scalar_t>
inline void gemm_nn(int64_t M, int64_t K, int64_t N, const acc_t* A, const scalar_t* B, acc_t* C) {
  if constexpr (kFastGemm<acc_t, scalar_t>) return fast_gemm<acc_t>().nn(M, K, N, A, B, C);
  std::fill(C, C + M * N, acc_t(0));
  for (int64_t i = 0; i < M; ++i) {
    acc_t* c = C + i * N;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t a = A[i * K + k];
      const scalar_t* b = B + k * N;
      for (int64_t j = 0; j < N; ++j) c[j] += a * static_cast<acc_t>(b[j]);
    }
  }
}

// C (K x N) += A^T @ G where A is (M x K) and G is (M x N).
template <typename acc_t>
inline void gemm_tn_acc(int64_t M, int64_t K, int64_t N, const acc_t* A, const acc_t* G, acc_t* C) {
  if constexpr (kFastGemm<acc_t, acc_t>) return fast_gemm<acc_t>().tn_acc(M, K, N, A, G, C);
  for (int64_t m = 0; m < M; ++m) {
    const acc_t* g = G + m * N;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t a = A[m * K + k];
      acc_t* c = C + k * N;
      for (int64_t j = 0; j < N; ++j) c[j] += a * g[j];
    }
  }
}

// C (M x K) += G (M x N) @ S^T where S is (K x N).
template <typename acc_t, typename scalar_t>
inline void gemm_nt_acc(int64_t M, int64_t K, int64_t N, const acc_t* G, const scalar_t* S, acc_t* C) {
  if constexpr (kFastGemm<acc_t, scalar_t>) return fast_gemm<acc_t>().nt_acc(M, K, N, G, S, C);
  for (int64_t m = 0; m < M; ++m) {
    const acc_t* g = G + m * N;
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* s = S + k * N;
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < N; ++j) sum += g[j] * static_cast<acc_t>(s[j]);
      C[m * K + k] += sum;
    }
  }
}

// Shape of one table: p, q, ranks (d + 1 entries) and derived strides.
struct TableShape {
  int64_t d = 0;
  std::vector<int64_t> p, q, r;
  std::vector<int64_t> Q;           // Q[k] = q_0 * ... * q_k
  std::vector<int64_t> slice;       // slice[k] = r_k * q_k * r_{k+1}
  int64_t num_rows = 1, dim = 1;
  int64_t valid_rows = 1;  // rows an index may name: num_rows, or the caller's table_num_rows

  std::vector<double> inv_p;        // 1 / p_k

  // The digits (i_0..i_{d-1}) of `row` into out[0..d): one division per digit, by the double
  // reciprocal (exact quotient after a correction) below 2^52, where the product is off by < 1; a
  // 64-bit integer division (tens of cycles, not pipelined) was most of tt_prepare's time.
  void digits(int64_t row, int64_t* out) const {
    for (int64_t k = d - 1; k >= 0; --k) {
      const int64_t pk = p[k];
      int64_t quot = row < (int64_t(1) << 52) ? static_cast<int64_t>(static_cast<double>(row) * inv_p[k]) : row / pk;
      int64_t rem = row - quot * pk;
      while (rem < 0) --quot, rem += pk;
      while (rem >= pk) ++quot, rem -= pk;
      out[k] = rem;
      row = quot;
    }
  }
};

TableShape table_shape(const std::vector<Tensor>& cores, int64_t begin, int64_t d) {
  TableShape s;
  s.d = d;
  s.r.push_back(1);
  for (int64_t k = 0; k < d; ++k) {
    const Tensor& c = cores[begin + k];
    TORCH_CHECK_VALUE(c.dim() == 4, "ttdist: core ", k, " must be 4-D (p, r_in, q, r_out), got ", c.sizes());
    TORCH_CHECK_VALUE(c.size(1) == s.r.back(), "ttdist: core ", k, " has r_in ", c.size(1), " but the previous core has r_out ", s.r.back());
    TORCH_CHECK_VALUE(c.is_contiguous(), "ttdist: cores must be contiguous");
    s.p.push_back(c.size(0));
    s.q.push_back(c.size(2));
    s.r.push_back(c.size(3));
  }
  TORCH_CHECK_VALUE(s.r.back() == 1, "ttdist: the last core must have r_out = 1");
  for (int64_t k = 0; k < d; ++k) s.num_rows *= s.p[k];
  for (int64_t k = 0; k < d; ++k) s.inv_p.push_back(1.0 / static_cast<double>(s.p[k]));
  s.valid_rows = s.num_rows;
  int64_t acc = 1;
  for (int64_t k = 0; k < d; ++k) {
    acc *= s.q[k];
    s.Q.push_back(acc);
    s.slice.push_back(s.r[k] * s.q[k] * s.r[k + 1]);
  }
  s.dim = acc;
  return s;
}

// The looked-up positions of all features that read one table, grouped by unique row (views
// into the call's index plan, see IndexPlan below).
struct TableBatch {
  const int64_t* rows = nullptr;    // sorted unique rows, U entries
  int64_t U = 0;
  const int64_t* group = nullptr;   // U + 1 offsets into `order`
  const int64_t* order = nullptr;   // the table's positions, sorted by (row, position)
  const int64_t* digits = nullptr;  // (U, d): the digits of each unique row
  int64_t d = 0;
  bool empty() const { return U == 0; }
  const int64_t* digits_of(int64_t u) const { return digits + u * d; }
  // First level at which unique rows a and b differ (d when equal).
  int64_t first_diff(int64_t a, int64_t b) const {
    for (int64_t k = 0; k < d; ++k)
      if (digits[a * d + k] != digits[b * d + k]) return k;
    return d;
  }
};

// Per-position pooling factor: per-sample weight times 1/len for mean bags; empty when every
// factor is 1 (no weights, no mean-pooled feature).
template <typename acc_t>
std::vector<acc_t> position_scales(const LookupArgs& a, const int64_t* offsets, int64_t B, const Tensor& indices) {
  const bool any_mean = std::find(a.pooling_modes.begin(), a.pooling_modes.end(), kPoolingMean) != a.pooling_modes.end();
  if (!a.per_sample_weights.has_value() && !any_mean) return {};
  const int64_t N = indices.numel();
  std::vector<acc_t> scale(N, acc_t(1));
  if (a.per_sample_weights.has_value()) {
    Tensor w = a.per_sample_weights->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* wp = w.data_ptr<acc_t>();
    std::copy(wp, wp + N, scale.begin());
  }
  const int64_t F = static_cast<int64_t>(a.feature_table_map.size());
  at::parallel_for(0, F * B, 256, [&](int64_t begin, int64_t end) {
    for (int64_t fb = begin; fb < end; ++fb) {
      if (a.pooling_modes[fb / B] != kPoolingMean) continue;
      const int64_t lo = offsets[fb], hi = offsets[fb + 1];
      for (int64_t j = lo; j < hi; ++j) scale[j] /= static_cast<acc_t>(hi - lo);
    }
  });
  return scale;
}

// out[b * ld_out + e] = sum_{i in [offsets[b], offsets[b + 1])} w[i] * rows[i][e] for b < sums,
// e < D (w null: weights 1): the pooling of forward and the row gradients of backward, by the
// vectorized kernel of tt_gemm.h where the rows are acc_t.
template <typename acc_t, typename src_t>
void pool_rows(int64_t sums, const int64_t* offsets, int64_t D, const src_t* const* rows, const acc_t* w, acc_t* out,
               int64_t ld_out) {
  if constexpr (kFastGemm<acc_t, src_t>) return fast_gemm<acc_t>().pool_rows(sums, offsets, D, rows, w, out, ld_out);
  for (int64_t b = 0; b < sums; ++b) {
    acc_t* o = out + b * ld_out;
    std::fill(o, o + D, acc_t(0));
    for (int64_t i = offsets[b]; i < offsets[b + 1]; ++i)
      for (int64_t e = 0; e < D; ++e) o[e] += (w ? w[i] : acc_t(1)) * static_cast<acc_t>(rows[i][e]);
  }
}

// Runs fn(begin, end) over [0, n) in chunks of `grain` items that the threads take as they free
// up (OpenMP's dynamic schedule), so a thread slowed by the machine's other load does not hold the
// others at the end of the region. Only for work whose results do not depend on which chunk or
// thread computes an item (each item written by itself); fn must not throw.
template <typename Fn>
void parallel_chunks(int64_t n, int64_t grain, const Fn& fn) {
  const int64_t chunks = (n + grain - 1) / grain;
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), chunks));
  if (threads <= 1 || at::in_parallel_region()) {
    if (n > 0) fn(0, n);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) fn(c * grain, std::min(n, (c + 1) * grain));
}

// Items per chunk of parallel_chunks: about 8 chunks per thread, at least `least`.
int64_t dynamic_grain(int64_t n, int64_t least) {
  return std::max<int64_t>(least, n / (8 * static_cast<int64_t>(at::get_num_threads())) + 1);
}

// Splits [0, U) into contiguous chunks, one per task, so each chunk walks its own trie.
std::vector<int64_t> chunk_bounds(int64_t U, int64_t min_rows_per_chunk) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), U / min_rows_per_chunk));
  std::vector<int64_t> bounds(chunks + 1);
  for (int64_t c = 0; c <= chunks; ++c) bounds[c] = U * c / chunks;
  return bounds;
}

// Prefix products of the current row of a trie walk; level k holds P_k, (Q_k, r_{k+1}).
template <typename acc_t, typename scalar_t>
struct PrefixStack {
  const TableShape& s;
  std::vector<const scalar_t*> core;
  std::vector<std::vector<acc_t>> P;
  std::vector<int64_t> digit;

  PrefixStack(const TableShape& shape, std::vector<const scalar_t*> cores) : s(shape), core(std::move(cores)) {
    for (int64_t k = 0; k < s.d; ++k) P.emplace_back(s.Q[k] * s.r[k + 1]);
    digit.assign(s.d, -1);
  }
  const scalar_t* slice(int64_t k, int64_t i) const { return core[k] + i * s.slice[k]; }
  // Recomputes P_from..P_to for the row of digits `row_digits` (P_{from-1} must be current);
  // P_to goes to `last` instead when given (a row of the output, never a parent).
  void advance(const int64_t* row_digits, int64_t from, int64_t to, acc_t* last = nullptr) {
    for (int64_t k = from; k <= to; ++k) {
      digit[k] = row_digits[k];
      const scalar_t* S = slice(k, digit[k]);
      acc_t* out = (k == to && last) ? last : P[k].data();
      if (k == 0) {
        for (int64_t e = 0; e < s.slice[0]; ++e) out[e] = static_cast<acc_t>(S[e]);
      } else {
        gemm_nn<acc_t, scalar_t>(s.Q[k - 1], s.r[k], s.q[k] * s.r[k + 1], P[k - 1].data(), S, out);
      }
    }
  }
};

template <typename scalar_t>
void forward_table(const TableShape& s, const std::vector<const scalar_t*>& cores, const TableBatch& tb,
                   at::opmath_type<scalar_t>* rows_out) {
  using acc_t = at::opmath_type<scalar_t>;
  // A chunk starts its trie walk afresh: the same products as a longer walk, so any chunking
  // gives the same rows.
  parallel_chunks(tb.U, dynamic_grain(tb.U, 64), [&](int64_t u0, int64_t u1) {
    PrefixStack<acc_t, scalar_t> stack(s, cores);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t from = (u == u0) ? 0 : tb.first_diff(u - 1, u);
      stack.advance(tb.digits_of(u), from, s.d - 1, rows_out + u * s.dim);
    }
  });
}

// Runs chunk_body(dcore, u_begin, u_end) over contiguous chunks of the U unique rows in
// parallel, each accumulating core gradients into dcore[k] (p_k * slice_k acc_t each). Chunk 0
// accumulates straight into `out`; chunks 1.. into private zeroed buffers that are added to `out`
// afterwards in chunk order, so the summation order depends only on the number of chunks
// (threads), not on scheduling.
template <typename acc_t, typename ChunkBody>
void accumulate_in_chunks(const TableShape& s, int64_t U, const std::vector<acc_t*>& out, ChunkBody chunk_body) {
  const auto bounds = chunk_bounds(U, 64);
  const int64_t chunks = static_cast<int64_t>(bounds.size()) - 1;
  const int64_t d = s.d;
  // priv[c - 1][k]: chunk c's gradient of core k (c >= 1).
  std::vector<std::vector<std::vector<acc_t>>> priv(chunks - 1);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      std::vector<acc_t*> dcore(d);
      for (int64_t k = 0; k < d; ++k) {
        if (c == 0) {
          dcore[k] = out[k];
        } else {
          priv[c - 1].emplace_back(s.p[k] * s.slice[k], acc_t(0));
          dcore[k] = priv[c - 1].back().data();
        }
      }
      if (bounds[c + 1] > bounds[c]) chunk_body(dcore, bounds[c], bounds[c + 1]);
    }
  });
  if (chunks == 1) return;
  // out[k] += priv[0][k] + priv[1][k] + ... (in this order), all cores in one parallel region.
  std::vector<int64_t> first(d + 1, 0);
  for (int64_t k = 0; k < d; ++k) first[k + 1] = first[k] + s.p[k] * s.slice[k];
  at::parallel_for(0, first[d], 4096, [&](int64_t b, int64_t e) {
    for (int64_t k = 0; k < d; ++k) {
      const int64_t lo = std::max(b, first[k]) - first[k], hi = std::min(e, first[k + 1]) - first[k];
      if (lo >= hi) continue;
      acc_t* dst = out[k];
      for (int64_t c = 1; c < chunks; ++c) {
        const acc_t* src = priv[c - 1][k].data();
        for (int64_t x = lo; x < hi; ++x) dst[x] += src[x];
      }
    }
  });
}

// Multiply-adds per batch of the two backward orders of a three-core table (r_0 = r_3 = 1):
//   trie walk:  per distinct prefix (i_0, i_1): P_1 = A @ B, dB += P_0^T dP_1, dP_0 = dP_1 @ B^T
//               (3 q_0 r_1 q_1 r_2), per row: dC += P_1^T g, dP_1 = g @ C^T (2 q_0 q_1 r_2 q_2);
//   middle-out: per row U = A^T g (r_1, q_1 q_2), S = B @ C (r_1 q_1, q_2), dA += g @ S^T,
//               dB += U @ C^T, dC += B^T @ U (2 q_0 r_1 q_1 q_2 + 3 r_1 q_1 r_2 q_2).
// A, B, C: the row's slices of the three cores. Middle-out wins when q_0 > q_2 (the demo's
// q = (4, 2, 2): 3584 instead of 6656 per row); the trie walk when rows share prefixes or q_0 < q_2.
bool middle_out_is_cheaper(const TableShape& s, const TableBatch& tb) {
  if (s.d != 3 || tb.U == 0) return false;
  const int64_t q0 = s.q[0], q1 = s.q[1], q2 = s.q[2], r1 = s.r[1], r2 = s.r[2];
  auto trie = [&](int64_t prefixes) { return prefixes * 3 * q0 * r1 * q1 * r2 + tb.U * 2 * q0 * q1 * r2 * q2; };
  const int64_t middle_out = tb.U * (2 * q0 * r1 * q1 * q2 + 3 * r1 * q1 * r2 * q2);
  // the trie walk's cost grows with the distinct prefixes (1..U): count them only when that decides
  if (middle_out >= trie(tb.U)) return false;
  if (middle_out < trie(1)) return true;
  int64_t prefixes = 1;
  for (int64_t u = 1; u < tb.U; ++u) prefixes += tb.first_diff(u - 1, u) <= 1;
  return middle_out < trie(prefixes);
}

// Middle-out backward of a three-core table (see middle_out_is_cheaper), fp32 / fp64.
template <typename acc_t>
void backward_table_middle_out(const TableShape& s, const std::vector<const acc_t*>& cores, const TableBatch& tb,
                               const acc_t* const* grad_rows, const std::vector<acc_t*>& out) {
  const int64_t q0 = s.q[0], q1 = s.q[1], q2 = s.q[2], r1 = s.r[1], r2 = s.r[2];
  accumulate_in_chunks<acc_t>(s, tb.U, out, [&](const std::vector<acc_t*>& dcore, int64_t u0, int64_t u1) {
    std::vector<acc_t> U(r1 * q1 * q2), S(r1 * q1 * q2);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t* i = tb.digits_of(u);
      const acc_t* A = cores[0] + i[0] * s.slice[0];  // (q_0, r_1)
      const acc_t* B = cores[1] + i[1] * s.slice[1];  // (r_1 q_1, r_2)
      const acc_t* C = cores[2] + i[2] * s.slice[2];  // (r_2, q_2)
      const acc_t* g = grad_rows[u];                  // (q_0, q_1 q_2)
      acc_t *dA = dcore[0] + i[0] * s.slice[0], *dB = dcore[1] + i[1] * s.slice[1], *dC = dcore[2] + i[2] * s.slice[2];
      if (fast_gemm<acc_t>().middle_out_acc(q0, q1, q2, r1, r2, A, B, C, g, dA, dB, dC)) continue;
      std::fill(U.begin(), U.end(), acc_t(0));
      gemm_tn_acc<acc_t>(q0, r1, q1 * q2, A, g, U.data());
      gemm_nn<acc_t, acc_t>(r1 * q1, r2, q2, B, C, S.data());
      gemm_nt_acc<acc_t, acc_t>(q0, r1, q1 * q2, g, S.data(), dA);
      gemm_nt_acc<acc_t, acc_t>(r1 * q1, r2, q2, U.data(), C, dB);
      gemm_tn_acc<acc_t>(r1 * q1, r2, q2, B, U.data(), dC);
    }
  });
}

// The trie walk's backward of the m rows of a three-core table under one prefix (i_0, i_1) (A, B
// its core slices, C[k] and g[k] row k's last slice and gradient; dA the gradient of
// P_0 = A), by the fused kernel of tt_gemm.h: false (nothing written) for shapes or dtypes it does
// not take.
template <typename acc_t, typename scalar_t>
bool prefix_rows_acc(const TableShape& s, int64_t m, const scalar_t* A, const scalar_t* B, const scalar_t* const* C,
                     const acc_t* const* g, acc_t* dA, acc_t* dB, acc_t* const* dC) {
  if constexpr (kFastGemm<acc_t, scalar_t>) {
    return fast_gemm<acc_t>().prefix_rows_acc(s.q[0], s.q[1], s.q[2], s.r[1], s.r[2], m, A, B, C, g, dA, dB, dC);
  } else {
    return false;
  }
}

// Reverse-mode pass: grad_rows (U rows' gradients, D values each) -> dense core gradients,
// accumulated into `out[k]` (acc_t, p_k * slice_k elements each, zero on entry): a trie walk
// over the sorted rows (prefix products and their gradients shared by rows with a common prefix;
// for three cores, the rows under each prefix P_1 in one fused kernel where it takes the shape),
// or for three cores the middle-out order when that takes fewer multiply-adds.
template <typename scalar_t>
void backward_table(const TableShape& s, const std::vector<const scalar_t*>& cores, const TableBatch& tb,
                    const at::opmath_type<scalar_t>* const* grad_rows,
                    const std::vector<at::opmath_type<scalar_t>*>& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t U = tb.U;
  if (s.d == 1) {  // one core: row i is the slice i itself (r_0 = r_1 = 1), its gradient the row's
    at::parallel_for(0, U, 256, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {  // rows are unique: no two tasks write one slice
        acc_t* dS = out[0] + tb.rows[u] * s.slice[0];
        for (int64_t e = 0; e < s.dim; ++e) dS[e] += grad_rows[u][e];
      }
    });
    return;
  }
  if constexpr (kFastGemm<acc_t, scalar_t>) {
    if (middle_out_is_cheaper(s, tb)) return backward_table_middle_out<acc_t>(s, cores, tb, grad_rows, out);
  }
  const int64_t d = s.d;
  accumulate_in_chunks<acc_t>(s, U, out, [&](const std::vector<acc_t*>& dcore, int64_t u0, int64_t u1) {
    PrefixStack<acc_t, scalar_t> stack(s, cores);
    std::vector<std::vector<acc_t>> dP;  // dP[k]: gradient of the current prefix P_k, k < d - 1
    for (int64_t k = 0; k + 1 < d; ++k) dP.emplace_back(s.Q[k] * s.r[k + 1], acc_t(0));
    bool try_fused = d == 3;  // the rows under each prefix P_1 go to prefix_rows_acc
    bool fused = false;       // the current prefix P_1 was pushed by prefix_rows_acc
    std::vector<const scalar_t*> last_slices;  // its rows' slices of the last core
    std::vector<acc_t*> last_grads;            // and their gradients
    // Pushes the finished prefix node at level k into its core slice and its parent.
    auto finalize = [&](int64_t k) {
      if (k == 1 && fused) {
        fused = false;
        return;
      }
      acc_t* dS = dcore[k] + stack.digit[k] * s.slice[k];
      if (k == 0) {
        for (int64_t e = 0; e < s.slice[0]; ++e) dS[e] += dP[0][e];
      } else {
        const int64_t M = s.Q[k - 1], K = s.r[k], N = s.q[k] * s.r[k + 1];
        gemm_tn_acc<acc_t>(M, K, N, stack.P[k - 1].data(), dP[k].data(), dS);
        gemm_nt_acc<acc_t, scalar_t>(M, K, N, dP[k].data(), stack.slice(k, stack.digit[k]), dP[k - 1].data());
      }
      std::fill(dP[k].begin(), dP[k].end(), acc_t(0));
    };
    for (int64_t u = u0; u < u1; ++u) {
      int64_t from = 0;
      if (u != u0) {
        from = std::min(tb.first_diff(u - 1, u), d - 1);
        for (int64_t k = d - 2; k >= from; --k) finalize(k);
      }
      const int64_t* i = tb.digits_of(u);
      if (try_fused) {  // rows u..e-1 share P_1 (from < 2: the trie walk's first row of it)
        int64_t e = u + 1;
        while (e < u1 && tb.first_diff(e - 1, e) == 2) ++e;
        last_slices.clear();
        last_grads.clear();
        for (int64_t v = u; v < e; ++v) {
          const int64_t c = tb.digits_of(v)[2];
          last_slices.push_back(stack.slice(2, c));
          last_grads.push_back(dcore[2] + c * s.slice[2]);
        }
        if (prefix_rows_acc<acc_t, scalar_t>(s, e - u, stack.slice(0, i[0]), stack.slice(1, i[1]), last_slices.data(),
                                             grad_rows + u, dP[0].data(), dcore[1] + i[1] * s.slice[1],
                                             last_grads.data())) {
          stack.advance(i, from, 0);
          fused = true;
          u = e - 1;
          continue;
        }
        try_fused = false;  // not the kernel's shape (nor dtype): no later row's either
      }
      stack.advance(i, from, d - 2);
      stack.digit[d - 1] = i[d - 1];
      // Leaf: W_row = P_{d-2} (Q_{d-2}, r_{d-1}) @ S_{d-1} (r_{d-1}, q_{d-1}).
      const int64_t M = s.Q[d - 2], K = s.r[d - 1], N = s.q[d - 1];
      const acc_t* g = grad_rows[u];
      acc_t* dS = dcore[d - 1] + stack.digit[d - 1] * s.slice[d - 1];
      gemm_tn_acc<acc_t>(M, K, N, stack.P[d - 2].data(), g, dS);
      gemm_nt_acc<acc_t, scalar_t>(M, K, N, g, stack.slice(d - 1, stack.digit[d - 1]), dP[d - 2].data());
    }
    for (int64_t k = d - 2; k >= 0; --k) finalize(k);
  });
}

// The index plan of one call: what tt_prepare computes once per batch and the three lookup ops
// reuse (autograd keeps it from forward to backward). One int64 tensor:
//   [0, kPlanHeader)   magic, N, F, B, T, hash of (indices, offsets, feature_table_map, rows per table)
//   [.., + 2T)         per table: U_t (unique rows), M_t (positions)
//   per table t:       rows [U_t] (sorted unique), group [U_t + 1] (offsets into order), order [M_t],
//                      digits [U_t * d_t] (each unique row's (i_0..i_{d-1}))
//   bag_of [N]         feature * B + bag of every position
//   unique_of [N]      the position's row, as an index into its table's `rows`
// An op given a plan recomputes the header from its own arguments (O(N)) and raises ValueError
// on any difference, so a plan made for other indices is never read.
constexpr int64_t kPlanMagic = 0x7474706c616e3031;  // "ttplan01"
constexpr int64_t kPlanHeader = 6;

// Everything one call needs about its tables and positions.
struct Prepared {
  int64_t B = 0, N = 0;
  std::vector<TableShape> shapes;
  std::vector<int64_t> core_begin;
  std::vector<int64_t> col_offset;  // per feature, in the (B, sum D) output
  int64_t total_dim = 0;
  Tensor plan;                      // the index plan the views below read
  std::vector<TableBatch> batches;
  const int64_t* bag_of = nullptr;
  const int64_t* unique_of = nullptr;
};

// Shapes, table/feature maps and offsets checked; no per-index work.
Prepared describe(const std::vector<Tensor>& cores, const LookupArgs& a, const Tensor& indices, const Tensor& offsets) {
  Prepared pr;
  const int64_t T = static_cast<int64_t>(a.table_num_cores.size());
  const int64_t F = static_cast<int64_t>(a.feature_table_map.size());
  TORCH_CHECK_VALUE(F > 0, "ttdist: feature_table_map must name at least one feature");
  TORCH_CHECK_VALUE(static_cast<int64_t>(a.pooling_modes.size()) == F, "ttdist: pooling_modes needs one entry per feature");
  TORCH_CHECK_VALUE(indices.dim() == 1 && offsets.dim() == 1, "ttdist: indices and offsets must be 1-D");
  TORCH_CHECK_VALUE((offsets.numel() - 1) % F == 0 && offsets.numel() >= 1,
              "ttdist: offsets must have F * B + 1 entries, got ", offsets.numel(), " for F = ", F);
  pr.B = (offsets.numel() - 1) / F;
  pr.N = indices.numel();
  // The core counts first: table_shape reads cores[begin .. begin + d).
  const int64_t C = static_cast<int64_t>(cores.size());
  int64_t begin = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t d = a.table_num_cores[t];
    TORCH_CHECK_VALUE(d >= 1 && d <= C - begin, "ttdist: table ", t, " has table_num_cores ", d,
                      " but only ", C - begin, " of the ", C, " cores are left for it");
    begin += d;
  }
  TORCH_CHECK_VALUE(begin == C, "ttdist: table_num_cores sums to ", begin, " but ", C, " cores were given");
  TORCH_CHECK_VALUE(a.table_num_rows.empty() || static_cast<int64_t>(a.table_num_rows.size()) == T,
                    "ttdist: table_num_rows needs one entry per table, got ", a.table_num_rows.size(), " for ", T,
                    " tables");
  begin = 0;
  for (int64_t t = 0; t < T; ++t) {
    pr.core_begin.push_back(begin);
    pr.shapes.push_back(table_shape(cores, begin, a.table_num_cores[t]));
    if (!a.table_num_rows.empty()) {
      const int64_t valid = a.table_num_rows[t];
      TORCH_CHECK_VALUE(valid >= 1 && valid <= pr.shapes.back().num_rows, "ttdist: table_num_rows[", t, "] = ", valid,
                        " is not in [1, ", pr.shapes.back().num_rows, "] (the product of the table's p)");
      pr.shapes.back().valid_rows = valid;
    }
    begin += a.table_num_cores[t];
  }
  for (int64_t f = 0; f < F; ++f) {
    const int64_t t = a.feature_table_map[f];
    TORCH_CHECK_VALUE(t >= 0 && t < T, "ttdist: feature ", f, " maps to table ", t, ", valid range [0, ", T, ")");
    pr.col_offset.push_back(pr.total_dim);
    pr.total_dim += pr.shapes[t].dim;
  }
  const int64_t* off = offsets.data_ptr<int64_t>();
  bool offsets_ok = off[0] == 0 && off[offsets.numel() - 1] == indices.numel();
  for (int64_t x = 0; offsets_ok && x + 1 < offsets.numel(); ++x) offsets_ok = off[x] <= off[x + 1];
  TORCH_CHECK_VALUE(offsets_ok, "ttdist: offsets must start at 0, be non-decreasing and end at the number of indices (",
                    indices.numel(), ")");
  return pr;
}

// The header of the index plan this call needs (see IndexPlan above).
std::vector<int64_t> plan_header(const Prepared& pr, const LookupArgs& a, const Tensor& indices, const Tensor& offsets) {
  uint64_t h = 0x243f6a8885a308d3ull;
  // Four interleaved chains (one multiply's latency per element was the whole cost), then folded.
  auto mix = [&h](const int64_t* v, int64_t n) {
    uint64_t lane[4] = {h, h ^ 1, h ^ 2, h ^ 3};
    for (int64_t i = 0; i < n; ++i)
      lane[i & 3] = (lane[i & 3] ^ static_cast<uint64_t>(v[i])) * 0x100000001b3ull + static_cast<uint64_t>(i);
    for (const uint64_t x : lane) h = (h ^ x) * 0x100000001b3ull;
  };
  mix(indices.data_ptr<int64_t>(), indices.numel());
  mix(offsets.data_ptr<int64_t>(), offsets.numel());
  mix(a.feature_table_map.data(), static_cast<int64_t>(a.feature_table_map.size()));
  for (const TableShape& s : pr.shapes) mix(&s.valid_rows, 1);
  const int64_t F = static_cast<int64_t>(a.feature_table_map.size());
  return {kPlanMagic, pr.N, F, pr.B, static_cast<int64_t>(pr.shapes.size()), static_cast<int64_t>(h)};
}

// Points pr.batches, bag_of and unique_of into `plan` (whose header was checked).
void attach_plan(Prepared& pr, Tensor plan) {
  const int64_t T = static_cast<int64_t>(pr.shapes.size());
  const int64_t* base = plan.data_ptr<int64_t>();
  const int64_t* sizes = base + kPlanHeader;
  int64_t at = kPlanHeader + 2 * T;
  pr.batches.clear();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t U = sizes[2 * t], M = sizes[2 * t + 1];
    TORCH_CHECK_VALUE(U >= 0 && M >= U && M <= pr.N, "ttdist: `prepared` is not an index plan of this call (table ", t,
                      ": ", U, " unique rows of ", M, " positions)");
    TableBatch tb;
    tb.U = U;
    tb.d = pr.shapes[t].d;
    tb.rows = base + at;
    tb.group = tb.rows + U;
    tb.order = tb.group + U + 1;
    tb.digits = tb.order + M;
    at += 2 * U + 1 + M + U * tb.d;
    pr.batches.push_back(tb);
  }
  pr.bag_of = base + at;
  pr.unique_of = pr.bag_of + pr.N;
  TORCH_CHECK_VALUE(at + 2 * pr.N == plan.numel(), "ttdist: `prepared` has ", plan.numel(),
                    " entries, but this call's index plan has ", at + 2 * pr.N);
  pr.plan = std::move(plan);
}

// The looked-up rows of table t in [lo, hi), with their positions (build_plan).
struct PlanPart {
  int64_t t, lo, hi;
  std::vector<std::pair<int64_t, int64_t>> pairs;  // (row - lo, position), sorted by row, stably
  int64_t U = 0;                                   // unique rows
  int64_t u_at = 0, m_at = 0;                      // its first unique row and position in the table's plan
};

// Sorts (row, position) pairs by row, stably, so positions stay in their (ascending) input order
// within a row: an LSD radix sort, 8 bits of the row per pass, passes up to max_row's top bit.
void sort_by_row(std::vector<std::pair<int64_t, int64_t>>& pairs, int64_t max_row) {
  if (pairs.size() < 64) {
    std::stable_sort(pairs.begin(), pairs.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    return;
  }
  std::vector<std::pair<int64_t, int64_t>> sorted(pairs.size());
  for (int shift = 0; shift < 64 && (max_row >> shift) != 0; shift += 8) {
    int64_t start[257] = {0};
    for (const auto& e : pairs) ++start[((e.first >> shift) & 255) + 1];
    if (*std::max_element(start + 1, start + 257) == static_cast<int64_t>(pairs.size())) continue;  // one bucket
    for (int b = 0; b < 256; ++b) start[b + 1] += start[b];
    for (const auto& e : pairs) sorted[start[(e.first >> shift) & 255]++] = e;
    pairs.swap(sorted);
  }
}

// Validates every index and builds the call's index plan.
Tensor build_plan(const Prepared& pr, const LookupArgs& a, const Tensor& indices, const Tensor& offsets,
                  const std::vector<int64_t>& header) {
  const int64_t T = static_cast<int64_t>(pr.shapes.size());
  const int64_t F = static_cast<int64_t>(a.feature_table_map.size());
  const int64_t* idx = indices.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  // Bounds first, in position order, so the error names the first bad index.
  for (int64_t f = 0; f < F; ++f) {
    const int64_t t = a.feature_table_map[f];
    for (int64_t j = off[f * pr.B]; j < off[(f + 1) * pr.B]; ++j)
      TORCH_CHECK_INDEX(idx[j] >= 0 && idx[j] < pr.shapes[t].valid_rows, "ttdist: index ", idx[j], " at position ", j,
                        " of feature ", f, " (table ", t, ") is out of range [0, ", pr.shapes[t].valid_rows, ")");
  }
  // The (row, position) pairs of each table, split by row range into parts (several per table
  // when there are fewer tables than threads and enough positions to share), each sorted on its
  // own: the parts of a table, concatenated, are its pairs sorted, so the plan does not depend on
  // the split.
  constexpr int64_t kPositionsPerPart = 2048;  // below this, a parallel region costs more than it saves
  const int64_t per_table = std::max<int64_t>(1, std::min<int64_t>((at::get_num_threads() + T - 1) / T,
                                                                   pr.N / (T * kPositionsPerPart)));
  std::vector<PlanPart> parts;
  for (int64_t t = 0; t < T; ++t) {
    // part k: [k * step + min(k, rest), ...), without the overflow of valid_rows * k near 2^63
    const int64_t rows = pr.shapes[t].valid_rows, step = rows / per_table, rest = rows % per_table;
    for (int64_t k = 0; k < per_table; ++k)
      parts.push_back({t, k * step + std::min(k, rest), (k + 1) * step + std::min(k + 1, rest)});
  }
  const int64_t P = static_cast<int64_t>(parts.size());
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t x = p0; x < p1; ++x) {
      PlanPart& part = parts[x];
      for (int64_t f = 0; f < F; ++f)
        if (a.feature_table_map[f] == part.t)
          for (int64_t j = off[f * pr.B]; j < off[(f + 1) * pr.B]; ++j)
            if (idx[j] >= part.lo && idx[j] < part.hi) part.pairs.emplace_back(idx[j] - part.lo, j);
      sort_by_row(part.pairs, part.hi - part.lo - 1);
      for (size_t n = 0; n < part.pairs.size(); ++n)
        part.U += (n == 0 || part.pairs[n].first != part.pairs[n - 1].first);
    }
  });
  // Where each table and part writes: per table [rows U][group U + 1][order M][digits U * d].
  std::vector<int64_t> table_at(T), U(T, 0), M(T, 0);
  for (PlanPart& part : parts) {
    part.u_at = U[part.t];
    part.m_at = M[part.t];
    U[part.t] += part.U;
    M[part.t] += static_cast<int64_t>(part.pairs.size());
  }
  int64_t total = kPlanHeader + 2 * T;
  for (int64_t t = 0; t < T; ++t) {
    table_at[t] = total;
    total += (2 + pr.shapes[t].d) * U[t] + 1 + M[t];
  }
  total += 2 * pr.N;
  Tensor plan = at::empty({total}, at::TensorOptions().dtype(at::kLong));
  int64_t* base = plan.data_ptr<int64_t>();
  std::copy(header.begin(), header.end(), base);
  int64_t* unique_of = base + total - pr.N;
  for (int64_t t = 0; t < T; ++t) {
    base[kPlanHeader + 2 * t] = U[t];
    base[kPlanHeader + 2 * t + 1] = M[t];
    base[table_at[t] + 2 * U[t]] = M[t];  // group[U]
  }
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t x = p0; x < p1; ++x) {
      const PlanPart& part = parts[x];
      const int64_t t = part.t, d = pr.shapes[t].d;
      int64_t *rows = base + table_at[t], *group = rows + U[t], *order = group + U[t] + 1, *digits = order + M[t];
      int64_t u = part.u_at - 1, n = part.m_at;
      for (size_t i = 0; i < part.pairs.size(); ++i, ++n) {
        const auto& [row, position] = part.pairs[i];
        if (i == 0 || row != part.pairs[i - 1].first) {
          rows[++u] = row + part.lo;
          group[u] = n;
          pr.shapes[t].digits(rows[u], digits + u * d);
        }
        order[n] = position;
        unique_of[position] = u;
      }
    }
  });
  int64_t* bag_of = base + total - 2 * pr.N;
  at::parallel_for(0, F * pr.B, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t fb = b0; fb < b1; ++fb)
      for (int64_t j = off[fb]; j < off[fb + 1]; ++j) bag_of[j] = fb;
  });
  return plan;
}

// Checks and describes one call; reuses `given` (an index plan from tt_prepare) or builds one.
Prepared prepare(const std::vector<Tensor>& cores, const LookupArgs& a, const Tensor& indices, const Tensor& offsets,
                 const std::optional<Tensor>& given) {
  Prepared pr = describe(cores, a, indices, offsets);
  const std::vector<int64_t> header = plan_header(pr, a, indices, offsets);
  if (!given.has_value()) {
    attach_plan(pr, build_plan(pr, a, indices, offsets, header));
    return pr;
  }
  const Tensor& plan = *given;
  TORCH_CHECK_VALUE(plan.device().is_cpu() && plan.scalar_type() == at::kLong && plan.dim() == 1 &&
                        plan.is_contiguous() && plan.numel() >= kPlanHeader + 2 * static_cast<int64_t>(pr.shapes.size()),
                    "ttdist: `prepared` must be what ttdist::tt_prepare returned on the CPU (a 1-D int64 tensor), got ",
                    plan.scalar_type(), " ", plan.sizes(), " on ", plan.device());
  TORCH_CHECK_VALUE(std::equal(header.begin(), header.end(), plan.data_ptr<int64_t>()),
                    "ttdist: `prepared` was made by tt_prepare for other indices, offsets or tables than this call's (",
                    pr.N, " indices, ", a.feature_table_map.size(), " features, ", pr.B,
                    " bags each); call tt_prepare with this call's arguments");
  attach_plan(pr, plan);
  return pr;
}

template <typename scalar_t>
std::vector<const scalar_t*> table_core_ptrs(const std::vector<Tensor>& cores, const Prepared& pr, int64_t t) {
  std::vector<const scalar_t*> ptrs;
  for (int64_t k = 0; k < pr.shapes[t].d; ++k) ptrs.push_back(cores[pr.core_begin[t] + k].data_ptr<scalar_t>());
  return ptrs;
}

// The gradient of each unique row of table t (D values each): the sum over its positions of
// scale * grad_output[bag, cols]. A row looked up once with factor 1 (fp32 / fp64) points into
// grad_output itself, so a batch of distinct rows copies nothing; the others are summed into
// `staging`.
template <typename acc_t>
struct RowGradients {
  std::vector<const acc_t*> row;     // U pointers
  std::unique_ptr<acc_t[]> staging;  // (U, D): row u's sum at u * D, where one is needed (else null)
};

template <typename acc_t, typename scalar_t>
RowGradients<acc_t> row_gradients(const Prepared& pr, int64_t t, const Tensor& grad_output,
                                  const std::vector<acc_t>& scale) {
  const TableBatch& tb = pr.batches[t];
  const int64_t D = pr.shapes[t].dim, U = tb.U, M = tb.group[U];
  // every row read once with factor 1 (M == U positions): all point into grad_output, no staging
  const bool all_direct = kFastGemm<acc_t, scalar_t> && scale.empty() && M == U;
  RowGradients<acc_t> grads{std::vector<const acc_t*>(U),
                            all_direct ? nullptr : std::unique_ptr<acc_t[]>(new acc_t[U * D])};
  const scalar_t* go = grad_output.data_ptr<scalar_t>();
  const int64_t ld = grad_output.size(1);
  std::vector<const scalar_t*> src(M);  // per position of the table (in `order`): its gradient row
  std::vector<acc_t> weight(scale.empty() ? 0 : M);
  parallel_chunks(U, dynamic_grain(U, 64), [&](int64_t u0, int64_t u1) {
    for (int64_t n = tb.group[u0]; n < tb.group[u1]; ++n) {
      const int64_t j = tb.order[n], fb = pr.bag_of[j];
      src[n] = go + (fb % pr.B) * ld + pr.col_offset[fb / pr.B];
      if (!scale.empty()) weight[n] = scale[j];
    }
    for (int64_t u = u0; u < u1; ++u) {
      if constexpr (kFastGemm<acc_t, scalar_t>) {
        if (scale.empty() && tb.group[u + 1] - tb.group[u] == 1) {
          grads.row[u] = src[tb.group[u]];
          continue;
        }
      }
      acc_t* sum = grads.staging.get() + u * D;
      pool_rows<acc_t, scalar_t>(1, tb.group + u, D, src.data(), scale.empty() ? nullptr : weight.data(), sum, D);
      grads.row[u] = sum;
    }
  });
  return grads;
}

// Applies one optimizer step to the listed rows of `weight` (rows, row_len).
template <typename scalar_t, typename GradRow>
void update_rows(scalar_t* weight, at::opmath_type<scalar_t>* state, int64_t row_len, const std::vector<int64_t>& ids,
                 GradRow grad_row, int64_t optimizer, double lr, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, static_cast<int64_t>(ids.size()), 16, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const int64_t row = ids[n];
      const acc_t* g = grad_row(n);
      scalar_t* w = weight + row * row_len;
      if (optimizer == kOptimSGD) {
        for (int64_t x = 0; x < row_len; ++x) w[x] = static_cast<scalar_t>(static_cast<acc_t>(w[x]) - acc_t(lr) * g[x]);
      } else if (optimizer == kOptimAdagrad) {
        acc_t* st = state + row * row_len;
        for (int64_t x = 0; x < row_len; ++x) {
          st[x] += g[x] * g[x];
          w[x] = static_cast<scalar_t>(static_cast<acc_t>(w[x]) - acc_t(lr) * g[x] / (std::sqrt(st[x]) + acc_t(eps)));
        }
      } else {
        acc_t sq = 0;  // a vector reduction: a serial sum of squares is a chain of dependent adds
#pragma omp simd reduction(+ : sq)
        for (int64_t x = 0; x < row_len; ++x) sq += g[x] * g[x];
        state[row] += sq / static_cast<acc_t>(row_len);
        const acc_t step = acc_t(lr) / (std::sqrt(state[row]) + acc_t(eps));
        for (int64_t x = 0; x < row_len; ++x) w[x] = static_cast<scalar_t>(static_cast<acc_t>(w[x]) - step * g[x]);
      }
    }
  });
}

void check_optimizer_state(const Tensor& weight, const Tensor& state, int64_t rows, int64_t row_len, int64_t optimizer) {
  TORCH_CHECK(optimizer == kOptimSGD || optimizer == kOptimAdagrad || optimizer == kOptimRowwiseAdagrad,
              "ttdist: unknown optimizer code ", optimizer);
  if (optimizer == kOptimSGD) return;
  const int64_t want = optimizer == kOptimAdagrad ? rows * row_len : rows;
  TORCH_CHECK(state.numel() == want && state.is_contiguous(), "ttdist: optimizer state has ", state.numel(),
              " elements, expected ", want);
  TORCH_CHECK(state.scalar_type() == at::toOpMathType(weight.scalar_type()), "ttdist: optimizer state must be ",
              at::toOpMathType(weight.scalar_type()));
}

// Shared by tt_backward and tt_backward_fused_: for each table t with looked-up rows,
// `buffers(t)` returns d_t zeroed acc_t buffers (dense core gradients, filled here), then
// `consume(t, the table's batch (its unique rows), shape, first core)` is called.
template <typename scalar_t, typename Buffers, typename Consume>
void backward_tables(const Tensor& grad_output, const std::vector<Tensor>& cores, const LookupArgs& a,
                     const Tensor& indices_in, const Tensor& offsets_in, Buffers buffers, Consume consume) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tensor indices = indices_in.to(at::kLong).contiguous();
  const Tensor offsets = offsets_in.to(at::kLong).contiguous();
  Prepared pr = prepare(cores, a, indices, offsets, a.prepared);
  TORCH_CHECK(grad_output.scalar_type() == cores[0].scalar_type(), "ttdist: grad_output must have the cores' dtype ",
              cores[0].scalar_type(), ", got ", grad_output.scalar_type());
  const Tensor go = grad_output.contiguous();
  TORCH_CHECK_VALUE(go.dim() == 2 && go.size(0) == pr.B && go.size(1) == pr.total_dim, "ttdist: grad_output must be (",
              pr.B, ", ", pr.total_dim, "), got ", go.sizes());
  const auto scale = position_scales<acc_t>(a, offsets.data_ptr<int64_t>(), pr.B, indices);
  for (int64_t t = 0; t < static_cast<int64_t>(pr.shapes.size()); ++t) {
    if (pr.batches[t].empty()) continue;
    const auto grad_rows = row_gradients<acc_t, scalar_t>(pr, t, go, scale);
    const std::vector<acc_t*> out = buffers(t, pr.shapes[t], pr.core_begin[t]);
    backward_table<scalar_t>(pr.shapes[t], table_core_ptrs<scalar_t>(cores, pr, t), pr.batches[t], grad_rows.row.data(),
                             out);
    consume(t, pr.batches[t], pr.shapes[t], pr.core_begin[t]);
  }
}

}  // namespace

Tensor tt_prepare_cpu(const std::vector<Tensor>& cores, const LookupArgs& a, const Tensor& indices_in,
                      const Tensor& offsets_in) {
  TORCH_CHECK(!cores.empty(), "ttdist: no cores given");
  const Tensor indices = indices_in.to(at::kLong).contiguous();
  const Tensor offsets = offsets_in.to(at::kLong).contiguous();
  return prepare(cores, a, indices, offsets, std::nullopt).plan;
}

Tensor tt_forward_cpu(const std::vector<Tensor>& cores, const LookupArgs& a, const Tensor& indices_in, const Tensor& offsets_in) {
  TORCH_CHECK(!cores.empty(), "ttdist: no cores given");
  const Tensor indices = indices_in.to(at::kLong).contiguous();
  const Tensor offsets = offsets_in.to(at::kLong).contiguous();
  Prepared pr = prepare(cores, a, indices, offsets, a.prepared);
  Tensor out = at::empty({pr.B, pr.total_dim}, cores[0].options());  // every (bag, feature) block is written
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, cores[0].scalar_type(), "tt_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto scale = position_scales<acc_t>(a, offsets.data_ptr<int64_t>(), pr.B, indices);
    const int64_t* off = offsets.data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t* weight = scale.empty() ? nullptr : scale.data();
    const int64_t F = static_cast<int64_t>(a.feature_table_map.size());
    std::vector<const acc_t*> src(pr.N);  // per position: its table's row in `rows`
    for (int64_t t = 0; t < static_cast<int64_t>(pr.shapes.size()); ++t) {
      const TableBatch& tb = pr.batches[t];
      const int64_t D = pr.shapes[t].dim;
      const std::unique_ptr<acc_t[]> rows(new acc_t[tb.U * D]);  // (U, D), all written: not zeroed
      forward_table<scalar_t>(pr.shapes[t], table_core_ptrs<scalar_t>(cores, pr, t), tb, rows.get());
      for (int64_t f = 0; f < F; ++f) {
        if (a.feature_table_map[f] != t) continue;
        parallel_chunks(pr.B, dynamic_grain(pr.B, 32), [&](int64_t b0, int64_t b1) {
          const int64_t* bag_off = off + f * pr.B + b0;
          for (int64_t j = bag_off[0]; j < bag_off[b1 - b0]; ++j) src[j] = rows.get() + pr.unique_of[j] * D;
          scalar_t* dst = o + b0 * pr.total_dim + pr.col_offset[f];
          if constexpr (std::is_same_v<acc_t, scalar_t>) {
            pool_rows<acc_t, acc_t>(b1 - b0, bag_off, D, src.data(), weight, reinterpret_cast<acc_t*>(dst), pr.total_dim);
          } else {
            std::vector<acc_t> bags((b1 - b0) * D);
            pool_rows<acc_t, acc_t>(b1 - b0, bag_off, D, src.data(), weight, bags.data(), D);
            for (int64_t b = 0; b < b1 - b0; ++b)
              for (int64_t e = 0; e < D; ++e) dst[b * pr.total_dim + e] = static_cast<scalar_t>(bags[b * D + e]);
          }
        });
      }
    }
  });
  return out;
}

std::vector<Tensor> tt_backward_cpu(const Tensor& grad_output, const std::vector<Tensor>& cores, const LookupArgs& a,
                                    const Tensor& indices, const Tensor& offsets) {
  std::vector<Tensor> out;
  for (const auto& c : cores) out.push_back(at::zeros_like(c));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, cores.at(0).scalar_type(), "tt_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // fp32 / fp64: accumulate straight into the (zeroed) results; bf16: into fp32 buffers.
    std::vector<std::vector<acc_t>> staging;
    backward_tables<scalar_t>(
        grad_output, cores, a, indices, offsets,
        [&](int64_t, const TableShape& s, int64_t begin) {
          std::vector<acc_t*> bufs;
          staging.clear();
          for (int64_t k = 0; k < s.d; ++k) {
            if constexpr (std::is_same_v<acc_t, scalar_t>) {
              bufs.push_back(reinterpret_cast<acc_t*>(out[begin + k].data_ptr<scalar_t>()));
            } else {
              staging.emplace_back(out[begin + k].numel(), acc_t(0));
              bufs.push_back(staging.back().data());
            }
          }
          return bufs;
        },
        [&](int64_t, const TableBatch&, const TableShape& s, int64_t begin) {
          if constexpr (!std::is_same_v<acc_t, scalar_t>) {
            for (int64_t k = 0; k < s.d; ++k) {
              Tensor g = at::from_blob(staging[k].data(), out[begin + k].sizes(),
                                       at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
              out[begin + k].copy_(g);
            }
          }
        });
  });
  return out;
}

void tt_backward_fused_cpu(const Tensor& grad_output, const std::vector<Tensor>& cores,
                           const std::vector<Tensor>& optimizer_states, const LookupArgs& a, const Tensor& indices,
                           const Tensor& offsets, int64_t optimizer, double learning_rate, double eps) {
  TORCH_CHECK(optimizer_states.size() == cores.size(), "ttdist: one optimizer state per core is required");
  for (size_t k = 0; k < cores.size(); ++k) {
    TORCH_CHECK_VALUE(cores[k].dim() == 4 && cores[k].size(0) > 0, "ttdist: core ", k,
                      " must be 4-D (p, r_in, q, r_out) with p >= 1, got ", cores[k].sizes());
    check_optimizer_state(cores[k], optimizer_states[k], cores[k].size(0), cores[k].numel() / cores[k].size(0), optimizer);
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, cores.at(0).scalar_type(), "tt_backward_fused_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<std::vector<acc_t>> grads;
    backward_tables<scalar_t>(
        grad_output, cores, a, indices, offsets,
        [&](int64_t, const TableShape& s, int64_t) {
          grads.clear();
          std::vector<acc_t*> bufs;
          for (int64_t k = 0; k < s.d; ++k) {
            grads.emplace_back(s.p[k] * s.slice[k], acc_t(0));
            bufs.push_back(grads.back().data());
          }
          return bufs;
        },
        [&](int64_t, const TableBatch& tb, const TableShape& s, int64_t begin) {
          for (int64_t k = 0; k < s.d; ++k) {
            // The slices of core k that this batch touched: every distinct digit i_k.
            std::vector<char> touched(s.p[k], 0);
            for (int64_t u = 0; u < tb.U; ++u) touched[tb.digits_of(u)[k]] = 1;
            std::vector<int64_t> ids;
            for (int64_t i = 0; i < s.p[k]; ++i)
              if (touched[i]) ids.push_back(i);
            const acc_t* g = grads[k].data();
            const int64_t len = s.slice[k];
            acc_t* state = optimizer == kOptimSGD ? nullptr : optimizer_states[begin + k].data_ptr<acc_t>();
            update_rows<scalar_t>(cores[begin + k].data_ptr<scalar_t>(), state, len, ids,
                                  [&](int64_t n) { return g + ids[n] * len; }, optimizer, learning_rate, eps);
          }
        });
  });
}

namespace {

// The optimizer step on rows `ids` (unique, in range) of `weight` (rows, len) from `row_grads`
// (ids.size(), len), after the state is checked.
void update_listed_rows(const Tensor& weight, const Tensor& optimizer_state, const std::vector<int64_t>& ids,
                        const Tensor& row_grads, int64_t optimizer, double learning_rate, double eps) {
  const int64_t len = weight.size(1);
  check_optimizer_state(weight, optimizer_state, weight.size(0), len, optimizer);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, weight.scalar_type(), "sparse_row_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* g = row_grads.data_ptr<acc_t>();
    acc_t* state = optimizer == kOptimSGD ? nullptr : optimizer_state.data_ptr<acc_t>();
    update_rows<scalar_t>(weight.data_ptr<scalar_t>(), state, len, ids, [&](int64_t n) { return g + n * len; },
                          optimizer, learning_rate, eps);
  });
}

}  // namespace

void sparse_row_update_cpu(const Tensor& weight, const Tensor& optimizer_state, const Tensor& row_ids_in,
                           const Tensor& row_grads_in, int64_t optimizer, double learning_rate, double eps) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "ttdist: sparse_row_update_ needs a contiguous 2-D weight");
  const Tensor row_ids = row_ids_in.to(at::kLong).contiguous();
  const Tensor row_grads = row_grads_in.to(at::toOpMathType(weight.scalar_type())).contiguous();
  const int64_t rows = weight.size(0), len = weight.size(1);
  TORCH_CHECK(row_grads.dim() == 2 && row_grads.size(0) == row_ids.numel() && row_grads.size(1) == len,
              "ttdist: row_grads must be (", row_ids.numel(), ", ", len, ")");
  std::vector<int64_t> ids(row_ids.data_ptr<int64_t>(), row_ids.data_ptr<int64_t>() + row_ids.numel());
  for (size_t n = 0; n < ids.size(); ++n)
    TORCH_CHECK_INDEX(ids[n] >= 0 && ids[n] < rows, "ttdist: row id ", ids[n], " at position ", n, " out of range [0, ",
                      rows, ")");
  std::vector<int64_t> sorted = ids;
  std::sort(sorted.begin(), sorted.end());
  const auto repeat = std::adjacent_find(sorted.begin(), sorted.end());
  TORCH_CHECK_VALUE(repeat == sorted.end(), "ttdist: row ids must be unique; row ", repeat == sorted.end() ? 0 : *repeat,
                    " repeats");
  update_listed_rows(weight, optimizer_state, ids, row_grads, optimizer, learning_rate, eps);
}

void dense_update_cpu(at::TensorList weights, at::TensorList optimizer_states, at::TensorList grads, int64_t optimizer,
                      double learning_rate, double eps) {
  TORCH_CHECK_VALUE(weights.size() == optimizer_states.size() && weights.size() == grads.size(), "ttdist: dense_update_ ",
                    "got ", weights.size(), " weights, ", optimizer_states.size(), " optimizer states and ", grads.size(),
                    " gradients");
  for (size_t i = 0; i < weights.size(); ++i) {
    TORCH_CHECK_VALUE(grads[i].sizes() == weights[i].sizes(), "ttdist: dense_update_: gradient ", i, " has shape ",
                      grads[i].sizes(), " but its weight has ", weights[i].sizes());
    TORCH_CHECK(weights[i].is_contiguous(), "ttdist: dense_update_ needs a contiguous 2-D weight");
    const int64_t rows = weights[i].dim() > 0 ? weights[i].size(0) : 1;
    std::vector<int64_t> ids(rows);
    std::iota(ids.begin(), ids.end(), int64_t(0));
    update_listed_rows(weights[i].view({rows, -1}), optimizer_states[i], ids,
                       grads[i].reshape({rows, -1}).to(at::toOpMathType(weights[i].scalar_type())).contiguous(),
                       optimizer, learning_rate, eps);
  }
}

}  // namespace ttdist
