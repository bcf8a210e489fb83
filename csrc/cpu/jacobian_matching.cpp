// CPU kernels of the Jacobian-matching loss head (contract: csrc/README.md), module jacfast._C.
// The vector kernels are in jacobian_matching_kernels.h; this file: checks, threading, ops.
// * Determinism: rows are cut into fixed kChunk-element chunks. A chunk's float64 partials
//   (ss, tt, st or dd) depend only on its data: 16 fixed lanes accumulate (a zero-padded
//   last block keeps that true for the tail) and are folded by a fixed tree; chunks are
//   summed in chunk order, rows by a fixed pairwise tree. Nothing depends on thread count.
// * Speed: hot loops use GCC generic vectors (W doubles per native vector), so one source
//   lowers to AVX-512 (W=8), AVX2 (W=4) or SSE2 (W=2); each is compiled as a target clone
//   and picked once at runtime. The 16 lanes are the same in every clone, so AVX-512 and
//   AVX2 give identical bits (the SSE2 clone has no FMA and may differ in the last bit).
// * fp16/bf16: loads are exact; outputs are rounded once, from float64, to the 16-bit grid:
//   in the AVX-512 clone through a float rounded to odd and a hardware conversion
//   (vcvtps2ph; vcvtneps2bf16 where AVX512_BF16 exists), elsewhere in float64 arithmetic.
// * forward_backward: a thread forms a row's stats and writes its gradient right away, so
//   the second read hits L1/L2 (for rows that fit there). Too few rows to keep all threads
//   busy are split over the threads, which meet at one barrier per row. The squared and
//   norm kinds, whose gradient needs no row sums, do it per 4096-element chunk instead, and
//   (but for float64) from one load per element: const_chunk in the kernels header.
// * Gradients from a quarter of the last-level cache up are written with streaming stores: a
//   normal store first reads the line it writes (4 passes over memory instead of 3).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include <unistd.h>

#include "jacobian_matching_kernels.h"  // the vector kernels and their ISA clones

namespace jacfast_cpu {
namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel task, at least

// 3 = AVX-512 with AVX512_BF16, 2 = AVX-512, 1 = AVX2+FMA+F16C, 0 = SSE2;
// JACFAST_CPU_ISA=avx512bf16|avx512|avx2|base lowers it (tests run every level).
int pick_isa() {
  __builtin_cpu_init();
  int isa = 0;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) isa = 1;
  if (isa == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    isa = 2;
  if (isa == 2 && __builtin_cpu_supports("avx512bf16")) isa = 3;
  const std::string e = std::getenv("JACFAST_CPU_ISA") ? std::getenv("JACFAST_CPU_ISA") : "";
  return std::min(isa, e == "avx512bf16" ? 3 : e == "avx512" ? 2 : e == "avx2" ? 1 : e == "base" ? 0 : isa);
}

template <class Tag> struct Kernels {
  decltype(&stats_base<Tag>) stats;
  decltype(&grad_base<Tag>) grad;
  decltype(&fused_const_base<Tag>) fused_const;  // squared / norm forward_backward, or null
  static const Kernels& get() {
    static const int isa = pick_isa();
    // bf16 gradients with AVX512_BF16: the same loads, stores through vcvtneps2bf16
    using StoreTag = std::conditional_t<same<Tag, BF16Tag>, BF16HwTag, Tag>;
    static const Kernels k = isa == 3   ? Kernels{stats_avx512<Tag>, grad_avx512<StoreTag>, fused_const_for(isa)}
                             : isa == 2 ? Kernels{stats_avx512<Tag>, grad_avx512<Tag>, fused_const_for(isa)}
                             : isa == 1 ? Kernels{stats_avx2<Tag>, grad_avx2<Tag>, fused_const_for(isa)}
                                        : Kernels{stats_base<Tag>, grad_base<Tag>, fused_const_for(isa)};
    return k;
  }
  // Not for float64 (see const_chunk), nor for half in the AVX2 clone, whose F16C stats and
  // grad go through float buffers.
  static decltype(fused_const) fused_const_for(int isa) {
    if constexpr (same<Tag, double>) {
      return nullptr;
    } else {
      using StoreTag = std::conditional_t<same<Tag, BF16Tag>, BF16HwTag, Tag>;
      if (isa == 1 && same<Tag, HalfTag>) return nullptr;
      return isa == 3 ? fused_const_avx512<StoreTag> : isa == 2 ? fused_const_avx512<Tag>
             : isa == 1 ? fused_const_avx2<Tag> : fused_const_base<Tag>;
    }
  }
};

// ---- per-row finishing and the loss output ----
struct RowOut { double loss, c0, c1, c2; };

RowOut finish_row(const double* part, int64_t nc, int kind, double eps) {
  double a = 0.0, b = 0.0, c = 0.0;  // chunk partials summed in chunk order
  for (int64_t i = 0; i < nc; ++i) { a += part[3 * i]; b += part[3 * i + 1]; c += part[3 * i + 2]; }
  if (kind == 1) return {a, 2.0, 2.0, 2.0};  // a = dd (= ss without teacher)
  if (kind == 2) return {a, 2.0, 0.0, 0.0};
  const double ss = a, tt = b, st = c, ns = std::sqrt(ss), nt = std::sqrt(tt);
  const double as = std::max(ns, eps), at = std::max(nt, eps);  // std::max keeps a NaN ns
  const double inv = 1.0 / (as * at), cst = st * inv;
  const double loss = ss / (as * as) + tt / (at * at) - 2.0 * st / (as * at);
  const double cs = ns > eps ? cst : 1.0, ct = nt > eps ? cst : 1.0;
  return {loss, 2.0 * cs / (as * as), 2.0 * inv, 2.0 * ct / (at * at)};
}

double tree_sum(const double* x, int64_t n) {  // fixed pairwise tree
  if (n <= 32) { double s = 0.0; for (int64_t i = 0; i < n; ++i) s += x[i]; return s; }
  return tree_sum(x, n / 2) + tree_sum(x + n / 2, n - n / 2);
}

// Per-row float64 losses -> loss (R,) or scaled sum (), rounded once like the kernels.
template <class Tag>
at::Tensor make_loss(const std::vector<double>& rows, int64_t reduction, double scale, const at::Tensor& like) {
  const int64_t R = (int64_t)rows.size(), n = reduction == 0 ? R : 1;
  at::Tensor out = reduction == 0 ? at::empty({R}, like.options()) : at::empty({}, like.options());
  const double total = reduction == 0 ? 0.0 : scale * tree_sum(rows.data(), R);
  St<Tag>* dst = reinterpret_cast<St<Tag>*>(out.data_ptr());
  for (int64_t i = 0; i < n; ++i) {
    St<Tag> o[2];
    store<Tag, 2>(o, typename V<2>::d{reduction == 0 ? rows[i] : total, 0.0});
    dst[i] = o[0];
  }
  return out;
}

// ---- argument checks (same rules and wording as the CUDA backend) ----
const at::Tensor* check_inputs(const at::Tensor& s, const c10::optional<at::Tensor>& teacher, int64_t kind,
                               int64_t reduction) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "jacfast_cpu: kind must be 0 (normalized), 1 (squared) or 2 (norm), got ", kind);
  TORCH_CHECK(reduction == 0 || reduction == 1, "jacfast_cpu: reduction must be 0 (none) or 1 (scaled sum), got ",
              reduction);
  TORCH_CHECK(s.defined() && s.device().is_cpu(), "jacfast_cpu: student must be a defined CPU tensor");
  TORCH_CHECK(s.dim() == 2, "jacfast_cpu: student must be 2-D (R, D), got shape ", s.sizes());
  TORCH_CHECK(s.size(0) >= 1 && s.size(1) >= 1,
              "jacfast_cpu: student must have R >= 1 rows and D >= 1 columns, got shape ", s.sizes());
  TORCH_CHECK(s.is_contiguous(), "jacfast_cpu: student must be contiguous");
  const auto dt = s.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "jacfast_cpu: dtype must be float32, float64, float16 or bfloat16, got ", dt);
  if (!teacher.has_value() || !teacher->defined()) return nullptr;
  const at::Tensor& t = *teacher;
  TORCH_CHECK(t.device() == s.device(), "jacfast_cpu: teacher is on ", t.device(), " but student is on ", s.device());
  TORCH_CHECK(t.scalar_type() == dt, "jacfast_cpu: teacher dtype ", t.scalar_type(), " differs from student dtype ",
              dt);
  TORCH_CHECK(t.sizes() == s.sizes(), "jacfast_cpu: teacher shape ", t.sizes(), " differs from student shape ",
              s.sizes());
  TORCH_CHECK(t.is_contiguous(), "jacfast_cpu: teacher must be contiguous");
  return &t;
}

template <class F> void dispatch(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(HalfTag{});
    default: return f(BF16Tag{});
  }
}
template <class Tag> const St<Tag>* ptr(const at::Tensor* x) {
  return x ? reinterpret_cast<const St<Tag>*>(x->data_ptr()) : nullptr;
}

int64_t chunks(int64_t D) { return (D + kChunk - 1) / kChunk; }

// Whether a gradient of `bytes` is written with streaming stores: from a quarter of the
// last-level cache, at most 8 MiB, up, where with the two inputs it fills the cache share of
// this process and could only evict them (and a normal store first reads every line it
// writes). The cap: a VM's L3 is its socket's, shared with other tenants. Measured, fp32
// forward_backward, streamed vs not: 32 MiB-L3 EPYC, 16 x 150528 (9.6 MB out) 10-15% faster,
// 256 x 3072 (3 MB) slower; 105 MiB-L3 Xeon with 2 vCPUs, normalized 1.14-1.24x faster from
// 6.3 MB (512 x 3072) up, squared 1.05-1.23x from 9.6 MB, 0.92-1.0 at 3 MB.
// JACFAST_CPU_STREAM_BYTES overrides the threshold (0: always; read per call, so tests cover
// both paths; the values written are the same either way).
bool stream_output(int64_t bytes) {
  static const int64_t threshold = [] {
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    const int64_t cap = (int64_t)8 << 20;
    return l3 > 0 ? std::min<int64_t>((int64_t)l3 / 4, cap) : cap;
  }();
  const char* env = std::getenv("JACFAST_CPU_STREAM_BYTES");
  return bytes >= (env && *env ? std::atoll(env) : threshold);
}
int64_t grain_for(int64_t item_elems) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, item_elems)); }
int stats_mode(int64_t kind, bool has_t) { return (kind == 2 || !has_t) ? 2 : (int)kind; }

// _round_to_grid(x float64 (N,), bf16) -> float32 (N,): test hook, the stores' rounding in
// the clone this machine runs (the value on the bf16 / half grid, as a float).
at::Tensor round_to_grid_op(const at::Tensor& x, bool bf16) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kDouble && x.dim() == 1,
              "jacfast_cpu._round_to_grid: x must be a 1-D float64 CPU tensor");
  const int64_t n = x.numel(), padded = (n + 7) / 8 * 8;
  at::Tensor in = at::zeros({padded}, x.options()), out = at::empty({padded}, x.options().dtype(at::kFloat));
  in.narrow(0, 0, n).copy_(x);
  const int isa = pick_isa();
  const auto round = isa == 3 ? round_avx512bf16 : isa == 2 ? round_avx512 : isa == 1 ? round_avx2 : round_base;
  round(in.data_ptr<double>(), out.data_ptr<float>(), padded, bf16);
  return out.narrow(0, 0, n).clone();
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& s, const c10::optional<at::Tensor>& teacher,
                                           int64_t kind, int64_t reduction, double eps, double scale) {
  const at::Tensor* t = check_inputs(s, teacher, kind, reduction);
  if (kind == 2) t = nullptr;  // norm never reads the teacher
  const int64_t R = s.size(0), D = s.size(1), nc = chunks(D);
  const int mode = stats_mode(kind, t != nullptr);
  std::vector<double> part(3 * R * nc), rows(R);
  at::Tensor coef = at::empty({R, 3}, s.options().dtype(at::kDouble)), loss;
  double* cp = coef.data_ptr<double>();
  dispatch(s.scalar_type(), [&](auto tag) {
    using Tag = decltype(tag);
    const St<Tag>*sp = ptr<Tag>(&s), *tp = ptr<Tag>(t);
    const auto& K = Kernels<Tag>::get();
    // Parallel over (row, chunk) items, so a few long rows still use every thread.
    at::parallel_for(0, R * nc, grain_for(std::min(D, kChunk)), [&](int64_t b, int64_t e) {
      for (int64_t r = b / nc, cb = b % nc, ce; b < e; b += ce - cb, r = b / nc, cb = b % nc) {
        ce = std::min(nc, cb + (e - b));
        K.stats(sp + r * D, tp ? tp + r * D : nullptr, D, cb, ce, mode, part.data() + 3 * r * nc);
      }
    });
    at::parallel_for(0, R, 4096, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const RowOut o = finish_row(part.data() + 3 * r * nc, nc, (int)kind, eps);
        rows[r] = o.loss, cp[3 * r] = o.c0, cp[3 * r + 1] = o.c1, cp[3 * r + 2] = o.c2;
      }
    });
    loss = make_loss<Tag>(rows, reduction, scale, s);
  });
  return {loss, coef};
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_loss, const at::Tensor& s,
                                            const c10::optional<at::Tensor>& teacher, const at::Tensor& coef_in,
                                            int64_t reduction, double scale, bool need_s, bool need_t) {
  const at::Tensor* t = check_inputs(s, teacher, 0, reduction);
  const int64_t R = s.size(0), D = s.size(1), nc = chunks(D);
  TORCH_CHECK(coef_in.defined() && coef_in.device() == s.device() && coef_in.scalar_type() == at::kDouble &&
                  coef_in.dim() == 2 && coef_in.size(0) == R && coef_in.size(1) == 3,
              "jacfast_cpu: coef must be a float64 (", R, ", 3) CPU tensor");
  TORCH_CHECK(grad_loss.defined() && grad_loss.device() == s.device() && at::isFloatingType(grad_loss.scalar_type()),
              "jacfast_cpu: grad_loss must be a floating-point CPU tensor");
  TORCH_CHECK(grad_loss.numel() == (reduction == 0 ? R : 1), "jacfast_cpu: grad_loss must have ",
              (reduction == 0 ? R : 1), " element(s) for reduction ", reduction, ", got shape ", grad_loss.sizes());
  need_t = need_t && t != nullptr;
  at::Tensor gs = need_s ? at::empty_like(s) : at::empty({0}, s.options());
  at::Tensor gt = need_t ? at::empty_like(s) : at::empty({0}, s.options());
  if (!need_s && !need_t) return {gs, gt};
  const at::Tensor gl = grad_loss.to(at::kDouble).contiguous().view({-1}), coef = coef_in.contiguous();
  const double *glp = gl.data_ptr<double>(), *cp = coef.data_ptr<double>();
  const bool stream = stream_output((need_s + need_t) * s.numel() * (int64_t)s.element_size());
  dispatch(s.scalar_type(), [&](auto tag) {
    using Tag = decltype(tag);
    const St<Tag>*sp = ptr<Tag>(&s), *tp = ptr<Tag>(t);
    St<Tag>* gsp = need_s ? reinterpret_cast<St<Tag>*>(gs.data_ptr()) : nullptr;
    St<Tag>* gtp = need_t ? reinterpret_cast<St<Tag>*>(gt.data_ptr()) : nullptr;
    const auto& K = Kernels<Tag>::get();
    at::parallel_for(0, R * nc, grain_for(std::min(D, kChunk)), [&](int64_t b, int64_t e) {
      for (int64_t r = b / nc, cb = b % nc, ce; b < e; b += ce - cb, r = b / nc, cb = b % nc) {
        ce = std::min(nc, cb + (e - b));  // one call per run of chunks inside a row
        const int64_t lo = r * D + cb * kChunk, n = std::min(D, ce * kChunk) - cb * kChunk;
        K.grad(sp + lo, tp ? tp + lo : nullptr, n, reduction == 0 ? glp[r] : glp[0] * scale, cp[3 * r],
               cp[3 * r + 1], cp[3 * r + 2], gsp ? gsp + lo : nullptr, gtp ? gtp + lo : nullptr, stream);
      }
    });
  });
  return {gs, gt};
}

std::tuple<at::Tensor, at::Tensor> forward_backward(const at::Tensor& s, const c10::optional<at::Tensor>& teacher,
                                                    int64_t kind, int64_t reduction, double eps, double scale) {
  const at::Tensor* t = check_inputs(s, teacher, kind, reduction);
  if (kind == 2) t = nullptr;  // norm never reads the teacher
  const int64_t R = s.size(0), D = s.size(1), nc = chunks(D);
  const int mode = stats_mode(kind, t != nullptr);
  const double g = reduction == 0 ? 1.0 : scale;
  std::vector<double> part(3 * R * nc), rows(R);
  at::Tensor gs = at::empty_like(s), loss;
  const bool stream = stream_output(s.numel() * (int64_t)s.element_size());
  const int nthreads = at::in_parallel_region() ? 1 : at::get_num_threads();
  // Split rows over the threads only when whole rows would leave threads >15% idle. Splitting
  // rows larger than one core's L2 too was ~10% faster on an idle machine (fp32 16 x 150528:
  // 838 vs 935 us) but costs one barrier per row, which was 20x slower (61 vs 3 ms) with
  // the cores oversubscribed, as training with data-loader workers often is.
  const int64_t per_thread = (R + nthreads - 1) / nthreads;
  const bool split = nthreads > 1 && nc >= nthreads && per_thread * nthreads * 100 > R * 115;
  dispatch(s.scalar_type(), [&](auto tag) {
    using Tag = decltype(tag);
    const St<Tag>*sp = ptr<Tag>(&s), *tp = ptr<Tag>(t);
    St<Tag>* gp = reinterpret_cast<St<Tag>*>(gs.data_ptr());
    const auto& K = Kernels<Tag>::get();
    if (kind != 0) {
      // squared, norm: the gradient's coefficients do not depend on the sums (finish_row
      // gives the same constants for any), so each (row, chunk) gets its partials and its
      // gradient in one visit, the second read from L1, and no thread waits for another.
      const double zero[3] = {0.0, 0.0, 0.0};
      const RowOut c = finish_row(zero, 1, (int)kind, eps);
      at::parallel_for(0, R * nc, grain_for(std::min(D, kChunk)), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t r = i / nc, ch = i % nc, lo = r * D + ch * kChunk, n = std::min(kChunk, D - ch * kChunk);
          const St<Tag>* tc = tp ? tp + lo : nullptr;
          // one load per element (K.fused_const); streaming needs an aligned chunk (16-bit rows
          // of 784 elements: every other one is 32, not 64, bytes aligned, which is enough)
          if (K.fused_const && (!stream || reinterpret_cast<uintptr_t>(gp + lo) % kStreamAlign<Tag> == 0)) {
            K.fused_const(sp + lo, tc, n, g, gp + lo, stream, part.data() + 3 * i);
          } else {
            K.stats(sp + r * D, tp ? tp + r * D : nullptr, D, ch, ch + 1, mode, part.data() + 3 * r * nc);
            K.grad(sp + lo, tc, n, g, c.c0, c.c1, c.c2, gp + lo, nullptr, stream);
          }
        }
      });
      at::parallel_for(0, R, 4096, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) rows[r] = finish_row(part.data() + 3 * r * nc, nc, (int)kind, eps).loss;
      });
    } else if (!split) {  // whole rows per thread: stats, then the gradient while the row is cached
      at::parallel_for(0, R, grain_for(D), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          double* pr = part.data() + 3 * r * nc;
          K.stats(sp + r * D, tp ? tp + r * D : nullptr, D, 0, nc, mode, pr);
          const RowOut o = finish_row(pr, nc, (int)kind, eps);
          rows[r] = o.loss;
          K.grad(sp + r * D, tp ? tp + r * D : nullptr, D, g, o.c0, o.c1, o.c2, gp + r * D, nullptr, stream);
        }
      });
    } else {
      // Few rows: each thread owns a fixed run of chunks of every row, forms their partials,
      // waits for the others (one barrier per row; partials are per row, so no second
      // barrier), folds all partials in chunk order (the same in every thread) and writes
      // the gradient of its own run, which it has just read.
#pragma omp parallel num_threads(nthreads)
      {
        const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
        const int64_t cb = nc * tid / nt, ce = nc * (tid + 1) / nt;
        const int64_t lo = cb * kChunk, hi = std::min(D, ce * kChunk);
        for (int64_t r = 0; r < R; ++r) {
          double* pr = part.data() + 3 * r * nc;
          const St<Tag>*sr = sp + r * D, *tr = tp ? tp + r * D : nullptr;
          if (ce > cb) K.stats(sr, tr, D, cb, ce, mode, pr);
#pragma omp barrier
          const RowOut o = finish_row(pr, nc, (int)kind, eps);
          if (tid == 0) rows[r] = o.loss;
          if (hi > lo)
            K.grad(sr + lo, tr ? tr + lo : nullptr, hi - lo, g, o.c0, o.c1, o.c2, gp + r * D + lo, nullptr, stream);
        }
      }
    }
    loss = make_loss<Tag>(rows, reduction, scale, s);
  });
  return {loss, gs};
}

}  // namespace
}  // namespace jacfast_cpu

TORCH_LIBRARY(jacfast_cpu, m) {
  m.def("forward(Tensor student, Tensor? teacher, int kind, int reduction, float eps, float scale) "
        "-> (Tensor, Tensor)");
  m.def("backward(Tensor grad_loss, Tensor student, Tensor? teacher, Tensor coef, int reduction, float scale, "
        "bool need_student, bool need_teacher) -> (Tensor, Tensor)");
  m.def("forward_backward(Tensor student, Tensor? teacher, int kind, int reduction, float eps, float scale) "
        "-> (Tensor, Tensor)");
  m.def("_round_to_grid(Tensor x, bool bf16) -> Tensor");  // test hook
}

TORCH_LIBRARY_IMPL(jacfast_cpu, CPU, m) {
  m.impl("forward", &jacfast_cpu::forward);
  m.impl("backward", &jacfast_cpu::backward);
  m.impl("forward_backward", &jacfast_cpu::forward_backward);
  m.impl("_round_to_grid", &jacfast_cpu::round_to_grid_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { (void)m; }  // ops register via TORCH_LIBRARY
