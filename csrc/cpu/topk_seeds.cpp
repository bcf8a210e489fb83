// CPU kernel of the fused top-k selection + one-hot backward seeds.
// Contract: jacfast/ops/topk_seeds.py (module docstring).
//
//   topk_seeds(logits (B, C) contiguous, k) -> indices (B, k) int64, seeds (k, B, C) logits dtype
//
// Order: larger first, ties toward the lower index, NaN larger than everything (NaNs tie
// among themselves), -0.0 == +0.0. Because that order is a strict total order on
// (value, index), every selection algorithm below yields the same, deterministic result.
//
// Design notes
// * One task per block of rows (at::parallel_for); a row is read once and its k seed rows
//   (zeros and one 1) are written by the same thread right after, so each output row is
//   written exactly once and first-touched by the thread that owns it.
// * Small k (the common case, K <= 16): a sorted buffer of k candidates; blocks of elements
//   none of which beats the current k-th are rejected with one vectorized test, so a row
//   costs ~C/8 comparisons' time once the buffer holds large values.
//   Large k: nth_element + sort on an index array, O(C + k log k).
// * Values are compared in their opmath type (float for half/bf16, exact conversion).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <vector>

namespace jacfast_cpu {
namespace {

constexpr int64_t kInsertMaxK = 16;      // up to this k, the sorted-buffer selection
constexpr int64_t kGrainElems = 1 << 15;  // logits elements per parallel task, at least
constexpr int64_t kScanBlock = 16;        // logits tested at once against the k-th candidate

// True when (va, ia) ranks strictly before (vb, ib).
template <typename acc_t>
static inline bool ranks_before(acc_t va, int64_t ia, acc_t vb, int64_t ib) {
  const bool na = std::isnan(va), nb = std::isnan(vb);
  if (na || nb) return (na && nb) ? ia < ib : na;
  if (va != vb) return va > vb;
  return ia < ib;
}

template <typename scalar_t>
void topk_rows(const scalar_t* logits, int64_t batch, int64_t classes, int64_t k, int64_t* indices,
               scalar_t* seeds) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(classes, 1));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> best_v;
    std::vector<int64_t> best_i;
    std::vector<int64_t> order;
    if (k <= kInsertMaxK) {
      best_v.resize(k);
      best_i.resize(k);
    } else {
      order.resize(classes);
    }
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* row = logits + b * classes;
      int64_t* out_i = indices + b * k;
      if (k <= kInsertMaxK) {
        // Insert row[c] (c: the largest index seen so far, so it sits after every equal value).
        int64_t n = 0;  // candidates held, sorted best first
        auto insert = [&](acc_t v, int64_t c) {
          int64_t j = (n < k) ? n++ : k - 1;
          while (j > 0 && ranks_before(v, c, best_v[j - 1], best_i[j - 1])) {
            best_v[j] = best_v[j - 1];
            best_i[j] = best_i[j - 1];
            --j;
          }
          best_v[j] = v;
          best_i[j] = c;
        };
        int64_t c = 0;
        for (; c < k; ++c) insert(static_cast<acc_t>(row[c]), c);
        // Later values enter only if they beat the k-th: !(v <= kth) is v > kth or v NaN
        // (a tie loses on index). Nothing beats a NaN k-th. Whole blocks of losers are
        // skipped with one vectorizable test.
        acc_t kth = best_v[k - 1];
        while (c < classes && !std::isnan(kth)) {
          for (; c + kScanBlock <= classes; c += kScanBlock) {
            int beats = 0;
            for (int64_t i = 0; i < kScanBlock; ++i) beats |= !(static_cast<acc_t>(row[c + i]) <= kth);
            if (beats) break;
          }
          const int64_t end = std::min(c + kScanBlock, classes);
          for (; c < end && !std::isnan(kth); ++c) {
            const acc_t v = static_cast<acc_t>(row[c]);
            if (!(v <= kth)) {
              insert(v, c);
              kth = best_v[k - 1];
            }
          }
        }
        std::copy(best_i.begin(), best_i.begin() + k, out_i);
      } else {
        std::iota(order.begin(), order.end(), int64_t{0});
        auto cmp = [row](int64_t a, int64_t c) {
          return ranks_before(static_cast<acc_t>(row[a]), a, static_cast<acc_t>(row[c]), c);
        };
        if (k < classes) std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), cmp);
        std::sort(order.begin(), order.begin() + k, cmp);
        std::copy(order.begin(), order.begin() + k, out_i);
      }
      // seeds[j, b, :] = one_hot(indices[b, j])
      for (int64_t j = 0; j < k; ++j) {
        scalar_t* seed = seeds + (j * batch + b) * classes;
        std::fill(seed, seed + classes, scalar_t(0));
        seed[out_i[j]] = scalar_t(1);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> topk_seeds_cpu(const at::Tensor& logits_in, int64_t k) {
  TORCH_CHECK(logits_in.dim() == 2, "topk_seeds: logits must be 2-D (B, C), got ", logits_in.dim(), "-D");
  TORCH_CHECK(logits_in.device().is_cpu(), "topk_seeds: logits must be a CPU tensor");
  const int64_t batch = logits_in.size(0), classes = logits_in.size(1);
  TORCH_CHECK(k >= 1 && k <= classes, "topk_seeds: need 1 <= k <= C = ", classes, ", got k = ", k);
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor indices = at::empty({batch, k}, logits.options().dtype(at::kLong));
  at::Tensor seeds = at::empty({k, batch, classes}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "jacfast_topk_seeds_cpu", [&] {
    topk_rows<scalar_t>(logits.const_data_ptr<scalar_t>(), batch, classes, k, indices.data_ptr<int64_t>(),
                        seeds.data_ptr<scalar_t>());
  });
  return std::make_tuple(indices, seeds);
}

}  // namespace
}  // namespace jacfast_cpu

TORCH_LIBRARY_FRAGMENT(jacfast_cpu, m) {
  m.def("topk_seeds(Tensor logits, int k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(jacfast_cpu, CPU, m) {
  m.impl("topk_seeds", &jacfast_cpu::topk_seeds_cpu);
}
