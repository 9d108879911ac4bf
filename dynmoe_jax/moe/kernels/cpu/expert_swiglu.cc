// One expert's SwiGLU at decode sizes on CPU, as an XLA FFI custom call.
//
//   y[m] = down @ (silu(gate @ x[m]) * (up @ x[m]))   for the rows m with take[m],
//   y[m] = 0                                          for the others.
//
// Weights are stored [out, in] (gate and up [F, D], down [D, F]), float32 or bfloat16 (all
// three the same), and every sum is float32. Only the rows that selected the expert are
// multiplied: at a few rows per step the products of a CPU are bound by their arithmetic as
// much as by reading the weight, so rows that did not select the expert are not computed. A
// weight row is read from memory once and then, from cache, for each further selected row.
// Output rows are split across XLA's intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline f32x16 load(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The sum of a vector's lanes, by halves (the halves are copied out, which compilers turn
// into lane extracts, so any GCC or Clang with vector extensions builds it).
inline float hsum(f32x16 v) {
  f32x8 lo8, hi8;
  std::memcpy(&lo8, &v, sizeof lo8);
  std::memcpy(&hi8, reinterpret_cast<const char*>(&v) + sizeof lo8, sizeof hi8);
  const f32x8 a = lo8 + hi8;
  f32x4 lo4, hi4;
  std::memcpy(&lo4, &a, sizeof lo4);
  std::memcpy(&hi4, reinterpret_cast<const char*>(&a) + sizeof lo4, sizeof hi4);
  const f32x4 b = lo4 + hi4;
  return (b[0] + b[2]) + (b[1] + b[3]);
}

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Per weight type: how a row of x is laid out, and how 32 columns of a weight row load as two
// float32 vectors that multiply the two vectors of x at the same offsets.
template <typename W>
struct Weights;

template <>
struct Weights<float> {
  // float32 rows are read as they are.
  static void pack(const float* x, float* out, int64_t in) { std::memcpy(out, x, in * 4); }
  static void load32(const float* w, f32x16& first, f32x16& second) {
    first = load(w);
    second = load(w + 16);
  }
  static float one(float w) { return w; }
  static int64_t at(int64_t column, int64_t /*in*/) { return column; }
};

template <>
struct Weights<uint16_t> {
  // 32 bfloat16 weights load as 16 words; a word's low half is the even column and its high
  // half the odd one, so widening is a shift and a mask, no shuffle. x is laid out to match:
  // per 32 columns, the 16 even ones, then the 16 odd ones; the tail stays in order.
  static void pack(const float* x, float* out, int64_t in) {
    const int64_t end = in - in % 32;
    for (int64_t i = 0; i < end; i += 32)
      for (int j = 0; j < 16; ++j) {
        out[i + j] = x[i + 2 * j];
        out[i + 16 + j] = x[i + 2 * j + 1];
      }
    std::memcpy(out + end, x + end, (in - end) * 4);
  }
  static void load32(const uint16_t* w, f32x16& even, f32x16& odd) {
    u32x16 words;
    std::memcpy(&words, w, sizeof words);
    const u32x16 lo = words << 16, hi = words & 0xFFFF0000u;
    std::memcpy(&even, &lo, sizeof lo);
    std::memcpy(&odd, &hi, sizeof hi);
  }
  static float one(uint16_t w) { return bf16_to_f32(w); }
  // Where `pack` puts a row's column.
  static int64_t at(int64_t column, int64_t in) {
    const int64_t j = column % 32, group = column - j;
    if (group + 32 > in) return column;
    return group + (j % 2) * 16 + j / 2;
  }
};

// One weight row with one packed row of x, read strictly in order with four independent sums.
template <typename W>
float dot_row(const W* w, const float* x, int64_t in) {
  f32x16 a0 = {}, a1 = {}, a2 = {}, a3 = {}, w0, w1, w2, w3;
  int64_t i = 0;
  for (; i + 64 <= in; i += 64) {
    Weights<W>::load32(w + i, w0, w1);
    Weights<W>::load32(w + i + 32, w2, w3);
    a0 += w0 * load(x + i);
    a1 += w1 * load(x + i + 16);
    a2 += w2 * load(x + i + 32);
    a3 += w3 * load(x + i + 48);
  }
  for (; i + 32 <= in; i += 32) {
    Weights<W>::load32(w + i, w0, w1);
    a0 += w0 * load(x + i);
    a1 += w1 * load(x + i + 16);
  }
  float sum = hsum((a0 + a1) + (a2 + a3));
  for (; i < in; ++i) sum += Weights<W>::one(w[i]) * x[i];
  return sum;
}

// OB weight rows (row stride in) with NB packed rows of x (row stride ld): every weight and
// every x vector is loaded once per step, for OB x NB independent sums.
template <typename W, int OB, int NB>
void dot_tile(const W* w, const float* x, int64_t ld, int64_t in, float* out) {
  f32x16 acc[OB][NB] = {};
  int64_t i = 0;
  for (; i + 32 <= in; i += 32) {
    f32x16 first[OB], second[OB];
    for (int r = 0; r < OB; ++r) Weights<W>::load32(w + r * in + i, first[r], second[r]);
    for (int t = 0; t < NB; ++t) {
      const f32x16 x0 = load(x + t * ld + i), x1 = load(x + t * ld + i + 16);
      for (int r = 0; r < OB; ++r) {
        acc[r][t] += first[r] * x0;
        acc[r][t] += second[r] * x1;
      }
    }
  }
  for (int r = 0; r < OB; ++r)
    for (int t = 0; t < NB; ++t) {
      float sum = hsum(acc[r][t]);
      for (int64_t j = i; j < in; ++j) sum += Weights<W>::one(w[r * in + j]) * x[t * ld + j];
      out[r * NB + t] = sum;
    }
}

constexpr int64_t kRowsPerChunk = 64;  // weight rows per unit of work handed to a thread

// The stride of packed rows of x: a row of `in` floats and one vector more, so that rows whose
// width is a multiple of 1024 floats do not all fall on the same cache sets.
inline int64_t stride(int64_t in) { return in + 16; }

// OB weight rows from o with rows [t, t + NB) of x: out_fn(row, o, value) for each.
template <typename W, int OB, int NB, typename Out>
inline void tile(const W* w, int64_t in, const float* x, int64_t ld, int64_t o, int64_t t,
                 Out& out_fn) {
  float sums[OB * NB];
  if constexpr (OB == 1 && NB == 1) {
    sums[0] = dot_row(w + o * in, x + t * ld, in);
  } else {
    dot_tile<W, OB, NB>(w + o * in, x + t * ld, ld, in, sums);
  }
  for (int r = 0; r < OB; ++r)
    for (int j = 0; j < NB; ++j) out_fn(t + j, o + r, sums[r * NB + j]);
}

// OB weight rows from o with every row of x, up to four at a time.
template <typename W, int OB, typename Out>
inline void tiles(const W* w, int64_t in, const float* x, int64_t ld, int64_t rows, int64_t o,
                  Out& out_fn) {
  int64_t t = 0;
  for (; t + 4 <= rows; t += 4) tile<W, OB, 4>(w, in, x, ld, o, t, out_fn);
  switch (rows - t) {
    case 3: tile<W, OB, 3>(w, in, x, ld, o, t, out_fn); break;
    case 2: tile<W, OB, 2>(w, in, x, ld, o, t, out_fn); break;
    case 1: tile<W, OB, 1>(w, in, x, ld, o, t, out_fn); break;
    default: break;
  }
}

// Rows x [rows, stride(in)] (packed) times weight rows [o0, o1) of w [out, in]:
// out_fn(row, o, value). One row of x reads one weight row at a time, strictly in order
// (interleaved weight rows read bfloat16 at about half the rate). Several rows of x are bound
// by loads and arithmetic as much as by memory, and take eight weight rows at a time: each
// loaded vector of x serves eight sums, and the eight independent sums per row of x keep the
// multiply-adds from waiting on each other (with four weight rows, two to four rows of x read
// the weights more slowly than one row does).
template <typename W, typename Out>
void product(const W* w, int64_t in, const float* x, int64_t rows, int64_t o0, int64_t o1,
             Out out_fn) {
  const int64_t ld = stride(in);
  int64_t o = o0;
  if (rows >= 2)
    for (; o + 8 <= o1; o += 8) tiles<W, 8>(w, in, x, ld, rows, o, out_fn);
  for (; o < o1; ++o) tiles<W, 1>(w, in, x, ld, rows, o, out_fn);
}

// Runs body(chunk) for every chunk in [0, chunks) on the caller and the pool's threads. Work is
// claimed from a shared counter, so the caller finishes it alone if no helper ever starts; a
// helper that starts late finds nothing left and touches nothing but the shared counters.
struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

template <typename Body>
void parallel_chunks(ffi::ThreadPool& pool, int64_t chunks, const Body& body) {
  auto progress = std::make_shared<Progress>();
  // A helper that claims a chunk runs it before the caller can return, so `body` outlives it.
  auto work = [progress, chunks, &body] {
    for (int64_t c; (c = progress->next.fetch_add(1)) < chunks;) {
      body(c);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (progress->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

template <typename W>
void expert_swiglu(ffi::ThreadPool& pool, const float* x, const bool* take, const W* gate,
                   const W* up, const W* down, float* y, int64_t m, int64_t d, int64_t f) {
  std::memset(y, 0, sizeof(float) * m * d);
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < m; ++i)
    if (take[i]) rows.push_back(i);
  const int64_t n = rows.size();
  if (n == 0) return;
  std::vector<float> xs(n * stride(d)), gs(n * f), us(n * f), hs(n * stride(f));
  for (int64_t t = 0; t < n; ++t) Weights<W>::pack(x + rows[t] * d, xs.data() + t * stride(d), d);

  // Each chunk also computes the SwiGLU of its own rows, straight into the packed layout the
  // down product reads, so no thread waits on the caller doing it for all rows.
  parallel_chunks(pool, (f + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t c) {
    const int64_t o0 = c * kRowsPerChunk, o1 = std::min(f, o0 + kRowsPerChunk);
    product(gate, d, xs.data(), n, o0, o1,
            [&](int64_t t, int64_t o, float v) { gs[t * f + o] = v; });
    product(up, d, xs.data(), n, o0, o1,
            [&](int64_t t, int64_t o, float v) { us[t * f + o] = v; });
    for (int64_t t = 0; t < n; ++t)
      for (int64_t o = o0; o < o1; ++o)
        hs[t * stride(f) + Weights<W>::at(o, f)] = silu(gs[t * f + o]) * us[t * f + o];
  });
  parallel_chunks(pool, (d + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t c) {
    const int64_t o0 = c * kRowsPerChunk, o1 = std::min(d, o0 + kRowsPerChunk);
    product(down, f, hs.data(), n, o0, o1,
            [&](int64_t t, int64_t o, float v) { y[rows[t] * d + o] = v; });
  });
}

ffi::Error ExpertSwigluImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::PRED> take, ffi::AnyBuffer gate, ffi::AnyBuffer up,
                            ffi::AnyBuffer down, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const auto gate_dims = gate.dimensions();
  if (x.dimensions().size() != 2 || gate_dims.size() != 2)
    return ffi::Error::InvalidArgument("expert_swiglu: x must be [M, D] and gate [F, D]");
  const int64_t m = x.dimensions()[0], d = x.dimensions()[1], f = gate_dims[0];
  const bool agree = gate_dims[1] == d && up.dimensions()[0] == f && up.dimensions()[1] == d &&
                     down.dimensions()[0] == d && down.dimensions()[1] == f &&
                     static_cast<int64_t>(take.element_count()) == m;
  if (!agree)
    return ffi::Error::InvalidArgument("expert_swiglu: shapes disagree");
  const ffi::DataType type = gate.element_type();
  if (up.element_type() != type || down.element_type() != type)
    return ffi::Error::InvalidArgument("expert_swiglu: gate, up and down differ in dtype");
  const bool* take_p = take.typed_data();
  if (type == ffi::DataType::F32) {
    expert_swiglu(pool, x.typed_data(), take_p, static_cast<const float*>(gate.untyped_data()),
                  static_cast<const float*>(up.untyped_data()),
                  static_cast<const float*>(down.untyped_data()), y->typed_data(), m, d, f);
  } else if (type == ffi::DataType::BF16) {
    expert_swiglu(pool, x.typed_data(), take_p, static_cast<const uint16_t*>(gate.untyped_data()),
                  static_cast<const uint16_t*>(up.untyped_data()),
                  static_cast<const uint16_t*>(down.untyped_data()), y->typed_data(), m, d, f);
  } else {
    return ffi::Error::InvalidArgument("expert_swiglu: weights must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DynmoeExpertSwiglu, ExpertSwigluImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
