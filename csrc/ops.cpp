// The ttdist op registry: one schema per op, CPU implementations registered here; the CUDA
// implementations are registered beside them in csrc/cuda/ops_cuda.cpp when CUDA is built.
//
// Conventions shared by every lookup op (T tables, F features, B bags per feature):
//   cores              all tables' cores, table after table; core k of a table is
//                      (p_k, r_{k-1}, q_k, r_k) with r_0 = r_d = 1
//   table_num_cores    [T]  number of cores d_t of each table
//   feature_table_map  [F]  the table each feature reads
//   pooling_modes      [F]  0 = sum, 1 = mean
//   indices            [N]  int64 rows, feature after feature
//   offsets            [F * B + 1]  bag boundaries into indices (fbgemm's TBE layout)
//   per_sample_weights [N]  optional, multiplies each looked-up row
//   output             [B, sum_f D_{t(f)}]  pooled rows, features side by side
//   table_num_rows     [T]  optional: rows an index may name per table (num_embeddings <= prod p);
//                      default prod p
//
// Bad index values or offsets: the CPU ops raise before computing (IndexError / ValueError). The
// CUDA ops check them on the device without making the host wait, exclude the bad entries, and
// raise the same errors later (csrc/error_checks.h); ttdist::check_errors waits for them.
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "cpu/tt_lookup_cpu.h"
#include "error_checks.h"

namespace ttdist {
namespace {

LookupArgs make_args(at::IntArrayRef table_num_cores, at::IntArrayRef feature_table_map,
                     at::IntArrayRef pooling_modes, const std::optional<at::Tensor>& per_sample_weights,
                     int64_t num_indices, at::OptionalIntArrayRef table_num_rows,
                     const std::optional<at::Tensor>& prepared = std::nullopt) {
  if (per_sample_weights.has_value())
    TORCH_CHECK(per_sample_weights->numel() == num_indices, "ttdist: per_sample_weights has ",
                per_sample_weights->numel(), " entries but there are ", num_indices, " indices");
  return LookupArgs{table_num_cores.vec(), feature_table_map.vec(), pooling_modes.vec(), per_sample_weights,
                    table_num_rows.has_value() ? table_num_rows->vec() : std::vector<int64_t>{}, prepared};
}

at::Tensor tt_prepare(at::TensorList cores, at::IntArrayRef table_num_cores, at::IntArrayRef feature_table_map,
                      at::IntArrayRef pooling_modes, const at::Tensor& indices, const at::Tensor& offsets,
                      const std::optional<at::Tensor>& per_sample_weights, at::OptionalIntArrayRef table_num_rows) {
  return tt_prepare_cpu(cores.vec(),
                        make_args(table_num_cores, feature_table_map, pooling_modes, per_sample_weights, indices.numel(),
                                  table_num_rows),
                        indices, offsets);
}

at::Tensor tt_forward(at::TensorList cores, at::IntArrayRef table_num_cores, at::IntArrayRef feature_table_map,
                      at::IntArrayRef pooling_modes, const at::Tensor& indices, const at::Tensor& offsets,
                      const std::optional<at::Tensor>& per_sample_weights, at::OptionalIntArrayRef table_num_rows,
                      const std::optional<at::Tensor>& prepared) {
  return tt_forward_cpu(cores.vec(),
                        make_args(table_num_cores, feature_table_map, pooling_modes, per_sample_weights, indices.numel(),
                                  table_num_rows, prepared),
                        indices, offsets);
}

std::vector<at::Tensor> tt_backward(const at::Tensor& grad_output, at::TensorList cores, at::IntArrayRef table_num_cores,
                                    at::IntArrayRef feature_table_map, at::IntArrayRef pooling_modes,
                                    const at::Tensor& indices, const at::Tensor& offsets,
                                    const std::optional<at::Tensor>& per_sample_weights,
                                    at::OptionalIntArrayRef table_num_rows, const std::optional<at::Tensor>& prepared) {
  return tt_backward_cpu(grad_output, cores.vec(),
                         make_args(table_num_cores, feature_table_map, pooling_modes, per_sample_weights, indices.numel(),
                                   table_num_rows, prepared),
                         indices, offsets);
}

void tt_backward_fused_(const at::Tensor& grad_output, at::TensorList cores, at::TensorList optimizer_states,
                        at::IntArrayRef table_num_cores, at::IntArrayRef feature_table_map,
                        at::IntArrayRef pooling_modes, const at::Tensor& indices, const at::Tensor& offsets,
                        const std::optional<at::Tensor>& per_sample_weights, int64_t optimizer, double learning_rate,
                        double eps, at::OptionalIntArrayRef table_num_rows,
                        const std::optional<at::Tensor>& prepared) {
  tt_backward_fused_cpu(grad_output, cores.vec(), optimizer_states.vec(),
                        make_args(table_num_cores, feature_table_map, pooling_modes, per_sample_weights, indices.numel(),
                                  table_num_rows, prepared),
                        indices, offsets, optimizer, learning_rate, eps);
}

// sparse_row_update_ on every row of each weight (a row whose gradient is zero stays unchanged under
// every fused optimizer, so this equals the sparse update of the touched rows): one call for a
// module's replicated cores instead of one per core. CPU only: elsewhere ttdist.ops.apply_updates
// uses torch ops (sparse_row_update_'s CUDA duplicate check would wait for the device per core).
void dense_update_(at::TensorList weights, at::TensorList optimizer_states, at::TensorList grads, int64_t optimizer,
                   double learning_rate, double eps) {
  dense_update_cpu(weights, optimizer_states, grads, optimizer, learning_rate, eps);
}

int64_t first_out_of_range(const at::Tensor& values, at::IntArrayRef length_per_feature,
                           at::IntArrayRef rows_per_feature) {
  return first_out_of_range_cpu(values, length_per_feature, rows_per_feature);
}

std::atomic<bool>& sync_checks_flag() {
  static std::atomic<bool> flag([] {
    const char* env = std::getenv("TTDIST_SYNC_CHECKS");
    return env != nullptr && std::strcmp(env, "1") == 0;
  }());
  return flag;
}

std::atomic<CheckErrorsFn>& cuda_check_errors_fn() {
  static std::atomic<CheckErrorsFn> fn{nullptr};
  return fn;
}

void check_errors_op(c10::Device device) { check_errors(device); }

bool set_sync_checks_op(bool enabled) { return set_sync_checks(enabled); }

}  // namespace

bool sync_checks() { return sync_checks_flag().load(); }
bool set_sync_checks(bool enabled) { return sync_checks_flag().exchange(enabled); }
void register_cuda_check_errors(CheckErrorsFn fn) { cuda_check_errors_fn().store(fn); }
void check_errors(const c10::Device& device) {
  if (!device.is_cuda()) return;  // the CPU ops raise at once
  const CheckErrorsFn fn = cuda_check_errors_fn().load();
  TORCH_CHECK(fn != nullptr, "ttdist: check_errors on ", device.str(), " but ttdist._C was built without CUDA");
  fn(device.has_index() ? device.index() : -1);
}

TORCH_LIBRARY(ttdist, m) {
  // The index plan of one batch: every index validated, positions grouped by table and unique
  // row (CPU: sorted; CUDA: sorted on the device without a host wait). Passed as `prepared` to
  // the three ops below with the same arguments, it spares them that work: autograd makes it
  // once in forward and keeps it for backward. Opaque 1-D int64 tensor, layout per device; an op
  // given one made for other indices, offsets or tables raises ValueError.
  m.def("tt_prepare(Tensor[] cores, int[] table_num_cores, int[] feature_table_map, int[] pooling_modes, "
        "Tensor indices, Tensor offsets, Tensor? per_sample_weights, int[]? table_num_rows=None) -> Tensor");
  // Pooled lookup of the rows `indices` of T TT tables; decompresses only those rows.
  m.def("tt_forward(Tensor[] cores, int[] table_num_cores, int[] feature_table_map, int[] pooling_modes, "
        "Tensor indices, Tensor offsets, Tensor? per_sample_weights, int[]? table_num_rows=None, "
        "Tensor? prepared=None) -> Tensor");
  // Dense gradient of every core given d(output); per_sample_weights are constants.
  m.def("tt_backward(Tensor grad_output, Tensor[] cores, int[] table_num_cores, int[] feature_table_map, "
        "int[] pooling_modes, Tensor indices, Tensor offsets, Tensor? per_sample_weights, "
        "int[]? table_num_rows=None, Tensor? prepared=None) -> Tensor[]");
  // tt_backward followed by an exact optimizer step (0 SGD, 1 Adagrad, 2 row-wise Adagrad) on
  // every core slice the batch touched; duplicates are summed first. Updates cores and states.
  m.def("tt_backward_fused_(Tensor grad_output, Tensor(a!)[] cores, Tensor(b!)[] optimizer_states, "
        "int[] table_num_cores, int[] feature_table_map, int[] pooling_modes, Tensor indices, Tensor offsets, "
        "Tensor? per_sample_weights, int optimizer, float learning_rate, float eps, "
        "int[]? table_num_rows=None, Tensor? prepared=None) -> ()");
  // The same optimizer step on rows `row_ids` (unique) of a 2-D weight, e.g. a row cache.
  m.def("sparse_row_update_(Tensor(a!) weight, Tensor(b!) optimizer_state, Tensor row_ids, Tensor row_grads, "
        "int optimizer, float learning_rate, float eps) -> ()");
  // sparse_row_update_ on every row of each weight from its dense gradient (shaped like the weight);
  // CPU only (see dense_update_ above).
  m.def("dense_update_(Tensor(a!)[] weights, Tensor(b!)[] optimizer_states, Tensor[] grads, int optimizer, "
        "float learning_rate, float eps) -> ()");
  // Position of the first of `values` (int32 / int64, grouped by feature: length_per_feature[f]
  // each) outside [0, rows_per_feature[f]), or -1; a feature with rows_per_feature[f] < 0 is not
  // checked. One pass, for error messages that name the feature (CPU only: CUDA lookups check
  // indices on the device).
  m.def("first_out_of_range(Tensor values, int[] length_per_feature, int[] rows_per_feature) -> int");
  // Waits for the device checks of every earlier CUDA op on `device` and raises the first bad
  // input they found (no-op on CPU). The CUDA ops also raise such an error at their next call.
  m.def("check_errors(Device device) -> ()", &check_errors_op);
  // Synchronous mode (every CUDA op waits for its checks and raises at once); returns the old mode.
  m.def("set_sync_checks(bool enabled) -> bool", &set_sync_checks_op);
}

TORCH_LIBRARY_IMPL(ttdist, CPU, m) {
  m.impl("tt_prepare", &tt_prepare);
  m.impl("tt_forward", &tt_forward);
  m.impl("tt_backward", &tt_backward);
  m.impl("tt_backward_fused_", &tt_backward_fused_);
  m.impl("sparse_row_update_", &sparse_row_update_cpu);
  m.impl("first_out_of_range", &first_out_of_range);
  m.impl("dense_update_", &dense_update_);
}

}  // namespace ttdist
