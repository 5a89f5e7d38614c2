// CUDA kernels and host launchers of the ttdist TT ops (API: tt_kernels.h; algorithm:
// tt_device.cuh; op sequences: tt_driver.cuh). Pure CUDA: no torch / ATen / c10 / cuBLAS
// headers, so a bare `nvcc -c` compiles it (.ci/compile_cuda.sh). Sorting and scans use CUB,
// which ships with the CUDA toolkit.
#include <cub/cub.cuh>

#include <algorithm>
#include <limits>
#include <string>

#include "tt_device.cuh"
#include "tt_driver.cuh"
#include "tt_kernels.h"

namespace ttdist {
namespace cuda {
namespace {

// One thread per item, grid-stride (no grid-dimension limit on the item count).
template <class Op>
__global__ void __launch_bounds__(kItemThreads) items_kernel(const Op op, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) op(i);
}

// One block per program item, grid-stride (a persistent grid); phases separated by barriers.
template <class Prog>
__global__ void __launch_bounds__(Prog::kThreads) program_kernel(const Prog prog, int64_t items,
                                                                 typename Prog::scratch_t* global_scratch,
                                                                 int64_t global_scratch_elems) {
  using scratch_t = typename Prog::scratch_t;
  __shared__ typename Prog::Shared sh;
  extern __shared__ __align__(16) unsigned char tt_dynamic_smem[];
  scratch_t* scratch = global_scratch != nullptr ? global_scratch + blockIdx.x * global_scratch_elems
                                                 : reinterpret_cast<scratch_t*>(tt_dynamic_smem);
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    for (int ph = 0;; ++ph) {
      const bool more = prog.phase(ph, item, sh, scratch, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
      __syncthreads();
      if (!more) break;
    }
  }
}

std::string cuda_message(cudaError_t e, const char* what) {
  return std::string("ttdist CUDA: ") + what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

// The CUDA executor of tt_driver.cuh.
class GpuExec {
 public:
  GpuExec(Allocator& alloc, cudaStream_t stream) : alloc_(alloc), stream_(stream) {
    int device = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    int optin = 0;
    check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
    smem_optin_ = optin > static_cast<int>(sizeof(ChunkShared)) ? static_cast<size_t>(optin) - sizeof(ChunkShared) : 0;
    if (sm_count_ < 1) sm_count_ = 1;
  }

  void* alloc(size_t bytes) { return alloc_.allocate(bytes); }
  void upload(void* dst, const void* src, size_t bytes) {
    // Pageable source: returns once the data is staged, so `src` may be freed afterwards.
    if (bytes) check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync H2D");
  }
  void download(void* dst, const void* src, size_t bytes) {
    if (bytes) check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync D2H");
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }
  void zero(void* p, size_t bytes) {
    if (bytes) check(cudaMemsetAsync(p, 0, bytes, stream_), "cudaMemsetAsync");
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
  void run_program(const Prog& prog, int64_t items, size_t smem_bytes, int64_t global_scratch_elems) {
    if (items <= 0 || !ok()) return;
    using scratch_t = typename Prog::scratch_t;
    auto kernel = program_kernel<Prog>;
    // The default limit (48 KB) covers static + dynamic shared memory together; set the dynamic
    // limit explicitly whenever dynamic memory is used (plan_chunks keeps it within the opt-in).
    if (smem_bytes > 0)
      check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)),
            "cudaFuncSetAttribute");
    int per_sm = 0;
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Prog::kThreads, smem_bytes),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    if (!ok()) return;
    const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * sm_count_;
    const int64_t grid = std::max<int64_t>(1, std::min<int64_t>({items, resident, std::numeric_limits<int32_t>::max()}));
    scratch_t* scratch = nullptr;
    if (global_scratch_elems > 0)
      scratch = static_cast<scratch_t*>(alloc(sizeof(scratch_t) * static_cast<size_t>(grid * global_scratch_elems)));
    kernel<<<static_cast<unsigned>(grid), Prog::kThreads, smem_bytes, stream_>>>(prog, items, scratch,
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
  bool ok() const { return status_.ok(); }
  void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess && status_.ok()) status_ = Status::Error(Status::kCudaError, cuda_message(e, what));
  }

  Allocator& alloc_;
  cudaStream_t stream_;
  int sm_count_ = 1;
  size_t smem_optin_ = 0;
  Status status_;
};

}  // namespace

size_t dtype_size(DType t) { return dtype_size_of(t); }
size_t acc_size(DType t) { return acc_size_of(t); }

Status check_lookup_problem(const LookupProblem& problem, int64_t* batch, int64_t* total_dim) {
  Problem pb;
  Status s = build_problem(problem, &pb);
  if (s.ok()) {
    *batch = pb.B;
    *total_dim = pb.total_dim;
  }
  return s;
}

Status tt_forward(const LookupProblem& problem, const LookupInputs& inputs, void* output, Allocator& alloc,
                  cudaStream_t stream) {
  Problem pb;
  Status s = build_problem(problem, &pb);
  if (!s.ok()) return s;
  GpuExec ex(alloc, stream);
  if (!ex.status().ok()) return ex.status();
  switch (problem.dtype) {
    case DType::kFloat32: return forward_impl<float>(ex, std::move(pb), inputs, static_cast<float*>(output));
    case DType::kBFloat16:
      return forward_impl<__nv_bfloat16>(ex, std::move(pb), inputs, static_cast<__nv_bfloat16*>(output));
    case DType::kFloat64: return forward_impl<double>(ex, std::move(pb), inputs, static_cast<double*>(output));
  }
  return invalid("unsupported dtype");
}

Status tt_backward(const LookupProblem& problem, const LookupInputs& inputs, const void* grad_output,
                   const std::vector<void*>& core_grads, Allocator& alloc, cudaStream_t stream) {
  Problem pb;
  Status s = build_problem(problem, &pb);
  if (!s.ok()) return s;
  if (static_cast<int64_t>(core_grads.size()) != pb.C) return invalid("one gradient buffer per core is required");
  GpuExec ex(alloc, stream);
  if (!ex.status().ok()) return ex.status();
  switch (problem.dtype) {
    case DType::kFloat32:
      return backward_impl<float>(ex, std::move(pb), inputs, static_cast<const float*>(grad_output), core_grads);
    case DType::kBFloat16:
      return backward_impl<__nv_bfloat16>(ex, std::move(pb), inputs, static_cast<const __nv_bfloat16*>(grad_output),
                                          core_grads);
    case DType::kFloat64:
      return backward_impl<double>(ex, std::move(pb), inputs, static_cast<const double*>(grad_output), core_grads);
  }
  return invalid("unsupported dtype");
}

Status tt_backward_fused(const LookupProblem& problem, const LookupInputs& inputs, const void* grad_output,
                         const std::vector<void*>& optimizer_states, int optimizer, double learning_rate, double eps,
                         Allocator& alloc, cudaStream_t stream) {
  Problem pb;
  Status s = build_problem(problem, &pb);
  if (!s.ok()) return s;
  if (static_cast<int64_t>(optimizer_states.size()) != pb.C) return invalid("one optimizer state per core is required");
  GpuExec ex(alloc, stream);
  if (!ex.status().ok()) return ex.status();
  switch (problem.dtype) {
    case DType::kFloat32:
      return backward_fused_impl<float>(ex, std::move(pb), inputs, static_cast<const float*>(grad_output),
                                        optimizer_states, optimizer, learning_rate, eps);
    case DType::kBFloat16:
      return backward_fused_impl<__nv_bfloat16>(ex, std::move(pb), inputs,
                                                static_cast<const __nv_bfloat16*>(grad_output), optimizer_states,
                                                optimizer, learning_rate, eps);
    case DType::kFloat64:
      return backward_fused_impl<double>(ex, std::move(pb), inputs, static_cast<const double*>(grad_output),
                                         optimizer_states, optimizer, learning_rate, eps);
  }
  return invalid("unsupported dtype");
}

Status sparse_row_update(DType dtype, void* weight, void* optimizer_state, int64_t rows, int64_t row_len,
                         const int64_t* row_ids, int64_t num_ids, const void* row_grads, int optimizer,
                         double learning_rate, double eps, Allocator& alloc, cudaStream_t stream) {
  GpuExec ex(alloc, stream);
  if (!ex.status().ok()) return ex.status();
  switch (dtype) {
    case DType::kFloat32:
      return sparse_row_update_impl<float>(ex, static_cast<float*>(weight), optimizer_state, rows, row_len, row_ids,
                                           num_ids, row_grads, optimizer, learning_rate, eps);
    case DType::kBFloat16:
      return sparse_row_update_impl<__nv_bfloat16>(ex, static_cast<__nv_bfloat16*>(weight), optimizer_state, rows,
                                                   row_len, row_ids, num_ids, row_grads, optimizer, learning_rate, eps);
    case DType::kFloat64:
      return sparse_row_update_impl<double>(ex, static_cast<double*>(weight), optimizer_state, rows, row_len, row_ids,
                                            num_ids, row_grads, optimizer, learning_rate, eps);
  }
  return invalid("unsupported dtype");
}

}  // namespace cuda
}  // namespace ttdist
