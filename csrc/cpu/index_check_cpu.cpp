// Range check of a KeyedJaggedTensor's values, feature by feature, in one pass (the sharded TT
// collection runs it on CPU input before its input all-to-all, on the whole KJT, its own features
// only; schema in csrc/ops.cpp).
#include "tt_lookup_cpu.h"

namespace ttdist {

int64_t first_out_of_range_cpu(const at::Tensor& values, at::IntArrayRef length_per_feature,
                               at::IntArrayRef rows_per_feature) {
  TORCH_CHECK_VALUE(values.dim() == 1, "ttdist: values must be 1-D, got ", values.dim(), " dimensions");
  TORCH_CHECK_VALUE(length_per_feature.size() == rows_per_feature.size(), "ttdist: ", length_per_feature.size(),
                    " feature lengths but ", rows_per_feature.size(), " row counts");
  int64_t total = 0;
  for (const int64_t n : length_per_feature) {
    TORCH_CHECK_VALUE(n >= 0, "ttdist: a feature length is negative (", n, ")");
    total += n;
  }
  TORCH_CHECK_VALUE(total == values.numel(), "ttdist: the feature lengths add up to ", total, " but there are ",
                    values.numel(), " values");
  const at::Tensor v = values.contiguous();
  int64_t found = -1;
  AT_DISPATCH_INDEX_TYPES(v.scalar_type(), "first_out_of_range_cpu", [&] {
    const index_t* x = v.data_ptr<index_t>();
    int64_t begin = 0;
    for (size_t f = 0; f < length_per_feature.size() && found < 0; ++f) {
      const int64_t end = begin + length_per_feature[f], rows = rows_per_feature[f];
      for (int64_t i = rows < 0 ? end : begin; i < end; ++i) {  // rows < 0: not checked
        if (x[i] < 0 || static_cast<int64_t>(x[i]) >= rows) {
          found = i;
          break;
        }
      }
      begin = end;
    }
  });
  return found;
}

}  // namespace ttdist
