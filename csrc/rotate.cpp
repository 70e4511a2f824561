// Key/query rotation (op `zipcache::hadamard_rotate`): y = x H / sqrt(D) along the last
// dimension, H Sylvester's +-1 Hadamard matrix, D a power of two.
//
// Same bits as the PyTorch reference zipcache_vllm/quant/rotation.py::hadamard_rotate
// (a float64 matmul by H, one float64 scaling, one rounding to float32) followed by
// `.to(dtype)`: the fast Walsh-Hadamard butterfly below adds in float64 too, and every
// partial sum of +-x is exact there (as in the matmul) unless a row mixes magnitudes
// more than 2^23 apart, so the sums, the scaled results and the roundings agree. One
// row at a time, so the bits never depend on how many rows a call holds. On AVX-512
// CPUs the rows go through rotate_avx512.cpp (the same butterfly, eight doubles per
// register); `isa` = "scalar" (or "avx2") keeps the portable loop, for the tests.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "host.h"
#include "zc_kernels.h"

namespace zc {
namespace {

using at::Tensor;

template <typename T>
constexpr FloatKind kind_of() {
  return std::is_same_v<T, float> ? FloatKind::f32 : std::is_same_v<T, c10::BFloat16> ? FloatKind::bf16 : FloatKind::f16;
}

template <typename In, typename Out>
void rotate_row_portable(const In* xr, Out* yr, int64_t D, double* a) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  for (int64_t j = 0; j < D; ++j) a[j] = static_cast<double>(static_cast<float>(xr[j]));
  for (int64_t h = 1; h < D; h <<= 1)
    for (int64_t i = 0; i < D; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const double u = a[j], w = a[j + h];
        a[j] = u + w;
        a[j + h] = u - w;
      }
  for (int64_t j = 0; j < D; ++j) yr[j] = static_cast<Out>(static_cast<float>(a[j] * scale));
}

template <typename In, typename Out>
void rotate_rows(const In* x, Out* y, int64_t n, int64_t D, bool vector) {
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    std::vector<double> buf(static_cast<size_t>(D));
    for (int64_t r = begin; r < end; ++r) {
      const In* xr = x + r * D;
      Out* yr = y + r * D;
      if (!vector || !avx512::rotate_row(xr, kind_of<In>(), yr, kind_of<Out>(), D))
        rotate_row_portable(xr, yr, D, buf.data());
    }
  });
}

Tensor hadamard_rotate(const Tensor& x, at::ScalarType dtype, const std::string& isa) {
  // Kept although kernels.ops.hadamard_rotate checks it too: DecodePlan.rotate calls this op
  // directly, and the butterfly's a[j + h] stays inside the row only for a power of two.
  const int64_t D = x.size(-1);
  TORCH_CHECK(D > 0 && (D & (D - 1)) == 0, "Hadamard rotation needs a power-of-two size, got ", D);
  Tensor xc = x.contiguous();
  Tensor y = at::empty(x.sizes(), x.options().dtype(dtype));
  const int64_t n = D ? xc.numel() / D : 0;
  const bool vector = resolve_isa(isa) == "avx512";
  auto with_out = [&](auto in_tag) {
    using In = decltype(in_tag);
    const In* xp = xc.data_ptr<In>();
    switch (dtype) {
      case at::kFloat: return rotate_rows(xp, y.data_ptr<float>(), n, D, vector);
      case at::kBFloat16: return rotate_rows(xp, y.data_ptr<c10::BFloat16>(), n, D, vector);
      case at::kHalf: return rotate_rows(xp, y.data_ptr<c10::Half>(), n, D, vector);
      default: TORCH_CHECK(false, "output dtype must be float32, bfloat16 or float16, got ", dtype);
    }
  };
  switch (x.scalar_type()) {
    case at::kFloat: with_out(float{}); break;
    case at::kBFloat16: with_out(c10::BFloat16{}); break;
    case at::kHalf: with_out(c10::Half{}); break;
    default: TORCH_CHECK(false, "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return y;
}

}  // namespace
}  // namespace zc

TORCH_LIBRARY_FRAGMENT(zipcache, m) { m.def("hadamard_rotate(Tensor x, ScalarType dtype, str isa=\"\") -> Tensor"); }

TORCH_LIBRARY_IMPL(zipcache, CPU, m) { m.impl("hadamard_rotate", &zc::hadamard_rotate); }
