// CUDA kernels for the Jacobian-matching loss head. The math, shapes, dtypes and the
// launch budget are fixed by csrc/README.md ("Kernel contract"); ops are registered in
// module.cpp. Summary of the design:
//   forward  = stage 1 (per-row or per-row-segment float64 sums) [+ finishing kernel].
//   backward = one grid-stride elementwise kernel driven by the per-row coefficients.
//   forward_backward = stage 1 and the backward in one kernel for rows that fit in
//              registers (rows_fused_kernel) [+ finishing kernel], else forward + backward.
// Determinism: every float sum has a fixed order that depends only on (R, D, dtype):
// the split plan is computed from those alone (never from the SM count), the per-thread
// element order is the same on the vectorized and the scalar load path, and all tree
// reductions use fixed shuffle/shared-memory patterns. No float atomics anywhere.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "jacobian_matching_device.cuh"

namespace jacfast_cuda {
namespace {

// ---------------------------------------------------------------- forward stage 1
// A row is cut into 16-byte "groups" of V = 16/sizeof(T) elements (the last one may be
// partial); segment (row, part) covers groups [part*gps, min(G, (part+1)*gps)).
// A team of TEAM threads (a warp, or the whole 256-thread block) reduces one segment;
// thread `lane` takes groups g0+lane, g0+lane+TEAM, ... in ascending order and the
// elements of a group in ascending order. That order is the same whether a group is
// read with one 16-byte load (row base aligned) or with V scalar loads, so the sums
// do not depend on the alignment of the row either.
// splits == 1: the team finishes its row (coef, loss or float64 row loss for reduction 1).
// splits > 1: it writes float64 partials[(row*splits + part)*3 + {0,1,2}].
template <typename T, int KIND, int TEAM>
__global__ void __launch_bounds__(kBlock)
rows_stage1_kernel(const T* __restrict__ s, const T* __restrict__ t, int64_t R, int64_t D,
                   int64_t splits, int64_t gps, double* __restrict__ partials,
                   T* __restrict__ loss, double* __restrict__ coef, double* __restrict__ rowloss,
                   int reduction, double eps) {
  using VecT = Vec16<T>;
  constexpr int V = VecT::N;
  constexpr int kTeams = kBlock / TEAM;
  const int lane = threadIdx.x % TEAM;
  const int64_t seg = static_cast<int64_t>(blockIdx.x) * kTeams + threadIdx.x / TEAM;
  if (seg >= R * splits) return;  // whole team leaves together (only in the warp layout)

  const int64_t row = seg / splits, part = seg % splits;
  const int64_t G = (D + V - 1) / V;
  const int64_t g0 = part * gps;
  const int64_t g1 = imin64(G, g0 + gps);
  const T* srow = s + row * D;
  const T* trow = t != nullptr ? t + row * D : nullptr;
  const bool has_t = trow != nullptr;
  const bool vec = aligned16(srow) && (!has_t || aligned16(trow));

  double a[3] = {0.0, 0.0, 0.0};
  int64_t g = g0 + lane;
  if (vec) {
    // Unrolled main loop over groups that lie wholly inside the row: issue kUnroll
    // 16-byte loads per tensor, then accumulate them in ascending group order.
    const int64_t gfull = imin64(g1, D / V);
    for (; g + (kUnroll - 1) * TEAM < gfull; g += kUnroll * TEAM) {
      VecT sv[kUnroll], tv[kUnroll] = {};
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        sv[u] = *reinterpret_cast<const VecT*>(srow + (g + u * TEAM) * V);
        if (has_t) tv[u] = *reinterpret_cast<const VecT*>(trow + (g + u * TEAM) * V);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int i = 0; i < V; ++i) accum<KIND>(to_d(sv[u].v[i]), to_d(tv[u].v[i]), a);
      }
    }
  }
  // Remaining groups of this thread (all of them on the scalar path), same order.
  for (; g < g1; g += TEAM) {
    const int64_t e0 = g * V;
    if (vec && e0 + V <= D) {
      const VecT sv = *reinterpret_cast<const VecT*>(srow + e0);
      VecT tv = {};
      if (has_t) tv = *reinterpret_cast<const VecT*>(trow + e0);
#pragma unroll
      for (int i = 0; i < V; ++i) accum<KIND>(to_d(sv.v[i]), to_d(tv.v[i]), a);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const int64_t e = e0 + i;
        if (e < D) accum<KIND>(to_d(srow[e]), has_t ? to_d(trow[e]) : 0.0, a);
      }
    }
  }

  if constexpr (TEAM == kWarp) {
#pragma unroll
    for (int q = 0; q < 3; ++q) a[q] = warp_sum(a[q]);
  } else {
    block_sum3(a);  // TEAM == blockDim.x: one segment per block
  }
  if (lane != 0) return;

  if (splits > 1) {
#pragma unroll
    for (int q = 0; q < 3; ++q) partials[seg * 3 + q] = a[q];
    return;
  }
  const double l = finish_row<T, KIND>(row, a, eps, coef, loss, reduction).loss;
  if (reduction == 1) rowloss[row] = l;
}

// ---------------------------------------------------------------- forward finishing kernel
// partials != nullptr: combine each row's `splits` partials in ascending part order,
//   write coef and (reduction 0) the per-row loss.
// partials == nullptr: per-row float64 losses come from stage 1 in `rowloss`.
// reduction 1: launched as ONE block; thread i sums rows i, i+blockDim, ... in order and
//   block_sum3 combines the threads in a fixed tree; loss[0] = scale * sum.
template <typename T, int KIND>
__global__ void __launch_bounds__(kFinishBlock)
finish_kernel(const double* __restrict__ partials, int64_t splits,
              const double* __restrict__ rowloss, int64_t R, T* __restrict__ loss,
              double* __restrict__ coef, int reduction, double eps, double scale) {
  double sum = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < R; r += stride) {
    double l;
    if (partials != nullptr) {
      double a[3] = {0.0, 0.0, 0.0};
      for (int64_t j = 0; j < splits; ++j) {
#pragma unroll
        for (int q = 0; q < 3; ++q) a[q] += partials[(r * splits + j) * 3 + q];
      }
      l = finish_row<T, KIND>(r, a, eps, coef, loss, reduction).loss;
    } else {
      l = rowloss[r];
    }
    sum += l;
  }
  if (reduction == 1) {  // uniform branch; every thread reaches block_sum3
    double v[3] = {sum, 0.0, 0.0};
    block_sum3(v);
    if (threadIdx.x == 0) loss[0] = from_d<T>(scale * v[0]);
  }
}

// ---------------------------------------------------------------- backward
// Elementwise over the flat R*D index: grad_s = g (c0 s - c1 t), grad_t = g (c2 t - c1 s),
// in float64, rounded once. vec: all used base pointers are 16-byte aligned, so flat
// group k (elements [kV, kV+V)) is one 16-byte access whatever D is; a group may cross
// row boundaries (only when D % V != 0; kNoCross = D % V == 0 drops that check and
// its registers), handled by advancing the row when the element index reaches it.
template <typename T, bool kNoCross>
__global__ void __launch_bounds__(kBlock)
backward_kernel(const T* __restrict__ s, const T* __restrict__ t, const double* __restrict__ coef,
                const T* __restrict__ gl_t, const double* __restrict__ gl_d, int64_t gl_stride,
                int reduction, double scale, T* __restrict__ gs, T* __restrict__ gt, int64_t R,
                int64_t D, bool vec) {
  using VecT = Vec16<T>;
  constexpr int V = VecT::N;
  const int64_t N = R * D;
  const int64_t NG = vec ? N / V : 0;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const bool has_t = t != nullptr;

  // Each thread tracks (row r, column col) of its current element and advances them by
  // a precomputed (rows, cols) step, so the loops do no 64-bit division.
  int64_t k = tid;
  int64_t r = (k * V) / D, col = k * V - r * D;
  const int64_t vstep_r = (stride * V) / D, vstep_c = stride * V - vstep_r * D;
  for (; k < NG; k += stride) {
    const int64_t e = k * V;
    const VecT sv = *reinterpret_cast<const VecT*>(s + e);
    VecT tv = {};
    if (has_t) tv = *reinterpret_cast<const VecT*>(t + e);
    int64_t rr = r, cc = col;  // row/column of element e + i
    RowCoef p = load_row_coef<T>(rr, coef, gl_t, gl_d, gl_stride, reduction, scale);
    VecT os, ot;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if constexpr (!kNoCross) {
        if (cc == D) {  // element e + i starts row rr + 1 (< R, since e + i < N)
          ++rr;
          cc = 0;
          p = load_row_coef<T>(rr, coef, gl_t, gl_d, gl_stride, reduction, scale);
        }
        ++cc;
      }
      const double x = to_d(sv.v[i]), y = to_d(tv.v[i]);
      if (gs != nullptr) os.v[i] = grad_s_elem<T>(p, x, y);
      if (gt != nullptr) ot.v[i] = grad_t_elem<T>(p, x, y);
    }
    if (gs != nullptr) *reinterpret_cast<VecT*>(gs + e) = os;
    if (gt != nullptr) *reinterpret_cast<VecT*>(gt + e) = ot;
    r += vstep_r;
    col += vstep_c;
    if (col >= D) {
      col -= D;
      ++r;
    }
  }
  // Scalar path: the tail after the last full group, or everything when !vec.
  int64_t e = NG * V + tid;
  r = e / D;
  col = e - r * D;
  const int64_t step_r = stride / D, step_c = stride - step_r * D;
  for (; e < N; e += stride) {
    const RowCoef p = load_row_coef<T>(r, coef, gl_t, gl_d, gl_stride, reduction, scale);
    const double x = to_d(s[e]), y = has_t ? to_d(t[e]) : 0.0;
    if (gs != nullptr) gs[e] = grad_s_elem<T>(p, x, y);
    if (gt != nullptr) gt[e] = grad_t_elem<T>(p, x, y);
    r += step_r;
    col += step_c;
    if (col >= D) {
      col -= D;
      ++r;
    }
  }
}

// ---------------------------------------------------------------- fused forward_backward
// forward_backward for rows of one segment (splits == 1) short enough to stay in registers:
// at most GPL 16-byte groups per thread of the team. The team reads its row once, sums it
// in exactly rows_stage1_kernel's order (thread `lane` takes groups lane, lane + TEAM, ...
// ascending, elements ascending, the same vector/scalar choice), reduces with the same
// warp/block sum, finishes the row as stage 1 does (coef, loss or rowloss), and then writes
// grad_s = g (c0 s - c1 t) (g = 1, or scale for reduction 1, as backward_kernel forms it)
// from the groups it holds: 3 passes over memory instead of 5, the same bits.
template <typename T, int KIND, int TEAM, int GPL>
__global__ void __launch_bounds__(kBlock)
rows_fused_kernel(const T* __restrict__ s, const T* __restrict__ t, int64_t R, int64_t D,
                  T* __restrict__ gs, T* __restrict__ loss, double* __restrict__ coef,
                  double* __restrict__ rowloss, int reduction, double eps, double scale) {
  using VecT = Vec16<T>;
  constexpr int V = VecT::N;
  constexpr int kTeams = kBlock / TEAM;
  const int lane = threadIdx.x % TEAM, team = threadIdx.x / TEAM;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kTeams + team;
  if (row >= R) return;  // whole team leaves together (only in the warp layout)

  const int64_t G = (D + V - 1) / V;
  const T* srow = s + row * D;
  const T* trow = t != nullptr ? t + row * D : nullptr;
  T* grow = gs + row * D;
  const bool has_t = trow != nullptr;
  const bool vec = aligned16(srow) && (!has_t || aligned16(trow));

  VecT sv[GPL], tv[GPL];
  double a[3] = {0.0, 0.0, 0.0};
#pragma unroll
  for (int i = 0; i < GPL; ++i) {
    const int64_t g = lane + static_cast<int64_t>(i) * TEAM, e0 = g * V;
    tv[i] = VecT{};
    if (g >= G) continue;
    if (vec && e0 + V <= D) {
      sv[i] = *reinterpret_cast<const VecT*>(srow + e0);
      if (has_t) tv[i] = *reinterpret_cast<const VecT*>(trow + e0);
#pragma unroll
      for (int j = 0; j < V; ++j) accum<KIND>(to_d(sv[i].v[j]), to_d(tv[i].v[j]), a);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int64_t e = e0 + j;
        sv[i].v[j] = e < D ? srow[e] : T(0);
        if (has_t && e < D) tv[i].v[j] = trow[e];
        if (e < D) accum<KIND>(to_d(sv[i].v[j]), has_t ? to_d(tv[i].v[j]) : 0.0, a);
      }
    }
  }

  double c0 = 0.0, c1 = 0.0;
  if constexpr (TEAM == kWarp) {
#pragma unroll
    for (int q = 0; q < 3; ++q) a[q] = warp_sum(a[q]);
    if (lane == 0) {
      const RowResult o = finish_row<T, KIND>(row, a, eps, coef, loss, reduction);
      if (reduction == 1) rowloss[row] = o.loss;
      c0 = o.c0;
      c1 = o.c1;
    }
    c0 = __shfl_sync(0xffffffffu, c0, 0);
    c1 = __shfl_sync(0xffffffffu, c1, 0);
  } else {
    __shared__ double shared_c[2];
    block_sum3(a);  // TEAM == blockDim.x: one row per block
    if (lane == 0) {
      const RowResult o = finish_row<T, KIND>(row, a, eps, coef, loss, reduction);
      if (reduction == 1) rowloss[row] = o.loss;
      shared_c[0] = o.c0;
      shared_c[1] = o.c1;
    }
    __syncthreads();
    c0 = shared_c[0];
    c1 = shared_c[1];
  }
  double g = 1.0;
  if (reduction == 1) g *= scale;
  const RowCoef p{c0, c1, 0.0, g};
  const bool vec_out = vec && aligned16(grow);
#pragma unroll
  for (int i = 0; i < GPL; ++i) {
    const int64_t g_i = lane + static_cast<int64_t>(i) * TEAM, e0 = g_i * V;
    if (g_i >= G) continue;
    if (vec_out && e0 + V <= D) {
      VecT os;
#pragma unroll
      for (int j = 0; j < V; ++j) os.v[j] = grad_s_elem<T>(p, to_d(sv[i].v[j]), to_d(tv[i].v[j]));
      *reinterpret_cast<VecT*>(grow + e0) = os;
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (e0 + j < D) grow[e0 + j] = grad_s_elem<T>(p, to_d(sv[i].v[j]), to_d(tv[i].v[j]));
      }
    }
  }
}

// ---------------------------------------------------------------- host side
bool host_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Split plan: a pure function of (R, D, element size), so the reduction tree is the
// same on every GPU and every run.
//  * rows of <= kWarpMaxGroups 16-byte groups: one warp per row, 8 rows per block,
//    no split (e.g. R=8192, D=784 fp32: 1024 blocks, one launch for reduction 0);
//  * longer rows: one 256-thread block per segment; split each row into
//    min(ceil(kTargetSegments / R), G / kMinGroupsPerSegment) segments (at least 1), so
//    R=16, D=150528 fp32 gives 64 segments per row = 1024 blocks (~7.8 per SM of a
//    132-SM H100, 1-2 waves depending on register use), bf16 36 per row = 576 blocks,
//    while R >= 1024 long rows get one block per row and no split.
struct Plan {
  int team;
  int64_t splits, gps, blocks;
};

Plan make_plan(int64_t R, int64_t D, int64_t elem_size) {
  const int64_t V = 16 / elem_size;
  const int64_t G = ceil_div(D, V);
  Plan p;
  if (G <= kWarpMaxGroups) {
    p.team = kWarp;
    p.splits = 1;
    p.gps = G;
    p.blocks = ceil_div(R, kBlock / kWarp);
    return p;
  }
  p.team = kBlock;
  const int64_t want = ceil_div(kTargetSegments, R);
  const int64_t most = std::max<int64_t>(1, G / kMinGroupsPerSegment);
  const int64_t splits = std::max<int64_t>(1, std::min(want, most));
  p.gps = ceil_div(G, splits);
  p.splits = ceil_div(G, p.gps);  // drop segments that would be empty
  p.blocks = R * p.splits;
  return p;
}

// Rows rows_fused_kernel takes: one segment, at most this many groups per thread.
// ptxas (sm_90): 61-116 registers and no spills for these; 16 groups per lane (all warp-layout
// rows) reach 255 registers and spill for fp16/bf16.
constexpr int kFusedWarpGroups = 8;   // warp layout: rows of <= 256 groups (fp32: 1024 elements)
constexpr int kFusedBlockGroups = 4;  // block layout: rows of <= 1024 groups (fp32: 4096 elements)

bool fusable(const Plan& p, int64_t G) {
  return p.splits == 1 && G <= (p.team == kWarp ? int64_t{kFusedWarpGroups} * kWarp : int64_t{kFusedBlockGroups} * kBlock);
}

// gs: the gradient of forward_backward, or undefined for a plain forward. Returns whether
// the gradient was written (rows_fused_kernel); otherwise the caller runs the backward.
template <typename T, int KIND>
bool forward_typed(const at::Tensor& s, const at::Tensor& t, int64_t reduction, double eps,
                   double scale, at::Tensor& loss, at::Tensor& coef, const at::Tensor& gs, cudaStream_t stream) {
  const int64_t R = s.size(0), D = s.size(1);
  const Plan p = make_plan(R, D, sizeof(T));
  const bool fused = gs.defined() && fusable(p, ceil_div(D, Vec16<T>::N));
  TORCH_CHECK(p.blocks <= INT_MAX, "jacfast_cuda.forward: too many rows (", R, ") for one launch");
  const T* sp = s.data_ptr<T>();
  const T* tp = (KIND != 2 && t.defined()) ? t.data_ptr<T>() : nullptr;  // norm ignores teacher
  T* lp = loss.data_ptr<T>();
  double* cp = coef.data_ptr<double>();

  // Workspace: float64 partials when rows are split, float64 row losses for reduction 1.
  at::Tensor ws;
  double* partials = nullptr;
  double* rowloss = nullptr;
  const auto dopts = s.options().dtype(at::kDouble);
  if (p.splits > 1) {
    ws = at::empty({R * p.splits * 3}, dopts);
    partials = ws.data_ptr<double>();
  } else if (reduction == 1) {
    ws = at::empty({R}, dopts);
    rowloss = ws.data_ptr<double>();
  }

  const int red = static_cast<int>(reduction);
  if (fused) {
    T* gp = gs.data_ptr<T>();
    if (p.team == kWarp) {
      rows_fused_kernel<T, KIND, kWarp, kFusedWarpGroups><<<static_cast<unsigned>(p.blocks), kBlock, 0, stream>>>(
          sp, tp, R, D, gp, lp, cp, rowloss, red, eps, scale);
    } else {
      rows_fused_kernel<T, KIND, kBlock, kFusedBlockGroups><<<static_cast<unsigned>(p.blocks), kBlock, 0, stream>>>(
          sp, tp, R, D, gp, lp, cp, rowloss, red, eps, scale);
    }
  } else if (p.team == kWarp) {
    rows_stage1_kernel<T, KIND, kWarp><<<static_cast<unsigned>(p.blocks), kBlock, 0, stream>>>(
        sp, tp, R, D, p.splits, p.gps, partials, lp, cp, rowloss, red, eps);
  } else {
    rows_stage1_kernel<T, KIND, kBlock><<<static_cast<unsigned>(p.blocks), kBlock, 0, stream>>>(
        sp, tp, R, D, p.splits, p.gps, partials, lp, cp, rowloss, red, eps);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (p.splits > 1 || reduction == 1) {
    // reduction 1 needs exactly one block (deterministic sum over all rows).
    const int64_t blocks = reduction == 1 ? 1 : std::min(ceil_div(R, kBlock), kMaxElementwiseGrid);
    const int threads = reduction == 1 ? kFinishBlock : kBlock;
    finish_kernel<T, KIND><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        partials, p.splits, rowloss, R, lp, cp, red, eps, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return fused;
}

// gl: flat grad_loss in T or float64; undefined means "grad_loss = 1" (forward_backward).
template <typename T>
void backward_typed(const at::Tensor& gl, const at::Tensor& s, const at::Tensor& t,
                    const at::Tensor& coef, int64_t reduction, double scale, at::Tensor& gs,
                    at::Tensor& gt, cudaStream_t stream) {
  const int64_t R = s.size(0), D = s.size(1);
  constexpr int V = Vec16<T>::N;
  const T* sp = s.data_ptr<T>();
  const T* tp = t.defined() ? t.data_ptr<T>() : nullptr;
  T* gsp = gs.defined() ? gs.data_ptr<T>() : nullptr;
  T* gtp = gt.defined() ? gt.data_ptr<T>() : nullptr;
  const T* gl_t = nullptr;
  const double* gl_d = nullptr;
  int64_t gl_stride = 0;
  if (gl.defined()) {
    if (gl.scalar_type() == at::kDouble) {
      gl_d = gl.data_ptr<double>();
    } else {
      gl_t = gl.data_ptr<T>();
    }
    gl_stride = reduction == 0 ? gl.stride(0) : 0;  // stride 0 for an expanded grad is fine
  }
  const bool vec = host_aligned16(sp) && (tp == nullptr || host_aligned16(tp)) &&
                   (gsp == nullptr || host_aligned16(gsp)) && (gtp == nullptr || host_aligned16(gtp));
  const int64_t N = R * D;
  const int64_t work = vec ? N / V + N % V : N;
  const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(work, kBlock), kMaxElementwiseGrid));
  const double* cp = coef.data_ptr<double>();
  const int red = static_cast<int>(reduction);
  if (vec && D % V == 0) {
    backward_kernel<T, true><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(
        sp, tp, cp, gl_t, gl_d, gl_stride, red, scale, gsp, gtp, R, D, vec);
  } else {
    backward_kernel<T, false><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(
        sp, tp, cp, gl_t, gl_d, gl_stride, red, scale, gsp, gtp, R, D, vec);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Host launchers used by the ops in module.cpp, which validate the inputs, allocate the
// outputs and hold the device guard. Kernels run on the current stream.
bool launch_forward(const at::Tensor& s, const at::Tensor& t, int64_t kind, int64_t reduction, double eps,
                    double scale, at::Tensor& loss, at::Tensor& coef, const at::Tensor& gs) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  bool fused = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "jacfast_cuda_forward", [&] {
    switch (kind) {
      case 0: fused = forward_typed<scalar_t, 0>(s, t, reduction, eps, scale, loss, coef, gs, stream); break;
      case 1: fused = forward_typed<scalar_t, 1>(s, t, reduction, eps, scale, loss, coef, gs, stream); break;
      default: fused = forward_typed<scalar_t, 2>(s, t, reduction, eps, scale, loss, coef, gs, stream); break;
    }
  });
  return fused;
}

void launch_backward(const at::Tensor& grad_loss, const at::Tensor& s, const at::Tensor& t,
                     const at::Tensor& coef, int64_t reduction, double scale, at::Tensor& gs, at::Tensor& gt) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "jacfast_cuda_backward", [&] {
    backward_typed<scalar_t>(grad_loss, s, t, coef, reduction, scale, gs, gt, stream);
  });
}

}  // namespace jacfast_cuda
