// Host-side driver of the TT ops, generic over an executor `Exec` that provides the primitives:
//
//   void* alloc(size_t bytes)                       temporary device memory (valid until return)
//   void upload(void* dst, const void* src, size_t)  host to device, stream-ordered, no wait
//   void zero(void* p, size_t bytes)
//   for_each(int64_t n, const Op& op)               op(i) for i in [0, n)
//   run_program(const Prog& prog, int64_t max_items, const unsigned long long* items, size_t smem_bytes,
//               int64_t global_scratch_elems)      items: device count <= max_items (null: max_items)
//   sort_pairs(keys_in, keys_out, vals_in, vals_out, n, key_bits)   stable, uint64 keys, int64 values
//   sort_keys(in, out, n)                           int64
//   inclusive_sum(in, out, n)                       int64
//   int sm_count(); size_t smem_optin();            multiprocessors; max dynamic smem per block
//   Status status();                                the first error seen (CUDA errors on the GPU)
//
// tt_kernels.cu instantiates it with the CUDA executor (kernels, CUB); the host emulator in
// tests/gpu/emulate_kernels.cu with a CPU executor. Everything here is host code, and none of it
// waits for the device: sizes that depend on the data are bounded from N and the kernels read
// the actual counts (unique rows, chunks, hot-row pieces) from device memory.
#pragma once

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "tt_device.cuh"
#include "tt_kernels.h"

namespace ttdist {
namespace cuda {

inline size_t dtype_size_of(DType t) { return t == DType::kFloat64 ? 8 : t == DType::kBFloat16 ? 2 : 4; }
inline size_t acc_size_of(DType t) { return t == DType::kFloat64 ? 8 : 4; }

// The validated, device-ready description of one lookup.
struct Problem {
  DType dtype = DType::kFloat32;
  int64_t T = 0, F = 0, C = 0, B = 0, N = 0, nbags = 0, total_dim = 0, max_dim = 1;
  uint64_t key_space = 0;  // sum of the tables' rows; also the invalid-row sentinel key
  int key_bits = 1;        // key_space < 2^key_bits
  std::vector<TableDesc> tables;
  std::vector<FeatureDesc> features;
  std::vector<CoreDesc> cores;
  std::vector<int64_t> slice_base;     // [C + 1]
  std::vector<int64_t> core_elem_off;  // [C + 1] offsets of the cores in one flat buffer
};

struct DriverOptions {
  int chunk_rows = 0;                // 0: choose; else force R (1..kMaxChunkRows)
  bool force_global_scratch = false;  // keep the chunk scratch in global memory
  size_t smem_budget = 48 * 1024;     // shared memory (static + dynamic) a chunk block aims to stay under:
                                      // 4 blocks of 256 threads per SM on H100, 3 on A100
};

inline std::string str(int64_t v) { return std::to_string(v); }

inline Status invalid(const std::string& m) { return Status::Error(Status::kInvalidArgument, "ttdist: " + m); }

inline Status build_problem(const LookupProblem& lp, Problem* out) {
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  Problem pb;
  pb.dtype = lp.dtype;
  pb.T = static_cast<int64_t>(lp.table_num_cores.size());
  pb.F = static_cast<int64_t>(lp.feature_table_map.size());
  pb.C = static_cast<int64_t>(lp.core_shapes.size());
  pb.N = lp.num_indices;
  if (pb.C == 0) return invalid("no cores given");
  if (static_cast<int64_t>(lp.cores.size()) != pb.C) return invalid("one device pointer per core is required");
  if (pb.F == 0) return invalid("feature_table_map must name at least one feature");
  if (static_cast<int64_t>(lp.pooling_modes.size()) != pb.F) return invalid("pooling_modes needs one entry per feature");
  if (!lp.table_num_rows.empty() && static_cast<int64_t>(lp.table_num_rows.size()) != pb.T)
    return invalid("table_num_rows needs one entry per table, got " + str(static_cast<int64_t>(lp.table_num_rows.size())) +
                   " for " + str(pb.T) + " tables");
  if (lp.num_offsets < 1 || (lp.num_offsets - 1) % pb.F != 0)
    return invalid("offsets must have F * B + 1 entries, got " + str(lp.num_offsets) + " for F = " + str(pb.F));
  if (pb.N < 0 || pb.N > kInt32Max) return invalid("at most 2^31 - 1 indices per call are supported, got " + str(pb.N));
  pb.nbags = lp.num_offsets - 1;
  pb.B = pb.nbags / pb.F;
  if (pb.nbags > (int64_t(1) << 56)) return invalid("too many bags");
  int64_t begin = 0;
  uint64_t key_space = 0;
  int64_t slices = 0, elems = 0;
  for (int64_t t = 0; t < pb.T; ++t) {
    const int64_t d = lp.table_num_cores[t];
    if (d < 1 || d > kMaxCores) return invalid("table " + str(t) + " has " + str(d) + " cores; 1.." + str(kMaxCores) + " are supported");
    if (begin + d > pb.C) return invalid("table_num_cores sums to more than the " + str(pb.C) + " cores given");
    TableDesc td;
    std::memset(&td, 0, sizeof(td));
    td.d = static_cast<int32_t>(d);
    td.core_begin = static_cast<int32_t>(begin);
    td.r[0] = 1;
    int64_t rows = 1, Q = 1;
    for (int64_t k = 0; k < d; ++k) {
      const auto& s = lp.core_shapes[begin + k];
      for (int x = 0; x < 4; ++x)
        if (s[x] < 1 || s[x] > kInt32Max) return invalid("core " + str(k) + " of table " + str(t) + " has an invalid size " + str(s[x]));
      if (s[1] != td.r[k])
        return invalid("core " + str(k) + " of table " + str(t) + " has r_in " + str(s[1]) + " but the previous core has r_out " + str(td.r[k]));
      const int64_t slice = s[1] * s[2] * s[3];
      if (slice > kInt32Max / 32)
        return invalid("core " + str(k) + " of table " + str(t) + " has slices of " + str(slice) +
                       " elements; at most 2^26 are supported");
      td.p[k] = static_cast<int32_t>(s[0]);
      td.q[k] = static_cast<int32_t>(s[2]);
      td.r[k + 1] = static_cast<int32_t>(s[3]);
      td.slice[k] = static_cast<int32_t>(slice);
      if (rows > (int64_t(1) << 62) / s[0]) return invalid("table " + str(t) + " has more than 2^62 rows");
      rows *= s[0];
      Q *= s[2];
      if (Q > kInt32Max / 64) return invalid("table " + str(t) + " is too wide (embedding dim >= 2^25)");
      td.Q[k] = static_cast<int32_t>(Q);
      const int64_t ld = s[3] % 2 == 0 ? s[3] + 1 : s[3];
      td.ld[k] = static_cast<int32_t>(ld);
      if (Q * ld > kInt32Max / 64) return invalid("table " + str(t) + ": prefix of core " + str(k) + " is too large");
      td.node_elems[k] = static_cast<int32_t>(Q * ld);
    }
    if (td.r[d] != 1) return invalid("the last core of table " + str(t) + " must have r_out = 1");
    td.dim = static_cast<int32_t>(Q);
    pb.max_dim = std::max<int64_t>(pb.max_dim, Q);
    td.num_rows = rows;
    td.valid_rows = rows;
    if (!lp.table_num_rows.empty()) {
      const int64_t valid = lp.table_num_rows[t];
      if (valid < 1 || valid > rows)
        return invalid("table_num_rows[" + str(t) + "] = " + str(valid) + " is not in [1, " + str(rows) +
                       "] (the product of the table's p)");
      td.valid_rows = valid;
    }
    int64_t stride = 1;
    for (int64_t k = d - 1; k >= 0; --k) {
      td.row_stride[k] = stride;
      stride *= td.p[k];
    }
    td.key_base = static_cast<int64_t>(key_space);
    key_space += static_cast<uint64_t>(rows);
    if (key_space > (uint64_t(1) << 62)) return invalid("the tables have more than 2^62 rows together");
    for (int64_t k = 0; k < d; ++k) {
      CoreDesc cd;
      cd.weight = lp.cores[begin + k];
      cd.grad = nullptr;
      cd.state = nullptr;
      cd.rows = td.p[k];
      cd.slice_len = td.slice[k];
      cd.slice_base = slices;
      pb.cores.push_back(cd);
      pb.slice_base.push_back(slices);
      pb.core_elem_off.push_back(elems);
      slices += td.p[k];
      elems += static_cast<int64_t>(td.p[k]) * td.slice[k];
    }
    pb.tables.push_back(td);
    begin += d;
  }
  if (begin != pb.C) return invalid("table_num_cores sums to " + str(begin) + " but " + str(pb.C) + " cores were given");
  pb.slice_base.push_back(slices);
  pb.core_elem_off.push_back(elems);
  pb.key_space = key_space;
  pb.key_bits = 1;
  while (pb.key_bits < 64 && (key_space >> pb.key_bits) != 0) ++pb.key_bits;
  for (int64_t f = 0; f < pb.F; ++f) {
    const int64_t t = lp.feature_table_map[f];
    if (t < 0 || t >= pb.T) return invalid("feature " + str(f) + " maps to table " + str(t) + ", valid range [0, " + str(pb.T) + ")");
    FeatureDesc fd;
    std::memset(&fd, 0, sizeof(fd));
    fd.table = static_cast<int32_t>(t);
    fd.pooling = lp.pooling_modes[f] == kPoolMean ? kPoolMean : kPoolSum;
    fd.dim = pb.tables[t].dim;
    fd.col = pb.total_dim;
    pb.total_dim += fd.dim;
    pb.features.push_back(fd);
  }
  *out = std::move(pb);
  return Status::Ok();
}

// Scratch elements per chunk row of one table: forward keeps P_0..P_{d-2} in two ping-pong
// buffers (even / odd levels); backward keeps every P_k and every dP_k.
inline int64_t fwd_row_elems(const TableDesc& t) {
  int64_t even = 0, odd = 0;
  for (int k = 0; k + 1 < t.d; ++k) (k % 2 == 0 ? even : odd) = std::max<int64_t>(k % 2 == 0 ? even : odd, t.node_elems[k]);
  return even + odd;
}
inline int64_t bwd_row_elems(const TableDesc& t) {
  int64_t sum = 0;
  for (int k = 0; k + 1 < t.d; ++k) sum += t.node_elems[k];
  return 2 * sum;
}

inline void apply_layout(TableDesc& t, int R, bool backward) {
  if (!backward) {
    int64_t even = 0;
    for (int k = 0; k + 1 < t.d; k += 2) even = std::max<int64_t>(even, t.node_elems[k]);
    for (int k = 0; k + 1 < t.d; ++k) t.off_p[k] = static_cast<int32_t>(k % 2 == 0 ? 0 : R * even);
    t.scratch_elems = static_cast<int32_t>(R * fwd_row_elems(t));
  } else {
    int64_t sum = 0;
    for (int k = 0; k + 1 < t.d; ++k) sum += t.node_elems[k];
    int64_t acc = 0;
    for (int k = 0; k + 1 < t.d; ++k) {
      t.off_p[k] = static_cast<int32_t>(R * acc);
      t.off_dp[k] = static_cast<int32_t>(R * (sum + acc));
      acc += t.node_elems[k];
    }
    t.scratch_elems = static_cast<int32_t>(R * bwd_row_elems(t));
  }
}

struct ChunkPlan {
  int rows = 1;                      // R: unique rows per block-program item
  size_t smem_bytes = 0;             // dynamic shared memory per block
  int64_t global_scratch_elems = 0;  // > 0: scratch per block in global memory instead
};

// Picks R (fits the shared-memory budget, and leaves ~4 chunks per multiprocessor when the
// batch is small: N bounds the number of unique rows) and lays out every table's scratch.
inline Status plan_chunks(std::vector<TableDesc>& tables, bool backward, size_t acc_bytes, int64_t num_indices,
                          int sm_count, size_t smem_optin, const DriverOptions& opt, ChunkPlan* plan) {
  int64_t row = 0;
  for (const auto& t : tables) row = std::max(row, backward ? bwd_row_elems(t) : fwd_row_elems(t));
  const int64_t row_bytes = row * static_cast<int64_t>(acc_bytes);
  const int64_t per_sm = std::max<int64_t>(1, static_cast<int64_t>(sm_count) * 4);
  const int64_t r_par = std::min<int64_t>(kMaxChunkRows, std::max<int64_t>(1, (num_indices + per_sm - 1) / per_sm));
  int64_t R;
  if (opt.chunk_rows > 0) R = std::min(opt.chunk_rows, kMaxChunkRows);
  else if (row_bytes == 0) R = r_par;
  else {
    const int64_t budget = static_cast<int64_t>(opt.smem_budget) - static_cast<int64_t>(sizeof(ChunkShared));
    R = std::max<int64_t>(1, std::min<int64_t>(r_par, std::max<int64_t>(budget, 0) / row_bytes));
  }
  if (R * row > std::numeric_limits<int32_t>::max()) return invalid("TT prefixes too large for one block's scratch");
  ChunkPlan p;
  p.rows = static_cast<int>(R);
  const int64_t need = R * row_bytes;
  if (opt.force_global_scratch || need > static_cast<int64_t>(smem_optin)) {
    p.smem_bytes = 0;
    p.global_scratch_elems = std::max<int64_t>(1, R * row);
  } else {
    p.smem_bytes = static_cast<size_t>(need);
  }
  for (auto& t : tables) apply_layout(t, p.rows, backward);
  *plan = p;
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// Preparation, in two parts.
//  * The sorted index of a batch: validation (recorded in the caller's ErrorRecord), sort by
//    (table, row), unique rows, their segments of positions, the bag of every position. It
//    depends only on indices, offsets, the feature -> table map and the tables' row counts, so
//    tt_prepare builds it once per batch into one int64 buffer that autograd saves for the
//    backward; an op not given one builds it into temporary memory.
//  * The plan of one op: descriptors (the scratch layout depends on the op's R, the cores may have
//    moved) and PlanOp (chunks of R unique rows), recomputed from the index's unique keys.
// Device arrays are sized by host bounds (U <= N unique rows); the counts live in device memory.
// ---------------------------------------------------------------------------------------------

// The sorted index: device arrays inside one int64 buffer, in this order.
struct SortedIndex {
  IndexStatus* status = nullptr;  // counts and bad input
  uint64_t* ukey = nullptr;       // [N] first U: unique keys, ascending
  int64_t* order = nullptr;       // [N] sorted position -> original position
  int64_t* bag_of = nullptr;      // [N] position -> bag f * B + b
  int64_t* unique_of = nullptr;   // [N] position -> unique id (-1: out-of-range index)
  int64_t* useg = nullptr;        // [N + 1] first U + 1: first sorted position of each unique key, then N
};

constexpr int64_t kIndexStatusWords = static_cast<int64_t>(sizeof(IndexStatus) / sizeof(int64_t));
static_assert(sizeof(IndexStatus) % sizeof(int64_t) == 0, "IndexStatus must be whole int64 words");

inline int64_t index_words(int64_t N) { return kIndexStatusWords + 5 * N + 1; }

inline SortedIndex index_view(int64_t* words, int64_t N) {
  SortedIndex ix;
  ix.status = reinterpret_cast<IndexStatus*>(words);
  int64_t* a = words + kIndexStatusWords;
  ix.ukey = reinterpret_cast<uint64_t*>(a);
  ix.order = a + N;
  ix.bag_of = a + 2 * N;
  ix.unique_of = a + 3 * N;
  ix.useg = a + 4 * N;
  return ix;
}

// Words of the buffer tt_prepare fills: the sorted index, then 0 .. kPreparedTagRange - 1 unused
// words (the tag). The tag is a hash of what the index depends on besides N (F, B, T, C, each
// table's cores and rows, the feature -> table map), so the length alone, which the host knows
// without reading device memory, tells a preparation made for another call apart: exactly when
// only N differs, and otherwise unless the tags collide (about 1 in kPreparedTagRange).
constexpr int64_t kPreparedTagRange = 4096;  // at most 32 KB of padding per saved batch
constexpr uint64_t kPreparedFormat = 1;      // change with the layout: older buffers stop matching

inline uint64_t mix64(uint64_t x) {  // splitmix64's finaliser
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

inline int64_t prepared_words(const Problem& pb) {
  uint64_t h = mix64(kPreparedFormat);
  const auto add = [&h](int64_t v) { h = mix64(h ^ static_cast<uint64_t>(v)); };
  for (int64_t v : {pb.F, pb.B, pb.T, pb.C}) add(v);
  for (const TableDesc& t : pb.tables) {
    add(t.d);
    add(t.num_rows);
    add(t.valid_rows);
  }
  for (const FeatureDesc& f : pb.features) add(f.table);
  return index_words(pb.N) + static_cast<int64_t>(h % static_cast<uint64_t>(kPreparedTagRange));
}

// What one op runs on: its descriptors and plan, and the sorted index (built here or saved).
struct Prepared {
  TableDesc* tables = nullptr;
  FeatureDesc* features = nullptr;
  CoreDesc* cores = nullptr;
  int64_t* slice_base = nullptr;
  SortedIndex index;
  PlanView plan{};
  unsigned long long* total_chunks = nullptr;  // device: chunks of this op's plan
  int64_t unique_bound = 0;  // >= valid unique rows (N)
  int64_t chunk_bound = 0;   // >= chunks (ceil(N / R) + T)
  int64_t rowbuf_bound = 0;  // >= row-buffer elements (N * max D + 4 T)
};

template <class Exec>
inline void* alloc_bytes(Exec& ex, size_t bytes) { return ex.alloc(std::max<size_t>(bytes, 16)); }

// Descriptors, the plan arrays and the zeroed chunk count: one upload.
template <class Exec>
void upload_descriptors(Exec& ex, const Problem& pb, Prepared* pr) {
  const int64_t T = pb.T;
  auto align = [](size_t x) { return (x + 255) / 256 * 256; };
  const size_t o_tab = 0, o_feat = align(o_tab + sizeof(TableDesc) * T),
               o_core = align(o_feat + sizeof(FeatureDesc) * pb.F), o_sb = align(o_core + sizeof(CoreDesc) * pb.C),
               o_plan = align(o_sb + sizeof(int64_t) * (pb.C + 1)), o_chunks = align(o_plan + sizeof(int64_t) * 3 * (T + 1)),
               total = align(o_chunks + sizeof(unsigned long long));
  std::vector<unsigned char> blob(total, 0);
  std::memcpy(blob.data() + o_tab, pb.tables.data(), sizeof(TableDesc) * T);
  std::memcpy(blob.data() + o_feat, pb.features.data(), sizeof(FeatureDesc) * pb.F);
  std::memcpy(blob.data() + o_core, pb.cores.data(), sizeof(CoreDesc) * pb.C);
  std::memcpy(blob.data() + o_sb, pb.slice_base.data(), sizeof(int64_t) * (pb.C + 1));
  unsigned char* dev = static_cast<unsigned char*>(alloc_bytes(ex, total));
  ex.upload(dev, blob.data(), total);
  pr->tables = reinterpret_cast<TableDesc*>(dev + o_tab);
  pr->features = reinterpret_cast<FeatureDesc*>(dev + o_feat);
  pr->cores = reinterpret_cast<CoreDesc*>(dev + o_core);
  pr->slice_base = reinterpret_cast<int64_t*>(dev + o_sb);
  int64_t* plan = reinterpret_cast<int64_t*>(dev + o_plan);
  pr->plan = PlanView{plan, plan + (T + 1), plan + 2 * (T + 1)};
  pr->total_chunks = reinterpret_cast<unsigned long long*>(dev + o_chunks);
}

// The sorted index of the batch into `ix`, and the first bad input into the caller's record.
template <class Exec>
void build_index(Exec& ex, const Problem& pb, const LookupInputs& in, const Prepared& desc, const SortedIndex& ix) {
  const int64_t N = pb.N;
  ex.zero(ix.status, sizeof(IndexStatus));
  ex.for_each(pb.nbags + 1, CheckOffsetsOp{in.offsets, pb.nbags, N, ix.status});
  if (N > 0 && pb.nbags > 0) {
    const size_t n8 = sizeof(int64_t) * static_cast<size_t>(N);
    uint64_t* keys = static_cast<uint64_t*>(alloc_bytes(ex, n8));
    uint64_t* skeys = static_cast<uint64_t*>(alloc_bytes(ex, n8));
    int64_t* pos = static_cast<int64_t*>(alloc_bytes(ex, n8));
    int64_t* head = static_cast<int64_t*>(alloc_bytes(ex, n8));
    int64_t* uid1 = static_cast<int64_t*>(alloc_bytes(ex, n8));
    ex.for_each(N, PositionsOp{in.indices, in.offsets, pb.nbags, pb.B, desc.features, desc.tables, pb.key_space, keys,
                               pos, ix.bag_of, ix.status});
    ex.sort_pairs(keys, skeys, pos, ix.order, N, pb.key_bits);
    ex.for_each(N, HeadFlagsOp{skeys, head});
    ex.inclusive_sum(head, uid1, N);
    ex.for_each(N, ScatterUniqueOp{pb.key_space, skeys, ix.order, head, uid1, N, ix.unique_of, ix.ukey, ix.useg,
                                   ix.status});
  }
  ex.for_each(1, ReportLookupErrorsOp{ix.status, in.indices, ix.bag_of, desc.features, desc.tables,
                                      std::max<int64_t>(pb.B, 1), N, in.call, in.errors});
}

inline Status check_prepared_words(const Problem& pb, int64_t words) {
  const int64_t want = prepared_words(pb);
  if (words == want) return Status::Ok();
  return invalid("`prepared` does not match this call: it has " + str(words) + " entries, a preparation of these " +
                 str(pb.N) + " indices, " + str(pb.F) + " features x " + str(pb.B) + " bags and " + str(pb.T) +
                 " tables has " + str(want) + "; pass the tensor tt_prepare returned on CUDA for the same indices, "
                 "offsets, feature_table_map and tables (or none)");
}

// Host checks of an op's inputs, before it enqueues anything.
inline Status check_lookup_inputs(const Problem& pb, const LookupInputs& in) {
  if (in.errors == nullptr) return invalid("no error record given");
  if (in.prepared != nullptr) return check_prepared_words(pb, in.prepared_words);
  if (pb.N > 0 && in.indices == nullptr) return invalid("no indices given");
  return Status::Ok();
}

// tt_prepare: the sorted index into `words` (prepared_words(pb) int64 of device memory).
template <class Exec>
Status prepare_index(Exec& ex, const Problem& pb, const LookupInputs& in, int64_t* words, int64_t num_words) {
  LookupInputs unprepared = in;  // a preparation's inputs are those of an op without one
  unprepared.prepared = nullptr;
  Status s = check_lookup_inputs(pb, unprepared);
  if (s.ok()) s = check_prepared_words(pb, num_words);
  if (!s.ok()) return s;
  Prepared desc;
  upload_descriptors(ex, pb, &desc);
  build_index(ex, pb, in, desc, index_view(words, pb.N));
  return ex.status();
}

// An op's preparation: descriptors, the sorted index (in.prepared's, else built here), the plan.
// The inputs have passed check_lookup_inputs.
template <class Exec>
Status prepare(Exec& ex, const Problem& pb, const LookupInputs& in, int chunk_rows, Prepared* pr) {
  const int64_t N = pb.N, T = pb.T;
  upload_descriptors(ex, pb, pr);
  pr->unique_bound = N;
  pr->chunk_bound = (N + chunk_rows - 1) / chunk_rows + T;
  pr->rowbuf_bound = N * pb.max_dim + 4 * T;
  if (in.prepared != nullptr) {
    pr->index = index_view(const_cast<int64_t*>(in.prepared), N);  // read only from here on
  } else {
    pr->index = index_view(static_cast<int64_t*>(alloc_bytes(ex, sizeof(int64_t) * index_words(N))), N);
    build_index(ex, pb, in, *pr, pr->index);
  }
  ex.for_each(1, PlanOp{pr->tables, T, chunk_rows, pr->index.ukey, pb.key_space, pr->index.status, pr->plan,
                        pr->total_chunks});
  return ex.status();
}

// ---------------------------------------------------------------------------------------------
// The ops.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, class Exec>
Status forward_impl(Exec& ex, Problem pb, const LookupInputs& in, scalar_t* out, const DriverOptions& opt = {}) {
  using acc_t = typename AccOf<scalar_t>::type;
  Status s = check_lookup_inputs(pb, in);
  if (!s.ok()) return s;
  ChunkPlan cp;
  s = plan_chunks(pb.tables, false, sizeof(acc_t), pb.N, ex.sm_count(), ex.smem_optin(), opt, &cp);
  if (!s.ok()) return s;
  Prepared pr;
  s = prepare(ex, pb, in, cp.rows, &pr);
  if (!s.ok()) return s;
  acc_t* rows = nullptr;
  if (pb.N > 0) {
    rows = static_cast<acc_t*>(alloc_bytes(ex, sizeof(acc_t) * pr.rowbuf_bound));
    RowsProgram<scalar_t> prog{ChunkSetup{pr.tables, pb.T, pr.plan, pr.index.ukey, cp.rows}, pr.cores, rows};
    ex.run_program(prog, pr.chunk_bound, pr.total_chunks, cp.smem_bytes, cp.global_scratch_elems);
  }
  if (pb.nbags > 0 && pb.total_dim > 0)
    ex.for_each(pb.nbags * kWarp, PoolOp<scalar_t>{pb.N, in.offsets, pr.index.unique_of,
                                                   static_cast<const acc_t*>(in.per_sample_weights), pr.features,
                                                   pr.plan, rows, out, pb.B, pb.total_dim});
  return ex.status();
}

// Row gradients and core gradients into the accumulators named by pb.cores[c].grad (zeroed by
// the caller); marks touched slices when `touched` is given. The inputs have passed
// check_lookup_inputs.
template <typename scalar_t, class Exec>
Status core_grads_impl(Exec& ex, Problem& pb, const LookupInputs& in, const scalar_t* grad_output,
                       unsigned char* touched, const DriverOptions& opt, Prepared* prepared) {
  using acc_t = typename AccOf<scalar_t>::type;
  ChunkPlan cp;
  Status s = plan_chunks(pb.tables, true, sizeof(acc_t), pb.N, ex.sm_count(), ex.smem_optin(), opt, &cp);
  if (!s.ok()) return s;
  Prepared& pr = *prepared;
  s = prepare(ex, pb, in, cp.rows, &pr);
  if (!s.ok() || pb.N == 0) return s;
  const int64_t U = pr.unique_bound;
  acc_t* grad_rows = static_cast<acc_t*>(alloc_bytes(ex, sizeof(acc_t) * pr.rowbuf_bound));
  const RowSlot slot{pr.tables, pb.T, pr.plan};
  const RowGradSum<scalar_t> sum{pr.features, pr.index.order, pr.index.bag_of, in.offsets,
                                 static_cast<const acc_t*>(in.per_sample_weights), grad_output, pb.B, pb.total_dim};
  // Hot rows in pieces: at most N / kHotPositions pieces of full rows plus one partial piece per hot row.
  int64_t* pieces = static_cast<int64_t*>(alloc_bytes(ex, sizeof(int64_t) * U));
  int64_t* piece_end = static_cast<int64_t*>(alloc_bytes(ex, sizeof(int64_t) * U));
  ex.for_each(U, PieceCountOp{pr.plan, pb.T, pr.index.useg, pieces});
  ex.inclusive_sum(pieces, piece_end, U);
  const int64_t piece_bound = 2 * (pb.N / kHotPositions) + 1;
  acc_t* partials = static_cast<acc_t*>(alloc_bytes(ex, sizeof(acc_t) * piece_bound * pb.max_dim));
  ex.for_each(U * kWarp, GradRowsOp<scalar_t>{slot, sum, pr.index.useg, grad_rows});
  ex.for_each(piece_bound * kWarp,
              GradPiecesOp<scalar_t>{slot, sum, pr.index.useg, piece_end, U, pb.max_dim, partials});
  ex.for_each(U * kWarp, ReduceHotRowsOp<acc_t>{slot, piece_end, pb.max_dim, partials, grad_rows});
  CoreGradProgram<scalar_t> prog{ChunkSetup{pr.tables, pb.T, pr.plan, pr.index.ukey, cp.rows}, pr.cores, grad_rows, touched};
  ex.run_program(prog, pr.chunk_bound, pr.total_chunks, cp.smem_bytes, cp.global_scratch_elems);
  return ex.status();
}

template <typename scalar_t, class Exec>
Status backward_impl(Exec& ex, Problem pb, const LookupInputs& in, const scalar_t* grad_output,
                     const std::vector<void*>& core_grads, const DriverOptions& opt = {}) {
  using acc_t = typename AccOf<scalar_t>::type;
  Status s = check_lookup_inputs(pb, in);
  if (!s.ok()) return s;
  const int64_t total = pb.core_elem_off[pb.C];
  const bool direct = sizeof(acc_t) == sizeof(scalar_t);  // float / double: accumulate in place
  acc_t* flat = nullptr;
  if (direct) {
    for (int64_t c = 0; c < pb.C; ++c) {
      pb.cores[c].grad = core_grads[c];
      ex.zero(core_grads[c], sizeof(acc_t) * (pb.core_elem_off[c + 1] - pb.core_elem_off[c]));
    }
  } else {
    flat = static_cast<acc_t*>(alloc_bytes(ex, sizeof(acc_t) * total));
    ex.zero(flat, sizeof(acc_t) * total);
    for (int64_t c = 0; c < pb.C; ++c) pb.cores[c].grad = flat + pb.core_elem_off[c];
  }
  Prepared pr;
  s = core_grads_impl<scalar_t>(ex, pb, in, grad_output, nullptr, opt, &pr);
  if (!s.ok()) return s;
  if (!direct)
    for (int64_t c = 0; c < pb.C; ++c) {
      const int64_t n = pb.core_elem_off[c + 1] - pb.core_elem_off[c];
      ex.for_each(n, ConvertOp<scalar_t>{flat + pb.core_elem_off[c], static_cast<scalar_t*>(core_grads[c])});
    }
  return ex.status();
}

template <typename scalar_t, class Exec>
Status backward_fused_impl(Exec& ex, Problem pb, const LookupInputs& in, const scalar_t* grad_output,
                           const std::vector<void*>& states, int optimizer, double lr, double eps,
                           const DriverOptions& opt = {}) {
  using acc_t = typename AccOf<scalar_t>::type;
  if (optimizer != kOptSGD && optimizer != kOptAdagrad && optimizer != kOptRowwiseAdagrad)
    return invalid("unknown optimizer code " + str(optimizer));
  Status s = check_lookup_inputs(pb, in);
  if (!s.ok()) return s;
  const int64_t total = pb.core_elem_off[pb.C];
  acc_t* flat = static_cast<acc_t*>(alloc_bytes(ex, sizeof(acc_t) * total));
  ex.zero(flat, sizeof(acc_t) * total);
  for (int64_t c = 0; c < pb.C; ++c) {
    pb.cores[c].grad = flat + pb.core_elem_off[c];
    pb.cores[c].state = optimizer == kOptSGD ? nullptr : states[c];
  }
  const int64_t slices = pb.slice_base[pb.C];
  unsigned char* touched = static_cast<unsigned char*>(alloc_bytes(ex, static_cast<size_t>(slices)));
  ex.zero(touched, static_cast<size_t>(slices));
  Prepared pr;
  s = core_grads_impl<scalar_t>(ex, pb, in, grad_output, touched, opt, &pr);
  if (!s.ok()) return s;
  // Every slice of every core is an item (a grid-stride loop over all of them), so no touched
  // slice is missed whatever p_k is; untouched slices return at once.
  UpdateProgram<scalar_t, SliceResolver<scalar_t>> prog{SliceResolver<scalar_t>{pr.cores, pr.slice_base, pb.C, touched, optimizer},
                                                       optimizer, static_cast<acc_t>(lr), static_cast<acc_t>(eps)};
  ex.run_program(prog, slices, nullptr, 0, 0);
  return ex.status();
}

template <typename scalar_t, class Exec>
Status sparse_row_update_impl(Exec& ex, scalar_t* weight, void* state, int64_t rows, int64_t len, const int64_t* ids,
                              int64_t n, const void* grads, int optimizer, double lr, double eps, ErrorRecord* errors,
                              int64_t call) {
  using acc_t = typename AccOf<scalar_t>::type;
  if (optimizer != kOptSGD && optimizer != kOptAdagrad && optimizer != kOptRowwiseAdagrad)
    return invalid("unknown optimizer code " + str(optimizer));
  if (errors == nullptr) return invalid("no error record given");
  if (n == 0 || len == 0) return ex.status();
  if (n > std::numeric_limits<int32_t>::max()) return invalid("at most 2^31 - 1 row ids per call are supported");
  RowUpdateStatus* st = static_cast<RowUpdateStatus*>(alloc_bytes(ex, sizeof(RowUpdateStatus)));
  RowUpdateStatus init{};
  init.first_bad = ~0ull;
  init.duplicate_value = -1;
  ex.upload(st, &init, sizeof(init));
  ex.for_each(n, CheckRowIdsOp{ids, rows, st});
  int64_t* sorted = static_cast<int64_t*>(alloc_bytes(ex, sizeof(int64_t) * n));
  ex.sort_keys(ids, sorted, n);
  ex.for_each(n, CheckDuplicatesOp{sorted, st});
  ex.for_each(1, ReportRowErrorsOp{st, ids, rows, call, errors});
  UpdateProgram<scalar_t, RowResolver<scalar_t>> prog{
      RowResolver<scalar_t>{rows, weight, static_cast<acc_t*>(state), ids, static_cast<const acc_t*>(grads), len,
                            optimizer},
      optimizer, static_cast<acc_t>(lr), static_cast<acc_t>(eps)};
  ex.run_program(prog, n, nullptr, 0, 0);
  return ex.status();
}

}  // namespace cuda
}  // namespace ttdist
