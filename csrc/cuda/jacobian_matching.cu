// CUDA kernels for the Jacobian-matching loss head. The math, shapes, dtypes and the
// launch budget are fixed by csrc/README.md ("Kernel contract"); ops are registered in
// module.cpp. Summary of the design:
//   forward  = stage 1 (per-row or per-row-segment float64 sums) [+ finishing kernel].
//   backward = one grid-stride elementwise kernel driven by the per-row coefficients.
//   forward_backward = stage 1 and the backward in one kernel (rows_fused_kernel,
//              jacobian_matching_fused.cuh) for rows or row segments that fit in registers
//              [+ finishing kernel] [+ pending_backward_kernel, for the segments whose
//              block gave up at the row barrier], else forward + backward.
// Determinism: every float sum has a fixed order that depends only on (R, D, dtype):
// the split plan is computed from those alone (never from the SM count; the SM count only
// decides whether forward_backward may fuse split rows, not how it sums), the per-thread
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
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "jacobian_matching_device.cuh"
#include "jacobian_matching_fused.cuh"  // rows_fused_kernel and its row barrier

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

// ---------------------------------------------------------------- host side
bool host_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Split plan: a pure function of (R, D, element size), so the reduction tree is the
// same on every GPU and every run.
//  * rows of <= kWarpMaxGroups 16-byte groups (fp32: 1024 elements): one warp per row, 8 rows
//    per block, no split (e.g. R=8192, D=784 fp32: 1024 blocks, one launch for reduction 0);
//  * longer rows: one 256-thread block per segment; split each row into
//    min(ceil(kTargetSegments / R), G / kMinGroupsPerSegment) segments (at least 1), and
//    into at least ceil(G / kMaxGroupsPerSegment), so that a segment fits the registers of
//    rows_fused_kernel's block. R=16, D=150528 fp32 (G = 37632) gives 64 segments per row
//    = 1024 blocks (~7.8 per SM of a 132-SM H100), R=128 37 per row, R=1 73.
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
  const int64_t fewest = ceil_div(G, kMaxGroupsPerSegment);
  const int64_t splits = std::max(fewest, std::max<int64_t>(1, std::min(want, most)));
  p.gps = ceil_div(G, splits);  // <= kMaxGroupsPerSegment
  p.splits = ceil_div(G, p.gps);  // drop segments that would be empty
  p.blocks = R * p.splits;
  return p;
}

// How many blocks of `kernel` (kBlock threads) the current GPU keeps resident at once: the
// most segments a split row may have for the row barrier (jacobian_matching_fused.cuh).
// Queried once per kernel and device.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int64_t> cached[kMaxDevices];  // 0: not queried yet
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < kMaxDevices && cached[dev].load() > 0) return cached[dev].load();
  int per_sm = 0, sms = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlock, 0));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t n = static_cast<int64_t>(per_sm) * sms;
  if (dev < kMaxDevices && n > 0) cached[dev].store(n);
  return n;
}

// Which kernel forward_backward runs for a plan (never changes the bits, only the passes):
//   kUnfused: forward then backward (5 passes over memory);
//   kFusedRows: rows_fused_kernel, one segment per row, the whole row in registers;
//   kFusedSplit: rows_fused_kernel, segments of split rows in registers (normalized kind: met
//                at a row barrier; squared and norm need none, their coefficients are constants).
enum FusedPath : int64_t { kUnfused = 0, kFusedRows = 1, kFusedSplit = 2 };

// JACFAST_CUDA_FUSE_SPLIT_ROWS=0 turns the row barrier off (forward then backward, the same
// bits), for GPUs shared in ways the occupancy query cannot see (MPS with an SM limit), where
// blocks would often wait out the barrier's polls and leave their segments to a second read.
bool split_rows_fusable() {
  static const bool on = [] {
    const char* e = std::getenv("JACFAST_CUDA_FUSE_SPLIT_ROWS");
    return e == nullptr || std::string(e) != "0";
  }();
  return on;
}

template <typename T, int KIND>
FusedPath fused_path(const Plan& p) {
  if (p.splits == 1) return kFusedRows;  // the plan's rows and segments fit the fused kernel
  if (KIND != 0) return kFusedSplit;     // no barrier
  if (p.splits > kMaxFusedSplits || !split_rows_fusable()) return kUnfused;
  return p.splits <= resident_blocks(rows_fused_kernel<T, KIND, kBlock, kFusedBlockGroups>) ? kFusedSplit : kUnfused;
}

// Polls of the row barrier before a block gives up (kMaxPolls; JACFAST_CUDA_BARRIER_POLLS,
// read per call, is a test hook).
int barrier_polls() {
  const char* e = std::getenv("JACFAST_CUDA_BARRIER_POLLS");
  return e != nullptr && *e != '\0' ? std::max(0, std::atoi(e)) : kMaxPolls;
}

// gs: the gradient of forward_backward, or undefined for a plain forward. Returns whether
// the gradient was written (rows_fused_kernel); otherwise the caller runs the backward.
template <typename T, int KIND>
bool forward_typed(const at::Tensor& s, const at::Tensor& t, int64_t reduction, double eps,
                   double scale, at::Tensor& loss, at::Tensor& coef, const at::Tensor& gs, cudaStream_t stream) {
  const int64_t R = s.size(0), D = s.size(1);
  const Plan p = make_plan(R, D, sizeof(T));
  TORCH_CHECK(p.blocks <= INT_MAX, "jacfast_cuda.forward: too many rows (", R, ") for one launch");
  const FusedPath path = gs.defined() ? fused_path<T, KIND>(p) : kUnfused;
  const T* sp = s.data_ptr<T>();
  const T* tp = (KIND != 2 && t.defined()) ? t.data_ptr<T>() : nullptr;  // norm ignores teacher
  T* lp = loss.data_ptr<T>();
  double* cp = coef.data_ptr<double>();

  // Workspace: float64 partials when rows are split, float64 row losses for reduction 1
  // (from stage 1 or the fused kernel, which then finish rows themselves), and for the row
  // barrier the rows' arrival counters, the segment ticket and the segments' done flags
  // (int32, zeroed).
  const bool barrier = path == kFusedSplit && KIND == 0;
  const bool rows_finished = p.splits == 1;
  const int64_t n_partials = p.splits > 1 ? R * p.splits * 3 : 0;
  const int64_t n_rowloss = reduction == 1 && rows_finished ? R : 0;
  at::Tensor ws, sync;
  double* partials = nullptr;
  double* rowloss = nullptr;
  if (n_partials + n_rowloss > 0) {
    ws = at::empty({n_partials + n_rowloss}, s.options().dtype(at::kDouble));
    if (n_partials > 0) partials = ws.data_ptr<double>();
    if (n_rowloss > 0) rowloss = ws.data_ptr<double>() + n_partials;
  }
  if (barrier) sync = at::zeros({R + 1 + p.blocks}, s.options().dtype(at::kInt));

  const int red = static_cast<int>(reduction);
  const unsigned blocks = static_cast<unsigned>(p.blocks);
  if (path != kUnfused) {
    T* gp = gs.data_ptr<T>();
    int* sync_ptr = sync.defined() ? sync.data_ptr<int>() : nullptr;
    if (p.team == kWarp) {
      rows_fused_kernel<T, KIND, kWarp, kFusedWarpGroups><<<blocks, kBlock, 0, stream>>>(
          sp, tp, R, D, 1, p.gps, nullptr, nullptr, gp, lp, cp, rowloss, red, eps, scale, 0);
    } else {
      rows_fused_kernel<T, KIND, kBlock, kFusedBlockGroups><<<blocks, kBlock, 0, stream>>>(
          sp, tp, R, D, p.splits, p.gps, partials, sync_ptr, gp, lp, cp, rowloss, red, eps, scale,
          barrier ? barrier_polls() : 0);
    }
  } else if (p.team == kWarp) {
    rows_stage1_kernel<T, KIND, kWarp><<<blocks, kBlock, 0, stream>>>(
        sp, tp, R, D, p.splits, p.gps, partials, lp, cp, rowloss, red, eps);
  } else {
    rows_stage1_kernel<T, KIND, kBlock><<<blocks, kBlock, 0, stream>>>(
        sp, tp, R, D, p.splits, p.gps, partials, lp, cp, rowloss, red, eps);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (!rows_finished || reduction == 1) {
    // reduction 1 needs exactly one block (deterministic sum over all rows).
    const int64_t fblocks = reduction == 1 ? 1 : std::min(ceil_div(R, kBlock), kMaxElementwiseGrid);
    const int threads = reduction == 1 ? kFinishBlock : kBlock;
    finish_kernel<T, KIND><<<static_cast<unsigned>(fblocks), threads, 0, stream>>>(
        rows_finished ? nullptr : partials, p.splits, rowloss, R, lp, cp, red, eps, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (barrier) {  // the segments whose block gave up waiting, from finish_kernel's coef
    pending_backward_kernel<T><<<blocks, kBlock, 0, stream>>>(
        sp, tp, cp, sync.data_ptr<int>() + R + 1, D, p.splits, p.gps, red, scale, gs.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return path != kUnfused;
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

// Test hook (_plan, host code only, so it runs without a GPU): the split plan's
// (team threads, splits, groups per segment) for R rows of D elements of elem_size bytes.
std::tuple<int64_t, int64_t, int64_t> split_plan(int64_t R, int64_t D, int64_t elem_size) {
  TORCH_CHECK(R >= 1 && D >= 1 && (elem_size == 2 || elem_size == 4 || elem_size == 8),
              "jacfast_cuda._plan: need rows, dim >= 1 and element_size 2, 4 or 8");
  const Plan p = make_plan(R, D, elem_size);
  return {p.team, p.splits, p.gps};
}

// Test hook (_fused_path): the FusedPath forward_backward takes for these rows on the
// current device.
int64_t forward_backward_path(int64_t R, int64_t D, at::ScalarType dtype, int64_t kind) {
  TORCH_CHECK(R >= 1 && D >= 1 && kind >= 0 && kind <= 2, "jacfast_cuda._fused_path: need rows, dim >= 1 and kind 0-2");
  int64_t path = kUnfused;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "jacfast_cuda_fused_path", [&] {
    const Plan p = make_plan(R, D, sizeof(scalar_t));
    path = kind == 0 ? fused_path<scalar_t, 0>(p) : kind == 1 ? fused_path<scalar_t, 1>(p)
                                                                 : fused_path<scalar_t, 2>(p);
  });
  return path;
}

void launch_backward(const at::Tensor& grad_loss, const at::Tensor& s, const at::Tensor& t,
                     const at::Tensor& coef, int64_t reduction, double scale, at::Tensor& gs, at::Tensor& gt) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "jacfast_cuda_backward", [&] {
    backward_typed<scalar_t>(grad_loss, s, t, coef, reduction, scale, gs, gt, stream);
  });
}

}  // namespace jacfast_cuda
