// CUDA kernels and host launchers of the ttdist TT ops (API: tt_kernels.h; algorithm:
// tt_device.cuh; op sequences: tt_driver.cuh). Pure CUDA: no torch / ATen / c10 / cuBLAS
// headers, so a bare `nvcc -c` compiles it (.ci/compile_cuda.sh). Sorting and scans use CUB,
// which ships with the CUDA toolkit.
#include "tt_driver.cuh"
#include "tt_gpu_exec.cuh"
#include "tt_kernels.h"

namespace ttdist {
namespace cuda {

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

Status prepared_words(const LookupProblem& problem, int64_t* words) {
  Problem pb;
  Status s = build_problem(problem, &pb);
  if (s.ok()) *words = prepared_words(pb);
  return s;
}

Status check_prepared(const LookupProblem& problem, int64_t words) {
  Problem pb;
  Status s = build_problem(problem, &pb);
  return s.ok() ? check_prepared_words(pb, words) : s;
}

Status tt_prepare(const LookupProblem& problem, const LookupInputs& inputs, int64_t* prepared, int64_t words,
                  Allocator& alloc, cudaStream_t stream) {
  Problem pb;
  Status s = build_problem(problem, &pb);
  if (!s.ok()) return s;
  GpuExec ex(alloc, stream);
  if (!ex.status().ok()) return ex.status();
  return prepare_index(ex, pb, inputs, prepared, words);
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
                         double learning_rate, double eps, ErrorRecord* errors, int64_t call, Allocator& alloc,
                         cudaStream_t stream) {
  GpuExec ex(alloc, stream);
  if (!ex.status().ok()) return ex.status();
  switch (dtype) {
    case DType::kFloat32:
      return sparse_row_update_impl<float>(ex, static_cast<float*>(weight), optimizer_state, rows, row_len, row_ids,
                                           num_ids, row_grads, optimizer, learning_rate, eps, errors, call);
    case DType::kBFloat16:
      return sparse_row_update_impl<__nv_bfloat16>(ex, static_cast<__nv_bfloat16*>(weight), optimizer_state, rows,
                                                   row_len, row_ids, num_ids, row_grads, optimizer, learning_rate, eps,
                                                   errors, call);
    case DType::kFloat64:
      return sparse_row_update_impl<double>(ex, static_cast<double*>(weight), optimizer_state, rows, row_len, row_ids,
                                            num_ids, row_grads, optimizer, learning_rate, eps, errors, call);
  }
  return invalid("unsupported dtype");
}

}  // namespace cuda
}  // namespace ttdist
