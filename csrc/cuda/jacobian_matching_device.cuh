// Device helpers and constants shared by the loss-head kernels in jacobian_matching.cu
// (stage 1, finishing, backward and fused forward_backward): 16-byte vectors, exact
// conversions, the float64 accumulation and fixed-order reductions, the per-row formulas
// and the gradient elements. Included by that one translation unit only.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace jacfast_cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kBlock = 256;                   // threads per block for stage 1 and backward
constexpr int kFinishBlock = 1024;            // single-block finishing kernel (reduction 1)
constexpr int kUnroll = 4;                    // 16-byte loads in flight per thread and tensor
constexpr int64_t kTargetSegments = 1024;     // ~8 blocks of 256 threads per SM of an H100
constexpr int64_t kMinGroupsPerSegment = 512; // >= 2 groups per thread in a 256-thread segment
// 16-byte groups per thread that rows_fused_kernel holds in registers (ptxas sm_90: no spills;
// 16 per lane reach 255 registers and spill for fp16/bf16). They bound the layouts, so that
// every row or segment fits the fused kernel:
constexpr int kFusedWarpGroups = 8;   // warp layout: rows of <= 256 groups (fp32: 1024 elements)
constexpr int kFusedBlockGroups = 4;  // block layout: segments of <= 1024 groups (fp32: 4096 elements)
constexpr int64_t kWarpMaxGroups = int64_t{kFusedWarpGroups} * kWarp;         // one warp per row
constexpr int64_t kMaxGroupsPerSegment = int64_t{kFusedBlockGroups} * kBlock;  // one block per segment
constexpr int64_t kMaxElementwiseGrid = 4096; // grid-stride cap for elementwise kernels

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------- device helpers
// 16-byte vector of T (same layout trick as ATen's aligned_vector).
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

__device__ __forceinline__ int64_t imin64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// T -> double is exact for all four dtypes (Half/BFloat16 convert through float).
template <typename T>
__device__ __forceinline__ double to_d(T x) { return static_cast<double>(x); }

// double -> T with a single rounding (no double -> float -> half double rounding).
template <typename T> __device__ __forceinline__ T from_d(double x);
template <> __device__ __forceinline__ float from_d<float>(double x) { return __double2float_rn(x); }
template <> __device__ __forceinline__ double from_d<double>(double x) { return x; }
template <> __device__ __forceinline__ c10::Half from_d<c10::Half>(double x) {
  return c10::Half(__double2half(x));
}
template <> __device__ __forceinline__ c10::BFloat16 from_d<c10::BFloat16>(double x) {
  return c10::BFloat16(__double2bfloat16(x));
}

// max(a, eps) that returns NaN for NaN a (fmax(NaN, eps) would return eps).
__device__ __forceinline__ double max_nan(double a, double eps) {
  return a > eps ? a : (a != a ? a : eps);
}

// One element into the float64 accumulators. Explicit __fma_rn so the vector and the
// scalar load paths produce bit-identical sums (no compiler-dependent contraction).
template <int KIND>
__device__ __forceinline__ void accum(double x, double y, double (&a)[3]) {
  if constexpr (KIND == 0) {  // ss, tt, st
    a[0] = __fma_rn(x, x, a[0]);
    a[1] = __fma_rn(y, y, a[1]);
    a[2] = __fma_rn(x, y, a[2]);
  } else if constexpr (KIND == 1) {  // dd = sum (s - t)^2, never ss + tt - 2 st
    const double d = x - y;
    a[0] = __fma_rn(d, d, a[0]);
  } else {  // ss
    a[0] = __fma_rn(x, x, a[0]);
  }
}

// Fixed-order warp sum; the result is valid in lane 0. All 32 lanes must be active.
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Fixed-order block sum of three values (blockDim.x a multiple of 32); valid in thread 0.
// Called at most once per kernel, so the static shared buffer is never reused.
__device__ __forceinline__ void block_sum3(double (&a)[3]) {
  __shared__ double sh[3][kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
#pragma unroll
  for (int q = 0; q < 3; ++q) {
    a[q] = warp_sum(a[q]);
    if (lane == 0) sh[q][warp] = a[q];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int q = 0; q < 3; ++q) a[q] = warp_sum(lane < nwarps ? sh[q][lane] : 0.0);
  }
}

struct RowResult {
  double loss, c0, c1, c2;
};

// Per-row loss and backward coefficients from the float64 sums (README formulas).
template <int KIND>
__device__ __forceinline__ RowResult finalize_row(const double (&a)[3], double eps) {
  RowResult o;
  if constexpr (KIND == 0) {
    const double ss = a[0], tt = a[1], st = a[2];
    const double ns = sqrt(ss), nt = sqrt(tt);
    const double as = max_nan(ns, eps), at = max_nan(nt, eps);
    const double cross = st / (as * at);
    o.loss = ss / (as * as) + tt / (at * at) - 2.0 * cross;
    const double cs = ns > eps ? cross : 1.0;
    const double ct = nt > eps ? cross : 1.0;
    o.c0 = 2.0 * cs / (as * as);
    o.c1 = 2.0 / (as * at);
    o.c2 = 2.0 * ct / (at * at);
  } else if constexpr (KIND == 1) {
    o.loss = a[0];
    o.c0 = o.c1 = o.c2 = 2.0;
  } else {
    o.loss = a[0];
    o.c0 = 2.0;
    o.c1 = o.c2 = 0.0;
  }
  return o;
}

// Finalizes row r: writes coef[r] and, for reduction 0, loss[r]; returns the float64 loss
// and the coefficients.
template <typename T, int KIND>
__device__ __forceinline__ RowResult finish_row(int64_t r, const double (&a)[3], double eps, double* coef,
                                                T* loss, int reduction) {
  const RowResult o = finalize_row<KIND>(a, eps);
  coef[r * 3 + 0] = o.c0;
  coef[r * 3 + 1] = o.c1;
  coef[r * 3 + 2] = o.c2;
  if (reduction == 0) loss[r] = from_d<T>(o.loss);
  return o;
}

// ---------------------------------------------------------------- gradient elements
struct RowCoef {
  double c0, c1, c2, g;
};

// grad_loss is read as T (gl_t), float64 (gl_d) or, when both are null
// (forward_backward), as 1; reduction 1 multiplies by scale.
template <typename T>
__device__ __forceinline__ RowCoef load_row_coef(int64_t r, const double* __restrict__ coef,
                                                 const T* __restrict__ gl_t,
                                                 const double* __restrict__ gl_d,
                                                 int64_t gl_stride, int reduction, double scale) {
  const int64_t gi = reduction == 0 ? r * gl_stride : 0;
  double g = gl_t != nullptr ? to_d(gl_t[gi]) : (gl_d != nullptr ? gl_d[gi] : 1.0);
  if (reduction == 1) g *= scale;
  return RowCoef{coef[r * 3 + 0], coef[r * 3 + 1], coef[r * 3 + 2], g};
}

// Explicit roundings (no compiler-dependent contraction): the backward kernel and the fused
// forward_backward kernel give the same bits.
template <typename T>
__device__ __forceinline__ T grad_s_elem(const RowCoef& p, double x, double y) {
  return from_d<T>(__dmul_rn(p.g, __fma_rn(p.c0, x, -__dmul_rn(p.c1, y))));
}
template <typename T>
__device__ __forceinline__ T grad_t_elem(const RowCoef& p, double x, double y) {
  return from_d<T>(__dmul_rn(p.g, __fma_rn(p.c2, y, -__dmul_rn(p.c1, x))));
}

}  // namespace
}  // namespace jacfast_cuda
