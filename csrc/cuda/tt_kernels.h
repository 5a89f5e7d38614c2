// Host API of the ttdist CUDA kernels (implemented in tt_kernels.cu). Plain C++: no torch, no
// CUDA device code, so the torch binding (ops_cuda.cpp, compiled by the host compiler) and any
// other host program can include it. Semantics of the ops: csrc/ops.cpp and csrc/cpu.
//
// Every launcher takes raw device pointers, the sizes, a caller-provided Allocator for temporary
// device memory and the cudaStream_t to run on, and only enqueues work: no launcher waits for
// the device. Sizes that depend on the data (unique rows, chunks) are bounded on the host from
// the input sizes and read by the kernels from device memory. Input values are validated on the
// device before any kernel reads a core through them; a bad index or malformed offsets are
// excluded from the lookup and recorded in the caller's ErrorRecord (device memory), which the
// caller reads when it next synchronises and raises from. Shapes and sizes are validated on the
// host and returned as a Status. Accumulation is in float (double for double cores).
#pragma once

#include <cuda_runtime_api.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace ttdist {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat64 = 2 };

// Bytes of one element of the core dtype and of its accumulation type (float / double).
size_t dtype_size(DType t);
size_t acc_size(DType t);

// Temporary device memory for one launcher call. The memory must stay valid, for work queued on
// `stream`, until the launcher returns (a stream-ordered allocator such as torch's caching
// allocator on the current stream, or cudaMallocAsync / cudaFreeAsync, satisfies this).
class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(size_t bytes) = 0;
};

// Bad input found on the device. The caller owns one per device (zeroed), passes it to every
// launcher and clears it after reporting; the first error is kept (later ones are counted by the
// call that found them only). Written in stream order by single-thread report kernels.
enum ErrorCode : int64_t { kErrNone = 0, kErrIndex = 1, kErrOffsets = 2, kErrRowId = 3, kErrDuplicateRowId = 4 };
struct ErrorRecord {
  int64_t code = kErrNone;
  int64_t call = 0;       // the caller's number of the call that found it
  int64_t position = -1;  // first bad position in indices / row ids
  int64_t value = 0;      // the bad index / row id
  int64_t feature = -1;   // its feature
  int64_t table = -1;     // its table
  int64_t limit = 0;      // the valid range is [0, limit)
  int64_t count = 0;      // bad entries in that call
};

// The message a caller raises for a recorded error (ValueError-like for offsets and repeated row
// ids, IndexError-like for the rest: see is_index_error).
inline std::string describe_error(const ErrorRecord& e) {
  const std::string at = " (found on the device in ttdist op call #" + std::to_string(e.call) +
                         "; that call excluded the bad entries from its result)";
  switch (e.code) {
    case kErrIndex:
      return "ttdist: index " + std::to_string(e.value) + " at position " + std::to_string(e.position) +
             " of feature " + std::to_string(e.feature) + " (table " + std::to_string(e.table) +
             ") is out of range [0, " + std::to_string(e.limit) + ") (" + std::to_string(e.count) +
             " indices out of range)" + at;
    case kErrOffsets:
      return "ttdist: offsets must start at 0, be non-decreasing and end at the number of indices (" +
             std::to_string(e.limit) + ")" + at;
    case kErrRowId:
      return "ttdist: row id " + std::to_string(e.value) + " at position " + std::to_string(e.position) +
             " out of range [0, " + std::to_string(e.limit) + ")" + at;
    case kErrDuplicateRowId:
      return "ttdist: row ids must be unique; row " + std::to_string(e.value) + " repeats" + at;
    default:
      return "";
  }
}
inline bool is_index_error(const ErrorRecord& e) { return e.code == kErrIndex || e.code == kErrRowId; }

struct Status {
  enum Code : int { kOk = 0, kInvalidArgument = 1, kCudaError = 3 };
  int code = kOk;
  std::string message;
  bool ok() const { return code == kOk; }
  static Status Ok() { return Status(); }
  static Status Error(int c, std::string m) {
    Status s;
    s.code = c;
    s.message = std::move(m);
    return s;
  }
};

// The non-tensor description of one table-batched lookup (see csrc/ops.cpp).
struct LookupProblem {
  DType dtype = DType::kFloat32;
  std::vector<std::array<int64_t, 4>> core_shapes;  // (p, r_in, q, r_out) per core, tables in order
  std::vector<const void*> cores;                   // device pointers, contiguous, dtype
  std::vector<int64_t> table_num_cores;             // [T]
  std::vector<int64_t> feature_table_map;           // [F]
  std::vector<int64_t> pooling_modes;               // [F] 1 = mean, anything else = sum (as the CPU op)
  std::vector<int64_t> table_num_rows;              // [T] valid rows (1..prod p) per table; empty: prod p
  int64_t num_indices = 0;                          // N
  int64_t num_offsets = 0;                          // F * B + 1
};

struct LookupInputs {
  const int64_t* indices = nullptr;          // [N]
  const int64_t* offsets = nullptr;          // [F * B + 1]
  const void* per_sample_weights = nullptr;  // [N] in the accumulation type, or null
  ErrorRecord* errors = nullptr;             // the caller's record (device memory); required
  int64_t call = 0;                          // the caller's number of this call (in messages)
  // The ops only: tt_prepare's buffer for this problem and batch (device, read only), or null to
  // prepare here. With it the op reads neither indices (may be null) nor records bad input again.
  const int64_t* prepared = nullptr;
  int64_t prepared_words = 0;  // its length (int64 entries), checked against prepared_words()
};

// Host-side validation of shapes and sizes; on success sets batch B and the output width.
Status check_lookup_problem(const LookupProblem& problem, int64_t* batch, int64_t* total_dim);

// Length (int64 entries) of the buffer tt_prepare fills for `problem`: a function of the
// problem's sizes, so a buffer made for another call is told apart on the host (docs/cuda.md).
Status prepared_words(const LookupProblem& problem, int64_t* words);
// Ok if a buffer of `words` entries can be tt_prepare's for `problem`; else kInvalidArgument.
Status check_prepared(const LookupProblem& problem, int64_t words);

// The device part of the ops' preparation, done once per batch: validation (bad input recorded as
// by the ops), sort by (table, row), unique rows. `prepared`: device, prepared_words() int64;
// inputs.per_sample_weights is not read. Pass it as inputs.prepared to the three ops below.
Status tt_prepare(const LookupProblem& problem, const LookupInputs& inputs, int64_t* prepared, int64_t words,
                  Allocator& alloc, cudaStream_t stream);

// output: (B, total_dim) in the core dtype; every element is written.
Status tt_forward(const LookupProblem& problem, const LookupInputs& inputs, void* output, Allocator& alloc,
                  cudaStream_t stream);

// grad_output: (B, total_dim) contiguous in the core dtype; core_grads[c]: device buffer shaped
// like core c in the core dtype; every element is written (zeros where untouched).
Status tt_backward(const LookupProblem& problem, const LookupInputs& inputs, const void* grad_output,
                   const std::vector<void*>& core_grads, Allocator& alloc, cudaStream_t stream);

// Summed core gradients, then one optimizer step (0 SGD, 1 Adagrad, 2 row-wise Adagrad) on every
// slice the batch touched; updates the cores (problem.cores, cast away const) and states
// (accumulation type: like the core for Adagrad, (p,) for row-wise Adagrad, unused for SGD).
Status tt_backward_fused(const LookupProblem& problem, const LookupInputs& inputs, const void* grad_output,
                         const std::vector<void*>& optimizer_states, int optimizer, double learning_rate, double eps,
                         Allocator& alloc, cudaStream_t stream);

// The same step on rows row_ids[n] (unique, in [0, rows)) of weight (rows, row_len); row_grads
// (num_ids, row_len) and the state are in the accumulation type. Ids out of range are skipped and
// recorded; repeated ids are recorded (their rows may then be updated in either order).
Status sparse_row_update(DType dtype, void* weight, void* optimizer_state, int64_t rows, int64_t row_len,
                         const int64_t* row_ids, int64_t num_ids, const void* row_grads, int optimizer,
                         double learning_rate, double eps, ErrorRecord* errors, int64_t call, Allocator& alloc,
                         cudaStream_t stream);

}  // namespace cuda
}  // namespace ttdist
