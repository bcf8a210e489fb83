// The fused forward_backward kernel of the loss head (rows_fused_kernel) and the row barrier
// its split rows use. Included once, by jacobian_matching.cu, whose stage-1 and finishing
// kernels' summation order it reproduces and whose launcher decides which rows it takes.
#pragma once

#include "jacobian_matching_device.cuh"

namespace jacfast_cuda {
namespace {

// ---------------------------------------------------------------- row barrier (split rows)
// The segments of a split row are taken by different blocks, which must all have summed
// their segment before any can write a gradient. Each block publishes its partials and
// arrives on the row's counter (release), then waits until all `splits` have arrived
// (acquire). Blocks take segments in ticket order (an atomic counter read when the block
// starts, not blockIdx, whose scheduling order CUDA does not promise): every row before the
// one holding the newest ticket has all its segments taken by running blocks, so only that
// row can be waiting, and it can always be completed as long as a row has no more segments
// than the GPU keeps blocks resident (the launcher checks splits <= that occupancy and <=
// kMaxFusedSplits, else runs forward then backward). Where that occupancy is not what the
// GPU gives (kernels of other streams or processes holding SMs), a block that has waited
// max_polls polls gives up and leaves its segment to pending_backward_kernel, which reads it
// again and writes the same bits: slower, never a hang or a wrong value.
__device__ __forceinline__ void arrive_release(int* counter) {
  asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(counter) : "memory");
}
__device__ __forceinline__ int load_acquire(const int* counter) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(counter) : "memory");
  return v;
}

// Polls of a row's counter before a block gives up: 2^16 polls of >= 64 ns (several ms,
// while a row's blocks finish in microseconds). JACFAST_CUDA_BARRIER_POLLS overrides it (a
// test hook: 0 makes every block that does not find its row complete give up).
constexpr int kMaxPolls = 1 << 16;
// Most segments a fused split row may have: warp 0 stages the row's partials in shared
// memory (3 KB) so that thread 0's ordered sum reads no global memory.
constexpr int64_t kMaxFusedSplits = 128;

// Called by all of warp 0 of a block that has summed segment `part` of `row` (a valid in
// lane 0): publishes a at partials[(row * splits + part) * 3], where finish_kernel reads
// it, and waits for the row's other segments. Returns, in every lane, whether they all
// arrived within max_polls polls; if so, lane 0's a holds the row's sums, added in ascending
// part order from 0.0, exactly as finish_kernel adds them.
__device__ __forceinline__ bool row_sums_after_barrier(double (&a)[3], double* __restrict__ partials,
                                                       int* __restrict__ arrived, int64_t row, int64_t part,
                                                       int64_t splits, int max_polls) {
  __shared__ double staged[kMaxFusedSplits * 3];
  const int lane = threadIdx.x;
  if (lane == 0) {
    double* mine = partials + (row * splits + part) * 3;
#pragma unroll
    for (int q = 0; q < 3; ++q) mine[q] = a[q];
    arrive_release(arrived + row);  // orders the stores above before the arrival
  }
  __syncwarp();  // the other lanes' polls below see lane 0's own arrival
  // Every lane polls with acquire loads, so each lane's reads of the partials below see them.
  for (int polls = 0; !__all_sync(0xffffffffu, load_acquire(arrived + row) >= splits); ++polls) {
    if (polls >= max_polls) return false;  // uniform: the whole warp gives up together
#if __CUDA_ARCH__ >= 700
    __nanosleep(64);
#endif
  }
  const double* first = partials + row * splits * 3;
  for (int64_t j = lane; j < splits * 3; j += kWarp) staged[j] = first[j];
  __syncwarp();
  if (lane == 0) {
    double b[3] = {0.0, 0.0, 0.0};
    for (int64_t j = 0; j < splits; ++j) {
#pragma unroll
      for (int q = 0; q < 3; ++q) b[q] += staged[j * 3 + q];
    }
#pragma unroll
    for (int q = 0; q < 3; ++q) a[q] = b[q];
  }
  return true;
}

// The gradient of the segments whose rows_fused_kernel block gave up at the row barrier
// (done[seg] == 0), from the coefficients finish_kernel wrote, as backward_kernel writes it
// (grad_loss = 1): the same bits. One block per segment; a done segment costs one load.
template <typename T>
__global__ void __launch_bounds__(kBlock)
pending_backward_kernel(const T* __restrict__ s, const T* __restrict__ t, const double* __restrict__ coef,
                        const int* __restrict__ done, int64_t D, int64_t splits, int64_t gps, int reduction,
                        double scale, T* __restrict__ gs) {
  const int64_t seg = blockIdx.x;
  if (done[seg] != 0) return;
  constexpr int V = Vec16<T>::N;
  const int64_t row = seg / splits, part = seg % splits;
  const int64_t lo = part * gps * V, hi = imin64(D, (part + 1) * gps * V);
  const RowCoef p = load_row_coef<T>(row, coef, nullptr, nullptr, 0, reduction, scale);
  const T* srow = s + row * D;
  const T* trow = t != nullptr ? t + row * D : nullptr;
  T* grow = gs + row * D;
  for (int64_t e = lo + threadIdx.x; e < hi; e += kBlock)
    grow[e] = grad_s_elem<T>(p, to_d(srow[e]), trow != nullptr ? to_d(trow[e]) : 0.0);
}

// ---------------------------------------------------------------- fused forward_backward
// forward_backward for segments short enough to stay in registers: at most GPL 16-byte groups
// per thread of the team. The team reads its segment once, sums it in exactly
// rows_stage1_kernel's order (thread `lane` takes groups g0 + lane, g0 + lane + TEAM, ...
// ascending, elements ascending, the same vector/scalar choice), reduces with the same
// warp/block sum, forms the row's coefficients as stage 1 and the finishing kernel do (an
// unsplit row also writes coef and loss or rowloss; for split rows the finishing kernel
// does), and then writes grad_s = g (c0 s - c1 t) (g = 1, or scale for reduction 1, as
// backward_kernel forms it) from the groups it holds: 3 passes over memory instead of 5,
// the same bits.
//   splits == 1: one row per team (warp or block layout), the row is blockIdx-derived.
//   splits > 1 (block layout), normalized kind: segment = ticket from sync[R]; the segments
//     of a row meet at the row barrier; a block that passes it writes its gradient and sets
//     done[seg] = sync[R + 1 + seg] to 1, one that gives up writes nothing more (its segment
//     is pending_backward_kernel's). sync = [arrived per row (R), ticket, done per segment
//     (R * splits)], zero at launch. The finishing kernel makes coef and loss from the
//     published partials afterwards, whichever blocks gave up.
//   splits > 1, squared and norm kinds: their gradient coefficients are constants, so no
//     block waits: each writes its partials, as stage 1 does, and its gradient; the finishing
//     kernel makes coef and loss from the partials afterwards (sync is unused).
template <typename T, int KIND, int TEAM, int GPL>
__global__ void __launch_bounds__(kBlock)
rows_fused_kernel(const T* __restrict__ s, const T* __restrict__ t, int64_t R, int64_t D, int64_t splits,
                  int64_t gps, double* __restrict__ partials, int* __restrict__ sync, T* __restrict__ gs,
                  T* __restrict__ loss, double* __restrict__ coef, double* __restrict__ rowloss, int reduction,
                  double eps, double scale, int max_polls) {
  using VecT = Vec16<T>;
  constexpr int V = VecT::N;
  constexpr int kTeams = kBlock / TEAM;
  const int lane = threadIdx.x % TEAM, team = threadIdx.x / TEAM;
  int64_t seg = static_cast<int64_t>(blockIdx.x) * kTeams + team;
  constexpr bool kBarrier = KIND == 0;  // split rows wait for their row's sums
  if constexpr (TEAM == kBlock && kBarrier) {
    if (splits > 1) {
      __shared__ int64_t ticket;
      if (threadIdx.x == 0) ticket = atomicAdd(sync + R, 1);
      __syncthreads();
      seg = ticket;
    }
  }
  if (seg >= R * splits) return;  // whole team leaves together (only in the warp layout)

  const int64_t row = seg / splits, part = seg % splits;
  const int64_t G = (D + V - 1) / V;
  const int64_t g0 = part * gps;
  // The segment: groups [g0, g0 + ng) of the row, its first n elements from `first` on.
  const int ng = static_cast<int>(imin64(G, g0 + gps) - g0);
  const int64_t first = row * D + g0 * V, n = D - g0 * V;
  const T* sseg = s + first;
  const T* tseg = t != nullptr ? t + first : nullptr;
  T* gseg = gs + first;
  const bool has_t = tseg != nullptr;
  // Row bases, not segment bases, decide (as in stage 1); g0 * V * sizeof(T) is a multiple of 16.
  const bool vec = aligned16(s + row * D) && (!has_t || aligned16(t + row * D));

  VecT sv[GPL], tv[GPL];
  double a[3] = {0.0, 0.0, 0.0};
#pragma unroll
  for (int i = 0; i < GPL; ++i) {
    const int g = lane + i * TEAM;
    const int64_t e0 = static_cast<int64_t>(g) * V;
    tv[i] = VecT{};
    if (g >= ng) continue;
    if (vec && e0 + V <= n) {
      sv[i] = *reinterpret_cast<const VecT*>(sseg + e0);
      if (has_t) tv[i] = *reinterpret_cast<const VecT*>(tseg + e0);
#pragma unroll
      for (int j = 0; j < V; ++j) accum<KIND>(to_d(sv[i].v[j]), to_d(tv[i].v[j]), a);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int64_t e = e0 + j;
        sv[i].v[j] = e < n ? sseg[e] : T(0);
        if (has_t && e < n) tv[i].v[j] = tseg[e];
        if (e < n) accum<KIND>(to_d(sv[i].v[j]), has_t ? to_d(tv[i].v[j]) : 0.0, a);
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
    __shared__ bool shared_passed;
    block_sum3(a);  // TEAM == blockDim.x: one segment per block
    bool passed = true;  // the row barrier, for split rows of the normalized kind
    if (kBarrier && splits > 1 && threadIdx.x < kWarp)
      passed = row_sums_after_barrier(a, partials, sync, row, part, splits, max_polls);
    if (lane == 0) {
      RowResult o;
      if (!kBarrier && splits > 1) {  // stage 1's partials; coefficients that do not depend on them
#pragma unroll
        for (int q = 0; q < 3; ++q) partials[seg * 3 + q] = a[q];
        o = finalize_row<KIND>(a, eps);
      } else if (splits == 1) {
        o = finish_row<T, KIND>(row, a, eps, coef, loss, reduction);
        if (reduction == 1) rowloss[row] = o.loss;
      } else {  // the row's sums, as finish_kernel forms them: it writes coef and loss
        o = finalize_row<KIND>(a, eps);
      }
      shared_c[0] = o.c0;
      shared_c[1] = o.c1;
      shared_passed = passed;
    }
    __syncthreads();
    if (!shared_passed) return;  // gave up waiting: pending_backward_kernel writes this segment
    if (kBarrier && splits > 1 && threadIdx.x == 0) sync[R + 1 + seg] = 1;  // read after this kernel
    c0 = shared_c[0];
    c1 = shared_c[1];
  }
  double g = 1.0;
  if (reduction == 1) g *= scale;
  const RowCoef p{c0, c1, 0.0, g};
  const bool vec_out = vec && aligned16(gs + row * D);
#pragma unroll
  for (int i = 0; i < GPL; ++i) {
    const int g = lane + i * TEAM;
    const int64_t e0 = static_cast<int64_t>(g) * V;
    if (g >= ng) continue;
    if (vec_out && e0 + V <= n) {
      VecT os;
#pragma unroll
      for (int j = 0; j < V; ++j) os.v[j] = grad_s_elem<T>(p, to_d(sv[i].v[j]), to_d(tv[i].v[j]));
      *reinterpret_cast<VecT*>(gseg + e0) = os;
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (e0 + j < n) gseg[e0 + j] = grad_s_elem<T>(p, to_d(sv[i].v[j]), to_d(tv[i].v[j]));
      }
    }
  }
}

}  // namespace
}  // namespace jacfast_cuda
