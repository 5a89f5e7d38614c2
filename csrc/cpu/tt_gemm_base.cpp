// Baseline (x86-64 / any target) build of the GEMM kernels, and the runtime selection.
#include "tt_gemm.h"

#define TTDIST_GEMM_NS base
#include "tt_gemm_impl.inc"
#undef TTDIST_GEMM_NS

namespace ttdist {
namespace kern {

GemmKernels<float> gemm_kernels_f32_base() { return base::make_f32("baseline"); }
GemmKernels<double> gemm_kernels_f64_base() { return base::make_f64("baseline"); }

namespace {
bool cpu_has_avx2_fma() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}
}  // namespace

const GemmKernels<float>& gemm_kernels_f32() {
  static const GemmKernels<float> k = cpu_has_avx2_fma() ? gemm_kernels_f32_avx2() : gemm_kernels_f32_base();
  return k;
}
const GemmKernels<double>& gemm_kernels_f64() {
  static const GemmKernels<double> k = cpu_has_avx2_fma() ? gemm_kernels_f64_avx2() : gemm_kernels_f64_base();
  return k;
}

}  // namespace kern
}  // namespace ttdist
