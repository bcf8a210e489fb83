// topk_seeds: per-row top-k output indices and the matching one-hot backward
// cotangents ("seeds") for Jacobian matching. Registered in module.cpp as
//   jacfast_cuda::topk_seeds(Tensor logits, int k) -> (Tensor indices, Tensor seeds)
// logits (B, C) contiguous; indices (B, k) int64 in descending value order, ties toward
// the lower index, NaN ranked above everything (as torch.topk); seeds (k, B, C) in the
// logits dtype with seeds[j, b, c] = (c == indices[b, j]).
//
// One launch, one block per row. The block zero-fills its k seed slices, then runs k
// selection passes: pass j takes the best element that ranks strictly after the winner
// of pass j-1 in the total order (value desc, NaN first, index asc), so no "already
// chosen" set is needed. Cost per row: O(k * C / threads) loads (hits in L1/L2 after
// the first pass) + k block reductions, plus k * C seed stores. Meant for small k
// (k << C); k close to C = 100k would be quadratic.
// Deterministic: the order is total and comparisons are exact, so the winner of each
// pass is unique whatever the reduction tree.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>

namespace jacfast_cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;

__device__ __forceinline__ double val_d(float x) { return static_cast<double>(x); }
__device__ __forceinline__ double val_d(double x) { return x; }
__device__ __forceinline__ double val_d(c10::Half x) { return static_cast<double>(static_cast<float>(x)); }
__device__ __forceinline__ double val_d(c10::BFloat16 x) { return static_cast<double>(static_cast<float>(x)); }

// true when (va, ia) ranks strictly before (vb, ib); both indices valid (>= 0).
__device__ __forceinline__ bool ranks_before(double va, int64_t ia, double vb, int64_t ib) {
  const bool na = va != va, nb = vb != vb;
  if (na != nb) return na;                // NaN ranks above any number
  if (!na && va != vb) return va > vb;    // larger value first
  return ia < ib;                         // ties (and NaN vs NaN): lower index first
}

// Keep the better of (v, i) and (ov, oi); index -1 means "no candidate".
__device__ __forceinline__ void take_better(double& v, int64_t& i, double ov, int64_t oi) {
  if (oi >= 0 && (i < 0 || ranks_before(ov, oi, v, i))) {
    v = ov;
    i = oi;
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
topk_seeds_kernel(const T* __restrict__ logits, int64_t B, int64_t C, int64_t k,
                  int64_t* __restrict__ indices, T* __restrict__ seeds) {
  __shared__ double sh_v[kMaxThreads / kWarp];
  __shared__ int64_t sh_i[kMaxThreads / kWarp];
  __shared__ double best_v;
  __shared__ int64_t best_i;

  const int64_t b = blockIdx.x;
  const T* row = logits + b * C;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;

  // Zero this row's seed slices seeds[j, b, :] (coalesced stores).
  const T zero = T(0.0f), one = T(1.0f);
  for (int64_t j = 0; j < k; ++j) {
    T* dst = seeds + (j * B + b) * C;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) dst[c] = zero;
  }
  // Orders the zero stores before the one-hot stores of thread 0 below (same block).
  __syncthreads();

  double prev_v = 0.0;
  int64_t prev_i = -1;  // -1: first pass, every element is eligible
  for (int64_t j = 0; j < k; ++j) {
    double v = 0.0;
    int64_t i = -1;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const double x = val_d(row[c]);
      if (prev_i >= 0 && !ranks_before(prev_v, prev_i, x, c)) continue;  // chosen already
      take_better(v, i, x, c);
    }
    // Block argmax: warp shuffles, then warp 0 over the per-warp winners.
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) {
      const double ov = __shfl_down_sync(0xffffffffu, v, off);
      const int64_t oi = __shfl_down_sync(0xffffffffu, i, off);
      take_better(v, i, ov, oi);
    }
    if (lane == 0) {
      sh_v[warp] = v;
      sh_i[warp] = i;
    }
    __syncthreads();
    if (warp == 0) {
      v = lane < nwarps ? sh_v[lane] : 0.0;
      i = lane < nwarps ? sh_i[lane] : -1;
#pragma unroll
      for (int off = kWarp / 2; off > 0; off >>= 1) {
        const double ov = __shfl_down_sync(0xffffffffu, v, off);
        const int64_t oi = __shfl_down_sync(0xffffffffu, i, off);
        take_better(v, i, ov, oi);
      }
      if (lane == 0) {
        best_v = v;
        best_i = i;  // k <= C guarantees a winner (i >= 0)
        indices[b * k + j] = i;
        seeds[(j * B + b) * C + i] = one;
      }
    }
    // Publishes best_*; the next pass writes sh_* / best_* only after its own barrier,
    // which every thread reaches after reading best_* here.
    __syncthreads();
    prev_v = best_v;
    prev_i = best_i;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_seeds(const at::Tensor& logits, int64_t k) {
  const char* op = "jacfast_cuda.topk_seeds";
  TORCH_CHECK(logits.defined() && logits.is_cuda(), op, ": logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (B, C), got shape ", logits.sizes());
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous");
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": dtype must be float32, float64, float16 or bfloat16, got ", st);
  const int64_t B = logits.size(0), C = logits.size(1);
  TORCH_CHECK(k >= 0 && k <= C, op, ": k must be in [0, C] = [0, ", C, "], got ", k);
  TORCH_CHECK(B <= INT_MAX, op, ": too many rows (", B, ")");
  c10::cuda::CUDAGuard guard(logits.device());

  auto indices = at::empty({B, k}, logits.options().dtype(at::kLong));
  auto seeds = at::empty({k, B, C}, logits.options());
  if (B == 0 || k == 0) return {indices, seeds};

  // Enough warps to cover short rows once, up to kMaxThreads for long rows.
  const int64_t threads = std::min<int64_t>(kMaxThreads, std::max<int64_t>(kWarp, (C + kWarp - 1) / kWarp * kWarp));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "jacfast_cuda_topk_seeds", [&] {
    topk_seeds_kernel<scalar_t><<<static_cast<unsigned>(B), static_cast<unsigned>(threads), 0, stream>>>(
        logits.data_ptr<scalar_t>(), B, C, k, indices.data_ptr<int64_t>(), seeds.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {indices, seeds};
}

}  // namespace jacfast_cuda
