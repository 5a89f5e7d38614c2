// Host emulation of the ttdist CUDA kernels: runs the op drivers of csrc/cuda/tt_driver.cuh with a
// CPU executor that executes every item op and every block-program phase of
// csrc/cuda/tt_device.cuh on the CPU, thread by thread in shuffled orders, and compares the
// results with a naive double-precision reference (no dedup, no trie: one chain per position).
//
// Built with -DTTDIST_ON_DEVICE the same cases run on a GPU through the op library's own CUDA
// executor (csrc/cuda/tt_gpu_exec.cuh: the real kernels, CUB, shuffles and atomics), with every
// buffer in managed memory: a pure-CUDA program, small enough for compute-sanitizer
// (benchmarks/gpu_check.py runs it under memcheck and racecheck).
//
// What this checks without a GPU: all index math (digits, trie, prefix reuse, scratch layout,
// row-buffer offsets, pooling, segment reduction, slice gradients, optimizer updates, touched
// slices), the host planning (chunk sizes, shared vs global scratch), validation errors, the ops
// run from a saved preparation (tt_prepare's buffer: bitwise the results of the ops that prepare
// for themselves, no sort, no second error report, the buffer left unchanged), the host-side
// rejection of a preparation made for another call, and that every phase returns the same
// "more" on every thread (barrier uniformity). What it cannot
// check: CUDA launches, CUB, warp shuffles (group_sum has a host branch), real concurrency.
//
// Build and run (no GPU needed; .ci/compile_cuda.sh does this):
//   nvcc -std=c++17 -O2 -o /tmp/tt_emulate tests/gpu/emulate_kernels.cu && /tmp/tt_emulate
// On a GPU:
//   nvcc -std=c++17 -O2 -arch=sm_90 -DTTDIST_ON_DEVICE -o /tmp/tt_ondevice tests/gpu/emulate_kernels.cu
//   /tmp/tt_ondevice [seed] [random cases per dtype]
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <unordered_map>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "../../csrc/cuda/tt_driver.cuh"
#if defined(TTDIST_ON_DEVICE)
#include "../../csrc/cuda/tt_gpu_exec.cuh"
#endif

using namespace ttdist::cuda;

namespace {

int g_failures = 0;
int g_checks = 0;
// TTDIST_EMULATE_STOP_AT=text: exit at the first failure whose message contains text (the
// mutation tests wait for one particular check, not for the whole run).
const char* const g_stop_at = std::getenv("TTDIST_EMULATE_STOP_AT");

#define EXPECT(cond, ...)                                          \
  do {                                                             \
    ++g_checks;                                                    \
    if (!(cond)) {                                                 \
      ++g_failures;                                                \
      char message_[1024];                                         \
      std::snprintf(message_, sizeof message_, __VA_ARGS__);       \
      std::fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, \
                   message_);                                      \
      if (g_stop_at != nullptr && std::strstr(message_, g_stop_at)) \
        std::exit(1);                                              \
    }                                                              \
  } while (0)

// ---------------------------------------------------------------------------------------------
// CPU executor.
// ---------------------------------------------------------------------------------------------
#if !defined(TTDIST_ON_DEVICE)
constexpr size_t kCanary = 64;

// The threads of one block-program phase as coroutines. A lane runs until it finishes the phase
// or calls a warp shuffle; a shuffle completes when all 32 lanes of the warp have called it (the
// same call, the same lane mask), each then getting its partner's value, as __shfl_xor_sync with a
// full mask does. A lane that leaves the phase while others of its warp wait at a shuffle (a
// shuffle over a partial warp: undefined on a GPU) is reported. Lanes are resumed in the
// executor's order, so code between shuffles runs interleaved across warps in many orders.
// exclusive_add checks that no two threads update one address without atomics in one phase.
class LaneScheduler {
 public:
  static constexpr size_t kStack = 256 * 1024;

  explicit LaneScheduler(int nt) : nt_(nt), lanes_(nt), stacks_(static_cast<size_t>(nt) * kStack) {}

  // Runs body(tid) for every tid in `order`; false (and EXPECT failures) on a shuffle error.
  template <class Body>
  bool run(const std::vector<int64_t>& order, const Body& body) {
    body_ = [&body](int tid) { body(tid); };
    writers_.clear();
    for (int tid = 0; tid < nt_; ++tid) {
      Lane& l = lanes_[tid];
      l = Lane{};
      getcontext(&l.context);
      l.context.uc_stack.ss_sp = stacks_.data() + static_cast<size_t>(tid) * kStack;
      l.context.uc_stack.ss_size = kStack;
      l.context.uc_link = &scheduler_;
      makecontext(&l.context, reinterpret_cast<void (*)()>(&LaneScheduler::entry), 1, tid);
    }
    active_ = this;
    bool ok = true;
    for (;;) {
      bool ran = false;
      for (int64_t tid : order) {
        Lane& l = lanes_[tid];
        if (l.state != kRunnable) continue;
        current_ = static_cast<int>(tid);
        swapcontext(&scheduler_, &l.context);
        ran = true;
        if (l.state == kRunnable) l.state = kDone;  // returned through uc_link: the phase is over
        release_warp(static_cast<int>(tid) / kWarp);
      }
      if (ran) continue;
      for (int tid = 0; tid < nt_; ++tid)
        if (lanes_[tid].state == kWaiting) {
          EXPECT(false, "a warp shuffle over a partial warp: lane %d of warp %d waits at a shuffle that other lanes "
                        "of the warp never reach", tid % kWarp, tid / kWarp);
          ok = false;
          break;
        }
      break;
    }
    active_ = nullptr;
    return ok && !failed_;
  }

  static double shfl_xor(double value, int lane_mask) {
    LaneScheduler* s = active_;
    if (s == nullptr) {
      EXPECT(false, "a warp shuffle outside a block program");
      return value;
    }
    Lane& l = s->lanes_[s->current_];
    l.state = kWaiting;
    l.deposit = value;
    l.mask = lane_mask;
    ++l.shuffles;
    swapcontext(&l.context, &s->scheduler_);
    return l.result;
  }

  static void exclusive_access(const void* address) {
    LaneScheduler* s = active_;
    if (s == nullptr) return;
    const auto it = s->writers_.emplace(address, s->current_).first;
    if (it->second != s->current_ && !s->failed_) {
      EXPECT(false, "threads %d and %d update one address without atomics in one phase (a lost update)", it->second,
             s->current_);
      s->failed_ = true;
    }
  }

 private:
  enum State { kRunnable, kWaiting, kDone };
  struct Lane {
    ucontext_t context{};
    State state = kRunnable;
    double deposit = 0, result = 0;
    int mask = 0;
    long shuffles = 0;
  };

  static void entry(int tid) {
    active_->body_(tid);
    active_->lanes_[tid].state = kDone;
  }

  // When every lane of warp w waits at the same shuffle, deliver the partners' values.
  void release_warp(int w) {
    const int first = w * kWarp, last = std::min(first + kWarp, nt_);
    if (last - first < kWarp) {  // a block whose size is no multiple of 32: the last warp is partial
      for (int t = first; t < last; ++t)
        if (lanes_[t].state == kWaiting) {
          EXPECT(false, "a warp shuffle in a block of %d threads (not a multiple of 32)", nt_);
          failed_ = true;
          lanes_[t].result = lanes_[t].deposit;
          lanes_[t].state = kRunnable;
        }
      return;
    }
    for (int t = first; t < last; ++t)
      if (lanes_[t].state != kWaiting || lanes_[t].shuffles != lanes_[first].shuffles ||
          lanes_[t].mask != lanes_[first].mask)
        return;
    for (int t = first; t < last; ++t) {
      const int partner = first + ((t - first) ^ lanes_[t].mask);
      lanes_[t].result = partner < last ? lanes_[partner].deposit : lanes_[t].deposit;
    }
    for (int t = first; t < last; ++t) lanes_[t].state = kRunnable;
  }

  int nt_;
  std::vector<Lane> lanes_;
  std::vector<unsigned char> stacks_;
  ucontext_t scheduler_{};
  std::function<void(int)> body_;
  std::unordered_map<const void*, int> writers_;
  int current_ = 0;
  bool failed_ = false;
  static LaneScheduler* active_;
};
LaneScheduler* LaneScheduler::active_ = nullptr;

struct CpuExec {
  std::mt19937_64* rng;
  int order = 2;         // thread order per phase: 0 ascending, 1 descending, 2 shuffled
  int grid = 3;          // emulated resident blocks (each keeps its shared memory across items)
  int chunk_threads = kChunkThreads;
  int sms = 4;
  size_t optin = 96 * 1024;
  std::vector<std::pair<unsigned char*, size_t>> blocks;
  std::vector<std::unique_ptr<unsigned char[]>> owned;
  Status st;
  int64_t enqueued = 0;  // copies, kernels, sorts and scans the driver asked for
  int64_t sorts = 0;     // sort_pairs: the preparation's sort by (table, row)

  void* alloc(size_t bytes) {
    owned.emplace_back(new unsigned char[bytes + kCanary]);
    unsigned char* p = owned.back().get();
    std::memset(p, 0xCD, bytes);  // garbage: a missing initialisation shows up as a wrong result
    std::memset(p + bytes, 0xA5, kCanary);
    blocks.emplace_back(p, bytes);
    return p;
  }
  bool canaries_intact() const {
    for (const auto& b : blocks)
      for (size_t i = 0; i < kCanary; ++i)
        if (b.first[b.second + i] != 0xA5) return false;
    return true;
  }
  void upload(void* dst, const void* src, size_t n) {
    ++enqueued;
    std::memcpy(dst, src, n);
  }
  void finish() {}
  void zero(void* p, size_t n) {
    ++enqueued;
    std::memset(p, 0, n);
  }

  std::vector<int64_t> permutation(int64_t n) {
    std::vector<int64_t> v(n);
    std::iota(v.begin(), v.end(), 0);
    if (order == 1) std::reverse(v.begin(), v.end());
    if (order == 2) std::shuffle(v.begin(), v.end(), *rng);
    return v;
  }

  template <class Op>
  void for_each(int64_t n, const Op& op) {
    ++enqueued;
    for (int64_t i : permutation(n)) op(i);
  }

  template <class Prog>
  void run_program(const Prog& prog, int64_t max_items, const unsigned long long* count, size_t smem_bytes,
                   int64_t global_scratch_elems) {
    ++enqueued;
    using scratch_t = typename Prog::scratch_t;
    using Shared = typename Prog::Shared;
    const int nt = Prog::kThreads == kChunkThreads ? chunk_threads : Prog::kThreads;
    const int64_t items = count != nullptr ? std::min<int64_t>(max_items, static_cast<int64_t>(*count)) : max_items;
    if (count != nullptr)
      EXPECT(static_cast<int64_t>(*count) <= max_items, "program items %llu over the host bound %lld", *count,
             (long long)max_items);
    if (smem_bytes > 0) EXPECT(smem_bytes <= optin, "dynamic smem %zu over the opt-in limit %zu", smem_bytes, optin);
    const int64_t elems = global_scratch_elems > 0 ? global_scratch_elems : static_cast<int64_t>(smem_bytes / sizeof(scratch_t));
    const int64_t g = std::max<int64_t>(1, std::min<int64_t>(grid, items));
    LaneScheduler lanes(nt);
    for (int64_t b = 0; b < g; ++b) {
      std::unique_ptr<unsigned char[]> sh_mem(new unsigned char[sizeof(Shared)]);
      std::memset(sh_mem.get(), 0xCD, sizeof(Shared));
      Shared& sh = *reinterpret_cast<Shared*>(sh_mem.get());
      const size_t bytes = sizeof(scratch_t) * static_cast<size_t>(std::max<int64_t>(elems, 1));
      std::unique_ptr<unsigned char[]> scratch(new unsigned char[bytes + kCanary]);
      std::memset(scratch.get(), 0xCD, bytes);
      std::memset(scratch.get() + bytes, 0xA5, kCanary);
      for (int64_t item = b; item < items; item += g) {
        for (int ph = 0;; ++ph) {
          int more = -1;
          bool agree = true;
          const bool ok = lanes.run(permutation(nt), [&](int tid) {
            const bool m = prog.phase(ph, item, sh, reinterpret_cast<scratch_t*>(scratch.get()), tid, nt);
            if (more == -1) more = m;
            else if (more != static_cast<int>(m)) agree = false;
          });
          if (!ok) return;
          if (!agree) {
            EXPECT(false, "phase %d of item %lld: threads disagree on whether more phases follow", ph, (long long)item);
            return;
          }
          if (ph > 200) {
            EXPECT(false, "runaway phases");
            return;
          }
          if (!more) break;
        }
        for (size_t i = 0; i < kCanary; ++i)
          if (scratch[bytes + i] != 0xA5) {
            EXPECT(false, "block scratch overrun (%lld elements)", (long long)elems);
            return;
          }
      }
    }
  }

  void sort_pairs(const uint64_t* kin, uint64_t* kout, const int64_t* vin, int64_t* vout, int64_t n, int bits) {
    ++enqueued;
    ++sorts;
    std::vector<int64_t> idx(n);
    std::iota(idx.begin(), idx.end(), 0);
    for (int64_t i = 0; i < n; ++i)
      EXPECT(bits >= 64 || (kin[i] >> bits) == 0, "sort key %llu needs more than %d bits", (unsigned long long)kin[i], bits);
    std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return kin[a] < kin[b]; });
    for (int64_t i = 0; i < n; ++i) {
      kout[i] = kin[idx[i]];
      vout[i] = vin[idx[i]];
    }
  }
  void sort_keys(const int64_t* in, int64_t* out, int64_t n) {
    ++enqueued;
    std::copy(in, in + n, out);
    std::sort(out, out + n);
  }
  void inclusive_sum(const int64_t* in, int64_t* out, int64_t n) {
    ++enqueued;
    std::partial_sum(in, in + n, out);
  }
  int sm_count() const { return sms; }
  size_t smem_optin() const { return optin; }
  Status status() const { return st; }
};
#endif

#if defined(TTDIST_ON_DEVICE)
// Buffers the kernels read or write: managed memory, so the host reference reads them directly.
template <typename T>
struct ManagedAllocator {
  using value_type = T;
  ManagedAllocator() = default;
  template <typename U>
  ManagedAllocator(const ManagedAllocator<U>&) {}
  T* allocate(size_t n) {
    void* p = nullptr;
    if (cudaMallocManaged(&p, std::max<size_t>(n, 1) * sizeof(T)) != cudaSuccess) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { cudaFree(p); }
  template <typename U>
  bool operator==(const ManagedAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const ManagedAllocator<U>&) const { return false; }
};
template <typename T>
using Buf = std::vector<T, ManagedAllocator<T>>;

// Temporary device memory of one driver call, freed when the executor goes (after a sync).
class CudaMallocAllocator final : public Allocator {
 public:
  ~CudaMallocAllocator() override {
    cudaDeviceSynchronize();
    for (void* p : blocks_) cudaFree(p);
  }
  void* allocate(size_t bytes) override {
    void* p = nullptr;
    if (cudaMalloc(&p, bytes) != cudaSuccess) return nullptr;
    blocks_.push_back(p);
    return p;
  }

 private:
  std::vector<void*> blocks_;
};

// The op library's executor on the default stream; finish() waits and reports kernel faults.
struct DeviceExec {
  std::unique_ptr<CudaMallocAllocator> allocator{new CudaMallocAllocator};
  std::unique_ptr<GpuExec> gpu{new GpuExec(*allocator, nullptr)};
  int64_t enqueued = 0;  // copies, kernels, sorts and scans the driver asked for
  int64_t sorts = 0;     // sort_pairs: the preparation's sort by (table, row)
  void* alloc(size_t bytes) { return gpu->alloc(bytes); }
  void upload(void* dst, const void* src, size_t n) {
    ++enqueued;
    gpu->upload(dst, src, n);
  }
  void zero(void* p, size_t n) {
    ++enqueued;
    gpu->zero(p, n);
  }
  template <class Op>
  void for_each(int64_t n, const Op& op) {
    ++enqueued;
    gpu->for_each(n, op);
  }
  template <class Prog>
  void run_program(const Prog& prog, int64_t max_items, const unsigned long long* count, size_t smem_bytes,
                   int64_t global_scratch_elems) {
    ++enqueued;
    gpu->run_program(prog, max_items, count, smem_bytes, global_scratch_elems);
  }
  void sort_pairs(const uint64_t* kin, uint64_t* kout, const int64_t* vin, int64_t* vout, int64_t n, int bits) {
    ++enqueued;
    ++sorts;
    gpu->sort_pairs(kin, kout, vin, vout, n, bits);
  }
  void sort_keys(const int64_t* in, int64_t* out, int64_t n) {
    ++enqueued;
    gpu->sort_keys(in, out, n);
  }
  void inclusive_sum(const int64_t* in, int64_t* out, int64_t n) {
    ++enqueued;
    gpu->inclusive_sum(in, out, n);
  }
  int sm_count() const { return gpu->sm_count(); }
  size_t smem_optin() const { return gpu->smem_optin(); }
  Status status() const { return gpu->status(); }
  void finish() {
    const cudaError_t e = cudaDeviceSynchronize();
    EXPECT(e == cudaSuccess, "kernel fault: %s", cudaGetErrorString(e));
  }
  bool canaries_intact() const { return true; }  // compute-sanitizer memcheck checks bounds on the GPU
};
#else
template <typename T>
using Buf = std::vector<T>;
#endif

// ---------------------------------------------------------------------------------------------
// Typed host storage and conversions.
// ---------------------------------------------------------------------------------------------
template <typename T>
double as_double(T x) { return static_cast<double>(to_acc(x)); }
template <typename T>
T from_double(double x) {
  T out;
  from_acc(static_cast<typename AccOf<T>::type>(x), &out);
  return out;
}
template <typename T>
DType dtype_of();
template <>
DType dtype_of<float>() { return DType::kFloat32; }
template <>
DType dtype_of<double>() { return DType::kFloat64; }
template <>
DType dtype_of<__nv_bfloat16>() { return DType::kBFloat16; }
template <typename T>
const char* name_of();
template <>
const char* name_of<float>() { return "fp32"; }
template <>
const char* name_of<double>() { return "fp64"; }
template <>
const char* name_of<__nv_bfloat16>() { return "bf16"; }

struct TableSpec {
  std::vector<int64_t> p, q, r;  // r has d + 1 entries
  int64_t d() const { return static_cast<int64_t>(p.size()); }
  int64_t rows() const { int64_t n = 1; for (auto x : p) n *= x; return n; }
  int64_t dim() const { int64_t n = 1; for (auto x : q) n *= x; return n; }
};

struct Case {
  std::vector<TableSpec> tables;
  std::vector<int64_t> ftm, modes;
  int64_t B = 0;
  std::vector<int64_t> indices, offsets;
  std::vector<double> psw;  // empty: none
  std::vector<std::vector<double>> cores;  // master values (already representable in the dtype)
};

// ---------------------------------------------------------------------------------------------
// Naive reference (double): one chain per position.
// ---------------------------------------------------------------------------------------------
// Prefixes P_0..P_{d-1} of one row; P_k is (Q_k, r_{k+1}) row-major.
std::vector<std::vector<double>> prefixes(const TableSpec& s, const std::vector<const std::vector<double>*>& cores,
                                          int64_t row, std::vector<int64_t>* digits) {
  const int64_t d = s.d();
  digits->assign(d, 0);
  int64_t rest = row;
  for (int64_t k = d - 1; k >= 0; --k) {
    (*digits)[k] = rest % s.p[k];
    rest /= s.p[k];
  }
  std::vector<std::vector<double>> P(d);
  const int64_t slice0 = s.q[0] * s.r[1];
  P[0].assign(cores[0]->begin() + (*digits)[0] * slice0, cores[0]->begin() + ((*digits)[0] + 1) * slice0);
  int64_t Q = s.q[0];
  for (int64_t k = 1; k < d; ++k) {
    const int64_t K = s.r[k], N = s.q[k] * s.r[k + 1];
    const double* S = cores[k]->data() + (*digits)[k] * K * N;
    P[k].assign(Q * N, 0.0);
    for (int64_t m = 0; m < Q; ++m)
      for (int64_t kk = 0; kk < K; ++kk)
        for (int64_t n = 0; n < N; ++n) P[k][m * N + n] += P[k - 1][m * K + kk] * S[kk * N + n];
    Q *= s.q[k];
  }
  return P;
}

std::vector<const std::vector<double>*> table_cores(const Case& c, int64_t t) {
  int64_t begin = 0;
  for (int64_t x = 0; x < t; ++x) begin += c.tables[x].d();
  std::vector<const std::vector<double>*> out;
  for (int64_t k = 0; k < c.tables[t].d(); ++k) out.push_back(&c.cores[begin + k]);
  return out;
}

int64_t core_begin(const Case& c, int64_t t) {
  int64_t begin = 0;
  for (int64_t x = 0; x < t; ++x) begin += c.tables[x].d();
  return begin;
}

double scale_of(const Case& c, int64_t fb, int64_t j) {
  double w = c.psw.empty() ? 1.0 : c.psw[j];
  const int64_t f = fb / c.B;
  if (c.modes[f] == 1) w /= static_cast<double>(c.offsets[fb + 1] - c.offsets[fb]);
  return w;
}

int64_t total_dim(const Case& c) {
  int64_t D = 0;
  for (auto t : c.ftm) D += c.tables[t].dim();
  return D;
}

std::vector<double> ref_forward(const Case& c) {
  const int64_t F = static_cast<int64_t>(c.ftm.size()), TD = total_dim(c);
  std::vector<double> out(c.B * TD, 0.0);
  int64_t col = 0;
  for (int64_t f = 0; f < F; ++f) {
    const int64_t t = c.ftm[f];
    const TableSpec& s = c.tables[t];
    const auto cores = table_cores(c, t);
    for (int64_t b = 0; b < c.B; ++b) {
      const int64_t fb = f * c.B + b;
      for (int64_t j = c.offsets[fb]; j < c.offsets[fb + 1]; ++j) {
        std::vector<int64_t> dg;
        const auto P = prefixes(s, cores, c.indices[j], &dg);
        const double w = scale_of(c, fb, j);
        for (int64_t e = 0; e < s.dim(); ++e) out[b * TD + col + e] += w * P[s.d() - 1][e];
      }
    }
    col += s.dim();
  }
  return out;
}

// Dense core gradients for grad_output `go` (B, TD).
std::vector<std::vector<double>> ref_backward(const Case& c, const std::vector<double>& go) {
  const int64_t F = static_cast<int64_t>(c.ftm.size()), TD = total_dim(c);
  std::vector<std::vector<double>> grads;
  for (const auto& core : c.cores) grads.emplace_back(core.size(), 0.0);
  int64_t col = 0;
  for (int64_t f = 0; f < F; ++f) {
    const int64_t t = c.ftm[f];
    const TableSpec& s = c.tables[t];
    const int64_t d = s.d(), cb = core_begin(c, t);
    const auto cores = table_cores(c, t);
    for (int64_t b = 0; b < c.B; ++b) {
      const int64_t fb = f * c.B + b;
      for (int64_t j = c.offsets[fb]; j < c.offsets[fb + 1]; ++j) {
        std::vector<int64_t> dg;
        const auto P = prefixes(s, cores, c.indices[j], &dg);
        const double w = scale_of(c, fb, j);
        std::vector<double> dP(s.dim());
        for (int64_t e = 0; e < s.dim(); ++e) dP[e] = w * go[b * TD + col + e];
        int64_t Q = s.dim() / s.q[d - 1];
        for (int64_t k = d - 1; k >= 1; --k) {
          const int64_t M = Q, K = s.r[k], N = s.q[k] * s.r[k + 1];
          const double* S = cores[k]->data() + dg[k] * K * N;
          double* dS = grads[cb + k].data() + dg[k] * K * N;
          std::vector<double> dprev(M * K, 0.0);
          for (int64_t m = 0; m < M; ++m)
            for (int64_t kk = 0; kk < K; ++kk)
              for (int64_t n = 0; n < N; ++n) {
                dS[kk * N + n] += P[k - 1][m * K + kk] * dP[m * N + n];
                dprev[m * K + kk] += dP[m * N + n] * S[kk * N + n];
              }
          dP.swap(dprev);
          Q /= s.q[k - 1];
        }
        double* dS0 = grads[cb].data() + dg[0] * s.q[0] * s.r[1];
        for (int64_t e = 0; e < s.q[0] * s.r[1]; ++e) dS0[e] += dP[e];
      }
    }
    col += s.dim();
  }
  return grads;
}

void ref_update(double* w, double* state, const double* g, int64_t len, int opt, double lr, double eps) {
  if (opt == 0) {
    for (int64_t x = 0; x < len; ++x) w[x] -= lr * g[x];
  } else if (opt == 1) {
    for (int64_t x = 0; x < len; ++x) {
      state[x] += g[x] * g[x];
      w[x] -= lr * g[x] / (std::sqrt(state[x]) + eps);
    }
  } else {
    double sq = 0;
    for (int64_t x = 0; x < len; ++x) sq += g[x] * g[x];
    state[0] += sq / static_cast<double>(len);
    const double step = lr / (std::sqrt(state[0]) + eps);
    for (int64_t x = 0; x < len; ++x) w[x] -= step * g[x];
  }
}

// ---------------------------------------------------------------------------------------------
// Case generation.
// ---------------------------------------------------------------------------------------------
int64_t rand_int(std::mt19937_64& rng, int64_t lo, int64_t hi) {  // inclusive
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}
double rand_double(std::mt19937_64& rng, double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }

template <typename T>
double representable(double x) { return as_double(from_double<T>(x)); }

template <typename T>
Case make_case(std::mt19937_64& rng, const std::vector<TableSpec>& tables, int64_t F, int64_t B, int max_bag,
               bool with_psw, double hot_fraction, const std::vector<int64_t>& ftm = {}) {
  Case c;
  c.tables = tables;
  const int64_t num_tables = static_cast<int64_t>(tables.size());
  for (int64_t f = 0; f < F; ++f) {
    c.ftm.push_back(!ftm.empty() ? ftm[f] : f < num_tables ? f : rand_int(rng, 0, num_tables - 1));
    c.modes.push_back(with_psw ? 0 : rand_int(rng, 0, 1));
  }
  c.B = B;
  for (const auto& s : tables)
    for (int64_t k = 0; k < s.d(); ++k) {
      std::vector<double> core(s.p[k] * s.r[k] * s.q[k] * s.r[k + 1]);
      const double scale = 1.0 / std::sqrt(static_cast<double>(s.r[k]));
      for (auto& v : core) v = representable<T>(rand_double(rng, -1, 1) * scale);
      c.cores.push_back(core);
    }
  c.offsets.push_back(0);
  for (int64_t f = 0; f < F; ++f) {
    const TableSpec& s = tables[c.ftm[f]];
    const int64_t rows = s.rows();
    std::vector<int64_t> hot;  // a few rows that repeat (duplicates, shared prefixes)
    for (int x = 0; x < 4; ++x) hot.push_back(rand_int(rng, 0, rows - 1));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = rand_int(rng, 0, max_bag);
      for (int64_t x = 0; x < len; ++x) {
        int64_t row;
        const double u = rand_double(rng, 0, 1);
        if (u < hot_fraction) row = hot[rand_int(rng, 0, 3)];
        else if (u < hot_fraction + 0.2) row = std::min(rows - 1, hot[0] + rand_int(rng, 0, 3));  // neighbours share prefixes
        else row = rand_int(rng, 0, rows - 1);
        c.indices.push_back(row);
      }
      c.offsets.push_back(static_cast<int64_t>(c.indices.size()));
    }
  }
  if (with_psw)
    for (size_t j = 0; j < c.indices.size(); ++j) c.psw.push_back(representable<T>(rand_double(rng, -2, 2)));
  return c;
}

TableSpec random_table(std::mt19937_64& rng, int64_t d) {
  TableSpec s;
  s.r.push_back(1);
  for (int64_t k = 0; k < d; ++k) {
    s.p.push_back(rand_int(rng, 1, 7));
    s.q.push_back(rand_int(rng, 1, 4));
    s.r.push_back(k + 1 == d ? 1 : rand_int(rng, 1, 6));
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// Running a case through the drivers.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Device {  // typed copies of a case's tensors
  std::vector<Buf<T>> cores;
  Buf<int64_t> indices, offsets;
  Buf<typename AccOf<T>::type> psw;
  Buf<ErrorRecord> errors = Buf<ErrorRecord>(1);
  LookupProblem lp;
  LookupInputs in;
  explicit Device(const Case& c) {
    for (const auto& core : c.cores) {
      cores.emplace_back();
      for (double v : core) cores.back().push_back(from_double<T>(v));
    }
    indices.assign(c.indices.begin(), c.indices.end());
    offsets.assign(c.offsets.begin(), c.offsets.end());
    for (double v : c.psw) psw.push_back(static_cast<typename AccOf<T>::type>(v));
    lp.dtype = dtype_of<T>();
    for (size_t k = 0, t = 0, kk = 0; k < c.cores.size(); ++k) {
      const TableSpec& s = c.tables[t];
      lp.core_shapes.push_back({s.p[kk], s.r[kk], s.q[kk], s.r[kk + 1]});
      lp.cores.push_back(cores[k].data());
      if (++kk == static_cast<size_t>(s.d())) {
        kk = 0;
        ++t;
      }
    }
    for (const auto& s : c.tables) lp.table_num_cores.push_back(s.d());
    lp.feature_table_map = c.ftm;
    lp.pooling_modes = c.modes;
    lp.num_indices = static_cast<int64_t>(indices.size());
    lp.num_offsets = static_cast<int64_t>(offsets.size());
    in.indices = indices.data();
    in.offsets = offsets.data();
    in.per_sample_weights = psw.empty() ? nullptr : psw.data();
    in.errors = errors.data();
    in.call = 7;
  }
  bool clean() const { return errors[0].code == kErrNone; }
};

template <typename T>
double tol_of() { return std::is_same<T, double>::value ? 1e-11 : std::is_same<T, float>::value ? 1e-5 : 1.5e-2; }

// max |a - b| / max(max |b|, floor)
double rel_err(const std::vector<double>& a, const std::vector<double>& b, double floor = 1e-6) {
  double m = floor, e = 0;
  for (size_t i = 0; i < b.size(); ++i) m = std::max(m, std::fabs(b[i]));
  for (size_t i = 0; i < b.size(); ++i) e = std::max(e, std::fabs(a[i] - b[i]));
  return e / m;
}

struct RunOptions {
  DriverOptions drv;
  int order = 2, grid = 3, chunk_threads = kChunkThreads, sms = 4;
  size_t optin = 96 * 1024;
  bool saved = false;  // run the op from tt_prepare's buffer (SavedPreparation), not its own preparation
};

RunOptions random_options(std::mt19937_64& rng) {
  RunOptions o;
  const int rows[] = {0, 0, 1, 2, 3, 5, 7, 32};
  o.drv.chunk_rows = rows[rand_int(rng, 0, 7)];
  o.drv.force_global_scratch = rand_int(rng, 0, 3) == 0;
  o.drv.smem_budget = rand_int(rng, 0, 1) ? 48 * 1024 : static_cast<size_t>(rand_int(rng, 256, 4096));
  o.order = static_cast<int>(rand_int(rng, 0, 2));
  o.grid = static_cast<int>(rand_int(rng, 1, 4));
  const int nts[] = {kChunkThreads, kChunkThreads, 32, 96, 64};  // whole warps (the kernels shuffle)
  o.chunk_threads = nts[rand_int(rng, 0, 4)];
  o.sms = static_cast<int>(rand_int(rng, 1, 8));
  return o;
}

#if defined(TTDIST_ON_DEVICE)
DeviceExec make_exec(std::mt19937_64&, const RunOptions&) { return DeviceExec(); }
#else
CpuExec make_exec(std::mt19937_64& rng, const RunOptions& o) {
  CpuExec ex;
  ex.rng = &rng;
  ex.order = o.order;
  ex.grid = o.grid;
  ex.chunk_threads = o.chunk_threads;
  ex.sms = o.sms;
  ex.optin = o.optin;
  return ex;
}
#endif

// tt_prepare's buffer for a case, made by an executor of its own in memory the host reads too.
// Guard words behind it catch a write past its end; a copy taken after the preparation catches an
// op that writes into it (forward and backward share one buffer).
class SavedPreparation {
 public:
  // Prepares dev's batch and points dev.in at the buffer, and its indices at nothing: an op given
  // a preparation must not read them.
  template <typename T>
  bool attach(std::mt19937_64& rng, const RunOptions& o, const Problem& pb, Device<T>& dev, const char* what) {
    words_ = prepared_words(pb);
    buf_.assign(words_ + kGuardWords, kFill);
    auto ex = make_exec(rng, o);
    const Status s = prepare_index(ex, pb, dev.in, buf_.data(), words_);
    ex.finish();
    EXPECT(s.ok(), "%s: tt_prepare: %s", what, s.message.c_str());
    EXPECT(ex.canaries_intact(), "%s: tt_prepare: buffer overrun", what);
    EXPECT(std::all_of(buf_.begin() + words_, buf_.end(), [](int64_t w) { return w == kFill; }),
           "%s: tt_prepare wrote past its %lld words", what, (long long)words_);
    snapshot_.assign(buf_.begin(), buf_.end());
    dev.in.prepared = buf_.data();
    dev.in.prepared_words = words_;
    dev.in.indices = nullptr;
    return s.ok();
  }
  bool intact() const { return std::equal(snapshot_.begin(), snapshot_.end(), buf_.begin()); }
  const int64_t* data() const { return buf_.data(); }
  int64_t words() const { return words_; }

 private:
  static constexpr int64_t kGuardWords = 64;
  static constexpr int64_t kFill = 0x5A5A5A5A5A5A5A5All;
  Buf<int64_t> buf_;
  std::vector<int64_t> snapshot_;
  int64_t words_ = 0;
};

// An op sorts the batch once when it prepares for itself, never when it is given a preparation.
int64_t expected_sorts(const Problem& pb, const RunOptions& o) { return !o.saved && pb.N > 0 && pb.nbags > 0 ? 1 : 0; }

// Each check returns what the op computed (as doubles), for comparing two runs.
template <typename T>
std::vector<double> check_forward(std::mt19937_64& rng, const Case& c, const RunOptions& o, const char* what) {
  Device<T> dev(c);
  Problem pb;
  Status s = build_problem(dev.lp, &pb);
  EXPECT(s.ok(), "%s: build_problem: %s", what, s.message.c_str());
  if (!s.ok()) return {};
  SavedPreparation saved;
  if (o.saved && !saved.attach(rng, o, pb, dev, what)) return {};
  auto ex = make_exec(rng, o);
  Buf<T> out(c.B * pb.total_dim);
  std::memset(static_cast<void*>(out.data()), 0xCD, sizeof(T) * out.size());  // every element must be written
  s = forward_impl<T>(ex, pb, dev.in, out.data(), o.drv);
  ex.finish();
  EXPECT(s.ok(), "%s: forward: %s", what, s.message.c_str());
  const auto ref = ref_forward(c);
  std::vector<double> got;
  for (const auto& v : out) got.push_back(as_double(v));
  const double err = rel_err(got, ref);
  EXPECT(err <= tol_of<T>(), "%s %s forward: relative error %.3g (R=%d)", what, name_of<T>(), err, o.drv.chunk_rows);
  EXPECT(ex.canaries_intact(), "%s: buffer overrun", what);
  EXPECT(dev.clean(), "%s: an error was recorded for valid input: %s", what, describe_error(dev.errors[0]).c_str());
  EXPECT(!o.saved || saved.intact(), "%s: forward wrote into the saved preparation", what);
  EXPECT(ex.sorts == expected_sorts(pb, o), "%s: forward sorted %lld times (saved: %d)", what, (long long)ex.sorts, o.saved);
  return got;
}

template <typename T>
std::vector<double> check_backward(std::mt19937_64& rng, const Case& c, const RunOptions& o, const char* what) {
  Device<T> dev(c);
  Problem pb;
  if (!build_problem(dev.lp, &pb).ok()) return {};
  SavedPreparation saved;
  if (o.saved && !saved.attach(rng, o, pb, dev, what)) return {};
  std::vector<double> go_d(c.B * pb.total_dim);
  Buf<T> go;
  for (auto& v : go_d) {
    v = representable<T>(rand_double(rng, -1, 1));
    go.push_back(from_double<T>(v));
  }
  std::vector<Buf<T>> grads;
  std::vector<void*> ptrs;
  for (const auto& core : c.cores) {
    grads.emplace_back(core.size());
    std::memset(static_cast<void*>(grads.back().data()), 0xCD, sizeof(T) * core.size());
    ptrs.push_back(grads.back().data());
  }
  auto ex = make_exec(rng, o);
  const Status s = backward_impl<T>(ex, pb, dev.in, go.data(), ptrs, o.drv);
  ex.finish();
  EXPECT(s.ok(), "%s: backward: %s", what, s.message.c_str());
  const auto ref = ref_backward(c, go_d);
  std::vector<double> got, want;
  for (size_t k = 0; k < ref.size(); ++k) {
    for (const auto& v : grads[k]) got.push_back(as_double(v));
    want.insert(want.end(), ref[k].begin(), ref[k].end());
  }
  const double err = rel_err(got, want);
  EXPECT(err <= tol_of<T>(), "%s %s backward: relative error %.3g (R=%d)", what, name_of<T>(), err, o.drv.chunk_rows);
  EXPECT(ex.canaries_intact(), "%s: buffer overrun", what);
  EXPECT(dev.clean(), "%s: an error was recorded for valid input: %s", what, describe_error(dev.errors[0]).c_str());
  EXPECT(!o.saved || saved.intact(), "%s: backward wrote into the saved preparation", what);
  EXPECT(ex.sorts == expected_sorts(pb, o), "%s: backward sorted %lld times (saved: %d)", what, (long long)ex.sorts, o.saved);
  return got;
}

template <typename T>
std::vector<double> check_fused(std::mt19937_64& rng, const Case& c, const RunOptions& o, int opt, const char* what) {
  using acc_t = typename AccOf<T>::type;
  Device<T> dev(c);
  Problem pb;
  if (!build_problem(dev.lp, &pb).ok()) return {};
  SavedPreparation saved;
  if (o.saved && !saved.attach(rng, o, pb, dev, what)) return {};
  std::vector<double> go_d(c.B * pb.total_dim);
  Buf<T> go;
  for (auto& v : go_d) {
    v = representable<T>(rand_double(rng, -1, 1));
    go.push_back(from_double<T>(v));
  }
  const double lr = rand_double(rng, 0.01, 0.5), eps = opt == 0 ? 0.0 : rand_double(rng, 1e-8, 1e-2);
  // States: start from random non-negative values (exercises the accumulation).
  std::vector<std::vector<double>> st_d;
  std::vector<Buf<acc_t>> st;
  std::vector<void*> st_ptrs;
  for (size_t k = 0; k < c.cores.size(); ++k) {
    const int64_t p = dev.lp.core_shapes[k][0];
    const int64_t n = opt == 1 ? static_cast<int64_t>(c.cores[k].size()) : opt == 2 ? p : 0;
    st_d.emplace_back(n);
    st.emplace_back(n);
    for (int64_t i = 0; i < n; ++i) {
      st[k][i] = static_cast<acc_t>(rand_double(rng, 0, 0.5));
      st_d[k][i] = static_cast<double>(st[k][i]);
    }
    st_ptrs.push_back(n ? st[k].data() : nullptr);
  }
  auto ex = make_exec(rng, o);
  const Status s = backward_fused_impl<T>(ex, pb, dev.in, go.data(), st_ptrs, opt, lr, eps, o.drv);
  ex.finish();
  EXPECT(s.ok(), "%s: fused: %s", what, s.message.c_str());
  // Reference: dense grads, then the update on every touched slice.
  const auto grads = ref_backward(c, go_d);
  std::vector<std::vector<double>> w = c.cores;
  const int64_t F = static_cast<int64_t>(c.ftm.size());
  std::vector<std::set<int64_t>> touched(c.cores.size());
  for (int64_t f = 0; f < F; ++f) {
    const int64_t t = c.ftm[f], cb = core_begin(c, t);
    const TableSpec& sp = c.tables[t];
    for (int64_t j = c.offsets[f * c.B]; j < c.offsets[(f + 1) * c.B]; ++j) {
      int64_t rest = c.indices[j];
      for (int64_t k = sp.d() - 1; k >= 0; --k) {
        touched[cb + k].insert(rest % sp.p[k]);
        rest /= sp.p[k];
      }
    }
  }
  int64_t beyond = 0;
  for (size_t k = 0; k < c.cores.size(); ++k) {
    const int64_t len = static_cast<int64_t>(c.cores[k].size()) / dev.lp.core_shapes[k][0];
    for (int64_t i : touched[k]) {
      if (i >= len) ++beyond;
      double* state = opt == 1 ? st_d[k].data() + i * len : opt == 2 ? st_d[k].data() + i : nullptr;
      ref_update(w[k].data() + i * len, state, grads[k].data() + i * len, len, opt, lr, eps);
    }
  }
  std::vector<double> got, want, got_s, want_s;
  for (size_t k = 0; k < c.cores.size(); ++k) {
    for (const auto& v : dev.cores[k]) got.push_back(as_double(v));
    want.insert(want.end(), w[k].begin(), w[k].end());
    for (const auto& v : st[k]) got_s.push_back(static_cast<double>(v));
    want_s.insert(want_s.end(), st_d[k].begin(), st_d[k].end());
  }
  const double err = rel_err(got, want), err_s = rel_err(got_s, want_s);
  EXPECT(err <= tol_of<T>(), "%s %s fused opt %d: weight error %.3g", what, name_of<T>(), opt, err);
  EXPECT(err_s <= (std::is_same<T, double>::value ? 1e-11 : 1e-4), "%s %s fused opt %d: state error %.3g", what,
         name_of<T>(), opt, err_s);
  EXPECT(ex.canaries_intact(), "%s: buffer overrun", what);
  EXPECT(dev.clean(), "%s: an error was recorded for valid input: %s", what, describe_error(dev.errors[0]).c_str());
  EXPECT(!o.saved || saved.intact(), "%s: the fused step wrote into the saved preparation", what);
  EXPECT(ex.sorts == expected_sorts(pb, o), "%s: the fused step sorted %lld times (saved: %d)", what, (long long)ex.sorts, o.saved);
  (void)beyond;
  got.insert(got.end(), got_s.begin(), got_s.end());
  return got;
}

// The ops run from one saved preparation (tt_prepare once; forward, backward and the fused step
// each from its buffer, with their own R) give bitwise the results of the ops that prepare for
// themselves. Thread orders are fixed (ascending or descending), so both runs add in one order.
template <typename T>
void check_saved_matches_unsaved(std::mt19937_64& rng, const Case& c, const char* what) {
  RunOptions o = random_options(rng);
  o.order = static_cast<int>(rand_int(rng, 0, 1));
  RunOptions saved = o;
  saved.saved = true;
  const int opt = static_cast<int>(rand_int(rng, 0, 2));
  const uint64_t seed = rng();
  const std::string saved_what = std::string(what) + " (saved)";
  const char* names[] = {"forward", "backward", "fused step"};
  for (int op = 0; op < 3; ++op) {
    std::mt19937_64 rng_unsaved(seed), rng_saved(seed);  // the same grad_output, lr, states
    const auto run = [&](std::mt19937_64& r, const RunOptions& ro, const char* w) {
      return op == 0 ? check_forward<T>(r, c, ro, w) : op == 1 ? check_backward<T>(r, c, ro, w)
                                                               : check_fused<T>(r, c, ro, opt, w);
    };
    const std::vector<double> unsaved_result = run(rng_unsaved, o, what);
    const std::vector<double> saved_result = run(rng_saved, saved, saved_what.c_str());
    EXPECT(saved_result == unsaved_result, "%s %s %s: the result from a saved preparation differs from the op's own",
           what, name_of<T>(), names[op]);
  }
}

template <typename T>
void check_sparse_update(std::mt19937_64& rng, int opt) {
  using acc_t = typename AccOf<T>::type;
  const int64_t rows = rand_int(rng, 1, 40), len = rand_int(rng, 1, 300);
  const int64_t n = rand_int(rng, 1, rows);
  Buf<int64_t> ids(rows);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  ids.resize(n);
  std::vector<double> w_d(rows * len), g_d(n * len), s_d(opt == 1 ? rows * len : opt == 2 ? rows : 0);
  Buf<T> w;
  Buf<acc_t> g, s;
  for (auto& v : w_d) {
    v = representable<T>(rand_double(rng, -1, 1));
    w.push_back(from_double<T>(v));
  }
  for (auto& v : g_d) {
    g.push_back(static_cast<acc_t>(rand_double(rng, -1, 1)));
    v = static_cast<double>(g.back());
  }
  for (auto& v : s_d) {
    s.push_back(static_cast<acc_t>(rand_double(rng, 0, 1)));
    v = static_cast<double>(s.back());
  }
  const double lr = 0.1, eps = 1e-6;
  RunOptions o = random_options(rng);
  auto ex = make_exec(rng, o);
  Buf<ErrorRecord> errors(1);
  const Status st = sparse_row_update_impl<T>(ex, w.data(), s.empty() ? nullptr : s.data(), rows, len, ids.data(), n,
                                              g.data(), opt, lr, eps, errors.data(), 1);
  ex.finish();
  EXPECT(st.ok(), "sparse_row_update: %s", st.message.c_str());
  EXPECT(errors[0].code == kErrNone, "sparse_row_update: an error was recorded for valid ids");
  for (int64_t x = 0; x < n; ++x)
    ref_update(w_d.data() + ids[x] * len, opt == 1 ? s_d.data() + ids[x] * len : opt == 2 ? s_d.data() + ids[x] : nullptr,
               g_d.data() + x * len, len, opt, lr, eps);
  std::vector<double> got, got_s(s.begin(), s.end());
  for (const auto& v : w) got.push_back(as_double(v));
  EXPECT(rel_err(got, w_d) <= tol_of<T>(), "%s sparse_row_update opt %d: weight error %.3g", name_of<T>(), opt,
         rel_err(got, w_d));
  EXPECT(rel_err(got_s, s_d) <= 1e-5, "%s sparse_row_update opt %d: state error", name_of<T>(), opt);
  // Errors: an id out of range is recorded and skipped (the other rows are updated); a repeated
  // id is recorded.
  Buf<int64_t> bad = ids;
  bad[n - 1] = rows + 3;
  const Buf<T> before = w;
  auto ex2 = make_exec(rng, o);
  Status e = sparse_row_update_impl<T>(ex2, w.data(), s.empty() ? nullptr : s.data(), rows, len, bad.data(), n, g.data(),
                                       opt, lr, eps, errors.data(), 2);
  ex2.finish();
  EXPECT(e.ok() && errors[0].code == kErrRowId && errors[0].position == n - 1 && errors[0].value == rows + 3 &&
             errors[0].limit == rows && errors[0].call == 2,
         "sparse_row_update: out-of-range id not recorded: %s", describe_error(errors[0]).c_str());
  int64_t changed_rows = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t x = 0; x < len; ++x)
      if (as_double(w[r * len + x]) != as_double(before[r * len + x])) {
        ++changed_rows;
        break;
      }
  EXPECT(changed_rows <= n - 1, "sparse_row_update: %lld rows changed for %lld valid ids", (long long)changed_rows,
         (long long)(n - 1));
  if (n >= 2) {
    Buf<int64_t> dup = ids;
    dup[1] = dup[0];
    errors[0] = ErrorRecord{};
    auto ex3 = make_exec(rng, o);
    e = sparse_row_update_impl<T>(ex3, w.data(), s.empty() ? nullptr : s.data(), rows, len, dup.data(), n, g.data(), opt,
                                  lr, eps, errors.data(), 3);
    ex3.finish();
    EXPECT(e.ok() && errors[0].code == kErrDuplicateRowId && errors[0].value == dup[0],
           "sparse_row_update: duplicate id not recorded: %s", describe_error(errors[0]).c_str());
  }
}

template <typename T>
void random_cases(std::mt19937_64& rng, int count) {
  for (int it = 0; it < count; ++it) {
    const int64_t T_ = rand_int(rng, 1, 3);
    std::vector<TableSpec> tables;
    for (int64_t t = 0; t < T_; ++t) tables.push_back(random_table(rng, rand_int(rng, 1, 4)));
    const int64_t F = rand_int(rng, 1, 4), B = rand_int(rng, 1, 9);
    const bool psw = rand_int(rng, 0, 2) == 0;
    const Case c = make_case<T>(rng, tables, F, B, static_cast<int>(rand_int(rng, 0, 6)), psw, rand_double(rng, 0, 0.7));
    char what[64];
    std::snprintf(what, sizeof(what), "random case %d", it);
    check_forward<T>(rng, c, random_options(rng), what);
    check_backward<T>(rng, c, random_options(rng), what);
    check_fused<T>(rng, c, random_options(rng), static_cast<int>(rand_int(rng, 0, 2)), what);
    if (it % 2 == 0) check_saved_matches_unsaved<T>(rng, c, what);  // every other case: the emulator's run time
  }
}

// FBTT's shape: p = [200, 220, 250], q = [4, 4, 4], ranks [32, 32]; rows with i_0 >= r*q*r = 128
// (FBTT's launch misses those slices in its fused update).
void fbtt_case(std::mt19937_64& rng) {
  TableSpec s;
  s.p = {200, 220, 250};
  s.q = {4, 4, 4};
  s.r = {1, 32, 32, 1};
  Case c = make_case<float>(rng, {s}, 1, 48, 6, false, 0.3);
  for (size_t j = 0; j < c.indices.size(); j += 3) c.indices[j] = (199 - static_cast<int64_t>(j % 60)) * 220 * 250 + static_cast<int64_t>(j % 97);
  RunOptions o;
  o.chunk_threads = kChunkThreads;
  check_forward<float>(rng, c, o, "fbtt");
  check_backward<float>(rng, c, o, "fbtt");
  for (int opt = 0; opt < 3; ++opt) check_fused<float>(rng, c, o, opt, "fbtt");
  check_saved_matches_unsaved<float>(rng, c, "fbtt");
  // Planning on an H100-like device: shared memory, not global scratch.
  Device<float> dev(c);
  Problem pb;
  build_problem(dev.lp, &pb);
  ChunkPlan fwd, bwd;
  plan_chunks(pb.tables, false, 4, 1 << 20, 132, 227 * 1024 - sizeof(ChunkShared), DriverOptions{}, &fwd);
  plan_chunks(pb.tables, true, 4, 1 << 20, 132, 227 * 1024 - sizeof(ChunkShared), DriverOptions{}, &bwd);
  const size_t total_fwd = fwd.smem_bytes + sizeof(ChunkShared), total_bwd = bwd.smem_bytes + sizeof(ChunkShared);
  EXPECT(fwd.global_scratch_elems == 0 && fwd.rows >= 8 && total_fwd <= 48 * 1024, "fbtt forward plan R=%d smem=%zu",
         fwd.rows, fwd.smem_bytes);
  EXPECT(bwd.global_scratch_elems == 0 && bwd.rows >= 4 && total_bwd <= 48 * 1024, "fbtt backward plan R=%d smem=%zu",
         bwd.rows, bwd.smem_bytes);
  std::printf("  fbtt plan: forward R=%d (%zu B smem), backward R=%d (%zu B smem), static smem %zu B\n", fwd.rows,
              fwd.smem_bytes, bwd.rows, bwd.smem_bytes, sizeof(ChunkShared));
}

// The case without the positions in `drop` (what an op computes when those indices are bad).
Case drop_positions(const Case& c, const std::set<int64_t>& drop) {
  Case out = c;
  out.indices.clear();
  out.psw.clear();
  out.offsets.assign(1, 0);
  for (size_t fb = 0; fb + 1 < c.offsets.size(); ++fb) {
    for (int64_t j = c.offsets[fb]; j < c.offsets[fb + 1]; ++j)
      if (!drop.count(j)) {
        out.indices.push_back(c.indices[j]);
        if (!c.psw.empty()) out.psw.push_back(c.psw[j]);
      }
    out.offsets.push_back(static_cast<int64_t>(out.indices.size()));
  }
  return out;
}

// A preparation made for another call (other N, B, F, feature map, T or C) is rejected on the
// host, before the op enqueues anything; so is a missing one's indices, and a wrong-sized buffer
// for tt_prepare.
void mismatched_preparations(std::mt19937_64& rng, const Case& c, const TableSpec& s) {
  Device<float> dev(c);
  Problem pb;
  build_problem(dev.lp, &pb);
  SavedPreparation saved;
  saved.attach(rng, RunOptions{}, pb, dev, "mismatch");
  TableSpec three_cores = s;  // as many rows (12), one core more
  three_cores.p = {3, 2, 2};
  three_cores.q = {2, 1, 2};
  three_cores.r = {1, 3, 2, 1};
  // c's indices (same N) in F x B bags of other tables; every feature reads table 0 (12 rows).
  const auto rebagged = [&](const std::vector<TableSpec>& tables, int64_t F, int64_t B) {
    Case out = make_case<float>(rng, tables, F, B, 0, false, 0.0, std::vector<int64_t>(F, 0));
    const int64_t N = static_cast<int64_t>(c.indices.size());
    out.indices = c.indices;
    out.offsets.clear();
    for (int64_t x = 0; x <= F * B; ++x) out.offsets.push_back(x * N / (F * B));
    return out;
  };
  const std::vector<std::pair<const char*, Case>> others = {
      {"one index less", drop_positions(c, {0})},
      {"other B", rebagged({s}, 2, c.B + 1)},
      {"other F", rebagged({s}, 3, c.B)},
      {"other T", rebagged({s, s}, 2, c.B)},
      {"other C", rebagged({three_cores}, 2, c.B)},
  };
  for (const auto& other : others) {
    Device<float> od(other.second);
    Problem opb;
    EXPECT(build_problem(od.lp, &opb).ok(), "%s: build_problem", other.first);
    od.in.prepared = saved.data();
    od.in.prepared_words = saved.words();
    std::vector<Buf<float>> bufs;
    std::vector<void*> ptrs;
    for (const auto& core : other.second.cores) {
      bufs.emplace_back(core.size());
      ptrs.push_back(bufs.back().data());
    }
    Buf<float> out(std::max<int64_t>(1, other.second.B * opb.total_dim));
    for (int op = 0; op < 3; ++op) {
      auto ex = make_exec(rng, RunOptions{});
      const Status st = op == 0   ? forward_impl<float>(ex, opb, od.in, out.data())
                        : op == 1 ? backward_impl<float>(ex, opb, od.in, out.data(), ptrs)
                                  : backward_fused_impl<float>(ex, opb, od.in, out.data(), ptrs, 0, 0.1, 0.0);
      EXPECT(st.code == Status::kInvalidArgument && st.message.find("`prepared` does not match this call") != std::string::npos &&
                 ex.enqueued == 0,
             "%s, op %d: a mismatched preparation was accepted or work was enqueued (%lld): %s", other.first, op,
             (long long)ex.enqueued, st.message.c_str());
    }
  }
  Buf<int64_t> buffer(saved.words() + 1);
  auto ex = make_exec(rng, RunOptions{});
  Status st = prepare_index(ex, pb, dev.in, buffer.data(), saved.words() + 1);
  EXPECT(st.code == Status::kInvalidArgument && ex.enqueued == 0, "tt_prepare into a wrong-sized buffer: %s",
         st.message.c_str());
  dev.in.prepared = nullptr;  // and no indices either (attach cleared them)
  Buf<float> out(c.B * pb.total_dim);
  st = forward_impl<float>(ex, pb, dev.in, out.data());
  EXPECT(st.code == Status::kInvalidArgument && ex.enqueued == 0, "forward without indices: %s", st.message.c_str());
}

// The length of a preparation tells calls apart on the host: always when only N differs; when B,
// F, the feature map, a table's valid rows or the tables differ, unless the tags collide, about
// once in kPreparedTagRange.
void prepared_length_cases(std::mt19937_64& rng) {
  const auto shapes = [](const std::vector<TableSpec>& tables, const std::vector<int64_t>& ftm, int64_t B,
                         int64_t N) {
    LookupProblem lp;
    for (const auto& t : tables) {
      for (int64_t k = 0; k < t.d(); ++k) {
        lp.core_shapes.push_back({t.p[k], t.r[k], t.q[k], t.r[k + 1]});
        lp.cores.push_back(nullptr);  // build_problem reads shapes only
      }
      lp.table_num_cores.push_back(t.d());
    }
    lp.feature_table_map = ftm;
    lp.pooling_modes.assign(ftm.size(), 0);
    lp.num_indices = N;
    lp.num_offsets = static_cast<int64_t>(ftm.size()) * B + 1;
    return lp;
  };
  const auto words = [](const LookupProblem& lp) {
    Problem pb;
    const Status s = build_problem(lp, &pb);
    EXPECT(s.ok(), "prepared_length_cases: %s", s.message.c_str());
    return prepared_words(pb);
  };
  int trials = 0, collisions = 0;
  for (int it = 0; it < 600; ++it) {
    std::vector<TableSpec> tables;
    for (int64_t t = 0, T = rand_int(rng, 1, 3); t < T; ++t) tables.push_back(random_table(rng, rand_int(rng, 1, 4)));
    std::vector<int64_t> ftm;
    for (int64_t f = 0, F = rand_int(rng, 1, 4); f < F; ++f) ftm.push_back(rand_int(rng, 0, tables.size() - 1));
    const int64_t B = rand_int(rng, 1, 300), N = rand_int(rng, 0, 5000);
    const LookupProblem base = shapes(tables, ftm, B, N);
    const int64_t w = words(base);
    EXPECT(words(shapes(tables, ftm, B, N + rand_int(rng, 1, 1000))) != w, "only N differs, same length");
    std::vector<LookupProblem> others = {shapes(tables, ftm, B + rand_int(rng, 1, 50), N)};
    std::vector<int64_t> more = ftm;
    more.push_back(0);
    others.push_back(shapes(tables, more, B, N));
    std::vector<TableSpec> extra = tables;
    extra.push_back(random_table(rng, rand_int(rng, 1, 4)));
    others.push_back(shapes(extra, ftm, B, N));
    if (tables.size() > 1) {
      std::vector<int64_t> moved = ftm;
      moved[0] = (moved[0] + 1) % static_cast<int64_t>(tables.size());
      others.push_back(shapes(tables, moved, B, N));
    }
    if (tables[0].rows() > 1) {
      LookupProblem fewer_rows = base;
      fewer_rows.table_num_rows.clear();
      for (const auto& t : tables) fewer_rows.table_num_rows.push_back(t.rows());
      fewer_rows.table_num_rows[0] -= 1;
      others.push_back(fewer_rows);
    }
    for (const auto& other : others) {
      ++trials;
      collisions += words(other) == w;
    }
  }
  EXPECT(trials > 2000 && collisions <= 6, "prepared lengths: %d collisions in %d calls that differ (expected ~%.1f)",
         collisions, trials, trials / static_cast<double>(kPreparedTagRange));
  std::printf("  prepared lengths: %d collisions in %d differing calls of equal N\n", collisions, trials);
}

// Bad input never stops a call or makes it read out of bounds: bad indices are excluded from the
// result and the first one is recorded (position, value, feature, table, range, count); malformed
// offsets are recorded; an earlier error stays until the caller clears it.
void error_cases(std::mt19937_64& rng) {
  TableSpec s;
  s.p = {3, 4};
  s.q = {2, 2};
  s.r = {1, 3, 1};
  Case c = make_case<float>(rng, {s}, 2, 5, 3, false, 0.2);
  c.modes = {0, 0};  // sum: a dropped position changes no bag length
  c.indices.push_back(0);  // make sure there is at least one index past position 0
  c.offsets.back() += 1;
  const int64_t last = static_cast<int64_t>(c.indices.size()) - 1;
  for (int64_t valid_rows : {int64_t(12), int64_t(10)}) {
    // Out of range: position 1 first (and the last one; with 10 valid rows also rows 10 and 11).
    Case bad = c;
    bad.indices[0] = 0;
    bad.indices[1] = valid_rows == 12 ? 12 : 11;
    bad.indices[last] = -1;
    std::set<int64_t> drop;
    for (int64_t j = 0; j <= last; ++j)
      if (bad.indices[j] < 0 || bad.indices[j] >= valid_rows) drop.insert(j);
    const Case kept = drop_positions(bad, drop);
    Device<float> dev(bad);
    if (valid_rows != 12) dev.lp.table_num_rows = {valid_rows};
    Problem pb;
    EXPECT(build_problem(dev.lp, &pb).ok(), "build_problem");
    auto ex = make_exec(rng, RunOptions{});
    Buf<float> out(bad.B * pb.total_dim);
    const Status st = forward_impl<float>(ex, pb, dev.in, out.data());
    ex.finish();
    const ErrorRecord& e = dev.errors[0];
    const int64_t f1 = 1 < c.offsets[c.B] ? 0 : 1;
    EXPECT(st.ok() && e.code == kErrIndex && e.position == 1 && e.value == bad.indices[1] &&
               e.count == static_cast<int64_t>(drop.size()) &&
               e.feature == f1 && e.table == 0 && e.limit == valid_rows && e.call == 7,
           "bad index not recorded: %s / %s", st.message.c_str(), describe_error(e).c_str());
    EXPECT(describe_error(e).find("index " + std::to_string(bad.indices[1]) + " at position 1 ") != std::string::npos,
           "message: %s", describe_error(e).c_str());
    std::vector<double> got;
    for (float v : out) got.push_back(v);
    EXPECT(rel_err(got, ref_forward(kept)) <= 1e-5, "forward with bad indices: the good ones differ (error %.3g)",
           rel_err(got, ref_forward(kept)));
    EXPECT(ex.canaries_intact(), "bad indices: buffer overrun");
    // Backward: the same exclusion; the earlier record stays (call 7), the new call's error is not kept.
    dev.in.call = 8;
    std::vector<double> go_d(out.size());
    Buf<float> go(out.size());
    for (size_t i = 0; i < go.size(); ++i) go[i] = static_cast<float>(go_d[i] = rand_double(rng, -1, 1));
    Buf<float> g0(3 * 1 * 2 * 3), g1(4 * 3 * 2 * 1);
    auto ex2 = make_exec(rng, RunOptions{});
    std::vector<void*> grads = {g0.data(), g1.data()};
    const Status sb = backward_impl<float>(ex2, pb, dev.in, go.data(), grads);
    ex2.finish();
    EXPECT(sb.ok() && dev.errors[0].call == 7, "backward: the first error was not kept (call %lld)",
           (long long)dev.errors[0].call);
    const auto ref = ref_backward(kept, go_d);
    std::vector<double> g, want;
    for (float v : g0) g.push_back(v);
    for (float v : g1) g.push_back(v);
    for (const auto& r : ref) want.insert(want.end(), r.begin(), r.end());
    EXPECT(rel_err(g, want) <= 1e-5, "backward with bad indices: error %.3g", rel_err(g, want));
    EXPECT(ex2.canaries_intact(), "bad indices (backward): buffer overrun");
    // Saved: tt_prepare records the bad index (its call); the ops run from its buffer record
    // nothing more and leave the same positions out.
    dev.errors[0] = ErrorRecord{};
    dev.in.call = 9;
    SavedPreparation saved;
    saved.attach(rng, RunOptions{}, pb, dev, "bad index (saved)");
    EXPECT(dev.errors[0].code == kErrIndex && dev.errors[0].position == 1 && dev.errors[0].call == 9 &&
               dev.errors[0].count == static_cast<int64_t>(drop.size()),
           "tt_prepare did not record the bad index: %s", describe_error(dev.errors[0]).c_str());
    dev.errors[0] = ErrorRecord{};
    dev.in.call = 10;
    Buf<float> out_saved(out.size()), g0s(g0.size()), g1s(g1.size());
    auto ex3 = make_exec(rng, RunOptions{});
    const Status fs = forward_impl<float>(ex3, pb, dev.in, out_saved.data());
    std::vector<void*> grads_saved = {g0s.data(), g1s.data()};
    const Status bs = backward_impl<float>(ex3, pb, dev.in, go.data(), grads_saved);
    ex3.finish();
    EXPECT(fs.ok() && bs.ok() && dev.clean(), "ops from a saved preparation of bad indices: %s %s, recorded %s",
           fs.message.c_str(), bs.message.c_str(), describe_error(dev.errors[0]).c_str());
    EXPECT(std::equal(out.begin(), out.end(), out_saved.begin()), "forward with bad indices: saved != unsaved");
    std::vector<double> gs;
    for (float v : g0s) gs.push_back(v);
    for (float v : g1s) gs.push_back(v);
    EXPECT(rel_err(gs, want) <= 1e-5, "backward with bad indices (saved): error %.3g", rel_err(gs, want));
    EXPECT(saved.intact() && ex3.canaries_intact(), "bad indices (saved): buffer overrun or preparation changed");
  }
  // Offsets that decrease / do not end at N / do not start at 0.
  for (int variant = 0; variant < 3; ++variant) {
    Case b2 = c;
    if (variant == 0) b2.offsets[1] = b2.offsets[2] + 1;
    if (variant == 1) b2.offsets.back() -= 1;
    if (variant == 2) b2.offsets[0] = 1;
    Device<float> dev(b2);
    Problem pb;
    build_problem(dev.lp, &pb);
    auto ex = make_exec(rng, RunOptions{});
    Buf<float> out(b2.B * pb.total_dim);
    const Status st = forward_impl<float>(ex, pb, dev.in, out.data());
    ex.finish();
    EXPECT(st.ok() && dev.errors[0].code == kErrOffsets && dev.errors[0].limit == static_cast<int64_t>(c.indices.size()),
           "bad offsets variant %d not recorded: %s", variant, describe_error(dev.errors[0]).c_str());
    EXPECT(ex.canaries_intact(), "bad offsets variant %d: buffer overrun", variant);
    // Saved: recorded by tt_prepare, and the op from its buffer reads within bounds.
    dev.errors[0] = ErrorRecord{};
    SavedPreparation saved;
    saved.attach(rng, RunOptions{}, pb, dev, "bad offsets (saved)");
    EXPECT(dev.errors[0].code == kErrOffsets, "tt_prepare: bad offsets variant %d not recorded", variant);
    dev.errors[0] = ErrorRecord{};
    auto ex2 = make_exec(rng, RunOptions{});
    const Status ss = forward_impl<float>(ex2, pb, dev.in, out.data());
    ex2.finish();
    EXPECT(ss.ok() && dev.clean() && ex2.canaries_intact() && saved.intact(),
           "bad offsets variant %d (saved): %s, recorded %s", variant, ss.message.c_str(),
           describe_error(dev.errors[0]).c_str());
  }
  mismatched_preparations(rng, c, s);
  // Host validation.
  Device<float> dev(c);
  LookupProblem lp = dev.lp;
  lp.core_shapes[1][1] = 4;  // rank mismatch
  Problem pb;
  EXPECT(build_problem(lp, &pb).code == Status::kInvalidArgument, "rank mismatch accepted");
  lp = dev.lp;
  lp.feature_table_map[0] = 3;
  EXPECT(build_problem(lp, &pb).code == Status::kInvalidArgument, "bad feature_table_map accepted");
  lp = dev.lp;
  lp.num_offsets = 4;
  EXPECT(build_problem(lp, &pb).code == Status::kInvalidArgument, "bad offsets length accepted");
  lp = dev.lp;
  lp.table_num_cores = {1};
  EXPECT(build_problem(lp, &pb).code == Status::kInvalidArgument, "core count mismatch accepted");
  for (const auto& rows : std::vector<std::vector<int64_t>>{{0}, {13}, {5, 5}}) {
    lp = dev.lp;
    lp.table_num_rows = rows;
    EXPECT(build_problem(lp, &pb).code == Status::kInvalidArgument, "table_num_rows %lld accepted", (long long)rows[0]);
  }
}

void edge_cases(std::mt19937_64& rng) {
  TableSpec s;
  s.p = {5, 3, 2};
  s.q = {2, 3, 2};
  s.r = {1, 4, 2, 1};
  // Everything empty (N = 0), and B = 0.
  for (int64_t B : {3, 0}) {
    Case c = make_case<float>(rng, {s}, 2, B, 0, false, 0.0);
    check_forward<float>(rng, c, RunOptions{}, "empty");
    check_backward<float>(rng, c, RunOptions{}, "empty");
    check_fused<float>(rng, c, RunOptions{}, 2, "empty");
    check_saved_matches_unsaved<float>(rng, c, "empty");
  }
  // One table read by several features, some tables unused.
  TableSpec s2 = s;
  s2.p = {7, 7, 7};
  const Case c = make_case<float>(rng, {s, s2, s}, 5, 6, 5, false, 0.5, {1, 1, 0, 1, 1});  // table 2 unused
  check_forward<float>(rng, c, RunOptions{}, "shared tables");
  check_backward<float>(rng, c, RunOptions{}, "shared tables");
  check_fused<float>(rng, c, RunOptions{}, 1, "shared tables");
  // Hot rows: a few rows in most bags, so their gradients are summed in pieces (kHotPositions).
  const Case hot = make_case<float>(rng, {s, s2}, 2, 250, 4, true, 0.9);
  check_forward<float>(rng, hot, RunOptions{}, "hot rows");
  check_backward<float>(rng, hot, RunOptions{}, "hot rows");
  check_fused<float>(rng, hot, RunOptions{}, 2, "hot rows");
  check_saved_matches_unsaved<float>(rng, hot, "hot rows");
  check_saved_matches_unsaved<float>(rng, c, "shared tables");
  check_backward<double>(rng, make_case<double>(rng, {s2}, 1, 300, 3, false, 0.95), RunOptions{}, "hot rows fp64");
  // Many bags, a persistent grid of one block, every R.
  Case big = make_case<float>(rng, {s2}, 1, 700, 3, true, 0.1);
  for (int R : {1, 4, 32}) {
    RunOptions o;
    o.drv.chunk_rows = R;
    o.grid = 1;
    check_forward<float>(rng, big, o, "many bags");
    check_backward<float>(rng, big, o, "many bags");
  }
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t seed = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 12345;
  const int count = argc > 2 ? std::atoi(argv[2]) : 60;
  std::mt19937_64 rng(seed);
#if defined(TTDIST_ON_DEVICE)
  const char* mode = "tt_ondevice";
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    std::fprintf(stderr, "tt_ondevice: no CUDA device\n");
    return 2;
  }
  std::printf("tt_ondevice: %s (sm_%d%d, %d SMs)\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
#else
  const char* mode = "tt_emulate";
  host_hooks().shfl_xor = &LaneScheduler::shfl_xor;
  host_hooks().exclusive_access = &LaneScheduler::exclusive_access;
#endif
  std::printf("%s: seed %llu, %d random cases per dtype\n", mode, (unsigned long long)seed, count);
  error_cases(rng);
  prepared_length_cases(rng);
  edge_cases(rng);
  random_cases<float>(rng, count);
  random_cases<double>(rng, count / 2);
  random_cases<__nv_bfloat16>(rng, count / 2);
  for (int opt = 0; opt < 3; ++opt)
    for (int x = 0; x < 6; ++x) {
      check_sparse_update<float>(rng, opt);
      check_sparse_update<__nv_bfloat16>(rng, opt);
      check_sparse_update<double>(rng, opt);
    }
  fbtt_case(rng);
  std::printf("%s: %d checks, %d failures\n", mode, g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
