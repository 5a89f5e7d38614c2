// CPU implementations of the ttdist TT lookup ops (schemas and docs: csrc/ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace ttdist {

// Pooling modes, per feature (match ttdist/ops.py).
constexpr int64_t kPoolingSum = 0;
constexpr int64_t kPoolingMean = 1;

// Fused optimizers (match ttdist.modules.optim.OptimType codes).
constexpr int64_t kOptimSGD = 0;
constexpr int64_t kOptimAdagrad = 1;
constexpr int64_t kOptimRowwiseAdagrad = 2;

// The non-tensor description of one table-batched lookup.
struct LookupArgs {
  std::vector<int64_t> table_num_cores;    // T entries: d_t
  std::vector<int64_t> feature_table_map;  // F entries: table of feature f
  std::vector<int64_t> pooling_modes;      // F entries: kPoolingSum | kPoolingMean
  std::optional<at::Tensor> per_sample_weights;
  std::vector<int64_t> table_num_rows;  // T entries: rows an index may name (<= prod p), or empty: prod p
  std::optional<at::Tensor> prepared;   // tt_prepare's index plan for these indices, or none: built per call
};

// The index plan of one batch (validated indices grouped by table and unique row), for the ops'
// `prepared` argument.
at::Tensor tt_prepare_cpu(const std::vector<at::Tensor>& cores, const LookupArgs& args, const at::Tensor& indices,
                          const at::Tensor& offsets);

at::Tensor tt_forward_cpu(const std::vector<at::Tensor>& cores, const LookupArgs& args, const at::Tensor& indices,
                          const at::Tensor& offsets);

std::vector<at::Tensor> tt_backward_cpu(const at::Tensor& grad_output, const std::vector<at::Tensor>& cores,
                                        const LookupArgs& args, const at::Tensor& indices, const at::Tensor& offsets);

void tt_backward_fused_cpu(const at::Tensor& grad_output, const std::vector<at::Tensor>& cores,
                           const std::vector<at::Tensor>& optimizer_states, const LookupArgs& args,
                           const at::Tensor& indices, const at::Tensor& offsets, int64_t optimizer,
                           double learning_rate, double eps);

// The position of the first value outside [0, rows_per_feature[f]) of its feature f (values grouped
// by feature, length_per_feature[f] each), or -1.
int64_t first_out_of_range_cpu(const at::Tensor& values, at::IntArrayRef length_per_feature,
                               at::IntArrayRef rows_per_feature);

void sparse_row_update_cpu(const at::Tensor& weight, const at::Tensor& optimizer_state, const at::Tensor& row_ids,
                           const at::Tensor& row_grads, int64_t optimizer, double learning_rate, double eps);

// sparse_row_update_cpu on every row of each weight (its rows: the leading dimension), from its
// gradient shaped like it; no row ids (schema and rationale in csrc/ops.cpp, dense_update_).
void dense_update_cpu(at::TensorList weights, at::TensorList optimizer_states, at::TensorList grads, int64_t optimizer,
                      double learning_rate, double eps);

}  // namespace ttdist
