// F(4x4, 3x3) Winograd transforms (Lavin & Gray, CVPR 2016) for VGG's 3x3, stride-1, SAME
// convolutions: NHWC, float32, as XLA FFI custom calls on the CPU. The 36 matmuls between
// the transforms stay XLA's, except with kernels transformed beforehand for inference
// (wino_products). Compiled and registered by vgg_jax/winograd.py.
//
//   wino_input     x[N,H,W,C]          -> V[36,T,C]    V[i*6+j] = (B^T d B)[i][j]
//   wino_output    M[36,T,K], bias[K]  -> y[N,H,W,K]   y = A^T m A (+ bias) (ReLU): mode 0/1/2
//   wino_output_t  dy[N,H,W,K], y      -> dM[36,T,K]   A dy A^T, dy masked by y > 0 in mode 1
//   wino_input_t   dV[36,T,C]          -> dx[N,H,W,C]  the transpose of wino_input
//   wino_products  V[36,T,C], P[36,K/16,C,16] -> M[36,T,K]  M[e] = V[e] U[e], U packed
//   wino_kernel    g[3,3,C,K]          -> U[36,C,K]    G g G^T
//   wino_kernel_t  dU[36,C,K]          -> dg[3,3,C,K]  G^T dU G
//
// T = N * ceil(H/4) * ceil(W/4): tile (n, ty, tx) reads input rows 4ty-1 .. 4ty+4 (padding
// 1) and writes output rows 4ty .. 4ty+3; borders are zeroed or cropped in the kernels. Each
// tile is transformed in registers, vectorised over channels with GCC vector extensions
// (8 floats: AVX2 where -march=native has it), work split over XLA's intra-op threads.
//
// Every handler checks the shape of every buffer it reads or writes against the others and
// returns InvalidArgument otherwise (XLA's binding checks their ranks and dtypes), so that a
// wrong caller gets an error rather than memory past a buffer's end.
//
// Built with -DVGG_JAX_PERTURBABLE (tests/test_winograd.py only), VggJaxPerturb(site, row,
// col, delta) adds delta to one coefficient of one transform's matrix at run time, to show
// that the tests catch any one wrong coefficient; the normal build has none of it.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using B1 = ffi::Buffer<ffi::F32, 1>;
using B3 = ffi::Buffer<ffi::F32, 3>;
using B4 = ffi::Buffer<ffi::F32, 4>;

typedef float v8 __attribute__((vector_size(32)));

// Unaligned loads / stores (memcpy compiles to vmovups).
template <class V> static inline V ld(const float* p) { V v; __builtin_memcpy(&v, p, sizeof(V)); return v; }
template <class V> static inline void st(float* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }
template <class V> static inline V zero() { return V{} ; }
// max(o, 0) that keeps a NaN, as XLA's ReLU does.
template <class V> static inline V relu(V o) { return o < zero<V>() ? zero<V>() : o; }

static inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// ---------------------------------------------------------------- shape checks
static std::string shape_string(const int64_t* dims, size_t rank) {
  std::string s = "(";
  for (size_t i = 0; i < rank; ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + ")";
}

// Success if `buffer` of handler `call` has dimensions `want`, else an InvalidArgument error
// that names both shapes.
static ffi::Error expect_shape(const char* call, const char* buffer,
                               ffi::Span<const int64_t> got, std::initializer_list<int64_t> want) {
  if (got.size() == want.size() && std::equal(want.begin(), want.end(), got.begin()))
    return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(call) + ": " + buffer + " is " +
                                     shape_string(got.begin(), got.size()) + ", expected " +
                                     shape_string(want.begin(), want.size()));
}

#define RETURN_IF_ERROR(expr)          \
  do {                                 \
    ffi::Error error_ = (expr);        \
    if (error_.failure()) return error_; \
  } while (0)

// ---------------------------------------------------------------- test-only perturbation
// Sites: the transform matrices as each function applies them (B^T d, B v, G g, G^T u, A^T m,
// A g). perturb() adds delta * in[col] to out[row - first] where (site, row, col) is the
// perturbed coefficient; without VGG_JAX_PERTURBABLE it is nothing.
enum Site { kBt = 0, kB = 1, kG = 2, kGt = 3, kAt = 4, kA = 5 };
#ifdef VGG_JAX_PERTURBABLE
static struct { int site = -1, row = 0, col = 0; float delta = 0.f; } perturbation;

extern "C" void VggJaxPerturb(int site, int row, int col, float delta) {
  perturbation.site = site;
  perturbation.row = row;
  perturbation.col = col;
  perturbation.delta = delta;
}

template <class V>
static inline void perturb(Site site, const V* in, V* out, int first = 0, int rows = 6) {
  const int row = perturbation.row - first;
  if (perturbation.site == site && row >= 0 && row < rows)
    out[row] = out[row] + in[perturbation.col] * perturbation.delta;
}
#else
template <class V>
static inline void perturb(Site, const V*, V*, int = 0, int = 6) {}
#endif

// ---------------------------------------------------------------- transforms on 6 values
// B^T d : rows  [4 0 -5 0 1 0] [0 -4 -4 1 1 0] [0 4 -4 -1 1 0] [0 -2 -1 2 1 0] [0 2 -1 -2 1 0]
//               [0 4 0 -5 0 1]
template <class V>
static inline void bt6(const V d[6], V r[6]) {
  V a = d[4] - d[2] * 4.f, b = d[3] - d[1] * 4.f;
  V c = d[4] - d[2], e = (d[3] - d[1]) * 2.f;
  r[0] = d[0] * 4.f - d[2] * 5.f + d[4];
  r[1] = a + b;
  r[2] = a - b;
  r[3] = c + e;
  r[4] = c - e;
  r[5] = d[1] * 4.f - d[3] * 5.f + d[5];
  perturb(kBt, d, r);
}
// A^T m : rows [1 1 1 1 1 0] [0 1 -1 2 -2 0] [0 1 1 4 4 0] [0 1 -1 8 -8 1]
template <class V>
static inline void at6(const V m[6], V o[4]) {
  V s = m[1] + m[2], d = m[1] - m[2], s2 = m[3] + m[4], d2 = m[3] - m[4];
  o[0] = m[0] + s + s2;
  o[1] = d + d2 * 2.f;
  o[2] = s + s2 * 4.f;
  o[3] = d + d2 * 8.f + m[5];
  perturb(kAt, m, o, 0, 4);
}
// A g (6 from 4), transpose of at6
template <class V>
static inline void a4(const V g[4], V r[6]) {
  V e = g[0] + g[2], o = g[1] + g[3];
  V e4 = g[0] + g[2] * 4.f, o4 = g[1] * 2.f + g[3] * 8.f;
  r[0] = g[0];
  r[1] = e + o;
  r[2] = e - o;
  r[3] = e4 + o4;
  r[4] = e4 - o4;
  r[5] = g[3];
  perturb(kA, g, r);
}
// B v (transpose of bt6): only outputs 1..4 are needed by the gather (0 = 4 v0, 5 = v5).
template <class V>
static inline void b6mid(const V v[6], V r[4]) {
  // B rows 1..4 = columns 1..4 of B^T:
  // k1: -4v1 + 4v2 - 2v3 + 2v4 + 4v5
  // k2: -5v0 - 4v1 - 4v2 - v3 - v4
  // k3:  v1 - v2 + 2v3 - 2v4 - 5v5
  // k4:  v0 + v1 + v2 + v3 + v4
  V d12 = v[2] - v[1], s12 = v[1] + v[2], d34 = v[4] - v[3], s34 = v[3] + v[4];
  r[0] = d12 * 4.f + d34 * 2.f + v[5] * 4.f;
  r[1] = -(v[0] * 5.f) - s12 * 4.f - s34;
  r[2] = -d12 - d34 * 2.f - v[5] * 5.f;
  r[3] = v[0] + s12 + s34;
  perturb(kB, v, r, 1, 4);
}
// Rows 0 and 5 of B v, from a neighbouring tile: 4 v0 and v5, their only coefficients.
template <class V>
static inline V b_first(V v0) {
  V r = v0 * 4.f;
  const V in[6] = {v0, zero<V>(), zero<V>(), zero<V>(), zero<V>(), zero<V>()};
  perturb(kB, in, &r, 0, 1);
  return r;
}
template <class V>
static inline V b_last(V v5) {
  V r = v5;
  const V in[6] = {zero<V>(), zero<V>(), zero<V>(), zero<V>(), zero<V>(), v5};
  perturb(kB, in, &r, 5, 1);
  return r;
}

// ---------------------------------------------------------------- thread splitting
struct ParState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0, chunk = 1;
  std::function<void(int64_t, int64_t)> fn;
  void work() {
    for (;;) {
      int64_t b = next.fetch_add(chunk, std::memory_order_relaxed);
      if (b >= n) return;
      int64_t e = std::min(n, b + chunk);
      fn(b, e);
      done.fetch_add(e - b, std::memory_order_release);
    }
  }
};

// Runs fn over [0, n) in chunks: the calling thread plus helpers from XLA's intra-op pool,
// items claimed dynamically, so a helper that never starts costs nothing (no deadlock).
static void parallel_for(ffi::ThreadPool& pool, int64_t n, int64_t chunk,
                         std::function<void(int64_t, int64_t)> fn) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t helpers = std::min<int64_t>(threads - 1, (n + chunk - 1) / chunk - 1);
  if (helpers <= 0) {
    fn(0, n);
    return;
  }
  auto s = std::make_shared<ParState>();
  s->n = n;
  s->chunk = chunk;
  s->fn = std::move(fn);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([s]() { s->work(); });
  s->work();
  while (s->done.load(std::memory_order_acquire) < n) {
    spin_pause();
  }
}

// ---------------------------------------------------------------- input transform
struct Geo {
  int64_t N, H, W, C, TH, TW, T;
};

template <class V, bool Border>
static inline void input_tile(const float* x, float* v, const Geo& g, int64_t n, int64_t ty,
                              int64_t tx, int64_t c) {
  const int64_t y0 = 4 * ty - 1, x0 = 4 * tx - 1;
  const int64_t t = (n * g.TH + ty) * g.TW + tx;
  V tmp[6][6];
  for (int j = 0; j < 6; ++j) {
    V d[6], r[6];
    const int64_t xx = x0 + j;
    for (int i = 0; i < 6; ++i) {
      const int64_t yy = y0 + i;
      if (Border && (yy < 0 || yy >= g.H || xx < 0 || xx >= g.W))
        d[i] = zero<V>();
      else
        d[i] = ld<V>(x + ((n * g.H + yy) * g.W + xx) * g.C + c);
    }
    bt6(d, r);
    for (int i = 0; i < 6; ++i) tmp[i][j] = r[i];
  }
  const int64_t pstride = g.T * g.C;
  float* out = v + t * g.C + c;
  for (int i = 0; i < 6; ++i) {
    V r[6];
    bt6(tmp[i], r);
    for (int j = 0; j < 6; ++j) {
      st<V>(out + (i * 6 + j) * pstride, r[j]);
    }
  }
}

static void input_rows(const float* x, float* v, const Geo& g, int64_t b, int64_t e) {
  for (int64_t row = b; row < e; ++row) {
    const int64_t n = row / g.TH, ty = row % g.TH;
    const bool brow = ty == 0 || 4 * ty + 4 >= g.H;
    for (int64_t tx = 0; tx < g.TW; ++tx) {
      const bool border = brow || tx == 0 || 4 * tx + 4 >= g.W;
      int64_t c = 0;
      if (border) {
        for (; c + 8 <= g.C; c += 8) input_tile<v8, true>(x, v, g, n, ty, tx, c);
        for (; c < g.C; ++c) input_tile<float, true>(x, v, g, n, ty, tx, c);
      } else {
        for (; c + 8 <= g.C; c += 8) input_tile<v8, false>(x, v, g, n, ty, tx, c);
        for (; c < g.C; ++c) input_tile<float, false>(x, v, g, n, ty, tx, c);
      }
    }
  }
}

static ffi::Error InputTransformImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 4> x,
                                     ffi::ResultBuffer<ffi::F32, 3> v) {
  auto d = x.dimensions();
  Geo g{d[0], d[1], d[2], d[3], (d[1] + 3) / 4, (d[2] + 3) / 4, 0};
  g.T = g.N * g.TH * g.TW;
  RETURN_IF_ERROR(expect_shape("wino_input", "V", v->dimensions(), {36, g.T, g.C}));
  const float* xp = x.typed_data();
  float* vp = v->typed_data();
  parallel_for(pool, g.N * g.TH, 1, [=](int64_t b, int64_t e) { input_rows(xp, vp, g, b, e); });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(WinoInput, InputTransformImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<B4>()
                                  .Ret<B3>());

// ---------------------------------------------------------------- output transform
// mode: 0 plain, 1 +bias, 2 +bias then ReLU
template <class V, bool Border>
static inline void output_tile(const float* m, const float* bias, float* y, const Geo& g,
                               int64_t n, int64_t ty, int64_t tx, int64_t k, int mode) {
  const int64_t t = (n * g.TH + ty) * g.TW + tx;
  const int64_t pstride = g.T * g.C;  // g.C = K here
  const float* in = m + t * g.C + k;
  V tmp[4][6];
  for (int j = 0; j < 6; ++j) {
    V col[6], r[4];
    for (int i = 0; i < 6; ++i) col[i] = ld<V>(in + (i * 6 + j) * pstride);
    at6(col, r);
    for (int q = 0; q < 4; ++q) tmp[q][j] = r[q];
  }
  V b = mode ? ld<V>(bias + k) : zero<V>();
  for (int q = 0; q < 4; ++q) {
    const int64_t yy = 4 * ty + q;
    if (Border && yy >= g.H) break;
    V r[4];
    at6(tmp[q], r);
    for (int s = 0; s < 4; ++s) {
      const int64_t xx = 4 * tx + s;
      if (Border && xx >= g.W) break;
      V o = r[s];
      if (mode) o = o + b;
      if (mode == 2) o = relu(o);
      st<V>(y + ((n * g.H + yy) * g.W + xx) * g.C + k, o);
    }
  }
}

static void output_rows(const float* m, const float* bias, float* y, const Geo& g, int64_t b,
                        int64_t e, int mode) {
  for (int64_t row = b; row < e; ++row) {
    const int64_t n = row / g.TH, ty = row % g.TH;
    const bool brow = 4 * ty + 4 > g.H;
    for (int64_t tx = 0; tx < g.TW; ++tx) {
      const bool border = brow || 4 * tx + 4 > g.W;
      int64_t k = 0;
      if (border) {
        for (; k + 8 <= g.C; k += 8) output_tile<v8, true>(m, bias, y, g, n, ty, tx, k, mode);
        for (; k < g.C; ++k) output_tile<float, true>(m, bias, y, g, n, ty, tx, k, mode);
      } else {
        for (; k + 8 <= g.C; k += 8) output_tile<v8, false>(m, bias, y, g, n, ty, tx, k, mode);
        for (; k < g.C; ++k) output_tile<float, false>(m, bias, y, g, n, ty, tx, k, mode);
      }
    }
  }
}

static ffi::Error OutputTransformImpl(ffi::ThreadPool pool, B3 m,
                                      B1 bias,
                                      ffi::ResultBuffer<ffi::F32, 4> y, int32_t mode) {
  auto d = y->dimensions();
  Geo g{d[0], d[1], d[2], d[3], (d[1] + 3) / 4, (d[2] + 3) / 4, 0};
  g.T = g.N * g.TH * g.TW;
  RETURN_IF_ERROR(expect_shape("wino_output", "M", m.dimensions(), {36, g.T, g.C}));
  RETURN_IF_ERROR(expect_shape("wino_output", "bias", bias.dimensions(), {g.C}));
  if (mode < 0 || mode > 2) return ffi::Error::InvalidArgument("wino_output: mode not 0, 1 or 2");
  const float* mp = m.typed_data();
  const float* bp = bias.typed_data();
  float* yp = y->typed_data();
  parallel_for(pool, g.N * g.TH, 1,
               [=](int64_t b, int64_t e) { output_rows(mp, bp, yp, g, b, e, mode); });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(WinoOutput, OutputTransformImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<B3>()
                                  .Arg<B1>()
                                  .Ret<B4>()
                                  .Attr<int32_t>("mode"));

// ---------------------------------------------------------------- output transform^T
// dy[N,H,W,K] -> dM[36,T,K], dM = A dy_tile A^T (dy zero beyond the border).
// With mask (mode 1): dy is multiplied by (y > 0) first (ReLU backward fused).
template <class V, bool Border, bool Mask>
static inline void output_t_tile(const float* dy, const float* yv, float* dm, const Geo& g,
                                 int64_t n, int64_t ty, int64_t tx, int64_t k) {
  const int64_t t = (n * g.TH + ty) * g.TW + tx;
  V tmp[6][4];  // tmp[i][s] = (A dy)[i][s]
  for (int s = 0; s < 4; ++s) {
    V col[4], r[6];
    const int64_t xx = 4 * tx + s;
    for (int q = 0; q < 4; ++q) {
      const int64_t yy = 4 * ty + q;
      if (Border && (yy >= g.H || xx >= g.W)) {
        col[q] = zero<V>();
      } else {
        const int64_t off = ((n * g.H + yy) * g.W + xx) * g.C + k;
        V gv = ld<V>(dy + off);
        if constexpr (Mask) gv = ld<V>(yv + off) > zero<V>() ? gv : zero<V>();
        col[q] = gv;
      }
    }
    a4(col, r);
    for (int i = 0; i < 6; ++i) tmp[i][s] = r[i];
  }
  const int64_t pstride = g.T * g.C;
  float* out = dm + t * g.C + k;
  for (int i = 0; i < 6; ++i) {
    V r[6];
    a4(tmp[i], r);
    for (int j = 0; j < 6; ++j) {
      st<V>(out + (i * 6 + j) * pstride, r[j]);
    }
  }
}

template <bool Mask>
static void output_t_rows(const float* dy, const float* yv, float* dm, const Geo& g, int64_t b,
                          int64_t e) {
  for (int64_t row = b; row < e; ++row) {
    const int64_t n = row / g.TH, ty = row % g.TH;
    const bool brow = 4 * ty + 4 > g.H;
    for (int64_t tx = 0; tx < g.TW; ++tx) {
      const bool border = brow || 4 * tx + 4 > g.W;
      int64_t k = 0;
      if (border) {
        for (; k + 8 <= g.C; k += 8) output_t_tile<v8, true, Mask>(dy, yv, dm, g, n, ty, tx, k);
        for (; k < g.C; ++k) output_t_tile<float, true, Mask>(dy, yv, dm, g, n, ty, tx, k);
      } else {
        for (; k + 8 <= g.C; k += 8) output_t_tile<v8, false, Mask>(dy, yv, dm, g, n, ty, tx, k);
        for (; k < g.C; ++k) output_t_tile<float, false, Mask>(dy, yv, dm, g, n, ty, tx, k);
      }
    }
  }
}

static ffi::Error OutputTransformTImpl(ffi::ThreadPool pool, B4 dy,
                                       B4 y,
                                       ffi::ResultBuffer<ffi::F32, 3> dm, int32_t mode) {
  auto d = dy.dimensions();
  Geo g{d[0], d[1], d[2], d[3], (d[1] + 3) / 4, (d[2] + 3) / 4, 0};
  g.T = g.N * g.TH * g.TW;
  RETURN_IF_ERROR(expect_shape("wino_output_t", "dM", dm->dimensions(), {36, g.T, g.C}));
  RETURN_IF_ERROR(expect_shape("wino_output_t", "y", y.dimensions(), {g.N, g.H, g.W, g.C}));
  if (mode < 0 || mode > 1) return ffi::Error::InvalidArgument("wino_output_t: mode not 0 or 1");
  const float* dyp = dy.typed_data();
  const float* yp = y.typed_data();
  float* dmp = dm->typed_data();
  if (mode) {
    parallel_for(pool, g.N * g.TH, 1,
                 [=](int64_t b, int64_t e) { output_t_rows<true>(dyp, yp, dmp, g, b, e); });
  } else {
    parallel_for(pool, g.N * g.TH, 1,
                 [=](int64_t b, int64_t e) { output_t_rows<false>(dyp, yp, dmp, g, b, e); });
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(WinoOutputT, OutputTransformTImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<B4>()
                                  .Arg<B4>()
                                  .Ret<B3>()
                                  .Attr<int32_t>("mode"));

// ---------------------------------------------------------------- input transform^T
// dV[36,T,C] -> dx[N,H,W,C].  Race-free gather: the 4x4 output block owned by tile
// (ty, tx) (rows 4ty..4ty+3, cols 4tx..4tx+3) receives rows 1..4 / cols 1..4 of its own
// tile's B dV B^T, row 5 of the tile above, row 0 of the tile below, col 5 of the tile to
// the left, col 0 of the tile to the right (and the corners).  Row 0 of B dV is 4 dV[0],
// row 5 is dV[5] (same for columns), so neighbours cost 6 + 2 extra loads per side.
template <class V>
struct DV {
  const float* base;
  int64_t pstride;
  inline V at(int i, int j) const { return ld<V>(base + (i * 6 + j) * pstride); }
};

template <class V>
static inline void input_t_block(const float* dv, float* dx, const Geo& g, int64_t n,
                                 int64_t ty, int64_t tx, int64_t c) {
  const int64_t pstride = g.T * g.C;
  auto tile = [&](int64_t yy, int64_t xx) {
    return DV<V>{dv + ((n * g.TH + yy) * g.TW + xx) * g.C + c, pstride};
  };
  const bool up = ty > 0, down = ty + 1 < g.TH, left = tx > 0, right = tx + 1 < g.TW;
  // Rg(tile column set j) for own tile: 4 rows (q) x 6 columns.
  // Row-stage for a tile at horizontal offset dx_ (-1, 0, +1), restricted to column j:
  //   R[q][j] = (B dV)[q+1][j] + [q==0] dVup[5][j] + [q==3] 4 dVdown[0][j]
  auto row_stage = [&](int64_t txx, int j, V out[4]) {
    DV<V> own = tile(ty, txx);
    V col[6];
    for (int i = 0; i < 6; ++i) col[i] = own.at(i, j);
    b6mid(col, out);
    if (up) out[0] = out[0] + b_last(tile(ty - 1, txx).at(5, j));
    if (down) out[3] = out[3] + b_first(tile(ty + 1, txx).at(0, j));
  };
  V R[4][6];
  for (int j = 0; j < 6; ++j) {
    V o[4];
    row_stage(tx, j, o);
    for (int q = 0; q < 4; ++q) R[q][j] = o[q];
  }
  V L[4], Rt[4];
  if (left) row_stage(tx - 1, 5, L);
  if (right) row_stage(tx + 1, 0, Rt);
  for (int q = 0; q < 4; ++q) {
    const int64_t yy = 4 * ty + q;
    if (yy >= g.H) break;
    V o[4];
    b6mid(R[q], o);
    if (left) o[0] = o[0] + b_last(L[q]);
    if (right) o[3] = o[3] + b_first(Rt[q]);
    for (int s = 0; s < 4; ++s) {
      const int64_t xx = 4 * tx + s;
      if (xx >= g.W) break;
      st<V>(dx + ((n * g.H + yy) * g.W + xx) * g.C + c, o[s]);
    }
  }
}

static void input_t_rows(const float* dv, float* dx, const Geo& g, int64_t b, int64_t e) {
  for (int64_t row = b; row < e; ++row) {
    const int64_t n = row / g.TH, ty = row % g.TH;
    for (int64_t tx = 0; tx < g.TW; ++tx) {
      int64_t c = 0;
      for (; c + 8 <= g.C; c += 8) input_t_block<v8>(dv, dx, g, n, ty, tx, c);
      for (; c < g.C; ++c) input_t_block<float>(dv, dx, g, n, ty, tx, c);
    }
  }
}

static ffi::Error InputTransformTImpl(ffi::ThreadPool pool, B3 dv,
                                      ffi::ResultBuffer<ffi::F32, 4> dx) {
  auto d = dx->dimensions();
  Geo g{d[0], d[1], d[2], d[3], (d[1] + 3) / 4, (d[2] + 3) / 4, 0};
  g.T = g.N * g.TH * g.TW;
  RETURN_IF_ERROR(expect_shape("wino_input_t", "dV", dv.dimensions(), {36, g.T, g.C}));
  const float* dvp = dv.typed_data();
  float* dxp = dx->typed_data();
  parallel_for(pool, g.N * g.TH, 1,
               [=](int64_t b, int64_t e) { input_t_rows(dvp, dxp, g, b, e); });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(WinoInputT, InputTransformTImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<B3>()
                                  .Ret<B4>());

// ---------------------------------------------------------------- products
// M[e] = V[e] U[e] for the 36 elements e: (T, C) x (C, K), with U packed in panels of 16
// columns, P[e][k / 16][c][k % 16] (zero beyond K), so that each panel is read in order. For
// fixed weights (inference), packed once; with few tiles (conv4 and conv5 at batch 1), XLA's
// matmul spends more time reading U, strided, than multiplying.
template <int R>
static inline void products_block(const float* v, const float* panel, float* m, int64_t C,
                                  int64_t K, int64_t cols) {
  v8 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = zero<v8>();
  for (int64_t c = 0; c < C; ++c) {
    const v8 b0 = ld<v8>(panel + 16 * c), b1 = ld<v8>(panel + 16 * c + 8);
    for (int r = 0; r < R; ++r) {
      const v8 a = zero<v8>() + v[r * C + c];
      acc[r][0] += a * b0;
      acc[r][1] += a * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    if (cols == 16) {
      st<v8>(m + r * K, acc[r][0]);
      st<v8>(m + r * K + 8, acc[r][1]);
    } else {
      float out[16];
      st<v8>(out, acc[r][0]);
      st<v8>(out + 8, acc[r][1]);
      std::memcpy(m + r * K, out, cols * sizeof(float));
    }
  }
}

static ffi::Error ProductsImpl(ffi::ThreadPool pool, B3 v, B4 packed,
                               ffi::ResultBuffer<ffi::F32, 3> m) {
  const auto vd = v.dimensions(), pd = packed.dimensions(), md = m->dimensions();
  const int64_t T = vd[1], C = vd[2], K = md[2], panels = (K + 15) / 16;
  RETURN_IF_ERROR(expect_shape("wino_products", "V", vd, {36, T, C}));
  RETURN_IF_ERROR(expect_shape("wino_products", "packed U", pd, {36, panels, C, 16}));
  RETURN_IF_ERROR(expect_shape("wino_products", "M", md, {36, T, K}));
  const float* vp = v.typed_data();
  const float* pp = packed.typed_data();
  float* mp = m->typed_data();
  // Items: (element, 48 rows, 16 panels): the rows' V stays in cache across the panels.
  const int64_t tb = 48, kb = 16, nt = (T + tb - 1) / tb, nk = (panels + kb - 1) / kb;
  parallel_for(pool, 36 * nt * nk, 1, [=](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t el = item / (nt * nk), t0 = (item / nk) % nt * tb, p0 = item % nk * kb;
      const int64_t rows = std::min(tb, T - t0);
      for (int64_t p = p0; p < std::min(panels, p0 + kb); ++p) {
        const float* ve = vp + (el * T + t0) * C;
        const float* panel = pp + (el * panels + p) * C * 16;
        float* me = mp + (el * T + t0) * K + 16 * p;
        const int64_t cols = std::min<int64_t>(16, K - 16 * p);
        int64_t r = 0;
        for (; r + 6 <= rows; r += 6) products_block<6>(ve + r * C, panel, me + r * K, C, K, cols);
        switch (rows - r) {
          case 5: products_block<5>(ve + r * C, panel, me + r * K, C, K, cols); break;
          case 4: products_block<4>(ve + r * C, panel, me + r * K, C, K, cols); break;
          case 3: products_block<3>(ve + r * C, panel, me + r * K, C, K, cols); break;
          case 2: products_block<2>(ve + r * C, panel, me + r * K, C, K, cols); break;
          case 1: products_block<1>(ve + r * C, panel, me + r * K, C, K, cols); break;
          default: break;
        }
      }
    }
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(WinoProducts, ProductsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<B3>()
                                  .Arg<B4>()
                                  .Ret<B3>());

// ---------------------------------------------------------------- kernel transform
// g[3,3,C,K] -> U[36,C,K], U[i*6+j] = (G g G^T)[i][j];  and its transpose dU -> dg = G^T dU G.
template <class V>
static inline void g6(const V g[3], V r[6]) {
  const float s6 = 1.f / 6, s12 = 1.f / 12, s24 = 1.f / 24;
  V sum = g[0] + g[2];
  r[0] = g[0] * 0.25f;
  r[1] = -(sum + g[1]) * s6;
  r[2] = -(sum - g[1]) * s6;
  V a = g[0] * s24 + g[2] * s6, b = g[1] * s12;
  r[3] = a + b;
  r[4] = a - b;
  r[5] = g[2];
  perturb(kG, g, r);
}
template <class V>
static inline void gt6(const V u[6], V r[3]) {
  const float s6 = 1.f / 6, s12 = 1.f / 12, s24 = 1.f / 24;
  V s12_ = u[1] + u[2], d12 = u[2] - u[1], s34 = u[3] + u[4], d34 = u[3] - u[4];
  r[0] = u[0] * 0.25f - s12_ * s6 + s34 * s24;
  r[1] = d12 * s6 + d34 * s12;
  r[2] = (s34 - s12_) * s6 + u[5];
  perturb(kGt, u, r, 0, 3);
}

template <class V>
static inline void kernel_elem(const float* g, float* u, int64_t ck, int64_t e) {
  V t[6][3];
  for (int b = 0; b < 3; ++b) {
    V col[3], r[6];
    for (int a = 0; a < 3; ++a) col[a] = ld<V>(g + (a * 3 + b) * ck + e);
    g6(col, r);
    for (int i = 0; i < 6; ++i) t[i][b] = r[i];
  }
  for (int i = 0; i < 6; ++i) {
    V r[6];
    g6(t[i], r);
    for (int j = 0; j < 6; ++j) st<V>(u + (i * 6 + j) * ck + e, r[j]);
  }
}
template <class V>
static inline void kernel_t_elem(const float* u, float* g, int64_t ck, int64_t e) {
  V t[3][6];  // t[a][j] = sum_i G[i][a] u[i][j]
  for (int j = 0; j < 6; ++j) {
    V col[6], r[3];
    for (int i = 0; i < 6; ++i) col[i] = ld<V>(u + (i * 6 + j) * ck + e);
    gt6(col, r);
    for (int a = 0; a < 3; ++a) t[a][j] = r[a];
  }
  for (int a = 0; a < 3; ++a) {
    V r[3];
    gt6(t[a], r);
    for (int b = 0; b < 3; ++b) st<V>(g + (a * 3 + b) * ck + e, r[b]);
  }
}

// Runs fn(V{}, i) over the C*K kernel positions i, 8 at a time (V = v8) and the rest one at
// a time (V = float), in blocks of 512 split over the pool.
template <class Fn>
static void for_each_kernel_element(ffi::ThreadPool& pool, int64_t ck, Fn fn) {
  const int64_t blk = 512;
  parallel_for(pool, (ck + blk - 1) / blk, 1, [=](int64_t b, int64_t e) {
    for (int64_t i = b * blk, end = std::min(ck, e * blk); i < end;) {
      if (i + 8 <= end) { fn(v8{}, i); i += 8; }
      else { fn(0.f, i); i += 1; }
    }
  });
}

// `after`, of any shape, is not read: it orders the transform after the layer's input exists,
// so that U is made just before its matmul instead of every layer's U at once at the start.
static ffi::Error KernelTransformImpl(ffi::ThreadPool pool, B4 g, ffi::AnyBuffer after,
                                      ffi::ResultBuffer<ffi::F32, 3> u) {
  auto d = g.dimensions();
  RETURN_IF_ERROR(expect_shape("wino_kernel", "g", d, {3, 3, d[2], d[3]}));
  RETURN_IF_ERROR(expect_shape("wino_kernel", "U", u->dimensions(), {36, d[2], d[3]}));
  const int64_t ck = d[2] * d[3];
  const float* gp = g.typed_data();
  float* up = u->typed_data();
  for_each_kernel_element(pool, ck, [=](auto vec, int64_t i) {
    kernel_elem<decltype(vec)>(gp, up, ck, i);
  });
  return ffi::Error::Success();
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(WinoKernel, KernelTransformImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<B4>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<B3>());

static ffi::Error KernelTransformTImpl(ffi::ThreadPool pool, B3 u, ffi::ResultBuffer<ffi::F32, 4> g) {
  auto d = g->dimensions();
  RETURN_IF_ERROR(expect_shape("wino_kernel_t", "dg", d, {3, 3, d[2], d[3]}));
  RETURN_IF_ERROR(expect_shape("wino_kernel_t", "dU", u.dimensions(), {36, d[2], d[3]}));
  const int64_t ck = d[2] * d[3];
  const float* up = u.typed_data();
  float* gp = g->typed_data();
  for_each_kernel_element(pool, ck, [=](auto vec, int64_t i) {
    kernel_t_elem<decltype(vec)>(up, gp, ck, i);
  });
  return ffi::Error::Success();
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(WinoKernelT, KernelTransformTImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<B3>().Ret<B4>());
