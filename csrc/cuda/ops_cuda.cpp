// torch binding of the CUDA kernels: tensor checks, the current stream, temporary memory from
// torch's caching allocator, the deferred error checks (csrc/error_checks.h), and
// TORCH_LIBRARY_IMPL(ttdist, CUDA) for the five ops whose schemas csrc/ops.cpp defines. Compiled
// only when torch has CUDA (setup.py defines TTDIST_WITH_CUDA). The kernels themselves
// (tt_kernels.cu) see raw pointers only, and no op here waits for the device.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "../error_checks.h"
#include "tt_kernels.h"

namespace ttdist {
namespace {

using at::Tensor;

// Temporary device memory of one op call, from torch's caching allocator on the current stream;
// released (back to the cache, stream-ordered) when the op returns.
class TorchAllocator final : public cuda::Allocator {
 public:
  explicit TorchAllocator(at::Device device) : device_(device) {}
  void* allocate(size_t bytes) override {
    buffers_.push_back(at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(device_)));
    return buffers_.back().data_ptr();
  }

 private:
  at::Device device_;
  std::vector<Tensor> buffers_;
};

// ---------------------------------------------------------------------------------------------
// Deferred error checks: one ErrorRecord per device. After every op its record is copied to
// pinned host memory (asynchronously) and an event is recorded; the next op raises an error
// whose copy has arrived (asked without waiting), check_errors waits for it, and synchronous
// mode waits at once.
// ---------------------------------------------------------------------------------------------
class DeviceErrors {
 public:
  explicit DeviceErrors(c10::DeviceIndex device) : device_(device) {
    c10::cuda::CUDAGuard guard(device);
    C10_CUDA_CHECK(cudaMalloc(&record_, sizeof(cuda::ErrorRecord)));
    C10_CUDA_CHECK(cudaMemset(record_, 0, sizeof(cuda::ErrorRecord)));
    C10_CUDA_CHECK(cudaHostAlloc(&copy_, sizeof(cuda::ErrorRecord), cudaHostAllocDefault));
    *copy_ = cuda::ErrorRecord{};
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&copied_, cudaEventDisableTiming));
  }

  static DeviceErrors& of(c10::DeviceIndex device) {
    static std::mutex mutex;
    static std::array<std::unique_ptr<DeviceErrors>, 64> devices;
    TORCH_CHECK(device >= 0 && device < static_cast<c10::DeviceIndex>(devices.size()), "ttdist: CUDA device ",
                static_cast<int>(device), " is out of range");
    std::lock_guard<std::mutex> lock(mutex);
    if (!devices[device]) devices[device] = std::make_unique<DeviceErrors>(device);
    return *devices[device];
  }

  // Before an op: raises an error of an earlier op whose copy has arrived; returns this op's number.
  int64_t begin_call() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (pending_) {
      const cudaError_t done = cudaEventQuery(copied_);
      if (done == cudaSuccess) raise_recorded();
      else if (done == cudaErrorNotReady) (void)cudaGetLastError();  // "not ready" is no error
      else C10_CUDA_CHECK(done);
    }
    return ++calls_;
  }

  // After an op was enqueued: the record's copy, then (synchronous mode) wait and raise.
  void end_call(cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    C10_CUDA_CHECK(cudaMemcpyAsync(copy_, record_, sizeof(cuda::ErrorRecord), cudaMemcpyDeviceToHost, stream));
    C10_CUDA_CHECK(cudaEventRecord(copied_, stream));
    pending_ = true;
    if (sync_checks()) wait_and_raise();
  }

  void check() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (pending_) wait_and_raise();
  }

  cuda::ErrorRecord* record() const { return record_; }

 private:
  void wait_and_raise() {
    C10_CUDA_CHECK(cudaEventSynchronize(copied_));
    raise_recorded();
  }

  // The copy has arrived: raise what it holds (once), and clear the device record behind it.
  void raise_recorded() {
    pending_ = false;
    const cuda::ErrorRecord found = *copy_;
    if (found.code == cuda::kErrNone || found.call <= reported_call_) return;
    reported_call_ = found.call;
    C10_CUDA_CHECK(cudaMemsetAsync(record_, 0, sizeof(cuda::ErrorRecord),
                                   c10::cuda::getCurrentCUDAStream(device_).stream()));
    const std::string message = cuda::describe_error(found);
    if (cuda::is_index_error(found)) TORCH_CHECK_INDEX(false, message);
    TORCH_CHECK_VALUE(false, message);
  }

  c10::DeviceIndex device_;
  cuda::ErrorRecord* record_ = nullptr;  // device
  cuda::ErrorRecord* copy_ = nullptr;    // pinned host
  cudaEvent_t copied_ = nullptr;
  bool pending_ = false;
  int64_t calls_ = 0;
  int64_t reported_call_ = 0;
  std::mutex mutex_;
};

void check_errors_cuda(c10::DeviceIndex device) {
  DeviceErrors::of(device < 0 ? c10::cuda::current_device() : device).check();
}

const bool registered_check = (register_cuda_check_errors(&check_errors_cuda), true);

// One op call: the device's error checks around it.
class Call {
 public:
  explicit Call(const at::Device& device) : errors_(DeviceErrors::of(device.index())) { number_ = errors_.begin_call(); }
  void finish() { errors_.end_call(c10::cuda::getCurrentCUDAStream().stream()); }
  cuda::ErrorRecord* record() const { return errors_.record(); }
  int64_t number() const { return number_; }

 private:
  DeviceErrors& errors_;
  int64_t number_ = 0;
};

// Invalid arguments raise ValueError, as the CPU ops do; CUDA failures RuntimeError.
void raise_if_error(const cuda::Status& s) {
  if (s.ok()) return;
  if (s.code == cuda::Status::kInvalidArgument) TORCH_CHECK_VALUE(false, s.message);
  TORCH_CHECK(false, s.message);
}

cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kDouble: return cuda::DType::kFloat64;
    default: TORCH_CHECK(false, "ttdist (CUDA): cores must be float32, bfloat16 or float64, got ", t);
  }
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_on(const Tensor& t, const at::Device& device, const char* name) {
  TORCH_CHECK(t.device() == device, "ttdist (CUDA): ", name, " is on ", t.device(), " but the cores are on ", device);
}

cuda::LookupProblem make_problem(at::TensorList cores, at::IntArrayRef table_num_cores,
                                 at::IntArrayRef feature_table_map, at::IntArrayRef pooling_modes,
                                 const Tensor& indices, const Tensor& offsets, at::OptionalIntArrayRef table_num_rows) {
  TORCH_CHECK(!cores.empty(), "ttdist: no cores given");
  const at::Device device = cores[0].device();
  const at::ScalarType dtype = cores[0].scalar_type();
  cuda::LookupProblem lp;
  lp.dtype = to_dtype(dtype);
  for (size_t c = 0; c < cores.size(); ++c) {
    const Tensor& t = cores[c];
    TORCH_CHECK(t.is_cuda() && t.device() == device, "ttdist (CUDA): core ", c, " is on ", t.device(),
                ", core 0 on ", device);
    TORCH_CHECK(t.scalar_type() == dtype, "ttdist (CUDA): all cores must have one dtype; core ", c, " is ",
                t.scalar_type(), ", core 0 ", dtype);
    TORCH_CHECK(t.dim() == 4, "ttdist: core ", c, " must be 4-D (p, r_in, q, r_out), got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), "ttdist: cores must be contiguous");
    lp.core_shapes.push_back({t.size(0), t.size(1), t.size(2), t.size(3)});
    lp.cores.push_back(t.data_ptr());
  }
  lp.table_num_cores = table_num_cores.vec();
  lp.feature_table_map = feature_table_map.vec();
  lp.pooling_modes = pooling_modes.vec();
  if (table_num_rows.has_value()) lp.table_num_rows = table_num_rows->vec();
  TORCH_CHECK(indices.dim() == 1 && offsets.dim() == 1, "ttdist: indices and offsets must be 1-D");
  lp.num_indices = indices.numel();
  lp.num_offsets = offsets.numel();
  return lp;
}

void check_weights(const std::optional<Tensor>& per_sample_weights, const Tensor& indices, const at::Device& device) {
  if (!per_sample_weights.has_value() || !per_sample_weights->defined()) return;
  check_on(*per_sample_weights, device, "per_sample_weights");
  TORCH_CHECK(per_sample_weights->numel() == indices.numel(), "ttdist: per_sample_weights has ",
              per_sample_weights->numel(), " entries but there are ", indices.numel(), " indices");
}

// The `prepared` argument of an op: null when none was given. Checked on the host only, without
// reading device memory: a 1-D int64 tensor on the cores' device whose length is the one
// tt_prepare gives this call (cuda::prepared_words, a function of the call's sizes). Raises
// ValueError before the op enqueues anything.
const Tensor* prepared_for(const std::optional<Tensor>& prepared, const cuda::LookupProblem& lp,
                           const at::Device& device) {
  if (!prepared.has_value() || !prepared->defined()) return nullptr;
  const Tensor& t = *prepared;
  TORCH_CHECK_VALUE(t.device() == device && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(),
                    "ttdist: `prepared` must be the contiguous 1-D int64 tensor tt_prepare returned on ", device,
                    " for this call; got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  raise_if_error(cuda::check_prepared(lp, t.numel()));
  return &t;
}

// int64 contiguous indices / offsets and accumulation-type weights on the cores' device. With a
// preparation the op reads no indices (they are in it), so they are not converted.
struct Inputs {
  Tensor indices, offsets, weights;
  cuda::LookupInputs raw;
};

Inputs make_inputs(const Tensor& indices, const Tensor& offsets, const std::optional<Tensor>& per_sample_weights,
                   const Tensor& core0, const Call& call, const Tensor* prepared = nullptr) {
  const at::Device device = core0.device();
  check_on(indices, device, "indices");
  check_on(offsets, device, "offsets");
  check_weights(per_sample_weights, indices, device);
  Inputs in;
  in.offsets = offsets.to(at::kLong).contiguous();
  in.raw.offsets = in.offsets.data_ptr<int64_t>();
  if (prepared != nullptr) {
    in.raw.prepared = prepared->data_ptr<int64_t>();
    in.raw.prepared_words = prepared->numel();
  } else {
    in.indices = indices.to(at::kLong).contiguous();
    in.raw.indices = in.indices.data_ptr<int64_t>();
  }
  in.raw.errors = call.record();
  in.raw.call = call.number();
  if (per_sample_weights.has_value() && per_sample_weights->defined()) {
    in.weights = per_sample_weights->to(at::toOpMathType(core0.scalar_type())).contiguous();
    in.raw.per_sample_weights = in.weights.data_ptr();
  }
  return in;
}

Tensor grad_output_for(const Tensor& grad_output, const Tensor& core0, int64_t batch, int64_t total_dim) {
  check_on(grad_output, core0.device(), "grad_output");
  TORCH_CHECK(grad_output.scalar_type() == core0.scalar_type(), "ttdist: grad_output must have the cores' dtype ",
              core0.scalar_type(), ", got ", grad_output.scalar_type());
  TORCH_CHECK_VALUE(grad_output.dim() == 2 && grad_output.size(0) == batch && grad_output.size(1) == total_dim,
                    "ttdist: grad_output must be (", batch, ", ", total_dim, "), got ", grad_output.sizes());
  return grad_output.contiguous();
}

void check_optimizer_state(const Tensor& core, const Tensor& state, int64_t optimizer, size_t c) {
  TORCH_CHECK(optimizer == 0 || optimizer == 1 || optimizer == 2, "ttdist: unknown optimizer code ", optimizer);
  if (optimizer == 0) return;
  const int64_t want = optimizer == 1 ? core.numel() : core.size(0);
  check_on(state, core.device(), "an optimizer state");
  TORCH_CHECK(state.numel() == want && state.is_contiguous(), "ttdist: optimizer state ", c, " has ", state.numel(),
              " elements, expected ", want);
  TORCH_CHECK(state.scalar_type() == at::toOpMathType(core.scalar_type()), "ttdist: optimizer state must be ",
              at::toOpMathType(core.scalar_type()));
}

// Core gradients are summed with floating-point atomics: the order, and so the last bits, vary.
void alert_not_deterministic(const char* op) {
  at::globalContext().alertNotDeterministic(std::string(op) +
                                            " (CUDA): core gradients are summed with floating-point atomics; "
                                            "the CPU op is deterministic");
}

// The device part of the preparation, once per batch, for autograd to save (ttdist/ops.py): one
// int64 tensor, sized on the host, filled on the stream; the host does not wait.
Tensor tt_prepare_cuda(at::TensorList cores, at::IntArrayRef table_num_cores, at::IntArrayRef feature_table_map,
                       at::IntArrayRef pooling_modes, const Tensor& indices, const Tensor& offsets,
                       const std::optional<Tensor>& per_sample_weights, at::OptionalIntArrayRef table_num_rows) {
  TORCH_CHECK(!cores.empty(), "ttdist: no cores given");
  c10::cuda::CUDAGuard guard(cores[0].device());
  const cuda::LookupProblem lp =
      make_problem(cores, table_num_cores, feature_table_map, pooling_modes, indices, offsets, table_num_rows);
  int64_t words = 0;
  raise_if_error(cuda::prepared_words(lp, &words));
  check_weights(per_sample_weights, indices, cores[0].device());  // checked now, used by the ops
  Call call(cores[0].device());
  const Inputs in = make_inputs(indices, offsets, std::nullopt, cores[0], call);
  Tensor prepared = at::empty({words}, indices.options().dtype(at::kLong));
  TorchAllocator alloc(cores[0].device());
  raise_if_error(cuda::tt_prepare(lp, in.raw, prepared.data_ptr<int64_t>(), words, alloc, current_stream()));
  call.finish();
  return prepared;
}

Tensor tt_forward_cuda(at::TensorList cores, at::IntArrayRef table_num_cores, at::IntArrayRef feature_table_map,
                       at::IntArrayRef pooling_modes, const Tensor& indices, const Tensor& offsets,
                       const std::optional<Tensor>& per_sample_weights, at::OptionalIntArrayRef table_num_rows,
                       const std::optional<Tensor>& prepared) {
  TORCH_CHECK(!cores.empty(), "ttdist: no cores given");
  c10::cuda::CUDAGuard guard(cores[0].device());
  const cuda::LookupProblem lp =
      make_problem(cores, table_num_cores, feature_table_map, pooling_modes, indices, offsets, table_num_rows);
  int64_t batch = 0, total_dim = 0;
  raise_if_error(cuda::check_lookup_problem(lp, &batch, &total_dim));
  const Tensor* saved = prepared_for(prepared, lp, cores[0].device());
  Call call(cores[0].device());
  const Inputs in = make_inputs(indices, offsets, per_sample_weights, cores[0], call, saved);
  Tensor out = at::empty({batch, total_dim}, cores[0].options());
  TorchAllocator alloc(cores[0].device());
  raise_if_error(cuda::tt_forward(lp, in.raw, out.data_ptr(), alloc, current_stream()));
  call.finish();
  return out;
}

std::vector<Tensor> tt_backward_cuda(const Tensor& grad_output, at::TensorList cores, at::IntArrayRef table_num_cores,
                                     at::IntArrayRef feature_table_map, at::IntArrayRef pooling_modes,
                                     const Tensor& indices, const Tensor& offsets,
                                     const std::optional<Tensor>& per_sample_weights,
                                     at::OptionalIntArrayRef table_num_rows, const std::optional<Tensor>& prepared) {
  TORCH_CHECK(!cores.empty(), "ttdist: no cores given");
  alert_not_deterministic("ttdist::tt_backward");
  c10::cuda::CUDAGuard guard(cores[0].device());
  const cuda::LookupProblem lp =
      make_problem(cores, table_num_cores, feature_table_map, pooling_modes, indices, offsets, table_num_rows);
  int64_t batch = 0, total_dim = 0;
  raise_if_error(cuda::check_lookup_problem(lp, &batch, &total_dim));
  const Tensor* saved = prepared_for(prepared, lp, cores[0].device());
  const Tensor go = grad_output_for(grad_output, cores[0], batch, total_dim);
  Call call(cores[0].device());
  const Inputs in = make_inputs(indices, offsets, per_sample_weights, cores[0], call, saved);
  std::vector<Tensor> grads;
  std::vector<void*> ptrs;
  for (const auto& c : cores) {
    grads.push_back(at::empty_like(c, at::MemoryFormat::Contiguous));
    ptrs.push_back(grads.back().data_ptr());
  }
  TorchAllocator alloc(cores[0].device());
  raise_if_error(cuda::tt_backward(lp, in.raw, go.data_ptr(), ptrs, alloc, current_stream()));
  call.finish();
  return grads;
}

void tt_backward_fused_cuda(const Tensor& grad_output, at::TensorList cores, at::TensorList optimizer_states,
                            at::IntArrayRef table_num_cores, at::IntArrayRef feature_table_map,
                            at::IntArrayRef pooling_modes, const Tensor& indices, const Tensor& offsets,
                            const std::optional<Tensor>& per_sample_weights, int64_t optimizer, double learning_rate,
                            double eps, at::OptionalIntArrayRef table_num_rows,
                            const std::optional<Tensor>& prepared) {
  TORCH_CHECK(!cores.empty(), "ttdist: no cores given");
  alert_not_deterministic("ttdist::tt_backward_fused_");
  c10::cuda::CUDAGuard guard(cores[0].device());
  TORCH_CHECK(optimizer_states.size() == cores.size(), "ttdist: one optimizer state per core is required");
  for (size_t c = 0; c < cores.size(); ++c) check_optimizer_state(cores[c], optimizer_states[c], optimizer, c);
  const cuda::LookupProblem lp =
      make_problem(cores, table_num_cores, feature_table_map, pooling_modes, indices, offsets, table_num_rows);
  int64_t batch = 0, total_dim = 0;
  raise_if_error(cuda::check_lookup_problem(lp, &batch, &total_dim));
  const Tensor* saved = prepared_for(prepared, lp, cores[0].device());
  const Tensor go = grad_output_for(grad_output, cores[0], batch, total_dim);
  Call call(cores[0].device());
  const Inputs in = make_inputs(indices, offsets, per_sample_weights, cores[0], call, saved);
  std::vector<void*> states;
  for (const auto& s : optimizer_states) states.push_back(optimizer == 0 ? nullptr : s.data_ptr());
  TorchAllocator alloc(cores[0].device());
  raise_if_error(cuda::tt_backward_fused(lp, in.raw, go.data_ptr(), states, static_cast<int>(optimizer), learning_rate,
                                         eps, alloc, current_stream()));
  call.finish();
}

void sparse_row_update_cuda(const Tensor& weight, const Tensor& optimizer_state, const Tensor& row_ids_in,
                            const Tensor& row_grads_in, int64_t optimizer, double learning_rate, double eps) {
  TORCH_CHECK(weight.is_cuda(), "ttdist (CUDA): weight must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(weight.device());
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "ttdist: sparse_row_update_ needs a contiguous 2-D weight");
  const cuda::DType dtype = to_dtype(weight.scalar_type());
  check_on(row_ids_in, weight.device(), "row_ids");
  check_on(row_grads_in, weight.device(), "row_grads");
  const Tensor row_ids = row_ids_in.to(at::kLong).contiguous();
  const Tensor row_grads = row_grads_in.to(at::toOpMathType(weight.scalar_type())).contiguous();
  const int64_t rows = weight.size(0), len = weight.size(1);
  TORCH_CHECK(row_grads.dim() == 2 && row_grads.size(0) == row_ids.numel() && row_grads.size(1) == len,
              "ttdist: row_grads must be (", row_ids.numel(), ", ", len, ")");
  check_optimizer_state(weight, optimizer_state, optimizer, 0);
  Call call(weight.device());
  TorchAllocator alloc(weight.device());
  raise_if_error(cuda::sparse_row_update(dtype, weight.data_ptr(), optimizer == 0 ? nullptr : optimizer_state.data_ptr(),
                                         rows, len, row_ids.data_ptr<int64_t>(), row_ids.numel(), row_grads.data_ptr(),
                                         static_cast<int>(optimizer), learning_rate, eps, call.record(), call.number(),
                                         alloc, current_stream()));
  call.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(ttdist, CUDA, m) {
  m.impl("tt_prepare", &tt_prepare_cuda);
  m.impl("tt_forward", &tt_forward_cuda);
  m.impl("tt_backward", &tt_backward_cuda);
  m.impl("tt_backward_fused_", &tt_backward_fused_cuda);
  m.impl("sparse_row_update_", &sparse_row_update_cuda);
}

}  // namespace ttdist
