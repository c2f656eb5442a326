// textrl's CPU kernels, built on first use by textrl/kernels.py (torch.utils.cpp_extension.load).
//
// split_mm: a matmul with few rows (a decode step's B tokens) split by output columns over the intra-op
// threads, each chunk one single-threaded BLAS call. With few rows, the BLAS library's own threading
// splits the rows, and every thread then packs the whole weight matrix for its handful of rows; split by
// columns, each thread packs only its own share of the weight, once.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace {

// out = x @ w (+ bias): x (M, K), w (K, N) of any strides, bias (N,) or none, out (M, N) with unit column stride.
void split_mm_into(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && out.dim() == 2, "split_mm: x, w and out must be 2-D");
  TORCH_CHECK(x.size(1) == w.size(0), "split_mm: x is ", x.sizes(), " but w is ", w.sizes());
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == w.size(1), "split_mm: out is ", out.sizes(),
              ", expected ", x.size(0), " x ", w.size(1));
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && out.device().is_cpu(), "split_mm: CPU tensors only");
  const int64_t N = w.size(1);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / 64));
  // chunk widths rounded to 16 columns (a SIMD multiple), the last one takes the rest
  const int64_t step = ((N + parts - 1) / parts + 15) / 16 * 16;
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    // below autograd on every thread (grad mode is per thread): the chunks are plain CPU matmuls
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t lo = i * step, width = std::min(N, lo + step) - lo;
      if (width <= 0) continue;
      at::Tensor o = out.narrow(1, lo, width);
      at::Tensor wi = w.narrow(1, lo, width);
      if (bias.has_value() && bias->defined()) {
        at::addmm_out(o, bias->narrow(0, lo, width), x, wi);
      } else {
        at::mm_out(o, x, wi);
      }
    }
  });
}

at::Tensor split_mm(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  at::Tensor out = at::empty({x.size(0), w.size(1)}, x.options());
  split_mm_into(x, w, bias, out);
  return out;
}

void split_mm_out(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, at::Tensor out) {
  split_mm_into(x, w, bias, out);
}

}  // namespace

TORCH_LIBRARY(textrl, m) {
  m.def("split_mm(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("split_mm_out(Tensor x, Tensor w, Tensor? bias, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(textrl, CPU, m) {
  m.impl("split_mm", &split_mm);
  m.impl("split_mm_out", &split_mm_out);
}
