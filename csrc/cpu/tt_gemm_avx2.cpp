// AVX2+FMA build of the GEMM kernels; only called when the CPU reports both (tt_gemm_base.cpp).
// The target pragma comes after every system include so that no std:: inline function is
// compiled for AVX2 here (see tt_gemm_impl.inc).
#include "tt_gemm.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define TTDIST_GEMM_NS avx2
#define TTDIST_GEMM_FMA 1
#include "tt_gemm_impl.inc"
#undef TTDIST_GEMM_FMA
#undef TTDIST_GEMM_NS
#pragma GCC pop_options

namespace ttdist {
namespace kern {
GemmKernels<float> gemm_kernels_f32_avx2() { return avx2::make_f32("avx2+fma"); }
GemmKernels<double> gemm_kernels_f64_avx2() { return avx2::make_f64("avx2+fma"); }
}  // namespace kern
}  // namespace ttdist
#else
namespace ttdist {
namespace kern {
GemmKernels<float> gemm_kernels_f32_avx2() { return gemm_kernels_f32_base(); }
GemmKernels<double> gemm_kernels_f64_avx2() { return gemm_kernels_f64_base(); }
}  // namespace kern
}  // namespace ttdist
#endif
