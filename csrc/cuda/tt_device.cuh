// The TT lookup algorithm as __host__ __device__ code: descriptors, per-item operations and
// block programs. Included by tt_kernels.cu (which launches them as CUDA kernels) and by
// tests/gpu/emulate_kernels.cu (which runs the very same code on the CPU, thread by thread,
// to check the index math without a GPU). Pure CUDA C++: no torch, no cuBLAS.
//
// Two execution shapes cover every kernel:
//   * item ops   `op(i)` for i in [0, n): one thread per item (grid-stride loop on the GPU).
//   * block programs `prog.phase(ph, item, shared, scratch, tid, nthreads) -> more`: one block
//     per item (grid-stride); phases are separated by __syncthreads(). Within a phase a thread
//     may read only what earlier phases wrote, and writes go to distinct places or through
//     atomics. No state lives in registers across phases, so a CPU can run a phase for every
//     tid in any order and get the GPU's result: that is what the emulator does.
//
// Notation (0-based, as csrc/cpu): table with d cores, core k is (p_k, r_k, q_k, r_{k+1}),
// r_0 = r_d = 1; S_k(i) is the (r_k, q_k r_{k+1}) slice of core k at digit i; the prefix
// P_k = S_0(i_0) x ... x S_k(i_k) is (Q_k, r_{k+1}) with Q_k = q_0 ... q_k.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "tt_kernels.h"

namespace ttdist {
namespace cuda {

#define TTD_HD __host__ __device__ __forceinline__
#if defined(__CUDA_ARCH__)
#define TTD_UNROLL _Pragma("unroll")
#else
#define TTD_UNROLL
#endif

constexpr int kMaxCores = 8;        // d <= 8 cores per table
constexpr int kMaxChunkRows = 32;   // unique rows per block-program item (one trie)
constexpr int kChunkThreads = 256;  // threads of the chunk programs (>= 32 * kMaxCores / 4)
constexpr int kUpdateThreads = 128; // threads of the optimizer-update programs (a power of two)
constexpr int kWarp = 32;
constexpr int kItemThreads = 256;   // threads per block of item ops
constexpr int kHotPositions = 64;   // a unique row with more positions has its gradient summed in pieces

enum : int { kOptSGD = 0, kOptAdagrad = 1, kOptRowwiseAdagrad = 2 };
enum : int { kPoolSum = 0, kPoolMean = 1 };

// ---------------------------------------------------------------------------------------------
// Scalars: cores are float, bf16 or double; everything is accumulated in float (double for
// double cores), like at::opmath_type on the CPU.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

TTD_HD float to_acc(float x) { return x; }
TTD_HD double to_acc(double x) { return x; }
TTD_HD float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

TTD_HD void from_acc(float x, float* out) { *out = x; }
TTD_HD void from_acc(double x, double* out) { *out = x; }
TTD_HD void from_acc(float x, __nv_bfloat16* out) { *out = __float2bfloat16(x); }  // round to nearest even

template <typename T>
TTD_HD void atomic_add(T* p, T v) {
#if defined(__CUDA_ARCH__)
  atomicAdd(p, v);
#else
  *p += v;
#endif
}

TTD_HD void atomic_min_u64(unsigned long long* p, unsigned long long v) {
#if defined(__CUDA_ARCH__)
  atomicMin(p, v);
#else
  if (v < *p) *p = v;
#endif
}

TTD_HD void atomic_add_u64(unsigned long long* p, unsigned long long v) {
#if defined(__CUDA_ARCH__)
  atomicAdd(p, v);
#else
  *p += v;
#endif
}

TTD_HD void atomic_max_i64(long long* p, long long v) {
#if defined(__CUDA_ARCH__)
  atomicMax(p, v);
#else
  if (v > *p) *p = v;
#endif
}

TTD_HD void atomic_max_u64(unsigned long long* p, unsigned long long v) {
#if defined(__CUDA_ARCH__)
  atomicMax(p, v);
#else
  if (v > *p) *p = v;
#endif
}

template <typename T>
TTD_HD T tt_min(T a, T b) { return a < b ? a : b; }
template <typename T>
TTD_HD T tt_max(T a, T b) { return a < b ? b : a; }

// Largest i in [0, n) with starts[i] <= x, for non-decreasing starts[0..n] (upper_bound - 1,
// clamped into [0, n - 1]). Picks the last of several equal starts, i.e. skips empty segments.
TTD_HD int64_t find_segment(const int64_t* starts, int64_t n, int64_t x) {
  int64_t lo = 0, hi = n + 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (starts[mid] <= x) lo = mid + 1;
    else hi = mid;
  }
  return tt_min<int64_t>(tt_max<int64_t>(lo - 1, 0), n - 1);
}

// First i in [0, n) with keys[i] >= key (n when none).
TTD_HD int64_t lower_bound_u64(const uint64_t* keys, int64_t n, uint64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] < key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// ---------------------------------------------------------------------------------------------
// Descriptors (built on the host, copied to the device once per op call).
// ---------------------------------------------------------------------------------------------
struct TableDesc {
  int32_t d;           // number of cores
  int32_t dim;         // D = prod q
  int32_t core_begin;  // index of core 0 in the CoreDesc array
  int32_t scratch_elems;               // scratch one block needs for this table (chosen R)
  int32_t p[kMaxCores], q[kMaxCores];  //
  int32_t r[kMaxCores + 1];            // r[0] = r[d] = 1
  int32_t pad0;
  int32_t Q[kMaxCores];           // q_0 * ... * q_k
  int32_t slice[kMaxCores];       // r_k q_k r_{k+1}: elements of one slice of core k
  int32_t ld[kMaxCores];          // row pitch of a P_k / dP_k node in scratch: r_{k+1} made odd
  int32_t node_elems[kMaxCores];  // Q_k * ld_k: scratch elements of one level-k node (k <= d-2)
  int32_t off_p[kMaxCores];       // scratch offset of the level-k node buffer P_k (elements)
  int32_t off_dp[kMaxCores];      // scratch offset of dP_k (backward programs only)
  int64_t num_rows;               // prod p
  int64_t valid_rows;             // rows an index may name (num_embeddings <= prod p)
  int64_t key_base;               // sort key of row 0 (tables stacked in one key space)
  int64_t row_stride[kMaxCores];  // p_{k+1} * ... * p_{d-1}; digit i_k = row / stride % p_k
};

struct FeatureDesc {
  int32_t table;
  int32_t pooling;  // kPoolSum | kPoolMean
  int32_t dim;      // D of its table
  int32_t pad0;
  int64_t col;      // first output column
};

struct CoreDesc {
  const void* weight;  // scalar_t, (p, r_in, q, r_out) contiguous
  void* grad;          // acc_t, same shape (backward accumulators), or null
  void* state;         // acc_t optimizer state (Adagrad: like the core; row-wise: (p,)), or null
  int64_t rows;        // p
  int64_t slice_len;   // r_in q r_out
  int64_t slice_base;  // global index of slice 0 over all cores (touched flags)
};

// Per-table results of the preparation, computed on the device (T + 1 entries each; entry T
// holds the totals).
struct PlanView {
  int64_t* ubegin;       // first global unique row of table t (sorted by (table, row))
  int64_t* chunk_begin;  // first chunk (block-program item) of table t
  int64_t* row_off;      // offset (elements) of table t's rows in the row buffers
};

// Counts of the sorted index (part of what tt_prepare saves). Zeroed before the preparation, so
// the first bad position is kept flipped (~j: the smallest j has the largest ~j, and 0 is none).
struct IndexStatus {
  unsigned long long first_bad_flipped;  // ~(smallest position with an out-of-range index); 0: none
  unsigned long long bad_count;          // number of out-of-range indices
  unsigned long long bad_offsets;        // 1 if offsets are not 0 .. N non-decreasing
  unsigned long long num_unique;         // unique (table, row) keys incl. the invalid sentinel
};

// ---------------------------------------------------------------------------------------------
// Shared-memory accumulation and warp shuffles. On the GPU: plain code and __shfl_xor_sync. On
// the host the emulator (tests/gpu/emulate_kernels.cu) installs hooks that run the lanes of a
// warp as coroutines meeting at every shuffle, and that check that no two threads of a block
// read-modify-write one address in one phase without atomics.
// ---------------------------------------------------------------------------------------------
struct HostEmulationHooks {
  double (*shfl_xor)(double value, int lane_mask) = nullptr;  // this lane's partner's value
  void (*exclusive_access)(const void* address) = nullptr;     // called before a non-atomic update
};
inline HostEmulationHooks& host_hooks() {
  static HostEmulationHooks hooks;
  return hooks;
}

template <typename T>
TTD_HD T shfl_xor(T v, int lane_mask) {
#if defined(__CUDA_ARCH__)
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
#else
  return static_cast<T>(host_hooks().shfl_xor(static_cast<double>(v), lane_mask));
#endif
}

// *p += v where no other thread of the block touches *p in this phase (not atomic).
template <typename T>
TTD_HD void exclusive_add(T* p, T v) {
#if !defined(__CUDA_ARCH__)
  if (host_hooks().exclusive_access != nullptr) host_hooks().exclusive_access(p);
#endif
  *p += v;
}

struct RowUpdateStatus {
  unsigned long long first_bad;  // smallest list position with an out-of-range id
  unsigned long long bad_count;
  unsigned long long duplicates;  // 1 if an id repeats
  long long duplicate_value;      // the largest repeated id
};

// ---------------------------------------------------------------------------------------------
// Preparation item ops: validate, build sort keys, find unique rows, plan the chunks.
// ---------------------------------------------------------------------------------------------

// offsets must be 0 = o[0] <= o[1] <= ... <= o[nbags] = N.
struct CheckOffsetsOp {
  const int64_t* offsets;
  int64_t nbags;
  int64_t num_indices;
  IndexStatus* status;
  TTD_HD void operator()(int64_t x) const {
    const int64_t o = offsets[x];
    const bool bad = o < 0 || o > num_indices || (x == 0 && o != 0) || (x == nbags && o != num_indices) ||
                     (x > 0 && o < offsets[x - 1]);
    if (bad) atomic_max_u64(&status->bad_offsets, 1ull);
  }
};

// Position j: its bag, its table, the range check and its sort key (table key_base + row;
// out-of-range rows get the sentinel key_space, which sorts last and is never looked up).
struct PositionsOp {
  const int64_t* indices;
  const int64_t* offsets;
  int64_t nbags;  // F * B >= 1
  int64_t batch;  // B
  const FeatureDesc* features;
  const TableDesc* tables;
  uint64_t key_space;
  uint64_t* keys;
  int64_t* positions;
  int64_t* bag_of;
  IndexStatus* status;
  TTD_HD void operator()(int64_t j) const {
    const int64_t fb = find_segment(offsets, nbags, j);
    const int64_t f = fb / batch;
    const TableDesc& tab = tables[features[f].table];
    const int64_t row = indices[j];
    uint64_t key = key_space;
    if (row >= 0 && row < tab.valid_rows) {
      key = static_cast<uint64_t>(tab.key_base) + static_cast<uint64_t>(row);
    } else {
      atomic_max_u64(&status->first_bad_flipped, ~static_cast<unsigned long long>(j));
      atomic_add_u64(&status->bad_count, 1ull);
    }
    keys[j] = key;
    positions[j] = j;
    bag_of[j] = fb;
  }
};

struct HeadFlagsOp {
  const uint64_t* sorted_keys;
  int64_t* head;
  TTD_HD void operator()(int64_t n) const { head[n] = (n == 0 || sorted_keys[n] != sorted_keys[n - 1]) ? 1 : 0; }
};

// uid1 = inclusive prefix sum of the head flags: sorted position n belongs to unique uid1[n] - 1.
// Positions with an out-of-range index (the sentinel key, sorted last) get unique id -1.
struct ScatterUniqueOp {
  uint64_t key_space;  // the sentinel
  const uint64_t* sorted_keys;
  const int64_t* order;  // order[n]: original position of sorted position n
  const int64_t* head;
  const int64_t* uid1;
  int64_t num_indices;
  int64_t* unique_of;  // [N] original position -> unique id
  uint64_t* ukey;      // [U] unique keys (ascending)
  int64_t* useg;       // [U + 1] first sorted position of each unique key
  IndexStatus* status;
  TTD_HD void operator()(int64_t n) const {
    const int64_t u = uid1[n] - 1;
    unique_of[order[n]] = sorted_keys[n] == key_space ? -1 : u;
    if (head[n]) {
      useg[u] = n;
      ukey[u] = sorted_keys[n];
    }
    if (n == num_indices - 1) {
      useg[u + 1] = num_indices;
      status->num_unique = static_cast<unsigned long long>(u + 1);
    }
  }
};

// One thread: per-table unique ranges, chunk counts (R rows per chunk) and row-buffer offsets.
// Reads the sorted index only; what depends on R goes to this op's plan.
struct PlanOp {
  const TableDesc* tables;
  int64_t num_tables;
  int64_t chunk_rows;
  const uint64_t* ukey;
  uint64_t key_space;
  const IndexStatus* index;
  PlanView plan;
  unsigned long long* total_chunks;  // block-program items of this op
  TTD_HD void operator()(int64_t) const {
    const int64_t U = static_cast<int64_t>(index->num_unique);
    for (int64_t t = 0; t <= num_tables; ++t) {
      const uint64_t base = t < num_tables ? static_cast<uint64_t>(tables[t].key_base) : key_space;
      plan.ubegin[t] = lower_bound_u64(ukey, U, base);
    }
    int64_t chunks = 0, row_off = 0;
    for (int64_t t = 0; t < num_tables; ++t) {
      const int64_t count = plan.ubegin[t + 1] - plan.ubegin[t];
      plan.chunk_begin[t] = chunks;
      plan.row_off[t] = row_off;
      chunks += (count + chunk_rows - 1) / chunk_rows;
      row_off += (count * tables[t].dim + 3) / 4 * 4;  // 16-byte aligned table blocks
    }
    plan.chunk_begin[num_tables] = chunks;
    plan.row_off[num_tables] = row_off;
    *total_chunks = static_cast<unsigned long long>(chunks);
  }
};

// Pooling factor of position j in bag fb: per-sample weight, divided by the bag length for mean
// bags (the CPU kernel's order: w, then w / len).
template <typename acc_t>
TTD_HD acc_t position_scale(const acc_t* psw, int64_t j, int pooling, int64_t bag_len) {
  acc_t w = psw != nullptr ? psw[j] : acc_t(1);
  if (pooling == kPoolMean) w = w / static_cast<acc_t>(bag_len);
  return w;
}

// ---------------------------------------------------------------------------------------------
// Forward pooling: item = (bag fb, lane); a warp per bag, lanes over the row's columns.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
struct PoolOp {
  using acc_t = typename AccOf<scalar_t>::type;
  int64_t num_indices;
  const int64_t* offsets;  // clamped into [0, N]: malformed offsets (recorded) never index out of bounds
  const int64_t* unique_of;
  const acc_t* psw;
  const FeatureDesc* features;
  PlanView plan;
  const acc_t* rows;  // row buffer
  scalar_t* out;      // (B, total_dim)
  int64_t batch;
  int64_t total_dim;
  TTD_HD void operator()(int64_t item) const {
    const int64_t fb = item / kWarp;
    const int lane = static_cast<int>(item - fb * kWarp);
    const int64_t f = fb / batch, b = fb - f * batch;
    const FeatureDesc fd = features[f];
    const int64_t lo = tt_min(tt_max<int64_t>(offsets[fb], 0), num_indices);
    const int64_t hi = tt_min(tt_max(offsets[fb + 1], lo), num_indices);
    const int64_t ub = plan.ubegin[fd.table], base = plan.row_off[fd.table];
    scalar_t* dst = out + b * total_dim + fd.col;
    for (int e = lane; e < fd.dim; e += kWarp) {
      acc_t acc = 0;
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t u = unique_of[j];
        if (u >= 0) acc += position_scale(psw, j, fd.pooling, hi - lo) * rows[base + (u - ub) * fd.dim + e];
      }
      from_acc(acc, dst + e);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Backward: gradient of every unique row, summed over its positions in sorted (= position)
// order: deterministic. A warp per row (lanes over columns); a hot row (more than
// kHotPositions positions, e.g. a Zipf-head id in many bags) is summed by many warps in pieces of
// kHotPositions positions, each into its own partial, and the partials are then added in piece
// order, so no warp walks more than kHotPositions positions and the sum stays deterministic.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
struct RowGradSum {
  using acc_t = typename AccOf<scalar_t>::type;
  const FeatureDesc* features;
  const int64_t* order;
  const int64_t* bag_of;
  const int64_t* offsets;
  const acc_t* psw;
  const scalar_t* grad_output;  // (B, total_dim)
  int64_t batch;
  int64_t total_dim;

  // dst[e] = sum over sorted positions n in [n0, n1) of scale(j) * grad_output[b(j), col + e].
  TTD_HD void operator()(int64_t n0, int64_t n1, int D, int lane, acc_t* dst) const {
    for (int e = lane; e < D; e += kWarp) {
      acc_t acc = 0;
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t j = order[n], fb = bag_of[j];
        const int64_t f = fb / batch, b = fb - f * batch;
        const FeatureDesc& fd = features[f];
        const acc_t s = position_scale(psw, j, fd.pooling, offsets[fb + 1] - offsets[fb]);
        acc += s * to_acc(grad_output[b * total_dim + fd.col + e]);
      }
      dst[e] = acc;
    }
  }
};

// Where unique row u's gradient goes in the row buffer, and its dim.
struct RowSlot {
  const TableDesc* tables;
  int64_t num_tables;
  PlanView plan;
  TTD_HD int64_t offset(int64_t u, int* dim) const {
    const int64_t t = find_segment(plan.ubegin, num_tables, u);
    *dim = tables[t].dim;
    return plan.row_off[t] + (u - plan.ubegin[t]) * tables[t].dim;
  }
};

// Pieces of every unique row (0 unless hot); u ranges over a host bound, valid u < ubegin[T].
struct PieceCountOp {
  PlanView plan;
  int64_t num_tables;
  const int64_t* useg;
  int64_t* pieces;
  TTD_HD void operator()(int64_t u) const {
    const int64_t len = u < plan.ubegin[num_tables] ? useg[u + 1] - useg[u] : 0;
    pieces[u] = len > kHotPositions ? (len + kHotPositions - 1) / kHotPositions : 0;
  }
};

// item = (unique u, lane): rows that are not hot.
template <typename scalar_t>
struct GradRowsOp {
  using acc_t = typename AccOf<scalar_t>::type;
  RowSlot slot;
  RowGradSum<scalar_t> sum;
  const int64_t* useg;
  acc_t* grad_rows;  // row buffer layout
  TTD_HD void operator()(int64_t item) const {
    const int64_t u = item / kWarp;
    if (u >= slot.plan.ubegin[slot.num_tables]) return;
    const int64_t n0 = useg[u], n1 = useg[u + 1];
    if (n1 - n0 > kHotPositions) return;  // GradPiecesOp + ReduceHotRowsOp
    int D = 0;
    const int64_t off = slot.offset(u, &D);
    sum(n0, n1, D, static_cast<int>(item - u * kWarp), grad_rows + off);
  }
};

// item = (piece, lane): piece p of a hot row into partials[p * max_dim ...].
template <typename scalar_t>
struct GradPiecesOp {
  using acc_t = typename AccOf<scalar_t>::type;
  RowSlot slot;
  RowGradSum<scalar_t> sum;
  const int64_t* useg;
  const int64_t* piece_end;  // inclusive prefix sum of the pieces per unique row (host-bound entries)
  int64_t unique_bound;
  int64_t max_dim;
  acc_t* partials;
  TTD_HD void operator()(int64_t item) const {
    const int64_t p = item / kWarp;
    const int64_t U = slot.plan.ubegin[slot.num_tables];
    if (U == 0 || p >= piece_end[unique_bound - 1]) return;
    int64_t lo = 0, hi = U;  // first u with piece_end[u] > p
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (piece_end[mid] <= p) lo = mid + 1;
      else hi = mid;
    }
    const int64_t u = lo, first = u > 0 ? piece_end[u - 1] : 0;
    const int64_t n0 = useg[u] + (p - first) * kHotPositions, n1 = tt_min(useg[u + 1], n0 + kHotPositions);
    int D = 0;
    slot.offset(u, &D);
    sum(n0, n1, D, static_cast<int>(item - p * kWarp), partials + p * max_dim);
  }
};

// item = (unique u, lane): a hot row's gradient = its partials added in piece order.
template <typename acc_t>
struct ReduceHotRowsOp {
  RowSlot slot;
  const int64_t* piece_end;
  int64_t max_dim;
  const acc_t* partials;
  acc_t* grad_rows;
  TTD_HD void operator()(int64_t item) const {
    const int64_t u = item / kWarp;
    if (u >= slot.plan.ubegin[slot.num_tables]) return;
    const int64_t first = u > 0 ? piece_end[u - 1] : 0, last = piece_end[u];
    if (last == first) return;  // not hot
    int D = 0;
    acc_t* dst = grad_rows + slot.offset(u, &D);
    for (int e = static_cast<int>(item - u * kWarp); e < D; e += kWarp) {
      acc_t acc = 0;
      for (int64_t p = first; p < last; ++p) acc += partials[p * max_dim + e];
      dst[e] = acc;
    }
  }
};

template <typename scalar_t>
struct ConvertOp {
  using acc_t = typename AccOf<scalar_t>::type;
  const acc_t* src;
  scalar_t* dst;
  TTD_HD void operator()(int64_t i) const { from_acc(src[i], dst + i); }
};

// ---------------------------------------------------------------------------------------------
// Chunk programs: one block walks the trie of R consecutive sorted unique rows of one table.
// Level-synchronous: every distinct prefix (node) of a level is computed once, all nodes of a
// level in one phase (in parallel), so rows sharing leading digits share P_0 .. P_{d-2}.
// ---------------------------------------------------------------------------------------------
struct ChunkShared {
  TableDesc tab;
  int32_t table, nrows;
  int64_t local0;  // index of the chunk's first row within its table's unique rows
  int64_t u0;      // its global unique index
  int64_t row[kMaxChunkRows];
  int32_t count[kMaxCores];                          // nodes per level
  int32_t head[kMaxCores][kMaxChunkRows];            // row i starts a new level-k node
  int32_t digit_of_row[kMaxCores][kMaxChunkRows];    // i_k of row i
  int32_t node_of[kMaxCores][kMaxChunkRows];         // level-k node of row i
  int32_t node_row[kMaxCores][kMaxChunkRows];        // first row of level-k node j
  int32_t node_digit[kMaxCores][kMaxChunkRows];      // i_k of level-k node j
  int32_t node_parent[kMaxCores][kMaxChunkRows];     // level-(k-1) node of level-k node j
};

// Phases 0-3 shared by both chunk programs. Returns false for phases it does not own.
struct ChunkSetup {
  const TableDesc* tables;
  int64_t num_tables;
  PlanView plan;
  const uint64_t* ukey;
  int chunk_rows;

  // Phase 0 (thread 0): which table and rows; phase 1: rows; phase 2: digits and node heads;
  // phase 3: node numbering (prefix count of heads).
  TTD_HD void run(int ph, int64_t chunk, ChunkShared& sh, int tid, int nt) const {
    if (ph == 0) {
      if (tid == 0) {
        const int64_t t = find_segment(plan.chunk_begin, num_tables, chunk);
        sh.table = static_cast<int32_t>(t);
        sh.tab = tables[t];
        sh.local0 = (chunk - plan.chunk_begin[t]) * chunk_rows;
        sh.u0 = plan.ubegin[t] + sh.local0;
        const int64_t count = plan.ubegin[t + 1] - plan.ubegin[t];
        sh.nrows = static_cast<int32_t>(tt_min<int64_t>(chunk_rows, count - sh.local0));
      }
      return;
    }
    const TableDesc& tb = sh.tab;
    const int n = sh.nrows;
    if (ph == 1) {
      for (int i = tid; i < n; i += nt) sh.row[i] = static_cast<int64_t>(ukey[sh.u0 + i] - static_cast<uint64_t>(tb.key_base));
    } else if (ph == 2) {
      for (int w = tid; w < tb.d * n; w += nt) {
        const int k = w / n, i = w - k * n;
        const int64_t prefix = sh.row[i] / tb.row_stride[k];
        sh.head[k][i] = (i == 0 || prefix != sh.row[i - 1] / tb.row_stride[k]) ? 1 : 0;
        sh.digit_of_row[k][i] = static_cast<int32_t>(prefix % tb.p[k]);
      }
    } else if (ph == 3) {
      for (int w = tid; w < tb.d * n; w += nt) {
        const int k = w / n, i = w - k * n;
        int c = 0;
TTD_UNROLL
        for (int x = 0; x < kMaxChunkRows; ++x) c += (x <= i) ? sh.head[k][x] : 0;
        sh.node_of[k][i] = c - 1;
        if (sh.head[k][i]) {
          sh.node_row[k][c - 1] = i;
          sh.node_digit[k][c - 1] = sh.digit_of_row[k][i];
        }
        if (i == n - 1) sh.count[k] = c;
      }
    }
  }

  // Phase 4 part: parents of the nodes of levels 1..d-1.
  TTD_HD static void parents(ChunkShared& sh, int tid, int nt) {
    const int d = sh.tab.d;
    for (int w = tid; w < d * kMaxChunkRows; w += nt) {
      const int k = w / kMaxChunkRows, j = w - k * kMaxChunkRows;
      if (k >= 1 && j < sh.count[k]) sh.node_parent[k][j] = sh.node_of[k - 1][sh.node_row[k][j]];
    }
  }
};

// Level 0: P_0[j] = S_0(i_0), (q_0, r_1), into a padded node (pitch ld_0).
template <typename scalar_t, typename acc_t>
TTD_HD void level0_forward(const ChunkShared& sh, const scalar_t* core0, acc_t* P0, int tid, int nt) {
  const TableDesc& tb = sh.tab;
  const int r1 = tb.r[1], n = tb.slice[0];
  for (int w = tid; w < sh.count[0] * n; w += nt) {
    const int j = w / n, e = w - j * n;
    const int m = e / r1, s = e - m * r1;
    P0[j * tb.node_elems[0] + m * tb.ld[0] + s] = to_acc(core0[static_cast<int64_t>(sh.node_digit[0][j]) * n + e]);
  }
}

// Level k >= 1: for every level-k node j, C = P_{k-1}[parent] (M = Q_{k-1}, K = r_k) @
// S_k(i_k) (K, N = q_k r_{k+1}). Work item = (node, 4 rows of C, column); consecutive threads take
// consecutive columns: the slice is read coalesced, P_{k-1} is a shared-memory broadcast.
// Middle levels store into the padded node P_k; the last level (k = d-1) writes the finished row
// (Q_{d-1} = D values) to `rows` at the chunk's row offset.
template <typename scalar_t, typename acc_t>
TTD_HD void level_forward(const ChunkShared& sh, int k, const scalar_t* core, const acc_t* Pprev, acc_t* Pk,
                          acc_t* rows, int tid, int nt) {
  const TableDesc& tb = sh.tab;
  const int M = tb.Q[k - 1], K = tb.r[k], qk = tb.q[k], rk1 = tb.r[k + 1], N = qk * rk1;
  const int Mc = (M + 3) / 4;
  const int lda = tb.ld[k - 1], a_node = tb.node_elems[k - 1];
  const bool last = (k == tb.d - 1);
  const int total = sh.count[k] * Mc * N;
  for (int w = tid; w < total; w += nt) {
    const int col = w % N;
    const int t2 = w / N;
    const int mc = t2 % Mc, j = t2 / Mc;
    const int m0 = mc * 4;
    const acc_t* A = Pprev + sh.node_parent[k][j] * a_node;
    const acc_t* a0 = A + tt_min(m0, M - 1) * lda;
    const acc_t* a1 = A + tt_min(m0 + 1, M - 1) * lda;
    const acc_t* a2 = A + tt_min(m0 + 2, M - 1) * lda;
    const acc_t* a3 = A + tt_min(m0 + 3, M - 1) * lda;
    const scalar_t* S = core + static_cast<int64_t>(sh.node_digit[k][j]) * tb.slice[k] + col;
    acc_t c0 = 0, c1 = 0, c2 = 0, c3 = 0;
    for (int kk = 0; kk < K; ++kk) {
      const acc_t s = to_acc(S[kk * N]);
      c0 += a0[kk] * s;
      c1 += a1[kk] * s;
      c2 += a2[kk] * s;
      c3 += a3[kk] * s;
    }
    const acc_t c[4] = {c0, c1, c2, c3};
    if (last) {
      acc_t* dst = rows + (sh.local0 + j) * static_cast<int64_t>(tb.dim);
TTD_UNROLL
      for (int i = 0; i < 4; ++i)
        if (m0 + i < M) dst[(m0 + i) * N + col] = c[i];
    } else {
      const int b = col / rk1, s = col - b * rk1;
      acc_t* dst = Pk + j * tb.node_elems[k];
TTD_UNROLL
      for (int i = 0; i < 4; ++i)
        if (m0 + i < M) dst[((m0 + i) * qk + b) * tb.ld[k] + s] = c[i];
    }
  }
}

// Forward chunk program: rows of R unique rows -> row buffer (acc_t).
// Phases: 0-3 setup, 4 parents + level 0, 4 + k level k (k = 1..d-1).
template <typename scalar_t>
struct RowsProgram {
  using acc_t = typename AccOf<scalar_t>::type;
  using scratch_t = acc_t;
  using Shared = ChunkShared;
  static constexpr int kThreads = kChunkThreads;
  ChunkSetup setup;
  const CoreDesc* cores;
  acc_t* rows;  // row buffer

  TTD_HD const scalar_t* core(const ChunkShared& sh, int k) const {
    return static_cast<const scalar_t*>(cores[sh.tab.core_begin + k].weight);
  }

  TTD_HD bool phase(int ph, int64_t chunk, ChunkShared& sh, acc_t* scratch, int tid, int nt) const {
    if (ph <= 3) {
      setup.run(ph, chunk, sh, tid, nt);
      return true;
    }
    const TableDesc& tb = sh.tab;
    const int d = tb.d;
    acc_t* chunk_rows = rows + setup.plan.row_off[sh.table];
    if (ph == 4) {
      ChunkSetup::parents(sh, tid, nt);
      if (d == 1) {  // the row is the slice
        const int D = tb.dim;
        const scalar_t* c0 = core(sh, 0);
        for (int w = tid; w < sh.nrows * D; w += nt) {
          const int i = w / D, e = w - i * D;
          chunk_rows[(sh.local0 + i) * D + e] = to_acc(c0[sh.row[i] * D + e]);
        }
        return false;
      }
      level0_forward(sh, core(sh, 0), scratch + tb.off_p[0], tid, nt);
      return true;
    }
    const int k = ph - 4;
    const bool last = (k == d - 1);
    level_forward(sh, k, core(sh, k), scratch + tb.off_p[k - 1], last ? nullptr : scratch + tb.off_p[k], chunk_rows,
                  tid, nt);
    return !last;
  }
};

// Sum over the `parts` (a power of two) consecutive lanes that computed partial sums of one
// output: every lane gets the total, the group's first lane is its leader. Every lane of the
// warp must call it (a full-mask shuffle).
template <typename acc_t>
TTD_HD acc_t group_sum(acc_t v, int parts, bool* leader, int tid) {
  for (int o = parts / 2; o > 0; o >>= 1) v += shfl_xor(v, o);
  *leader = (tid % parts) == 0;
  return v;
}

// Column split of a backward reduction over N columns: a power of two <= 8 that divides `mult`
// (so a lane's columns keep their position within an r-block), and <= N.
TTD_HD int col_parts(int N, int mult) {
  int cp = 8;
  while (cp > 1 && (cp > N || mult % cp != 0)) cp >>= 1;
  return cp;
}

// Backward chunk program: row gradients -> core gradients (atomics), with touched-slice flags.
// Phases: 0-3 setup (+ zero dP in 1), 4 parents + touched + level 0 forward, then forward levels
// 1..d-2 (prefixes kept for every level), the leaf level d-1, middle levels d-2..1, level 0.
template <typename scalar_t>
struct CoreGradProgram {
  using acc_t = typename AccOf<scalar_t>::type;
  using scratch_t = acc_t;
  using Shared = ChunkShared;
  static constexpr int kThreads = kChunkThreads;
  ChunkSetup setup;
  const CoreDesc* cores;
  const acc_t* grad_rows;  // row buffer layout
  unsigned char* touched;  // [total slices] or null

  TTD_HD const scalar_t* core(const ChunkShared& sh, int k) const {
    return static_cast<const scalar_t*>(cores[sh.tab.core_begin + k].weight);
  }
  TTD_HD acc_t* grad(const ChunkShared& sh, int k) const {
    return static_cast<acc_t*>(cores[sh.tab.core_begin + k].grad);
  }
  TTD_HD const acc_t* grad_row(const ChunkShared& sh, int i) const {
    return grad_rows + setup.plan.row_off[sh.table] + (sh.local0 + i) * static_cast<int64_t>(sh.tab.dim);
  }

  // dS_k(i_k) += P_{k-1}[parent]^T @ G_j for every level-k node j (k >= 1), where G_j is dP_k[j]
  // viewed as (M = Q_{k-1}, N = q_k r_{k+1}) (the leaf: the row gradient, (Q_{d-2}, q_{d-1})).
  // Item = (node, kk, column), columns fastest: coalesced atomics, P broadcast.
  TTD_HD void slice_grads(const ChunkShared& sh, int k, const acc_t* scratch, int tid, int nt) const {
    const TableDesc& tb = sh.tab;
    const bool leaf = (k == tb.d - 1);
    const int M = tb.Q[k - 1], K = tb.r[k], qk = tb.q[k], rk1 = tb.r[k + 1], N = qk * rk1;
    const acc_t* Pprev = scratch + tb.off_p[k - 1];
    const int lda = tb.ld[k - 1], a_node = tb.node_elems[k - 1];
    acc_t* dS = grad(sh, k);
    const int total = sh.count[k] * K * N;
    for (int w = tid; w < total; w += nt) {
      const int col = w % N, t2 = w / N;
      const int kk = t2 % K, j = t2 / K;
      const acc_t* A = Pprev + sh.node_parent[k][j] * a_node + kk;
      acc_t acc = 0;
      if (leaf) {
        const acc_t* g = grad_row(sh, j) + col;  // leaf nodes are the rows
        for (int m = 0; m < M; ++m) acc += A[m * lda] * g[m * N];
      } else {
        const int b = col / rk1, s = col - b * rk1;
        const acc_t* g = scratch + tb.off_dp[k] + j * tb.node_elems[k] + b * tb.ld[k] + s;
        const int step = qk * tb.ld[k];
        for (int m = 0; m < M; ++m) acc += A[m * lda] * g[m * step];
      }
      atomic_add(dS + static_cast<int64_t>(sh.node_digit[k][j]) * tb.slice[k] + kk * N + col, acc);
    }
  }

  // dP_{k-1}[p] (M x K) += sum over p's children j at level k of G_j (M x N) @ S_k(i_k)^T.
  // Item = (parent, 4 rows, kk, column part): `cp` consecutive lanes split the columns and are
  // summed by group_sum, so the slice rows are read in 32-byte pieces instead of 4 bytes per lane.
  TTD_HD void prefix_grads(const ChunkShared& sh, int k, acc_t* scratch, int tid, int nt) const {
    const TableDesc& tb = sh.tab;
    const bool leaf = (k == tb.d - 1);
    const int M = tb.Q[k - 1], K = tb.r[k], qk = tb.q[k], rk1 = tb.r[k + 1], N = qk * rk1;
    const int Mc = (M + 3) / 4;
    const int cp = leaf ? col_parts(N, N) : col_parts(N, rk1);
    const scalar_t* Sk = core(sh, k);
    acc_t* dPprev = scratch + tb.off_dp[k - 1];
    const int total = sh.count[k - 1] * Mc * K * cp;
    const int padded = (total + kWarp - 1) / kWarp * kWarp;  // whole warps take part in group_sum
    for (int w = tid; w < padded; w += nt) {
      const bool active = w < total;
      const int ww = active ? w : 0;
      const int part = ww % cp;
      int t2 = ww / cp;
      const int kk = t2 % K;
      t2 /= K;
      const int mc = t2 % Mc, p = t2 / Mc;
      const int m0 = mc * 4;
      acc_t c0 = 0, c1 = 0, c2 = 0, c3 = 0;
      if (active) {
        const int pr = sh.node_row[k - 1][p];
        const int cb = sh.node_of[k][pr];
        const int ce = (p + 1 < sh.count[k - 1]) ? sh.node_of[k][sh.node_row[k - 1][p + 1]] : sh.count[k];
        const int r0 = tt_min(m0, M - 1), r1 = tt_min(m0 + 1, M - 1), r2 = tt_min(m0 + 2, M - 1),
                  r3 = tt_min(m0 + 3, M - 1);
        for (int j = cb; j < ce; ++j) {
          const scalar_t* S = Sk + static_cast<int64_t>(sh.node_digit[k][j]) * tb.slice[k] + kk * N;
          if (leaf) {
            const acc_t* g = grad_row(sh, j);
            for (int col = part; col < N; col += cp) {
              const acc_t s = to_acc(S[col]);
              c0 += g[r0 * N + col] * s;
              c1 += g[r1 * N + col] * s;
              c2 += g[r2 * N + col] * s;
              c3 += g[r3 * N + col] * s;
            }
          } else {
            const acc_t* G = scratch + tb.off_dp[k] + j * tb.node_elems[k];
            const int ldk = tb.ld[k];
            const acc_t* g0 = G + r0 * qk * ldk;
            const acc_t* g1 = G + r1 * qk * ldk;
            const acc_t* g2 = G + r2 * qk * ldk;
            const acc_t* g3 = G + r3 * qk * ldk;
            for (int b = 0; b < qk; ++b)
              for (int s = part; s < rk1; s += cp) {
                const acc_t sv = to_acc(S[b * rk1 + s]);
                const int x = b * ldk + s;
                c0 += g0[x] * sv;
                c1 += g1[x] * sv;
                c2 += g2[x] * sv;
                c3 += g3[x] * sv;
              }
          }
        }
      }
      bool leader = false;
      c0 = group_sum(c0, cp, &leader, tid);
      c1 = group_sum(c1, cp, &leader, tid);
      c2 = group_sum(c2, cp, &leader, tid);
      c3 = group_sum(c3, cp, &leader, tid);
      if (active && leader) {
        acc_t* dst = dPprev + p * tb.node_elems[k - 1] + kk;
        const int ld = tb.ld[k - 1];
        if (m0 < M) exclusive_add(dst + m0 * ld, c0);
        if (m0 + 1 < M) exclusive_add(dst + (m0 + 1) * ld, c1);
        if (m0 + 2 < M) exclusive_add(dst + (m0 + 2) * ld, c2);
        if (m0 + 3 < M) exclusive_add(dst + (m0 + 3) * ld, c3);
      }
    }
  }

  TTD_HD bool phase(int ph, int64_t chunk, ChunkShared& sh, acc_t* scratch, int tid, int nt) const {
    if (ph == 0) {  // thread 0 writes sh.tab: nothing else may read it in this phase
      setup.run(ph, chunk, sh, tid, nt);
      return true;
    }
    if (ph <= 3) {
      setup.run(ph, chunk, sh, tid, nt);
      if (ph == 1 && sh.tab.d >= 2) {  // zero every dP (accumulated with +=)
        const TableDesc& tb = sh.tab;
        const int begin = tb.off_dp[0], end = tb.off_dp[tb.d - 2] + setup.chunk_rows * tb.node_elems[tb.d - 2];
        for (int e = begin + tid; e < end; e += nt) scratch[e] = acc_t(0);
      }
      return true;
    }
    const TableDesc& tb = sh.tab;
    const int d = tb.d;
    const int fwd_levels = d >= 2 ? d - 2 : 0;
    const int leaf_ph = 5 + fwd_levels;
    if (ph == 4) {
      ChunkSetup::parents(sh, tid, nt);
      if (touched != nullptr) {
        for (int w = tid; w < d * kMaxChunkRows; w += nt) {
          const int k = w / kMaxChunkRows, j = w - k * kMaxChunkRows;
          if (j < sh.count[k]) touched[cores[tb.core_begin + k].slice_base + sh.node_digit[k][j]] = 1;
        }
      }
      if (d >= 2) level0_forward(sh, core(sh, 0), scratch + tb.off_p[0], tid, nt);
      return true;
    }
    if (ph < leaf_ph) {  // forward level k = 1..d-2, keeping every P_k
      const int k = ph - 4;
      level_forward<scalar_t, acc_t>(sh, k, core(sh, k), scratch + tb.off_p[k - 1], scratch + tb.off_p[k], nullptr,
                                     tid, nt);
      return true;
    }
    if (ph == leaf_ph) {
      if (d == 1) {  // dS_0(row) += g
        const int D = tb.dim;
        acc_t* dS = grad(sh, 0);
        for (int w = tid; w < sh.nrows * D; w += nt) {
          const int i = w / D, e = w - i * D;
          atomic_add(dS + sh.row[i] * D + e, grad_row(sh, i)[e]);
        }
        return false;
      }
      slice_grads(sh, d - 1, scratch, tid, nt);
      prefix_grads(sh, d - 1, scratch, tid, nt);
      return true;
    }
    const int k = d - 1 - (ph - leaf_ph);  // d-2 .. 1 for middle levels, 0 at the end
    if (k >= 1) {
      slice_grads(sh, k, scratch, tid, nt);
      prefix_grads(sh, k, scratch, tid, nt);
      return true;
    }
    // Level 0: dS_0(i_0) += dP_0[j].
    const int r1 = tb.r[1], n = tb.slice[0];
    acc_t* dS = grad(sh, 0);
    const acc_t* dP0 = scratch + tb.off_dp[0];
    for (int w = tid; w < sh.count[0] * n; w += nt) {
      const int j = w / n, e = w - j * n;
      const int m = e / r1, s = e - m * r1;
      atomic_add(dS + static_cast<int64_t>(sh.node_digit[0][j]) * n + e, dP0[j * tb.node_elems[0] + m * tb.ld[0] + s]);
    }
    return false;
  }
};

// ---------------------------------------------------------------------------------------------
// Optimizer updates: one block per target row (a touched core slice, or a row of a 2-D weight).
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
struct UpdateTarget {
  using acc_t = typename AccOf<scalar_t>::type;
  scalar_t* w;
  const acc_t* g;
  acc_t* state;  // element-wise (len) or row-wise (1) state, or null for SGD
  int64_t len;
  bool active;
};

template <typename acc_t>
struct UpdateShared {
  acc_t partial[kUpdateThreads];
  acc_t step;
};

// Phases: SGD / Adagrad: 0 only. Row-wise Adagrad: 0 partial sums of g^2, 1..log2(nt) tree
// reduction, then thread 0 updates the state, then every thread updates the weights.
template <typename scalar_t, typename Resolver>
struct UpdateProgram {
  using acc_t = typename AccOf<scalar_t>::type;
  using scratch_t = acc_t;
  using Shared = UpdateShared<acc_t>;
  static constexpr int kThreads = kUpdateThreads;
  Resolver resolve;
  int optimizer;
  acc_t lr, eps;

  TTD_HD bool phase(int ph, int64_t item, Shared& sh, acc_t*, int tid, int nt) const {
    const UpdateTarget<scalar_t> t = resolve(item);
    if (!t.active) return false;
    if (optimizer == kOptSGD) {
      for (int64_t x = tid; x < t.len; x += nt) from_acc(to_acc(t.w[x]) - lr * t.g[x], t.w + x);
      return false;
    }
    if (optimizer == kOptAdagrad) {
      for (int64_t x = tid; x < t.len; x += nt) {
        const acc_t g = t.g[x];
        const acc_t s = t.state[x] + g * g;
        t.state[x] = s;
        from_acc(to_acc(t.w[x]) - lr * g / (sqrt(s) + eps), t.w + x);
      }
      return false;
    }
    int levels = 0;
    while ((1 << levels) < nt) ++levels;
    if (ph == 0) {
      acc_t sq = 0;
      for (int64_t x = tid; x < t.len; x += nt) sq += t.g[x] * t.g[x];
      sh.partial[tid] = sq;
      return true;
    }
    if (ph <= levels) {
      const int half = nt >> ph;
      if (tid < half) sh.partial[tid] += sh.partial[tid + half];
      return true;
    }
    if (ph == levels + 1) {
      if (tid == 0) {
        const acc_t s = t.state[0] + sh.partial[0] / static_cast<acc_t>(t.len);
        t.state[0] = s;
        sh.step = lr / (sqrt(s) + eps);
      }
      return true;
    }
    const acc_t step = sh.step;
    for (int64_t x = tid; x < t.len; x += nt) from_acc(to_acc(t.w[x]) - step * t.g[x], t.w + x);
    return false;
  }
};

// Fused backward: item = global slice index over all cores; active when the batch touched it.
template <typename scalar_t>
struct SliceResolver {
  using acc_t = typename AccOf<scalar_t>::type;
  const CoreDesc* cores;
  const int64_t* slice_base;  // [C + 1]
  int64_t num_cores;
  const unsigned char* touched;
  int optimizer;
  TTD_HD UpdateTarget<scalar_t> operator()(int64_t g) const {
    const int64_t c = find_segment(slice_base, num_cores, g);
    const CoreDesc& cd = cores[c];
    const int64_t i = g - slice_base[c], len = cd.slice_len;
    UpdateTarget<scalar_t> t;
    t.w = static_cast<scalar_t*>(const_cast<void*>(cd.weight)) + i * len;
    t.g = static_cast<const acc_t*>(cd.grad) + i * len;
    t.state = optimizer == kOptAdagrad ? static_cast<acc_t*>(cd.state) + i * len
              : optimizer == kOptRowwiseAdagrad ? static_cast<acc_t*>(cd.state) + i
                                                : nullptr;
    t.len = len;
    t.active = touched[g] != 0;
    return t;
  }
};

// sparse_row_update_: item = position n in the (unique) id list.
template <typename scalar_t>
struct RowResolver {
  using acc_t = typename AccOf<scalar_t>::type;
  int64_t rows;
  scalar_t* weight;
  acc_t* state;
  const int64_t* ids;
  const acc_t* grads;  // (n, len)
  int64_t len;
  int optimizer;
  TTD_HD UpdateTarget<scalar_t> operator()(int64_t n) const {
    const int64_t row = ids[n];
    UpdateTarget<scalar_t> t;
    t.active = row >= 0 && row < rows;  // an id out of range is recorded and skipped
    const int64_t r = t.active ? row : 0;
    t.w = weight + r * len;
    t.g = grads + n * len;
    t.state = optimizer == kOptAdagrad ? state + r * len : optimizer == kOptRowwiseAdagrad ? state + r : nullptr;
    t.len = len;
    return t;
  }
};

struct CheckRowIdsOp {
  const int64_t* ids;
  int64_t rows;
  RowUpdateStatus* status;
  TTD_HD void operator()(int64_t n) const {
    const int64_t id = ids[n];
    if (id < 0 || id >= rows) {
      atomic_min_u64(&status->first_bad, static_cast<unsigned long long>(n));
      atomic_add_u64(&status->bad_count, 1ull);
    }
  }
};

struct CheckDuplicatesOp {
  const int64_t* sorted_ids;
  RowUpdateStatus* status;
  TTD_HD void operator()(int64_t n) const {
    if (n > 0 && sorted_ids[n] == sorted_ids[n - 1]) {
      atomic_max_u64(&status->duplicates, 1ull);
      atomic_max_i64(&status->duplicate_value, sorted_ids[n]);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Error reports: one thread copies a call's first bad input into the caller's ErrorRecord,
// unless an earlier call's error is still there (stream order: no atomics needed).
// ---------------------------------------------------------------------------------------------
struct ReportLookupErrorsOp {
  const IndexStatus* status;
  const int64_t* indices;
  const int64_t* bag_of;
  const FeatureDesc* features;
  const TableDesc* tables;
  int64_t batch;
  int64_t num_indices;
  int64_t call;
  ErrorRecord* record;
  TTD_HD void operator()(int64_t) const {
    if (record->code != kErrNone) return;
    if (status->bad_offsets) {
      record->code = kErrOffsets;
      record->call = call;
      record->limit = num_indices;
      return;
    }
    if (status->bad_count == 0) return;
    const int64_t j = static_cast<int64_t>(~status->first_bad_flipped);
    const int64_t f = bag_of[j] / batch;
    const TableDesc& tab = tables[features[f].table];
    record->code = kErrIndex;
    record->call = call;
    record->position = j;
    record->value = indices[j];
    record->feature = f;
    record->table = features[f].table;
    record->limit = tab.valid_rows;
    record->count = static_cast<int64_t>(status->bad_count);
  }
};

struct ReportRowErrorsOp {
  const RowUpdateStatus* status;
  const int64_t* ids;
  int64_t rows;
  int64_t call;
  ErrorRecord* record;
  TTD_HD void operator()(int64_t) const {
    if (record->code != kErrNone || (status->bad_count == 0 && status->duplicates == 0)) return;
    record->call = call;
    record->limit = rows;
    if (status->bad_count) {
      const int64_t j = static_cast<int64_t>(status->first_bad);
      record->code = kErrRowId;
      record->position = j;
      record->value = ids[j];
      record->count = static_cast<int64_t>(status->bad_count);
    } else {
      record->code = kErrDuplicateRowId;
      record->value = static_cast<int64_t>(status->duplicate_value);
    }
  }
};

}  // namespace cuda
}  // namespace ttdist
