// CPU kernels of the Jacobian-matching loss head (contract: csrc/README.md), module jacfast._C.
// * Determinism: rows are cut into fixed kChunk-element chunks. A chunk's float64 partials
//   (ss, tt, st or dd) depend only on its data: 16 fixed lanes accumulate (a zero-padded
//   last block keeps that true for the tail) and are folded by a fixed tree; chunks are
//   summed in chunk order, rows by a fixed pairwise tree. Nothing depends on thread count.
// * Speed: hot loops use GCC generic vectors (W doubles per native vector), so one source
//   lowers to AVX-512 (W=8), AVX2 (W=4) or SSE2 (W=2); each is compiled as a target clone
//   and picked once at runtime. The 16 lanes are the same in every clone, so AVX-512 and
//   AVX2 give identical bits (the SSE2 clone has no FMA and may differ in the last bit).
// * fp16/bf16: loads are exact; outputs are rounded once, from float64, to the 16-bit grid.
// * forward_backward: a thread forms a row's stats and writes its gradient right away, so
//   the second read hits L1/L2 (for rows that fit there). Too few rows to keep all threads
//   busy are split over the threads, which meet at one barrier per row.
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

#pragma GCC diagnostic ignored "-Wpsabi"

namespace jacfast_cpu {
namespace {

constexpr int64_t kChunk = 4096;   // elements per deterministic partial (multiple of 16)
constexpr int64_t kGrain = 32768;  // elements per parallel task, at least
constexpr int kLanes = 16;         // float64 accumulator lanes per statistic, in every clone

// ==== kernels (plain C++ on raw pointers)
template <int W> struct V {  // native vectors of W doubles: W = 8 (zmm), 4 (ymm), 2 (xmm)
  typedef double d __attribute__((vector_size(8 * W)));
  typedef uint64_t ul __attribute__((vector_size(8 * W)));
  typedef float f __attribute__((vector_size(4 * W)));
  typedef uint32_t u __attribute__((vector_size(4 * W)));
  typedef uint16_t h __attribute__((vector_size(2 * W)));
};
#define JF_INLINE static inline __attribute__((always_inline))

// Element tags: float, double, HalfTag, BF16Tag, and HalfGrid = float storage holding
// values already on the half grid (the F16C path below).
struct HalfTag {}; struct BF16Tag {}; struct HalfGrid {};
template <class Tag> struct Storage { using type = Tag; };
template <> struct Storage<HalfTag> { using type = uint16_t; };
template <> struct Storage<BF16Tag> { using type = uint16_t; };
template <> struct Storage<HalfGrid> { using type = float; };
template <class Tag> using St = typename Storage<Tag>::type;
template <class A, class B> constexpr bool same = std::is_same_v<A, B>;

// float -> double lane by lane: GCC 12 lowers __builtin_convertvector(v8sf -> v8df) to two
// halves plus an insert, while this loop becomes one vcvtps2pd.
template <int W> JF_INLINE typename V<W>::d widen(const typename V<W>::f& f) {
  typename V<W>::d r = {};
  for (int j = 0; j < W; ++j) r[j] = f[j];
  return r;
}

// ---- loads: W elements -> W doubles (exact) ----
template <class Tag, int W> JF_INLINE typename V<W>::d load(const St<Tag>* p) {
  using v = V<W>;
  if constexpr (same<Tag, double>) {
    typename v::d d; std::memcpy(&d, p, sizeof d); return d;
  } else if constexpr (same<Tag, float> || same<Tag, HalfGrid>) {
    typename v::f f; std::memcpy(&f, p, sizeof f); return widen<W>(f);
  } else {
    typename v::u w = {};
    for (int j = 0; j < W; ++j) w[j] = (uint32_t)p[j] << 16;  // one vpmovzxwd + shift
    if constexpr (same<Tag, BF16Tag>) return widen<W>((typename v::f)w);
    // IEEE half -> float: the fp16 library's exact branch-free formula
    typename v::u sign = w & 0x80000000u, two_w = w + w;
    typename v::f normal = (typename v::f)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    typename v::f denorm = (typename v::f)((two_w >> 17) | (126u << 23)) - 0.5f;
    typename v::u m = (typename v::u)(two_w < (1u << 27));
    return widen<W>((typename v::f)(sign | ((typename v::u)denorm & m) | ((typename v::u)normal & ~m)));
  }
}

// ---- stores: W doubles -> W elements, rounded once ----
// Round d to the bf16 / half grid in float64 (to nearest even) and return it as float,
// exactly: the whole conversion rounds once. Normal range: round the significand to p bits
// with integer arithmetic. Below the smallest normal the grid is fixed (2^-133 bf16, 2^-24
// half) and (d + 1.5*2^(52+q)) - 1.5*2^(52+q) rounds to it. NaN passes through; overflow
// rounds up to 2^128 / 65536, which encodes as inf.
template <bool BF, int W> JF_INLINE typename V<W>::f round_to_grid(const typename V<W>::d& d) {
  using v = V<W>;
  constexpr int drop = BF ? 45 : 42;  // 52 - (p - 1), p = 8 (bf16) or 11 (half)
  constexpr double tiny = BF ? 0x1.0p-126 : 0x1.0p-14, magic = BF ? 0x1.8p-81 : 0x1.8p+28;
  const uint64_t sign = 0x8000000000000000ull;
  typename v::ul u = (typename v::ul)d;
  u = (u + ((1ull << (drop - 1)) - 1) + ((u >> drop) & 1)) & ~((1ull << drop) - 1);
  typename v::d sub = (d + magic) - magic;  // loses the sign of a zero: restored below
  typename v::ul is_sub = (typename v::ul)(((typename v::ul)d & ~sign) < (typename v::ul)(typename v::d{} + tiny));
  typename v::ul is_nan = (typename v::ul)(d != d);
  u = (u & ~(is_sub | is_nan)) | (((typename v::ul)sub | ((typename v::ul)d & sign)) & is_sub) |
      ((typename v::ul)d & is_nan);
  return __builtin_convertvector((typename v::d)u, typename v::f);  // exact
}

// put: one vector to memory. NT: a non-temporal (streaming) store, p aligned to the vector's
// size, in the AVX2 / AVX-512 clones (W >= 4) for 16- to 64-byte vectors (VEX/EVEX vmovntpd;
// GCC has no generic builtin for it and intrinsics cannot be inlined into these
// target-neutral templates); anything else is stored normally.
template <bool NT, int W, class Vec, class S> JF_INLINE void put(S* p, const Vec& x) {
  if constexpr (NT && W >= 4 && (sizeof(Vec) == 16 || sizeof(Vec) == 32 || sizeof(Vec) == 64))
    asm volatile("vmovntpd %1, %0" : "=m"(*reinterpret_cast<Vec*>(p)) : "v"(x));
  else
    std::memcpy(p, &x, sizeof x);
}

template <class Tag, int W, bool NT = false> JF_INLINE void store(St<Tag>* p, const typename V<W>::d& d) {
  using v = V<W>;
  if constexpr (same<Tag, double>) {
    put<NT, W>(p, d);
  } else if constexpr (same<Tag, float>) {
    put<NT, W>(p, __builtin_convertvector(d, typename v::f));
  } else if constexpr (same<Tag, HalfGrid>) {
    typename v::f f = round_to_grid<false, W>(d); std::memcpy(p, &f, sizeof f);
  } else {
    typename v::u w = (typename v::u)round_to_grid<same<Tag, BF16Tag>, W>(d), r;
    if constexpr (same<Tag, BF16Tag>) {
      r = w >> 16;  // exact: the low 16 bits are zero (NaN keeps its quiet bit)
    } else {        // re-encode an on-grid float as half, exactly (SSE2 clone, loss output)
      typename v::u a = w & 0x7fffffffu;
      typename v::u sub = (typename v::u)((typename v::f)a * 0x1.0p24f + 0x1.0p23f) & 0x3ffu;
      typename v::u is_sub = (typename v::u)(a < 0x38800000u), big = (typename v::u)(a >= 0x47800000u);
      typename v::u nan = (typename v::u)(a > 0x7f800000u);
      r = (((a >> 13) - (112u << 10)) & ~is_sub) | (sub & is_sub);
      r = (r & ~(big | nan)) | (0x7c00u & big & ~nan) | (0x7e00u & nan) | ((w >> 16) & 0x8000u);
    }
    put<NT, W>(p, __builtin_convertvector(r, typename v::h));
  }
}

template <int W> JF_INLINE double fold(const typename V<W>::d* acc) {  // fixed tree over lanes
  double x[kLanes];
  std::memcpy(x, acc, sizeof x);
  for (int w = kLanes / 2; w >= 1; w /= 2)
#pragma GCC unroll 8
    for (int j = 0; j < w; ++j) x[j] += x[j + w];
  return x[0];
}

// Stats modes: 0 = (ss, tt, st), 1 = dd, 2 = ss only (norm, or any kind without teacher).
// Lane j of the 16 sums elements j, j+16, ... of the chunk, whatever W is.
template <class Tag, int W, int MODE>
JF_INLINE void chunk_stats(const St<Tag>* s, const St<Tag>* t, int64_t n, double* out) {
  using S = St<Tag>;
  using vd = typename V<W>::d;
  constexpr int K = kLanes / W;
  vd a[K] = {}, b[K] = {}, c[K] = {};
  auto block = [&](const S* ps, const S* pt) __attribute__((always_inline)) {
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      vd sv = load<Tag, W>(ps + k * W);
      if constexpr (MODE == 2) {
        a[k] += sv * sv;
      } else {
        vd tv = load<Tag, W>(pt + k * W), dv = sv - tv;
        if constexpr (MODE == 1) a[k] += dv * dv;
        else { a[k] += sv * sv; b[k] += tv * tv; c[k] += sv * tv; }
      }
    }
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) block(s + i, MODE == 2 ? s : t + i);
  if (i < n) {  // zero-padded last block: the same lanes as if n were a multiple of 16
    S bs[kLanes] = {}, bt[kLanes] = {};
    std::memcpy(bs, s + i, (n - i) * sizeof(S));
    if (MODE != 2) std::memcpy(bt, t + i, (n - i) * sizeof(S));
    block(bs, bt);
  }
  out[0] = fold<W>(a);
  out[1] = MODE == 0 ? fold<W>(b) : 0.0;
  out[2] = MODE == 0 ? fold<W>(c) : 0.0;
}

// With F16C (the AVX2 / AVX-512 clones) half data is converted into float buffers by
// vcvtph2ps / vcvtps2ph, exactly, and the float kernels run on them: the same bits as the
// branch-free path of the SSE2 clone, at a fraction of the cost.
#define JF_F16C __attribute__((target("avx,f16c"), noinline))
JF_F16C void half_to_float(const uint16_t* h, float* f, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  for (; i < n; ++i) f[i] = _cvtsh_ss(h[i]);
}
// f is on the half grid; nt: streaming stores, h 16-byte aligned.
JF_F16C void float_to_half(const float* f, uint16_t* h, int64_t n, bool nt) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i v = _mm256_cvtps_ph(_mm256_loadu_ps(f + i), 0);
    if (nt) _mm_stream_si128(reinterpret_cast<__m128i*>(h + i), v);
    else _mm_storeu_si128(reinterpret_cast<__m128i*>(h + i), v);
  }
  for (; i < n; ++i) h[i] = _cvtss_sh(f[i], 0);
}

// Partials of chunks [cb, ce) of one row of length D into part[3*c ...].
template <class Tag, int W>
JF_INLINE void stats_impl(const St<Tag>* s, const St<Tag>* t, int64_t D, int64_t cb, int64_t ce, int mode,
                          double* part) {
  for (int64_t c = cb; c < ce; ++c) {
    const int64_t off = c * kChunk, n = std::min(kChunk, D - off);
    if constexpr (same<Tag, HalfTag> && W >= 4) {
      alignas(64) float bs[kChunk], bt[kChunk];
      half_to_float(s + off, bs, n);
      if (mode != 2) half_to_float(t + off, bt, n);
      stats_impl<float, W>(bs, bt, n, 0, 1, mode, part + 3 * c);
    } else if (mode == 0) {
      chunk_stats<Tag, W, 0>(s + off, t + off, n, part + 3 * c);
    } else if (mode == 1) {
      chunk_stats<Tag, W, 1>(s + off, t + off, n, part + 3 * c);
    } else {
      chunk_stats<Tag, W, 2>(s + off, nullptr, n, part + 3 * c);
    }
  }
}

// grad_s = g (c0 s - c1 t), grad_t = g (c2 t - c1 s) over n elements, float64, rounded once.
template <class Tag, int W, bool HAS_T, bool GS, bool GT, bool NT>
JF_INLINE void grad_loop(const St<Tag>* s, const St<Tag>* t, int64_t n, double g, double c0, double c1,
                         double c2, St<Tag>* gs, St<Tag>* gt) {
  using S = St<Tag>;
  using vd = typename V<W>::d;
  auto block = [&](const S* ps, const S* pt, S* os, S* ot, auto nt) __attribute__((always_inline)) {
#pragma GCC unroll 8
    for (int k = 0; k < kLanes / W; ++k) {
      vd sv = load<Tag, W>(ps + k * W), tv = {};
      if constexpr (HAS_T) tv = load<Tag, W>(pt + k * W);
      if constexpr (GS) store<Tag, W, decltype(nt)::value>(os + k * W, g * (c0 * sv - c1 * tv));
      if constexpr (GT) store<Tag, W, decltype(nt)::value>(ot + k * W, g * (c2 * tv - c1 * sv));
    }
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) block(s + i, t + i, gs + i, gt + i, std::bool_constant<NT>{});
  if (i < n) {  // the padded last block goes through local buffers, never streamed
    const int64_t m = n - i;
    S bs[kLanes] = {}, bt[kLanes] = {}, os[kLanes], ot[kLanes];
    std::memcpy(bs, s + i, m * sizeof(S));
    if (HAS_T) std::memcpy(bt, t + i, m * sizeof(S));
    block(bs, bt, os, ot, std::false_type{});
    if (GS) std::memcpy(gs + i, os, m * sizeof(S));
    if (GT) std::memcpy(gt + i, ot, m * sizeof(S));
  }
}

template <class Tag, int W, bool NT>
JF_INLINE void grad_run(const St<Tag>* s, const St<Tag>* t, int64_t n, double g, double c0, double c1,
                        double c2, St<Tag>* gs, St<Tag>* gt) {
  if constexpr (same<Tag, HalfTag> && W >= 4) {  // F16C: through float buffers that fit L1
    constexpr int64_t B = 1024;
    alignas(64) float bs[B], bt[B], os[B], ot[B];
    for (int64_t i = 0; i < n; i += B) {
      const int64_t m = std::min(B, n - i);
      half_to_float(s + i, bs, m);
      if (t) half_to_float(t + i, bt, m);
      grad_run<HalfGrid, W, false>(bs, t ? bt : nullptr, m, g, c0, c1, c2, gs ? os : nullptr, gt ? ot : nullptr);
      if (gs) float_to_half(os, gs + i, m, NT);
      if (gt) float_to_half(ot, gt + i, m, NT);
    }
  } else if (t) {  // unused output pointers alias a used one so no null pointer arithmetic happens
    if (gs && gt) grad_loop<Tag, W, true, true, true, NT>(s, t, n, g, c0, c1, c2, gs, gt);
    else if (gs) grad_loop<Tag, W, true, true, false, NT>(s, t, n, g, c0, c1, c2, gs, gs);
    else if (gt) grad_loop<Tag, W, true, false, true, NT>(s, t, n, g, c0, c1, c2, gt, gt);
  } else if (gs) {
    grad_loop<Tag, W, false, true, false, NT>(s, s, n, g, c0, c1, c2, gs, gs);
  }
}

// stream: write the gradient with non-temporal stores (large outputs that would only evict
// the inputs from the cache). The first elements, up to a 64-byte boundary of the outputs,
// are stored normally so that every streamed vector is aligned; the values are the same.
template <class Tag, int W>
JF_INLINE void grad_impl(const St<Tag>* s, const St<Tag>* t, int64_t n, double g, double c0, double c1,
                         double c2, St<Tag>* gs, St<Tag>* gt, bool stream) {
  using S = St<Tag>;
  const uintptr_t a = reinterpret_cast<uintptr_t>(gs ? gs : gt), b = reinterpret_cast<uintptr_t>(gt ? gt : gs);
  if (!stream || a % sizeof(S) != 0 || a % 64 != b % 64) return grad_run<Tag, W, false>(s, t, n, g, c0, c1, c2, gs, gt);
  const int64_t head = std::min<int64_t>(n, (64 - a % 64) % 64 / sizeof(S));
  grad_run<Tag, W, false>(s, t, head, g, c0, c1, c2, gs, gt);
  if (n > head)
    grad_run<Tag, W, true>(s + head, t ? t + head : nullptr, n - head, g, c0, c1, c2, gs ? gs + head : nullptr,
                           gt ? gt + head : nullptr);
  _mm_sfence();  // streaming stores are weakly ordered: complete them before the caller's barrier
}

// ---- ISA clones ----
#define JF_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")))
#define JF_AVX2 __attribute__((target("avx2,fma")))
#define JF_CLONES(NAME, IMPL, PARAMS, ARGS)                                       \
  template <class Tag> JF_AVX512 void NAME##_avx512 PARAMS { IMPL<Tag, 8> ARGS; } \
  template <class Tag> JF_AVX2 void NAME##_avx2 PARAMS { IMPL<Tag, 4> ARGS; }     \
  template <class Tag> void NAME##_base PARAMS { IMPL<Tag, 2> ARGS; }
JF_CLONES(stats, stats_impl,
          (const St<Tag>* s, const St<Tag>* t, int64_t D, int64_t cb, int64_t ce, int mode, double* part),
          (s, t, D, cb, ce, mode, part))
JF_CLONES(grad, grad_impl,
          (const St<Tag>* s, const St<Tag>* t, int64_t n, double g, double c0, double c1, double c2, St<Tag>* gs,
           St<Tag>* gt, bool stream),
          (s, t, n, g, c0, c1, c2, gs, gt, stream))

// Test hook: the stores' rounding of float64 values to the bf16 / half grid.
template <int W> JF_INLINE void round_impl(const double* x, float* y, int64_t n, bool bf) {
  for (int64_t i = 0; i + W <= n; i += W) {  // n: a multiple of 8
    typename V<W>::d d;
    std::memcpy(&d, x + i, sizeof d);
    const typename V<W>::f f = bf ? round_to_grid<true, W>(d) : round_to_grid<false, W>(d);
    std::memcpy(y + i, &f, sizeof f);
  }
}
JF_AVX512 void round_avx512(const double* x, float* y, int64_t n, bool bf) { round_impl<8>(x, y, n, bf); }
JF_AVX2 void round_avx2(const double* x, float* y, int64_t n, bool bf) { round_impl<4>(x, y, n, bf); }
void round_base(const double* x, float* y, int64_t n, bool bf) { round_impl<2>(x, y, n, bf); }
// ==== end of kernels

int pick_isa() {  // 2 = AVX-512, 1 = AVX2+FMA+F16C, 0 = SSE2; JACFAST_CPU_ISA=avx2|base lowers it
  __builtin_cpu_init();
  int isa = 0;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) isa = 1;
  if (isa == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    isa = 2;
  const std::string e = std::getenv("JACFAST_CPU_ISA") ? std::getenv("JACFAST_CPU_ISA") : "";
  return std::min(isa, e == "avx512" ? 2 : e == "avx2" ? 1 : e == "base" ? 0 : isa);
}

template <class Tag> struct Kernels {
  decltype(&stats_base<Tag>) stats;
  decltype(&grad_base<Tag>) grad;
  static const Kernels& get() {
    static const int isa = pick_isa();
    static const Kernels k = isa == 2   ? Kernels{stats_avx512<Tag>, grad_avx512<Tag>}
                             : isa == 1 ? Kernels{stats_avx2<Tag>, grad_avx2<Tag>}
                                        : Kernels{stats_base<Tag>, grad_base<Tag>};
    return k;
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
// last-level cache up, where with the two inputs it fills the cache and could only evict them
// (and a normal store first reads every line it writes). Measured on a 32 MiB-L3 EPYC:
// 16 x 150528 fp32 (9.6 MB out) 10-15% faster streamed; 256 x 3072 (3 MB) slower.
// JACFAST_CPU_STREAM_BYTES overrides the threshold (0: always; read per call, so tests cover
// both paths; the values written are the same either way).
bool stream_output(int64_t bytes) {
  static const int64_t quarter_llc = [] {
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return l3 > 0 ? (int64_t)l3 / 4 : (int64_t)8 << 20;
  }();
  const char* env = std::getenv("JACFAST_CPU_STREAM_BYTES");
  return bytes >= (env && *env ? std::atoll(env) : quarter_llc);
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
  (isa == 2 ? round_avx512 : isa == 1 ? round_avx2 : round_base)(in.data_ptr<double>(), out.data_ptr<float>(),
                                                                  padded, bf16);
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
    if (!split) {  // whole rows per thread: stats, then the gradient while the row is cached
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
