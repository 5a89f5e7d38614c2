// The CUDA executor of tt_driver.cuh: kernel launches (item ops and block programs), CUB sorts
// and scans, on one stream with temporary memory from the caller's Allocator. Shared by the op
// library (tt_kernels.cu) and the on-device run of the kernel checks (tests/gpu/emulate_kernels.cu
// built with -DTTDIST_ON_DEVICE), so both launch exactly the same kernels. Pure CUDA.
#pragma once

#include <cub/cub.cuh>

#include <algorithm>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "tt_device.cuh"
#include "tt_kernels.h"

namespace ttdist {
namespace cuda {

// Threads per block of item ops, and the blocks per SM the register budget is sized for
// (__launch_bounds__ min-blocks: 256 threads x 4 blocks -> at most 64 registers per thread).
constexpr int kItemMinBlocks = 4;
// Block programs: 2 resident blocks of kThreads per SM -> at most 128 registers per thread, so
// the chunk programs (up to ~110 registers) do not spill.
constexpr int kProgramMinBlocks = 2;

// One thread per item, grid-stride (no grid-dimension limit on the item count).
template <class Op>
__global__ void __launch_bounds__(kItemThreads, kItemMinBlocks) items_kernel(const Op op, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) op(i);
}

// One block per program item, grid-stride (a persistent grid); phases separated by barriers.
// The item count is min(max_items, *items) when `items` (device memory) is given.
template <class Prog>
__global__ void __launch_bounds__(Prog::kThreads, kProgramMinBlocks)
    program_kernel(const Prog prog, int64_t max_items, const unsigned long long* items,
                   typename Prog::scratch_t* global_scratch, int64_t global_scratch_elems) {
  using scratch_t = typename Prog::scratch_t;
  __shared__ typename Prog::Shared sh;
  extern __shared__ __align__(16) unsigned char tt_dynamic_smem[];
  scratch_t* scratch = global_scratch != nullptr ? global_scratch + blockIdx.x * global_scratch_elems
                                                 : reinterpret_cast<scratch_t*>(tt_dynamic_smem);
  const int64_t n = items != nullptr ? tt_min<int64_t>(max_items, static_cast<int64_t>(*items)) : max_items;
  for (int64_t item = blockIdx.x; item < n; item += gridDim.x) {
    for (int ph = 0;; ++ph) {
      const bool more = prog.phase(ph, item, sh, scratch, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
      __syncthreads();
      if (!more) break;
    }
  }
}

inline std::string cuda_message(cudaError_t e, const char* what) {
  return std::string("ttdist CUDA: ") + what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

// Pinned host buffers for the host-to-device copies of a call (descriptors, initial status):
// from pageable memory the driver may make the host wait for the stream, from pinned memory the
// copy is asynchronous. A buffer is reused once the event recorded after its copy has completed
// (asked without waiting); otherwise another is allocated. Shared by all threads and devices.
class PinnedStaging {
 public:
  static cudaError_t copy_to_device(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
    static PinnedStaging staging;
    return staging.copy(dst, src, bytes, stream);
  }

 private:
  struct Buffer {
    void* host = nullptr;
    size_t bytes = 0;
    int device = -1;
    cudaEvent_t done = nullptr;
    bool in_flight = false;
  };

  cudaError_t copy(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
    int device = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e != cudaSuccess) return e;
    std::lock_guard<std::mutex> lock(mutex_);
    Buffer* buffer = nullptr;
    for (Buffer& b : buffers_) {
      if (b.device != device || b.bytes < bytes) continue;
      if (b.in_flight) {
        const cudaError_t q = cudaEventQuery(b.done);
        if (q == cudaErrorNotReady) {
          (void)cudaGetLastError();  // a query's "not ready" is no error: clear it, as torch does
          continue;
        }
        if (q != cudaSuccess) return q;
      }
      buffer = &b;
      break;
    }
    if (buffer == nullptr) {
      // A few at once on a device's first copy: forward and backward calls overlap, and a
      // pinned allocation may wait for the device, so it should not happen in steady state.
      size_t size = kMinBytes;
      while (size < bytes) size *= 2;
      const bool first = std::none_of(buffers_.begin(), buffers_.end(), [&](const Buffer& b) { return b.device == device; });
      for (int n = 0; n < (first ? kFirstBuffers : 1); ++n) {
        Buffer b;
        b.device = device;
        b.bytes = size;
        if ((e = cudaHostAlloc(&b.host, b.bytes, cudaHostAllocDefault)) != cudaSuccess) return e;
        if ((e = cudaEventCreateWithFlags(&b.done, cudaEventDisableTiming)) != cudaSuccess) return e;
        buffers_.push_back(b);
      }
      buffer = &buffers_.back();
    }
    std::memcpy(buffer->host, src, bytes);
    if ((e = cudaMemcpyAsync(dst, buffer->host, bytes, cudaMemcpyHostToDevice, stream)) != cudaSuccess) return e;
    buffer->in_flight = true;
    return cudaEventRecord(buffer->done, stream);
  }

  static constexpr size_t kMinBytes = 64 * 1024;
  static constexpr int kFirstBuffers = 4;
  std::mutex mutex_;
  std::deque<Buffer> buffers_;  // stable addresses
};

// The CUDA executor of tt_driver.cuh. Enqueues only: nothing here waits for the device.
class GpuExec {
 public:
  GpuExec(Allocator& alloc, cudaStream_t stream) : alloc_(alloc), stream_(stream) {
    // An error left by earlier work on this thread is reported as such, not blamed on (and
    // cleared by) this call's first launch check.
    const cudaError_t pending = cudaPeekAtLastError();
    if (pending != cudaSuccess) {
      status_ = Status::Error(Status::kCudaError, cuda_message(pending, "an error pending from earlier CUDA work"));
      return;
    }
    int device = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    if (!ok()) return;
    const DeviceLimits limits = device_limits(device);
    check(limits.error, "cudaDeviceGetAttribute");
    device_ = device;
    sm_count_ = limits.sm_count;
    smem_per_block_optin_ = limits.smem_per_block_optin;
    smem_optin_ = limits.smem_optin;
  }

  void* alloc(size_t bytes) { return alloc_.allocate(bytes); }
  void upload(void* dst, const void* src, size_t bytes) {
    if (bytes && ok()) check(PinnedStaging::copy_to_device(dst, src, bytes, stream_), "host-to-device copy");
  }
  void zero(void* p, size_t bytes) {
    if (bytes && ok()) check(cudaMemsetAsync(p, 0, bytes, stream_), "cudaMemsetAsync");
  }

  template <class Op>
  void for_each(int64_t n, const Op& op) {
    if (n <= 0 || !ok()) return;
    const int64_t want = (n + kItemThreads - 1) / kItemThreads;
    const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(want, static_cast<int64_t>(sm_count_) * 16));
    items_kernel<Op><<<static_cast<unsigned>(grid), kItemThreads, 0, stream_>>>(op, n);
    check(cudaGetLastError(), "items_kernel launch");
  }

  template <class Prog>
  void run_program(const Prog& prog, int64_t max_items, const unsigned long long* items, size_t smem_bytes,
                   int64_t global_scratch_elems) {
    if (max_items <= 0 || !ok()) return;
    using scratch_t = typename Prog::scratch_t;
    auto kernel = program_kernel<Prog>;
    // The default limit (48 KB) covers static + dynamic shared memory together; a kernel that
    // takes more dynamic memory needs its limit raised. It is raised once per kernel and device,
    // to the opt-in maximum (plan_chunks stays within it), so concurrent calls never race.
    if (smem_bytes > 0) allow_max_dynamic_smem(reinterpret_cast<const void*>(kernel));
    int per_sm = 0;
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Prog::kThreads, smem_bytes),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    if (!ok()) return;
    const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * sm_count_;
    const int64_t grid =
        std::max<int64_t>(1, std::min<int64_t>({max_items, resident, std::numeric_limits<int32_t>::max()}));
    scratch_t* scratch = nullptr;
    if (global_scratch_elems > 0)
      scratch = static_cast<scratch_t*>(alloc(sizeof(scratch_t) * static_cast<size_t>(grid * global_scratch_elems)));
    kernel<<<static_cast<unsigned>(grid), Prog::kThreads, smem_bytes, stream_>>>(prog, max_items, items, scratch,
                                                                                global_scratch_elems);
    check(cudaGetLastError(), "program_kernel launch");
  }

  void sort_pairs(const uint64_t* keys_in, uint64_t* keys_out, const int64_t* vals_in, int64_t* vals_out, int64_t n,
                  int key_bits) {
    if (n <= 0 || !ok()) return;
    size_t bytes = 0;
    const int items = static_cast<int>(n);
    check(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys_in, keys_out, vals_in, vals_out, items, 0, key_bits,
                                          stream_),
          "cub::DeviceRadixSort::SortPairs");
    void* temp = alloc(std::max<size_t>(bytes, 16));
    check(cub::DeviceRadixSort::SortPairs(temp, bytes, keys_in, keys_out, vals_in, vals_out, items, 0, key_bits,
                                          stream_),
          "cub::DeviceRadixSort::SortPairs");
  }
  void sort_keys(const int64_t* in, int64_t* out, int64_t n) {
    if (n <= 0 || !ok()) return;
    size_t bytes = 0;
    const int items = static_cast<int>(n);
    check(cub::DeviceRadixSort::SortKeys(nullptr, bytes, in, out, items, 0, 64, stream_), "cub::DeviceRadixSort::SortKeys");
    void* temp = alloc(std::max<size_t>(bytes, 16));
    check(cub::DeviceRadixSort::SortKeys(temp, bytes, in, out, items, 0, 64, stream_), "cub::DeviceRadixSort::SortKeys");
  }
  void inclusive_sum(const int64_t* in, int64_t* out, int64_t n) {
    if (n <= 0 || !ok()) return;
    size_t bytes = 0;
    const int items = static_cast<int>(n);
    check(cub::DeviceScan::InclusiveSum(nullptr, bytes, in, out, items, stream_), "cub::DeviceScan::InclusiveSum");
    void* temp = alloc(std::max<size_t>(bytes, 16));
    check(cub::DeviceScan::InclusiveSum(temp, bytes, in, out, items, stream_), "cub::DeviceScan::InclusiveSum");
  }

  int sm_count() const { return sm_count_; }
  size_t smem_optin() const { return smem_optin_; }
  Status status() const { return status_; }

 private:
  struct DeviceLimits {
    int sm_count = 1;
    int smem_per_block_optin = 0;  // static + dynamic shared memory one block may take
    size_t smem_optin = 0;  // dynamic shared memory plans may give a chunk block (with a margin for
                            // static memory beyond sizeof(ChunkShared): alignment, other variables)
    cudaError_t error = cudaSuccess;
  };

  // Read once per device and cached: the attributes cannot change while the process runs.
  static DeviceLimits device_limits(int device) {
    static std::mutex mutex;
    static std::vector<std::pair<int, DeviceLimits>> cache;
    std::lock_guard<std::mutex> lock(mutex);
    for (const auto& entry : cache)
      if (entry.first == device) return entry.second;
    DeviceLimits limits;
    int sms = 0, optin = 0;
    limits.error = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (limits.error == cudaSuccess)
      limits.error = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    limits.sm_count = std::max(sms, 1);
    limits.smem_per_block_optin = optin;
    const int reserved = static_cast<int>(sizeof(ChunkShared)) + 1024;
    limits.smem_optin = optin > reserved ? static_cast<size_t>(optin - reserved) : 0;
    if (limits.error == cudaSuccess) cache.emplace_back(device, limits);
    return limits;
  }

  // Raises the kernel's dynamic shared-memory limit to what its static memory leaves of the
  // per-block opt-in maximum (a larger value is rejected as invalid).
  void allow_max_dynamic_smem(const void* kernel) {
    static std::mutex mutex;
    static std::set<std::pair<const void*, int>> raised;
    std::lock_guard<std::mutex> lock(mutex);
    if (raised.count({kernel, device_})) return;
    cudaFuncAttributes attributes{};
    check(cudaFuncGetAttributes(&attributes, kernel), "cudaFuncGetAttributes");
    if (!ok()) return;
    const int dynamic = smem_per_block_optin_ - static_cast<int>(attributes.sharedSizeBytes);
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, std::max(dynamic, 0)),
          "cudaFuncSetAttribute");
    if (ok()) raised.insert({kernel, device_});
  }

  bool ok() const { return status_.ok(); }
  // Records the first failure of a runtime call made here, and clears it from the runtime's
  // last-error slot: it is reported through this call's Status, and left there it would fail
  // the next, unrelated launch check (torch's included).
  void check(cudaError_t e, const char* what) {
    if (e == cudaSuccess) return;
    (void)cudaGetLastError();
    if (status_.ok()) status_ = Status::Error(Status::kCudaError, cuda_message(e, what));
  }

  Allocator& alloc_;
  cudaStream_t stream_;
  int device_ = 0;
  int sm_count_ = 1;
  int smem_per_block_optin_ = 0;
  size_t smem_optin_ = 0;
  Status status_;
};

}  // namespace cuda
}  // namespace ttdist
