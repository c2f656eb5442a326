// textrl's CPU kernels, built on first use by textrl/kernels.py (torch.utils.cpp_extension.load).
//
// split_mm: a matmul with few rows (a decode step's B tokens) split by output columns over the intra-op
// threads. With few rows, the BLAS library's own threading splits the rows, and every thread then packs the
// whole weight matrix for its handful of rows; split by columns, each thread reads only its own share of
// the weight, once.
//
// Where the weight is input-major ((in, out), unit column stride: every block weight on a CPU, see
// textrl.ops.input_major), a thread's share runs through the direct kernel below, which multiplies the
// weight where it lies instead of packing it first (a BLAS call copies its weight panel into a buffer before
// multiplying; at a decode step's few rows that copy costs about as much as the multiply). Other layouts (the
// LM head's (out, in) weight), other dtypes and the columns short of a 32-wide strip take one single-threaded
// BLAS call per share.
//
// split_mm_group: the same for several weights that read the same rows (a layer's q, k and v; its gate and
// up), their columns laid end to end and shared out in one parallel region.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// 16 floats: one AVX-512 register (GCC/Clang vector extension, built with -march=native). The tile below
// keeps 16 of them as accumulators plus two of weights: that fits AVX-512's 32 registers, not AVX2's 16, so
// on a machine without AVX-512 every share takes the BLAS calls instead.
typedef float vec16 __attribute__((vector_size(64), aligned(4)));
#if defined(__AVX512F__)
constexpr bool kDirect = true;
#else
constexpr bool kDirect = false;
#endif

constexpr int64_t kCols = 32;      // output columns per tile: two vectors
constexpr int64_t kRows = 8;       // rows per tile: 8 x 2 accumulators stay in registers
// Weight rows read ahead, into L2. A tile walks down a column strip, 128 bytes a row, which the hardware
// prefetcher does not follow across pages. A decode step reads each weight once, from memory; the core keeps
// more misses in flight towards L2 than towards L1, so prefetching far ahead into L2 draws the weights faster
// than near ahead into L1 (the streaming table of benchmarks/cpu_kernels.py measures the rate).
constexpr int64_t kPrefetch = 64;

// Where a tile prefetches, row by row: from ``from`` (rows ``ld`` apart) until row ``wrap``, then from ``then``
// (rows ``then_ld`` apart).
struct Prefetch {
  const float* from;
  int64_t ld, wrap;
  const float* then;
  int64_t then_ld;
};

// out[r, 0:32] = x[r, :] @ w[:, 0:32] (+ bias[0:32]) for the R rows of x; w's rows are ldw apart. Each row of
// the loop prefetches one row (two cache lines) as ``pf`` says.
template <int R>
inline void tile(const float* x, int64_t ldx, int64_t K, const float* w, int64_t ldw, const float* bias, float* out,
                 int64_t ldo, Prefetch pf) {
  vec16 acc0[R], acc1[R];
  vec16 b0 = {}, b1 = {};
  if (bias != nullptr) {
    std::memcpy(&b0, bias, sizeof(vec16));
    std::memcpy(&b1, bias + 16, sizeof(vec16));
  }
  for (int r = 0; r < R; ++r) {
    acc0[r] = b0;
    acc1[r] = b1;
  }
  const float* wp = w;
  const float* p = pf.from;
  int64_t pld = pf.ld;
  for (int64_t k = 0; k < K; ++k, wp += ldw, p += pld) {
    if (k == pf.wrap) {
      p = pf.then;
      pld = pf.then_ld;
    }
    __builtin_prefetch(p, 0, 2);  // locality 2: into L2 (prefetcht1)
    __builtin_prefetch(p + 16, 0, 2);
    vec16 w0, w1;
    std::memcpy(&w0, wp, sizeof(vec16));
    std::memcpy(&w1, wp + 16, sizeof(vec16));
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * ldx + k];
      acc0[r] += xv * w0;
      acc1[r] += xv * w1;
    }
  }
  for (int r = 0; r < R; ++r) {
    std::memcpy(out + r * ldo, &acc0[r], sizeof(vec16));
    std::memcpy(out + r * ldo + 16, &acc1[r], sizeof(vec16));
  }
}

// Columns [lo, lo + 32) of out = x @ w (+ bias), every row: tiles of 8 rows (the column strip of w, K x 32,
// stays in cache between them), then the remaining rows. ``next``: the start of the strip this thread multiplies
// after this one (null if none; its rows ``next_ld`` apart).
//
// The prefetches keep memory busy all along: the first tile reads the strip from memory and prefetches
// kPrefetch rows ahead of itself (into the next strip, for its last rows, when it is the only tile); a later
// tile reads the strip from cache, and the last one prefetches the whole next strip, one row per row, so that
// the next strip's first tile finds it in cache too.
void strip(const float* x, int64_t ldx, int64_t M, int64_t K, const float* w, int64_t ldw, const float* bias,
           float* out, int64_t ldo, int64_t lo, const float* next, int64_t next_ld) {
  const float* b = bias == nullptr ? nullptr : bias + lo;
  const float* ws = w + lo;
  const int64_t wrap = std::max<int64_t>(K - kPrefetch, 0);
  const float* then = next != nullptr ? next : ws;  // the next strip; without one, this strip again
  const int64_t then_ld = next != nullptr ? next_ld : ldw;
  const Prefetch ahead{ws + kPrefetch * ldw, ldw, wrap, ws, ldw};  // a first tile, more to come: this strip again
  const Prefetch only{ws + kPrefetch * ldw, ldw, wrap, then, then_ld};
  const Prefetch whole_next{then, then_ld, -1, nullptr, 0};
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows) {
    const bool last = m + kRows == M;
    tile<kRows>(x + m * ldx, ldx, K, ws, ldw, b, out + m * ldo + lo, ldo,
                m == 0 ? (last ? only : ahead) : (last ? whole_next : ahead));
  }
  const float* xm = x + m * ldx;
  float* om = out + m * ldo + lo;
  const Prefetch pf = m == 0 ? only : whole_next;
  switch (M - m) {
    case 7: tile<7>(xm, ldx, K, ws, ldw, b, om, ldo, pf); break;
    case 6: tile<6>(xm, ldx, K, ws, ldw, b, om, ldo, pf); break;
    case 5: tile<5>(xm, ldx, K, ws, ldw, b, om, ldo, pf); break;
    case 4: tile<4>(xm, ldx, K, ws, ldw, b, om, ldo, pf); break;
    case 3: tile<3>(xm, ldx, K, ws, ldw, b, om, ldo, pf); break;
    case 2: tile<2>(xm, ldx, K, ws, ldw, b, om, ldo, pf); break;
    case 1: tile<1>(xm, ldx, K, ws, ldw, b, om, ldo, pf); break;
    default: break;
  }
}

// One piece of a thread's share: columns [lo, lo + width) of weight j, by the direct kernel (a whole strip of
// an input-major weight) or by one BLAS call.
struct Piece {
  int64_t j, lo, width;
  bool direct;
};

// outs[j] = x @ ws[j] (+ biases[j]) for every j: x (M, K) and ws[j] (K, N_j) of any strides, biases[j] (N_j,)
// or none, outs[j] (M, N_j) with unit column stride. The columns of all the weights, end to end, are cut into
// one share per thread.
void mm_group_into(const at::Tensor& x, at::TensorList ws, const std::vector<c10::optional<at::Tensor>>& biases,
                   at::TensorList outs, const char* name) {
  const int64_t n = static_cast<int64_t>(ws.size());
  TORCH_CHECK(n > 0, name, ": no weights");
  TORCH_CHECK(static_cast<int64_t>(outs.size()) == n && static_cast<int64_t>(biases.size()) == n, name, ": ", n,
              " weights but ", outs.size(), " outputs and ", biases.size(), " biases");
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), name, ": x must be a 2-D CPU tensor, got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  const bool x_direct = kDirect && x.scalar_type() == at::kFloat && x.stride(1) == 1;
  std::vector<Piece> pieces;
  int64_t total = 0;
  for (int64_t j = 0; j < n; ++j) {
    const at::Tensor& w = ws[j];
    const at::Tensor& o = outs[j];
    TORCH_CHECK(w.dim() == 2 && o.dim() == 2, name, ": weight and output ", j, " must be 2-D");
    TORCH_CHECK(K == w.size(0), name, ": x is ", x.sizes(), " but weight ", j, " is ", w.sizes());
    TORCH_CHECK(o.size(0) == M && o.size(1) == w.size(1), name, ": output ", j, " is ", o.sizes(), ", expected ", M,
                " x ", w.size(1));
    TORCH_CHECK(o.stride(1) == 1 || o.size(1) <= 1, name, ": output ", j, " needs unit column stride");
    TORCH_CHECK(w.device().is_cpu() && o.device().is_cpu(), name, ": CPU tensors only");
    const c10::optional<at::Tensor>& b = biases[j];
    const bool has_bias = b.has_value() && b->defined();
    if (has_bias) {
      TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(1), name, ": bias ", j, " is ", b->sizes(), ", expected (",
                  w.size(1), ",)");
    }
    const bool direct = x_direct && w.scalar_type() == at::kFloat && o.scalar_type() == at::kFloat &&
                        w.stride(1) == 1 && (!has_bias || (b->scalar_type() == at::kFloat && b->stride(0) == 1));
    const int64_t N = w.size(1);
    int64_t lo = 0;
    if (direct) {
      for (; lo + kCols <= N; lo += kCols) pieces.push_back({j, lo, kCols, true});
    }
    if (lo < N) {  // another layout, or the last columns short of a strip: BLAS calls, one per thread's share
      const int64_t rest = N - lo, parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rest / 64));
      const int64_t step = ((rest + parts - 1) / parts + 15) / 16 * 16;  // a multiple of 16 columns
      for (; lo < N; lo += step) pieces.push_back({j, lo, std::min(step, N - lo), false});
    }
    total += N;
  }
  // contiguous runs of pieces, one per thread, of about equal width
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), pieces.size()));
  std::vector<int64_t> start(threads + 1, static_cast<int64_t>(pieces.size()));
  start[0] = 0;
  int64_t seen = 0, t = 1;
  for (int64_t p = 0; p < static_cast<int64_t>(pieces.size()) && t < threads; ++p) {
    seen += pieces[p].width;
    if (seen * threads >= t * total) start[t++] = p + 1;
  }
  const float* xp = x_direct ? x.data_ptr<float>() : nullptr;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    // below autograd on every thread (grad mode is per thread): the BLAS pieces are plain CPU matmuls
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t p = start[i]; p < start[i + 1]; ++p) {
        const Piece& piece = pieces[p];
        const at::Tensor& w = ws[piece.j];
        const at::Tensor& o = outs[piece.j];
        const c10::optional<at::Tensor>& b = biases[piece.j];
        const bool has_bias = b.has_value() && b->defined();
        if (piece.direct) {
          const float* next = nullptr;  // this thread's next strip, if it has one
          int64_t next_ld = 0;
          if (p + 1 < start[i + 1] && pieces[p + 1].direct) {
            const at::Tensor& wn = ws[pieces[p + 1].j];
            next = wn.data_ptr<float>() + pieces[p + 1].lo;
            next_ld = wn.stride(0);
          }
          strip(xp, x.stride(0), M, K, w.data_ptr<float>(), w.stride(0), has_bias ? b->data_ptr<float>() : nullptr,
                o.data_ptr<float>(), o.stride(0), piece.lo, next, next_ld);
          continue;
        }
        at::Tensor oi = o.narrow(1, piece.lo, piece.width);
        at::Tensor wi = w.narrow(1, piece.lo, piece.width);
        if (has_bias) {
          at::addmm_out(oi, b->narrow(0, piece.lo, piece.width), x, wi);
        } else {
          at::mm_out(oi, x, wi);
        }
      }
    }
  });
}

std::vector<c10::optional<at::Tensor>> optional_list(const c10::List<c10::optional<at::Tensor>>& biases) {
  std::vector<c10::optional<at::Tensor>> out;
  for (size_t i = 0; i < biases.size(); ++i) out.push_back(biases.get(i));
  return out;
}

at::Tensor split_mm(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  at::Tensor out = at::empty({x.size(0), w.size(1)}, x.options());
  mm_group_into(x, {w}, {bias}, {out}, "split_mm");
  return out;
}

void split_mm_out(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, at::Tensor out) {
  mm_group_into(x, {w}, {bias}, {out}, "split_mm");
}

// One (M, sum of the weights' widths) tensor, the outputs side by side (callers split it into views).
at::Tensor split_mm_cat(const at::Tensor& x, at::TensorList ws, const c10::List<c10::optional<at::Tensor>>& biases) {
  int64_t N = 0;
  for (const at::Tensor& w : ws) N += w.size(1);
  at::Tensor out = at::empty({x.size(0), N}, x.options());
  std::vector<at::Tensor> outs;
  int64_t lo = 0;
  for (const at::Tensor& w : ws) {
    outs.push_back(out.narrow(1, lo, w.size(1)));
    lo += w.size(1);
  }
  mm_group_into(x, ws, optional_list(biases), outs, "split_mm_group");
  return out;
}

void split_mm_group_out(const at::Tensor& x, at::TensorList ws, const c10::List<c10::optional<at::Tensor>>& biases,
                        at::TensorList outs) {
  mm_group_into(x, ws, optional_list(biases), outs, "split_mm_group");
}

// The sum of a vector's 16 lanes (with AVX-512, a tree of shuffles rather than 15 dependent adds).
inline float lanes_sum(vec16 v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#else
  float sum = 0.0f;
  for (int i = 0; i < 16; ++i) sum += v[i];
  return sum;
#endif
}

#if defined(__AVX512F__)
// exp of 16 floats by Cephes' expf (range reduction by ln 2, a degree-6 polynomial, then a scale by 2^n): within
// 2 ulp of the library's expf; inputs clamped to [-87, 88] (exp(-87) is 1.6e-38, exp(88) 1.7e38).
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 scaled = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));  // x / ln 2
  const __m512 n = _mm512_roundscale_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}
#endif

// p[s] = exp(p[s]) for s < S (every p[s] <= 0 here: scores less their maximum), 16 at a time where AVX-512 is.
inline void exp_inplace(float* p, int64_t S) {
  int64_t s = 0;
#if defined(__AVX512F__)
  for (; s + 16 <= S; s += 16) _mm512_storeu_ps(p + s, exp16(_mm512_loadu_ps(p + s)));
#endif
  for (; s < S; ++s) p[s] = std::exp(p[s]);
}

// Row-wise kernels (decode steps, reference passes, and the update's backward): one pass per row where torch runs
// several elementwise ops, each with its own set-up and threading; x (..., E) read as rows of E. Rows go to threads
// only when there are enough elements to pay for it; the outputs are contiguous.
constexpr int64_t kRowsGrain = 1 << 15;  // elements per thread's chunk at least

// x (..., E) as N rows of E, read in place wherever the leading dimensions collapse into two strided ones (a slice
// of a rollout record is (B, S, E) with gaps between its rows: flattening it would copy it), from a contiguous copy
// otherwise.
struct Rows {
  at::Tensor t;  // x, a view of it, or a copy
  const float* p = nullptr;
  int64_t N = 0, E = 0, inner = 1, outer_stride = 0, inner_stride = 0;
  const float* row(int64_t n) const { return p + (n / inner) * outer_stride + (n % inner) * inner_stride; }
};

Rows rows_of(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() >= 1 && x.device().is_cpu() && x.scalar_type() == at::kFloat, name,
              ": a float32 CPU tensor, got ", x.scalar_type(), " ", x.sizes());
  Rows r;
  r.E = x.size(-1);
  if (x.numel() == 0) {
    r.t = x.new_empty({0, 1, r.E});
  } else {
    r.t = x.dim() == 1 ? x.view({1, 1, r.E}) : x.dim() == 2 ? x.unsqueeze(0) : x.reshape({-1, x.size(-2), r.E});
  }
  if (r.t.stride(2) != 1 && r.E > 1) r.t = r.t.contiguous();
  r.p = r.t.data_ptr<float>();
  r.inner = std::max<int64_t>(r.t.size(1), 1);
  r.N = r.t.size(0) * r.t.size(1);
  r.outer_stride = r.t.stride(0);
  r.inner_stride = r.t.stride(1);
  return r;
}

// RMSNorm as HF computes it in float32: x * rsqrt(mean(x^2) + eps) * weight.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const Rows rows = rows_of(x, "rms_norm");
  const int64_t N = rows.N, E = rows.E;
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == E && weight.scalar_type() == at::kFloat && weight.stride(0) == 1,
              "rms_norm: weight ", weight.sizes(), " does not match rows of ", E);
  at::Tensor out = at::empty({N, E}, x.options());
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, kRowsGrain / std::max<int64_t>(E, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* xr = rows.row(n);
      float* orow = op + n * E;
      vec16 acc = {};
      int64_t e = 0;
      for (; e + 16 <= E; e += 16) {
        vec16 v;
        std::memcpy(&v, xr + e, sizeof(vec16));
        acc += v * v;
      }
      float sum = lanes_sum(acc);
      for (; e < E; ++e) sum += xr[e] * xr[e];
      const float r = 1.0f / std::sqrt(sum / static_cast<float>(E) + static_cast<float>(eps));
      for (e = 0; e < E; ++e) orow[e] = wp[e] * (xr[e] * r);
    }
  });
  return out.view(x.sizes());
}

// SwiGLU's product silu(gate) * up = gate / (1 + exp(-gate)) * up.
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes(), "silu_mul: gate ", gate.sizes(), " and up ", up.sizes(), " differ");
  const Rows g = rows_of(gate, "silu_mul"), u = rows_of(up, "silu_mul");
  const int64_t N = g.N, F = g.E;
  at::Tensor out = at::empty({N, F}, gate.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, kRowsGrain / std::max<int64_t>(F, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* gr = g.row(n);
      const float* ur = u.row(n);
      float* orow = op + n * F;
      int64_t f = 0;
#if defined(__AVX512F__)
      const __m512 one = _mm512_set1_ps(1.0f);
      for (; f + 16 <= F; f += 16) {
        const __m512 x = _mm512_loadu_ps(gr + f);
        const __m512 sig = _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
        _mm512_storeu_ps(orow + f, _mm512_mul_ps(sig, _mm512_loadu_ps(ur + f)));
      }
#endif
      for (; f < F; ++f) orow[f] = gr[f] / (1.0f + std::exp(-gr[f])) * ur[f];
    }
  });
  return out.view(gate.sizes());
}

// Backward kernels of the row-wise ops, for the update's autograd (textrl.ops wraps each pair in a Function): one
// pass over each row where torch's autograd runs the forward's several ops' backwards one after the other.
// RMSNorm's backward: with r = rsqrt(mean(x^2) + eps) and g = grad * weight, dx = r * (g - x * r^2 * mean(g * x))
// and dweight = the sum over rows of grad * x * r (each thread sums its rows, then the threads' sums are added).
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& weight, double eps) {
  TORCH_CHECK(grad.sizes() == x.sizes(), "rms_norm_backward: grad ", grad.sizes(), " and x ", x.sizes(), " differ");
  const Rows rows = rows_of(x, "rms_norm_backward"), g = rows_of(grad, "rms_norm_backward");
  const int64_t N = rows.N, E = rows.E;
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == E && weight.scalar_type() == at::kFloat && weight.stride(0) == 1,
              "rms_norm_backward: weight ", weight.sizes(), " does not match rows of ", E);
  at::Tensor dx = at::empty({N, E}, x.options());
  at::Tensor partial = at::zeros({at::get_num_threads(), E}, x.options());
  const float* wp = weight.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, kRowsGrain / std::max<int64_t>(E, 1)), [&](int64_t begin, int64_t end) {
    float* dw = pp + at::get_thread_num() * E;
    for (int64_t n = begin; n < end; ++n) {
      const float* xr = rows.row(n);
      const float* gr = g.row(n);
      float* dr = dp + n * E;
      vec16 sq = {}, gwx = {};
      int64_t e = 0;
      for (; e + 16 <= E; e += 16) {
        vec16 xv, gv, wv;
        std::memcpy(&xv, xr + e, sizeof(vec16));
        std::memcpy(&gv, gr + e, sizeof(vec16));
        std::memcpy(&wv, wp + e, sizeof(vec16));
        sq += xv * xv;
        gwx += gv * wv * xv;
      }
      float squares = lanes_sum(sq), dot = lanes_sum(gwx);
      for (; e < E; ++e) {
        squares += xr[e] * xr[e];
        dot += gr[e] * wp[e] * xr[e];
      }
      const float r = 1.0f / std::sqrt(squares / static_cast<float>(E) + static_cast<float>(eps));
      const float c = r * r * dot / static_cast<float>(E);
      for (e = 0; e < E; ++e) {
        dr[e] = r * (gr[e] * wp[e] - xr[e] * c);
        dw[e] += gr[e] * xr[e] * r;
      }
    }
  });
  return {dx.view(x.sizes()), partial.sum(0)};
}

// SwiGLU's backward: with s = sigmoid(gate), dgate = grad * up * s * (1 + gate * (1 - s)), dup = grad * gate * s.
std::tuple<at::Tensor, at::Tensor> silu_mul_backward(const at::Tensor& grad, const at::Tensor& gate,
                                                     const at::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes() && grad.sizes() == gate.sizes(), "silu_mul_backward: grad ", grad.sizes(),
              ", gate ", gate.sizes(), " and up ", up.sizes(), " differ");
  const Rows d = rows_of(grad, "silu_mul_backward"), g = rows_of(gate, "silu_mul_backward"),
             u = rows_of(up, "silu_mul_backward");
  const int64_t N = g.N, F = g.E;
  at::Tensor dgate = at::empty({N, F}, gate.options()), dup = at::empty({N, F}, gate.options());
  float* dgp = dgate.data_ptr<float>();
  float* dup_ = dup.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, kRowsGrain / std::max<int64_t>(F, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* dr = d.row(n);
      const float* gr = g.row(n);
      const float* ur = u.row(n);
      float* dgr = dgp + n * F;
      float* dur = dup_ + n * F;
      int64_t f = 0;
#if defined(__AVX512F__)
      const __m512 one = _mm512_set1_ps(1.0f);
      for (; f + 16 <= F; f += 16) {
        const __m512 x = _mm512_loadu_ps(gr + f), dy = _mm512_loadu_ps(dr + f);
        const __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
        const __m512 ds = _mm512_mul_ps(dy, s);
        _mm512_storeu_ps(dur + f, _mm512_mul_ps(ds, x));
        const __m512 slope = _mm512_fmadd_ps(x, _mm512_sub_ps(one, s), one);  // 1 + gate * (1 - s)
        _mm512_storeu_ps(dgr + f, _mm512_mul_ps(_mm512_mul_ps(ds, _mm512_loadu_ps(ur + f)), slope));
      }
#endif
      for (; f < F; ++f) {
        const float x = gr[f], s = 1.0f / (1.0f + std::exp(-x)), ds = dr[f] * s;
        dur[f] = ds * x;
        dgr[f] = ds * ur[f] * (1.0f + x * (1.0f - s));
      }
    }
  });
  return {dgate.view(gate.sizes()), dup.view(gate.sizes())};
}

// GPT-2's tanh GELU as x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)) (0.5 (1 + tanh z) = sigmoid(2 z)), the form
// textrl.ops takes with autograd too.
at::Tensor gelu_tanh(const at::Tensor& x) {
  const Rows rows = rows_of(x, "gelu_tanh");
  const int64_t N = rows.N, F = rows.E;
  at::Tensor out = at::empty({N, F}, x.options());
  float* op = out.data_ptr<float>();
  constexpr float k = 1.5957691216057308f;  // 2 sqrt(2 / pi)
  at::parallel_for(0, N, std::max<int64_t>(1, kRowsGrain / std::max<int64_t>(F, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* xr = rows.row(n);
      float* orow = op + n * F;
      int64_t f = 0;
#if defined(__AVX512F__)
      const __m512 one = _mm512_set1_ps(1.0f), c = _mm512_set1_ps(0.044715f), minus_k = _mm512_set1_ps(-k);
      for (; f + 16 <= F; f += 16) {
        const __m512 v = _mm512_loadu_ps(xr + f);
        const __m512 z = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(v, v), v), c, v);  // x + 0.044715 x^3
        const __m512 e = exp16(_mm512_mul_ps(z, minus_k));
        _mm512_storeu_ps(orow + f, _mm512_div_ps(v, _mm512_add_ps(one, e)));
      }
#endif
      for (; f < F; ++f) {
        const float v = xr[f];
        orow[f] = v / (1.0f + std::exp(-k * (v + 0.044715f * v * v * v)));
      }
    }
  });
  return out.view(x.sizes());
}

// One (row, key head) pair of decode_attention: for each of its r query heads (q rows qs apart), the scores
// over the S cached keys (rows ks apart; seen[s * ms], the mask of head j at seen + j * mh), their softmax
// (into p, S floats) and the weighted sum of the values (rows vs apart) into out (r rows of D). V: D / 16 when
// D is a multiple of 16 up to 256 (the accumulators then stay in registers); 0: any D.
template <int V>
void attend_pair(const float* q, int64_t qs, const float* k, int64_t ks, const float* v, int64_t vs, const bool* seen,
                 int64_t mh, int64_t ms, int64_t r, int64_t S, int64_t D, float scale, float* p, float* out) {
  for (int64_t j = 0; j < r; ++j, q += qs, seen += mh, out += D) {
    float top = -std::numeric_limits<float>::infinity();
    if constexpr (V > 0) {
      vec16 qv[V];
      for (int i = 0; i < V; ++i) std::memcpy(&qv[i], q + 16 * i, sizeof(vec16));
      for (int64_t s = 0; s < S; ++s) {
        if (!seen[s * ms]) continue;
        const float* kr = k + s * ks;
        vec16 acc = {};
        for (int i = 0; i < V; ++i) {
          vec16 kv;
          std::memcpy(&kv, kr + 16 * i, sizeof(vec16));
          acc += qv[i] * kv;
        }
        p[s] = lanes_sum(acc) * scale;
        top = std::max(top, p[s]);
      }
    } else {
      for (int64_t s = 0; s < S; ++s) {
        if (!seen[s * ms]) continue;
        float sum = 0.0f;
        for (int64_t d = 0; d < D; ++d) sum += q[d] * k[s * ks + d];
        p[s] = sum * scale;
        top = std::max(top, p[s]);
      }
    }
    for (int64_t s = 0; s < S; ++s) p[s] = seen[s * ms] ? p[s] - top : -std::numeric_limits<float>::infinity();
    exp_inplace(p, S);
    float total = 0.0f;
    for (int64_t s = 0; s < S; ++s) {
      p[s] = seen[s * ms] ? p[s] : 0.0f;
      total += p[s];
    }
    const float inv = 1.0f / total;  // no key seen: 0/0, NaN, as torch's kernel gives
    if constexpr (V > 0) {
      vec16 acc[V] = {};
      for (int64_t s = 0; s < S; ++s) {
        const float w = p[s];
        if (w == 0.0f) continue;
        const float* vr = v + s * vs;
        for (int i = 0; i < V; ++i) {
          vec16 x;
          std::memcpy(&x, vr + 16 * i, sizeof(vec16));
          acc[i] += w * x;
        }
      }
      for (int i = 0; i < V; ++i) {
        acc[i] *= inv;
        std::memcpy(out + 16 * i, &acc[i], sizeof(vec16));
      }
    } else {
      std::fill(out, out + D, 0.0f);
      for (int64_t s = 0; s < S; ++s) {
        const float w = p[s];
        if (w == 0.0f) continue;
        for (int64_t d = 0; d < D; ++d) out[d] += w * v[s * vs + d];
      }
      for (int64_t d = 0; d < D; ++d) out[d] *= inv;
    }
  }
}

// A decode step's attention: one query per row over its KV cache, as F.scaled_dot_product_attention(q, k, v,
// attn_mask=mask, enable_gqa=True) computes it. q (B, H, 1, D); k, v (B, G, S, D) with G dividing H (each key
// head serves H / G query heads); mask boolean (B or 1, H or 1, 1, S), True where a key is seen. Any strides
// with unit stride along D. torch's CPU kernel is made for many queries and spends most of a call on set-up
// when there is one; here each thread takes whole (row, key head) pairs, whose keys and values stay in cache
// for all the pair's query heads.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4, "decode_attention: q, k, v and mask ",
              "must be 4-D, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes(), ", ", mask.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), G = k.size(1), S = k.size(2);
  TORCH_CHECK(q.size(2) == 1, "decode_attention: one query per row, got q ", q.sizes());
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && G > 0 && H % G == 0,
              "decode_attention: q ", q.sizes(), " does not match k ", k.sizes(), " and v ", v.sizes());
  TORCH_CHECK((mask.size(0) == B || mask.size(0) == 1) && (mask.size(1) == H || mask.size(1) == 1) &&
                  mask.size(2) == 1 && mask.size(3) == S,
              "decode_attention: mask ", mask.sizes(), " does not broadcast to (", B, ", ", H, ", 1, ", S, ")");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  mask.scalar_type() == at::kBool,
              "decode_attention: float32 q, k, v and a bool mask only");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && mask.device().is_cpu(),
              "decode_attention: CPU tensors only");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: unit stride along D");
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  const int64_t r = H / G;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const int64_t mb = mask.size(0) == 1 ? 0 : mask.stride(0), mh = mask.size(1) == 1 ? 0 : mask.stride(1);
  const int64_t ms = mask.stride(3), qs = q.stride(1);
  auto pair = D % 16 != 0 || D > 256 ? attend_pair<0>
              : D == 64              ? attend_pair<4>
              : D == 128             ? attend_pair<8>
              : D == 32              ? attend_pair<2>
              : D == 16              ? attend_pair<1>
              : D == 256             ? attend_pair<16>
              : D == 96              ? attend_pair<6>
              : D == 80              ? attend_pair<5>
              : D == 48              ? attend_pair<3>
                                     : attend_pair<0>;
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(S);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / G, g = task % G;
      pair(qp + b * q.stride(0) + g * r * qs, qs, kp + b * k.stride(0) + g * k.stride(1), k.stride(2),
           vp + b * v.stride(0) + g * v.stride(1), v.stride(2), mp + b * mb + g * r * mh, mh, ms, r, S, D, scale,
           p.data(), op + (b * H + g * r) * D);
    }
  });
  return out;
}

// --- one decode step's Transformer block in one call -----------------------------------------------------

// out[d] = x[d] * cos[d] + x[(d + D/2) % D] * sin[d] over D elements (``sin`` signed: its first half negated), as
// textrl.ops.rotate computes rotary embeddings: two products and a sum, each rounded, with no fused multiply-add
// (the file is built with -ffp-contract=fast), so the result is torch's bit for bit.
#if defined(__clang__)
void rotate_row(const float* x, int64_t D, const float* c, const float* s, float* out) {
#pragma clang fp contract(off)
#else
__attribute__((optimize("fp-contract=off"))) void rotate_row(const float* x, int64_t D, const float* c,
                                                             const float* s, float* out) {
#endif
  const int64_t half = D / 2;
  for (int64_t d = 0; d < D; ++d) {
    const float a = x[d] * c[d];
    const float b = x[d < half ? d + half : d - half] * s[d];
    out[d] = a + b;
  }
}

// A block's norm of x (B, E): LayerNorm (torch's own op) or RMSNorm (the row kernel above).
at::Tensor block_norm(const at::Tensor& x, const c10::optional<at::Tensor>& w, const c10::optional<at::Tensor>& b,
                      double eps, bool layer_norm) {
  if (layer_norm) return at::layer_norm(x, {x.size(-1)}, w, b, eps);
  TORCH_CHECK(w.has_value() && w->defined(), "decode_layer: an RMSNorm needs its weight");
  return rms_norm(x, *w, eps);
}

// outs[j] = x @ ws[j] (+ biases[j]): split over the threads by columns (mm_group_into), or torch's matmul per
// weight, as textrl.ops.base_group_into does for the same ``split``.
void linear_group(const at::Tensor& x, at::TensorList ws, const std::vector<c10::optional<at::Tensor>>& biases,
                  at::TensorList outs, bool split) {
  if (split) {
    mm_group_into(x, ws, biases, outs, "decode_layer");
    return;
  }
  for (size_t j = 0; j < ws.size(); ++j) {
    at::Tensor o = outs[j];
    if (biases[j].has_value() && biases[j]->defined()) {
      at::addmm_out(o, *biases[j], x, ws[j]);
    } else {
      at::mm_out(o, x, ws[j]);
    }
  }
}

// Column ``col`` of each (B, T, width) buffer: the (B, width) outputs a step writes (a rollout record's column t,
// or a session's scratch buffer of one column).
std::vector<at::Tensor> columns(at::TensorList bufs, int64_t col) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& b : bufs) out.push_back(b.select(1, col));
  return out;
}

// x += y for (B, E) tensors, y of any row stride: the residual connection, in place.
void add_rows(at::Tensor& x, const at::Tensor& y) {
  const int64_t B = x.size(0), E = x.size(1);
  float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    float* xr = xp + b * x.stride(0);
    const float* yr = yp + b * y.stride(0);
    for (int64_t e = 0; e < E; ++e) xr[e] += yr[e];
  }
}

// One Transformer block for a decode step's one token per row, in place on the residual stream x (B, E), as
// textrl.engine.Engine._block computes it with the decode's kernels: norm, the attention's linear layers (q, k, v
// as one group, or GPT-2's fused qkv), per-head q/k RMSNorm (Qwen3), rotary embedding, the keys and values into
// the cache's column t, attention over cache columns [first, t], output projection plus residual, norm, the MLP
// (SwiGLU's gate and up as one group, or up and a GELU) and its down projection plus residual. One call where the
// op-by-op block makes ~40 Python-level calls per layer, each with its dispatch and its own small allocation.
//
// Every linear output goes into column ``col`` of its (B, T, width) buffer in attn_outs / o_out / mlp_outs /
// down_out (a rollout record, or one-column scratch). k_cache, v_cache (B, G, max_len, D) and keymask
// (B, 1, 1, max_len) are the session's cache; cos, sin (B, D) the rotary tables at each row's position (none:
// learned positions). eps: the two block norms' and the q/k norms'. split: per linear call (attention group,
// output, MLP group, down), whether it takes mm_group_into. act: 0 SwiGLU, 1 tanh GELU, 2 exact GELU.
void decode_layer(at::Tensor x, int64_t col, int64_t t, int64_t first, const c10::optional<at::Tensor>& cos,
                  const c10::optional<at::Tensor>& sin, const c10::optional<at::Tensor>& norm1_w,
                  const c10::optional<at::Tensor>& norm1_b, at::TensorList attn_ws,
                  const c10::List<c10::optional<at::Tensor>>& attn_bs, at::TensorList attn_outs,
                  const c10::optional<at::Tensor>& q_norm_w, const c10::optional<at::Tensor>& k_norm_w,
                  at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& keymask, const at::Tensor& o_w,
                  const c10::optional<at::Tensor>& o_b, const at::Tensor& o_out,
                  const c10::optional<at::Tensor>& norm2_w, const c10::optional<at::Tensor>& norm2_b,
                  at::TensorList mlp_ws, const c10::List<c10::optional<at::Tensor>>& mlp_bs, at::TensorList mlp_outs,
                  const at::Tensor& down_w, const c10::optional<at::Tensor>& down_b, const at::Tensor& down_out,
                  int64_t n_head, int64_t act, bool layer_norm, at::ArrayRef<double> eps, at::IntArrayRef split) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "decode_layer: x must be a contiguous float32 CPU (B, E) tensor, got ", x.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.size(0) == x.size(0),
              "decode_layer: caches ", k_cache.sizes(), " and ", v_cache.sizes(), " do not fit x ", x.sizes());
  TORCH_CHECK(0 <= first && first <= t && t < k_cache.size(2), "decode_layer: column ", t, " (from ", first,
              ") outside a cache of ", k_cache.size(2));
  TORCH_CHECK(eps.size() == 3 && split.size() == 4, "decode_layer: eps takes 3 values and split 4");
  TORCH_CHECK(attn_ws.size() == 1 || attn_ws.size() == 3, "decode_layer: 1 (fused qkv) or 3 attention weights");
  TORCH_CHECK(mlp_ws.size() == (act == 0 ? 2u : 1u), "decode_layer: SwiGLU takes gate and up, a GELU up only");
  const int64_t B = x.size(0), H = n_head, G = k_cache.size(1), D = k_cache.size(3);
  at::Tensor h = block_norm(x, norm1_w, norm1_b, eps[0], layer_norm);
  const std::vector<at::Tensor> a = columns(attn_outs, col);
  linear_group(h, attn_ws, optional_list(attn_bs), a, split[0] != 0);
  at::Tensor q, k, v;
  if (a.size() == 1) {
    TORCH_CHECK(a[0].size(1) == (H + 2 * G) * D, "decode_layer: fused qkv of ", a[0].size(1), " columns");
    q = a[0].narrow(1, 0, H * D);
    k = a[0].narrow(1, H * D, G * D);
    v = a[0].narrow(1, (H + G) * D, G * D);
  } else {
    q = a[0];
    k = a[1];
    v = a[2];
  }
  TORCH_CHECK(q.size(1) == H * D && k.size(1) == G * D && v.size(1) == G * D, "decode_layer: q, k, v of ", q.size(1),
              ", ", k.size(1), ", ", v.size(1), " columns for ", H, " heads and ", G, " key heads of ", D);
  q = q.unflatten(1, {H, D});  // (B, H, D)
  k = k.unflatten(1, {G, D});
  v = v.unflatten(1, {G, D});
  if (q_norm_w.has_value() && q_norm_w->defined()) {
    q = rms_norm(q, *q_norm_w, eps[2]);
    k = rms_norm(k, *k_norm_w, eps[2]);
  }
  at::Tensor k_col = k_cache.select(2, t), v_col = v_cache.select(2, t);  // (B, G, D)
  v_col.copy_(v);
  at::Tensor q4;
  if (cos.has_value() && cos->defined()) {
    TORCH_CHECK(cos->is_contiguous() && sin->is_contiguous() && cos->size(0) == B && cos->size(1) == D &&
                    sin->sizes() == cos->sizes(),
                "decode_layer: rotary tables must be contiguous (B, D)");
    q4 = at::empty({B, H, 1, D}, x.options());
    const float* cp = cos->data_ptr<float>();
    const float* sp = sin->data_ptr<float>();
    const float* qp = q.data_ptr<float>();
    const float* kp = k.data_ptr<float>();
    float* q4p = q4.data_ptr<float>();
    float* kc = k_col.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < H; ++i) {
        rotate_row(qp + b * q.stride(0) + i * q.stride(1), D, cp + b * D, sp + b * D, q4p + (b * H + i) * D);
      }
      for (int64_t g = 0; g < G; ++g) {
        rotate_row(kp + b * k.stride(0) + g * k.stride(1), D, cp + b * D, sp + b * D,
                   kc + b * k_col.stride(0) + g * k_col.stride(1));
      }
    }
  } else {
    k_col.copy_(k);
    q4 = q.unsqueeze(2);
  }
  const int64_t S = t + 1 - first;
  at::Tensor att = decode_attention(q4, k_cache.narrow(2, first, S), v_cache.narrow(2, first, S),
                                    keymask.narrow(3, first, S));
  const at::Tensor o = o_out.select(1, col);
  linear_group(att.view({B, H * D}), {o_w}, {o_b}, {o}, split[1] != 0);
  add_rows(x, o);
  h = block_norm(x, norm2_w, norm2_b, eps[1], layer_norm);
  const std::vector<at::Tensor> m = columns(mlp_outs, col);
  linear_group(h, mlp_ws, optional_list(mlp_bs), m, split[2] != 0);
  const at::Tensor hidden = act == 0 ? silu_mul(m[0], m[1]) : act == 1 ? gelu_tanh(m[0]) : at::gelu(m[0]);
  const at::Tensor d = down_out.select(1, col);
  linear_group(hidden, {down_w}, {down_b}, {d}, split[3] != 0);
  add_rows(x, d);
}

// --- a whole decode step in one call ---------------------------------------------------------------------

// One decode step of a model in one call from Python: the token embeddings (plus learned positions, or the rotary
// tables at each row's position), every block through decode_layer, the final norm and the LM head, as
// textrl.engine.Engine._step computes them op by op with the same kernels, in the same order. The arguments that
// stay the same for a whole session (weights, the cache, the record's buffers) are given once, when the plan is
// made (textrl.engine.Engine._fused_plan); a step passes only its tokens and position. Between the blocks of a
// step no Python runs: each Python-level call after a step's large matmuls meets cold caches, and a step made of
// one call instead of ~30 pays that once.
struct DecodeLayerArgs {
  int64_t window;  // the attention window, or -1 for none
  c10::optional<at::Tensor> norm1_w, norm1_b;
  std::vector<at::Tensor> attn_ws;
  c10::List<c10::optional<at::Tensor>> attn_bs;
  std::vector<at::Tensor> attn_outs;
  c10::optional<at::Tensor> q_norm_w, k_norm_w;
  at::Tensor k_cache, v_cache, keymask, o_w;
  c10::optional<at::Tensor> o_b;
  at::Tensor o_out;
  c10::optional<at::Tensor> norm2_w, norm2_b;
  std::vector<at::Tensor> mlp_ws;
  c10::List<c10::optional<at::Tensor>> mlp_bs;
  std::vector<at::Tensor> mlp_outs;
  at::Tensor down_w;
  c10::optional<at::Tensor> down_b;
  at::Tensor down_out;
  int64_t n_head, act;
  bool layer_norm;
  std::vector<double> eps;
  std::vector<int64_t> split;
};

struct DecodePlan : torch::CustomClassHolder {
  at::Tensor embed, keymask;
  c10::optional<at::Tensor> positions, cos, sin, norm_w, norm_b, head_w, head_b;
  double norm_eps;
  bool norm_ln, head_split;
  std::vector<DecodeLayerArgs> layers;

  // embed (V, E): the token embeddings; positions (P, E): learned position embeddings, or cos and sin (N, D): the
  // rotary tables (the sine signed, as textrl.ops.rotate takes it) for positions 0..N-1; norm_*: the final
  // norm; head_w (E, V), head_b: the LM head as a matmul's weight (none: the caller computes the logits from the
  // hidden states); head_split: through mm_group_into; keymask (B, 1, 1, max_len): the cache's key mask.
  DecodePlan(at::Tensor embed, c10::optional<at::Tensor> positions, c10::optional<at::Tensor> cos,
             c10::optional<at::Tensor> sin, c10::optional<at::Tensor> norm_w, c10::optional<at::Tensor> norm_b,
             double norm_eps, bool norm_ln, c10::optional<at::Tensor> head_w, c10::optional<at::Tensor> head_b,
             bool head_split, at::Tensor keymask)
      : embed(std::move(embed)), keymask(std::move(keymask)), positions(std::move(positions)), cos(std::move(cos)),
        sin(std::move(sin)), norm_w(std::move(norm_w)), norm_b(std::move(norm_b)), head_w(std::move(head_w)),
        head_b(std::move(head_b)), norm_eps(norm_eps), norm_ln(norm_ln), head_split(head_split) {
    TORCH_CHECK(this->embed.dim() == 2 && this->embed.scalar_type() == at::kFloat && this->embed.device().is_cpu(),
                "DecodePlan: the embeddings must be a float32 CPU (V, E) tensor, got ", this->embed.sizes());
    TORCH_CHECK(this->cos.has_value() == this->sin.has_value(), "DecodePlan: give both rotary tables or neither");
  }

  // One block's decode_layer arguments after the per-step ones (x, col, t, first, cos, sin), and its window.
  void add_layer(int64_t window, c10::optional<at::Tensor> norm1_w, c10::optional<at::Tensor> norm1_b,
                 std::vector<at::Tensor> attn_ws, c10::List<c10::optional<at::Tensor>> attn_bs,
                 std::vector<at::Tensor> attn_outs, c10::optional<at::Tensor> q_norm_w,
                 c10::optional<at::Tensor> k_norm_w, at::Tensor k_cache, at::Tensor v_cache, at::Tensor keymask,
                 at::Tensor o_w, c10::optional<at::Tensor> o_b, at::Tensor o_out, c10::optional<at::Tensor> norm2_w,
                 c10::optional<at::Tensor> norm2_b, std::vector<at::Tensor> mlp_ws,
                 c10::List<c10::optional<at::Tensor>> mlp_bs, std::vector<at::Tensor> mlp_outs, at::Tensor down_w,
                 c10::optional<at::Tensor> down_b, at::Tensor down_out, int64_t n_head, int64_t act, bool layer_norm,
                 std::vector<double> eps, std::vector<int64_t> split) {
    layers.push_back({window, std::move(norm1_w), std::move(norm1_b), std::move(attn_ws), std::move(attn_bs),
                      std::move(attn_outs), std::move(q_norm_w), std::move(k_norm_w), std::move(k_cache),
                      std::move(v_cache), std::move(keymask), std::move(o_w), std::move(o_b), std::move(o_out),
                      std::move(norm2_w), std::move(norm2_b), std::move(mlp_ws), std::move(mlp_bs),
                      std::move(mlp_outs), std::move(down_w), std::move(down_b), std::move(down_out), n_head, act,
                      layer_norm, std::move(eps), std::move(split)});
  }

  // Feed tokens (B,) at cache column t: each row's position pos (B,) moves on by one (in place), the column joins
  // the key mask, the blocks write their linear outputs into column ``col`` of their buffers and the tokens go
  // into ids[:, t] (a rollout record's; none without one). Returns (logits (B, V), into ``out`` when given;
  // none without a head, hidden (B, E): the final norm's output).
  std::tuple<c10::optional<at::Tensor>, at::Tensor> step(at::Tensor tokens, at::Tensor pos, int64_t t, int64_t col,
                                          c10::optional<at::Tensor> ids, c10::optional<at::Tensor> out) {
    TORCH_CHECK(!layers.empty(), "DecodePlan.step: the plan has no layers");
    TORCH_CHECK(tokens.dim() == 1 && tokens.scalar_type() == at::kLong && pos.sizes() == tokens.sizes() &&
                    pos.scalar_type() == at::kLong && tokens.size(0) == keymask.size(0),
                "DecodePlan.step: tokens and positions must be int64 (B,) for the cache's ", keymask.size(0),
                " rows, got ", tokens.sizes(), " and ", pos.sizes());
    TORCH_CHECK(0 <= t && t < keymask.size(3), "DecodePlan.step: column ", t, " outside a cache of ",
                keymask.size(3));
    const int64_t V = embed.size(0);
    const at::Tensor tok = tokens.contiguous();  // a column of a (B, S) tensor is strided
    const int64_t* tp = tok.data_ptr<int64_t>();
    for (int64_t b = 0; b < tok.size(0); ++b) {
      TORCH_CHECK(0 <= tp[b] && tp[b] < V, "DecodePlan.step: token ", tp[b], " of row ", b,
                  " is outside the vocabulary of ", V);
    }
    if (positions.has_value() || cos.has_value()) {  // checked before anything changes: the step's positions
      const at::Tensor& table = positions.has_value() ? *positions : *cos;
      const at::Tensor before = pos.contiguous();
      const int64_t* pp = before.data_ptr<int64_t>();
      for (int64_t b = 0; b < before.size(0); ++b) {
        TORCH_CHECK(0 <= pp[b] + 1 && pp[b] + 1 < table.size(0), "DecodePlan.step: position ", pp[b] + 1, " of row ",
                    b, " is outside the model's table of ", table.size(0));
      }
    }
    pos.add_(1);
    const at::Tensor current = pos.contiguous();  // each row's position now
    keymask.select(3, t).fill_(true);
    at::Tensor x = at::index_select(embed, 0, tok);  // (B, E), a tensor of its own: the blocks update it in place
    c10::optional<at::Tensor> c, s;
    if (positions.has_value()) x = x + at::index_select(*positions, 0, current);
    if (cos.has_value()) {
      c = at::index_select(*cos, 0, current);  // (B, D)
      s = at::index_select(*sin, 0, current);
    }
    for (const DecodeLayerArgs& l : layers) {
      const int64_t first = l.window < 0 ? 0 : std::max<int64_t>(0, t + 1 - l.window);
      decode_layer(x, col, t, first, c, s, l.norm1_w, l.norm1_b, l.attn_ws, l.attn_bs, l.attn_outs, l.q_norm_w,
                   l.k_norm_w, l.k_cache, l.v_cache, l.keymask, l.o_w, l.o_b, l.o_out, l.norm2_w, l.norm2_b, l.mlp_ws,
                   l.mlp_bs, l.mlp_outs, l.down_w, l.down_b, l.down_out, l.n_head, l.act, l.layer_norm, l.eps,
                   l.split);
    }
    if (ids.has_value()) ids->select(1, t).copy_(tok);
    at::Tensor hidden = block_norm(x, norm_w, norm_b, norm_eps, norm_ln);
    if (!head_w.has_value()) return {c10::nullopt, hidden};
    at::Tensor logits = out.has_value() ? *out : at::empty({x.size(0), head_w->size(1)}, x.options());
    linear_group(hidden, {*head_w}, {head_b}, {logits}, head_split);
    return {logits, hidden};
  }
};

// One sampling step of a rollout, as textrl.rollout.collect_rollout draws it in Python (textrl.policy.shape_logits
// without top-k or top-p, a softmax, textrl.policy.sample's inverse-CDF draw, the drawn token's log-probability):
// the same ATen ops in the same order, so the same tokens and log-probabilities bit for bit, in one call from
// Python instead of about fifteen. logits (B, V') of which the first n columns are actions; suppressed: token
// ids never drawn (may be empty); the tokens (B,) and their log-probabilities (B,) go into tokens and logprobs.
void sample_into(const at::Tensor& logits, int64_t n, const at::Tensor& suppressed, double temperature,
                 c10::optional<at::Generator> generator, at::Tensor tokens, at::Tensor logprobs) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && 0 < n && n <= logits.size(1),
              "sample_into: logits must be float32 (B, V) with 0 < n <= V, got ", logits.sizes(), " and n = ", n);
  TORCH_CHECK(tokens.dim() == 1 && tokens.size(0) == logits.size(0) && tokens.scalar_type() == at::kLong &&
                  logprobs.sizes() == tokens.sizes() && logprobs.scalar_type() == at::kFloat,
              "sample_into: tokens (int64) and logprobs (float32) must be (B,) for B = ", logits.size(0));
  TORCH_CHECK(temperature > 0, "sample_into: temperature must be > 0, got ", temperature);
  at::Tensor x = logits.narrow(1, 0, n);
  if (suppressed.numel() > 0) x = x.index_fill(-1, suppressed, -std::numeric_limits<double>::infinity());
  if (temperature != 1.0) x = x / temperature;
  const at::Tensor probs = at::softmax(x, -1);
  const at::Tensor cdf = probs.cumsum(-1);
  const at::Tensor u = at::rand({probs.size(0), 1}, generator, cdf.options()) * cdf.narrow(1, n - 1, 1);
  const at::Tensor action = at::searchsorted(cdf, u, false, true).squeeze(1).clamp_max(n - 1);
  tokens.copy_(action);
  at::log_out(logprobs, probs.gather(1, action.unsqueeze(1)).squeeze(1));
}

bool has_direct() { return kDirect; }

}  // namespace

TORCH_LIBRARY(textrl, m) {
  m.def("has_direct() -> bool", &has_direct);
  m.def("split_mm(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("split_mm_out(Tensor x, Tensor w, Tensor? bias, Tensor(a!) out) -> ()");
  m.def("split_mm_cat(Tensor x, Tensor[] ws, Tensor?[] biases) -> Tensor");
  m.def("split_mm_group_out(Tensor x, Tensor[] ws, Tensor?[] biases, Tensor(a!)[] outs) -> ()");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("gelu_tanh(Tensor x) -> Tensor");
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def(
      "decode_layer(Tensor(a!) x, int col, int t, int first, Tensor? cos, Tensor? sin, Tensor? norm1_w, "
      "Tensor? norm1_b, Tensor[] attn_ws, Tensor?[] attn_bs, Tensor(b!)[] attn_outs, Tensor? q_norm_w, "
      "Tensor? k_norm_w, Tensor(c!) k_cache, Tensor(d!) v_cache, Tensor keymask, Tensor o_w, Tensor? o_b, "
      "Tensor(e!) o_out, Tensor? norm2_w, Tensor? norm2_b, Tensor[] mlp_ws, Tensor?[] mlp_bs, "
      "Tensor(f!)[] mlp_outs, Tensor down_w, Tensor? down_b, Tensor(g!) down_out, int n_head, int act, "
      "bool layer_norm, float[] eps, int[] split) -> ()");
  m.def(
      "sample_into(Tensor logits, int n, Tensor suppressed, float temperature, Generator? generator, "
      "Tensor(a!) tokens, Tensor(b!) logprobs) -> ()");
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
                       c10::optional<at::Tensor>, c10::optional<at::Tensor>, double, bool, c10::optional<at::Tensor>,
                       c10::optional<at::Tensor>, bool, at::Tensor>())
      .def("add_layer", &DecodePlan::add_layer)
      .def("step", &DecodePlan::step);
}

TORCH_LIBRARY_IMPL(textrl, CPU, m) {
  m.impl("split_mm", &split_mm);
  m.impl("split_mm_out", &split_mm_out);
  m.impl("split_mm_cat", &split_mm_cat);
  m.impl("split_mm_group_out", &split_mm_group_out);
  m.impl("decode_attention", &decode_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("gelu_tanh", &gelu_tanh);
  m.impl("rms_norm_backward", &rms_norm_backward);
  m.impl("silu_mul_backward", &silu_mul_backward);
  m.impl("decode_layer", &decode_layer);
  m.impl("sample_into", &sample_into);
}
