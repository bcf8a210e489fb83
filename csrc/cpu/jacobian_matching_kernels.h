// Vector kernels of the CPU loss head (plain C++ on raw pointers, GCC generic vectors and
// ISA clones), included once by jacobian_matching.cpp, which holds the ATen glue: argument
// checks, threading and the op registration. The design notes are at the top of that file.
#pragma once
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#pragma GCC diagnostic ignored "-Wpsabi"

namespace jacfast_cpu {
namespace {

constexpr int64_t kChunk = 4096;   // elements per deterministic partial (multiple of 16)
constexpr int kLanes = 16;         // float64 accumulator lanes per statistic, in every clone

template <int W> struct V {  // native vectors of W doubles: W = 8 (zmm), 4 (ymm), 2 (xmm)
  typedef double d __attribute__((vector_size(8 * W)));
  typedef uint64_t ul __attribute__((vector_size(8 * W)));
  typedef float f __attribute__((vector_size(4 * W)));
  typedef uint32_t u __attribute__((vector_size(4 * W)));
  typedef uint16_t h __attribute__((vector_size(2 * W)));
};
#define JF_INLINE static inline __attribute__((always_inline))

// Element tags: float, double, HalfTag, BF16Tag, BF16HwTag (bf16 whose AVX-512 stores use
// AVX512_BF16's vcvtneps2bf16: picked at run time where the CPU has it), and HalfGrid = float
// storage holding values already on the half grid (the F16C path of the AVX2 clone below).
struct HalfTag {}; struct BF16Tag {}; struct BF16HwTag {}; struct HalfGrid {};
template <class Tag> struct Storage { using type = Tag; };
template <> struct Storage<HalfTag> { using type = uint16_t; };
template <> struct Storage<BF16Tag> { using type = uint16_t; };
template <> struct Storage<BF16HwTag> { using type = uint16_t; };
template <> struct Storage<HalfGrid> { using type = float; };
template <class Tag> using St = typename Storage<Tag>::type;
template <class A, class B> constexpr bool same = std::is_same_v<A, B>;
template <class Tag> constexpr bool is_bf16 = same<Tag, BF16Tag> || same<Tag, BF16HwTag>;

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
  } else if constexpr (same<Tag, HalfTag> && W == 8) {  // AVX-512 clone: vcvtph2ps, exact
    typename v::h h; std::memcpy(&h, p, sizeof h);
    typename v::f f; asm("vcvtph2ps %1, %0" : "=v"(f) : "v"(h));
    return widen<W>(f);
  } else {
    typename v::u w = {};
    for (int j = 0; j < W; ++j) w[j] = (uint32_t)p[j] << 16;  // one vpmovzxwd + shift
    if constexpr (is_bf16<Tag>) return widen<W>((typename v::f)w);
    // IEEE half -> float: the fp16 library's exact branch-free formula
    typename v::u sign = w & 0x80000000u, two_w = w + w;
    typename v::f normal = (typename v::f)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    typename v::f denorm = (typename v::f)((two_w >> 17) | (126u << 23)) - 0.5f;
    typename v::u m = (typename v::u)(two_w < (1u << 27));
    return widen<W>((typename v::f)(sign | ((typename v::u)denorm & m) | ((typename v::u)normal & ~m)));
  }
}

// Whether every lane of a comparison mask (all ones or zero per lane) is set: its sign bits
// by (v)movmskpd, or vpmovq2m for zmm (inline asm: these templates are target-neutral).
template <int W> JF_INLINE bool all_lanes(const typename V<W>::ul& m) {
  unsigned bits;
  if constexpr (W == 8) asm("vpmovq2m %1, %%k7\n\tkmovb %%k7, %0" : "=r"(bits) : "v"(m) : "k7");
  else if constexpr (W == 4) asm("vmovmskpd %1, %0" : "=r"(bits) : "x"(m));
  else asm("movmskpd %1, %0" : "=r"(bits) : "x"(m));
  return bits == (1u << W) - 1;
}

// ---- stores: W doubles -> W elements, rounded once ----
// Round d to the bf16 / half grid in float64 (to nearest even) and return it as float,
// exactly: the whole conversion rounds once. Normal range: round the significand to p bits
// with integer arithmetic. Below the smallest normal the grid is fixed (2^-133 bf16, 2^-24
// half) and (d + 1.5*2^(52+q)) - 1.5*2^(52+q) rounds to it. NaN passes through; overflow
// rounds up to 2^128 / 65536, which encodes as inf. When every lane is normal on the
// target grid, zero or infinite (all but rare vectors) the integer rounding alone is exact
// and the rest is skipped: one test per vector instead of ~8 blend operations.
template <bool BF, int W> JF_INLINE typename V<W>::f round_to_grid(const typename V<W>::d& d) {
  using v = V<W>;
  constexpr int drop = BF ? 45 : 42;  // 52 - (p - 1), p = 8 (bf16) or 11 (half)
  constexpr double tiny = BF ? 0x1.0p-126 : 0x1.0p-14, magic = BF ? 0x1.8p-81 : 0x1.8p+28;
  const uint64_t sign = 0x8000000000000000ull;
  typename v::ul u = (typename v::ul)d;
  u = (u + ((1ull << (drop - 1)) - 1) + ((u >> drop) & 1)) & ~((1ull << drop) - 1);
  const typename v::d a = (typename v::d)((typename v::ul)d & ~sign);
  if (__builtin_expect(all_lanes<W>((typename v::ul)(a >= tiny) | (typename v::ul)(a == 0.0)), 1))  // NaN: false
    return __builtin_convertvector((typename v::d)u, typename v::f);
  typename v::d sub = (d + magic) - magic;  // loses the sign of a zero: restored below
  typename v::ul is_sub = (typename v::ul)(((typename v::ul)d & ~sign) < (typename v::ul)(typename v::d{} + tiny));
  typename v::ul is_nan = (typename v::ul)(d != d);
  u = (u & ~(is_sub | is_nan)) | (((typename v::ul)sub | ((typename v::ul)d & sign)) & is_sub) |
      ((typename v::ul)d & is_nan);
  return __builtin_convertvector((typename v::d)u, typename v::f);  // exact
}

// AVX-512 clone: the same single rounding through a float rounded to odd, in ~3x fewer
// instructions. Truncate to float (embedded rounding, vcvtpd2ps {rz-sae}) and set its last
// bit when that dropped a nonzero bit: rounding this float to nearest even on a grid at least
// 2 bits coarser (bf16: 8 significant bits, half: 11, float: 24) rounds the double once
// (round-to-odd, Boldo & Melquiond 2008). Where the float is normal, "dropped a nonzero bit"
// is "the double's low 29 significand bits are not all zero" (one integer test, no second
// conversion); where it is subnormal that test is wrong, and the callers redo such vectors
// exactly (bf16; for half they round to zero anyway). Beyond FLT_MAX truncation gives FLT_MAX,
// odd, which rounds on to inf; NaN stays NaN.
JF_INLINE V<8>::u round_to_odd_float(const V<8>::d& d) {
  V<8>::u f;
  asm("vcvtpd2ps %{rz-sae%}, %[d], %[f]\n\t"
      "vptestmq %[low], %[d], %%k7\n\t"
      "vpord %[one], %[f], %[f]%{%%k7%}"
      : [f] "=&v"(f)
      : [d] "v"(d), [low] "v"(V<8>::ul{} + 0x1fffffffull), [one] "v"(V<8>::u{} + 1u)
      : "k7");
  return f;
}
JF_INLINE bool any_subnormal(const V<8>::u& f) {
  unsigned char m;
  asm("vfpclassps $0x20, %1, %0" : "=Yk"(m) : "v"(f));
  return __builtin_expect(m != 0, 0);
}
// bf16 of a float rounded to odd: to nearest even on the top 16 bits, by integer arithmetic;
// a NaN (which could carry into the sign) keeps its top half.
JF_INLINE V<8>::h bf16_of_odd_float(const V<8>::u& u) {
  V<8>::u hi, r;
  asm("vpsrld $16, %[u], %[hi]\n\t"
      "vpandd %[one], %[hi], %[r]\n\t"
      "vpaddd %[u], %[r], %[r]\n\t"
      "vpaddd %[half], %[r], %[r]\n\t"
      "vpsrld $16, %[r], %[r]\n\t"
      "vfpclassps $0x81, %[u], %%k7\n\t"  // quiet or signalling NaN
      "vmovdqa32 %[hi], %[r]%{%%k7%}"
      : [hi] "=&v"(hi), [r] "=&v"(r)
      : [u] "v"(u), [one] "v"(V<8>::u{} + 1u), [half] "v"(V<8>::u{} + 0x7fffu)
      : "k7");
  return __builtin_convertvector(r, V<8>::h);
}
// The 16-bit encodings of 8 doubles, rounded once (AVX-512 clone). A vector with a
// subnormal float (|d| < 2^-126, bf16 subnormals) takes the exact float64 path.
template <class Tag> JF_INLINE V<8>::h encode16(const V<8>::d& d) {
  const V<8>::u u = round_to_odd_float(d);
  V<8>::h r;
  if constexpr (is_bf16<Tag>) {
    if (any_subnormal(u))
      return __builtin_convertvector((V<8>::u)round_to_grid<true, 8>(d) >> 16, V<8>::h);
    if constexpr (same<Tag, BF16HwTag>) asm("vcvtneps2bf16 %1, %0" : "=v"(r) : "v"(u));
    else r = bf16_of_odd_float(u);
  } else {  // vcvtps2ph, to nearest even (imm 0), subnormals and overflow by the hardware
    asm("vcvtps2ph $0, %1, %0" : "=v"(r) : "v"(u));
  }
  return r;
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
  } else if constexpr ((is_bf16<Tag> || same<Tag, HalfTag>) && W == 8) {
    put<NT, W>(p, encode16<Tag>(d));
  } else if constexpr (same<Tag, HalfGrid>) {
    typename v::f f = round_to_grid<false, W>(d); std::memcpy(p, &f, sizeof f);
  } else {
    typename v::u w = (typename v::u)round_to_grid<is_bf16<Tag>, W>(d), r;
    if constexpr (is_bf16<Tag>) {
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
    if constexpr (same<Tag, HalfTag> && W == 4) {
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
  if constexpr (same<Tag, HalfTag> && W == 4) {  // F16C: through float buffers that fit L1
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

// forward_backward of the squared (MODE 1) and norm (MODE 2) kinds over one chunk of n <=
// kChunk elements, each element loaded once: chunk_stats' partial (dd or ss, same lanes) and
// grad_loop's gradient with coefficients (2, 2), g (2s - 2t) (or g 2s), formed as g (d + d)
// with d = s - t (or s): the same bits, since scaling by 2 commutes with rounding. Not for
// float64 inputs, where 2s can overflow while d + d does not. NT: gs aligned to kStreamAlign.
template <class Tag, int W, int MODE, bool NT>
JF_INLINE void const_chunk(const St<Tag>* s, const St<Tag>* t, int64_t n, double g, St<Tag>* gs, double* out) {
  using S = St<Tag>;
  using vd = typename V<W>::d;
  constexpr int K = kLanes / W;
  vd a[K] = {};
  auto block = [&](const S* ps, const S* pt, S* os, auto nt) __attribute__((always_inline)) {
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      vd dv = load<Tag, W>(ps + k * W);
      if constexpr (MODE == 1) dv = dv - load<Tag, W>(pt + k * W);
      a[k] += dv * dv;
      store<Tag, W, decltype(nt)::value>(os + k * W, g * (dv + dv));
    }
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) block(s + i, t + i, gs + i, std::bool_constant<NT>{});
  if (i < n) {  // zero-padded last block, as in chunk_stats; never streamed
    S bs[kLanes] = {}, bt[kLanes] = {}, os[kLanes];
    std::memcpy(bs, s + i, (n - i) * sizeof(S));
    if (MODE == 1) std::memcpy(bt, t + i, (n - i) * sizeof(S));
    block(bs, bt, os, std::false_type{});
    std::memcpy(gs + i, os, (n - i) * sizeof(S));
  }
  out[0] = fold<W>(a);
  out[1] = out[2] = 0.0;
}

// Alignment of a chunk's gs that makes every vector store of const_chunk aligned to its own
// size (W elements, at most 64 bytes), as a streaming store needs: blocks are kLanes elements.
template <class Tag> constexpr uintptr_t kStreamAlign = std::min<uintptr_t>(64, kLanes * sizeof(St<Tag>));

// t: the teacher chunk (squared) or null (norm, or no teacher); stream: streaming stores,
// for a gs aligned to kStreamAlign<Tag> only (the caller's choice).
template <class Tag, int W>
JF_INLINE void const_impl(const St<Tag>* s, const St<Tag>* t, int64_t n, double g, St<Tag>* gs, bool stream,
                          double* part) {
  static_assert(!same<Tag, double>, "float64: 2s can overflow where d + d does not");
  if (stream) {
    t ? const_chunk<Tag, W, 1, true>(s, t, n, g, gs, part) : const_chunk<Tag, W, 2, true>(s, s, n, g, gs, part);
    _mm_sfence();
  } else {
    t ? const_chunk<Tag, W, 1, false>(s, t, n, g, gs, part) : const_chunk<Tag, W, 2, false>(s, s, n, g, gs, part);
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
JF_CLONES(fused_const, const_impl,
          (const St<Tag>* s, const St<Tag>* t, int64_t n, double g, St<Tag>* gs, bool stream, double* part),
          (s, t, n, g, gs, stream, part))

// Test hook: the stores' rounding of float64 values to the bf16 / half grid, as the kernels
// store them (16-bit encodings, decoded exactly; half below AVX-512: the float grid values
// that F16C encodes). BF: the bf16 tag of the clone.
template <int W, class BF> JF_INLINE void round_impl(const double* x, float* y, int64_t n, bool bf) {
  for (int64_t i = 0; i + W <= n; i += W) {  // n: a multiple of 8
    typename V<W>::d d;
    std::memcpy(&d, x + i, sizeof d);
    uint16_t h[W];
    typename V<W>::f f;
    if (bf) {
      store<BF, W>(h, d);
      f = __builtin_convertvector(load<BF, W>(h), typename V<W>::f);
    } else if constexpr (W == 8) {
      store<HalfTag, W>(h, d);
      f = __builtin_convertvector(load<HalfTag, W>(h), typename V<W>::f);
    } else {
      store<HalfGrid, W>(reinterpret_cast<float*>(&f), d);
    }
    std::memcpy(y + i, &f, sizeof f);
  }
}
JF_AVX512 void round_avx512bf16(const double* x, float* y, int64_t n, bool bf) { round_impl<8, BF16HwTag>(x, y, n, bf); }
JF_AVX512 void round_avx512(const double* x, float* y, int64_t n, bool bf) { round_impl<8, BF16Tag>(x, y, n, bf); }
JF_AVX2 void round_avx2(const double* x, float* y, int64_t n, bool bf) { round_impl<4, BF16Tag>(x, y, n, bf); }
void round_base(const double* x, float* y, int64_t n, bool bf) { round_impl<2, BF16Tag>(x, y, n, bf); }

}  // namespace
}  // namespace jacfast_cpu
