// Dequantize whole pages to float32 (op `zipcache::dequantize_pages`), for the prefill
// path that attends a request's packed prefix as one dense float32 attention.
//
// Output: keys and values [N, H, B, D] in storage order (salient tokens first, then
// the rest: the order of the code rows in the page; attention does not depend on the
// order of its keys as long as the values follow them). Bit-identical to the PyTorch
// reference `quant/block.py::unpack_dequantize_blocks(order="storage")`:
//
//   key   k_ij = code_ij * s_j + m_j                (channelwise params per precision group)
//   value v_ij = (code_ij * step_i + min_i) * c_j   (CSTQ: per-token params, channel scale)
//
// each product and sum rounded to float32 on its own, as the reference's separate tensor
// ops do (this file is compiled without FMA, so nothing is contracted).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "host.h"

namespace zc {
namespace {

using at::Tensor;

inline float half_at(const uint8_t* base, int64_t i) {
  c10::Half h;
  std::memcpy(&h.x, base + 2 * i, 2);
  return static_cast<float>(h);
}

// Code j (bits wide) of a little-endian bit stream (quant/packing.py).
inline uint32_t get_code(const uint8_t* row, int64_t j, int bits, int64_t row_bytes) {
  const int64_t bit = j * bits, byte = bit >> 3;
  uint32_t word = row[byte];
  if (byte + 1 < row_bytes) word |= static_cast<uint32_t>(row[byte + 1]) << 8;
  return (word >> (bit & 7)) & ((1u << bits) - 1u);
}

// One head section -> k, v [B, D] (storage order).
void dequantize_head(const uint8_t* head, const PageLayout& L, float* k, float* v) {
  const int64_t B = L.block_size, D = L.head_size;
  const uint8_t* vtp = head + L.off[V_TOKEN_PARAMS];  // fp16 [2, B]: min, step
  const uint8_t* cs = head + L.off[V_CHANNEL_SCALE];  // fp16 [D]
  float c[MAX_HEAD], km[MAX_HEAD], ks[MAX_HEAD];
  for (int64_t j = 0; j < D; ++j) c[j] = half_at(cs, j);
  struct Group { int64_t lo, hi; int bits; int kc, kp, vc; };
  const Group groups[2] = {{0, L.n_hi, int(L.hi_bits), K_HI_CODES, K_HI_PARAMS, V_HI_CODES},
                           {L.n_hi, B, int(L.lo_bits), K_LO_CODES, K_LO_PARAMS, V_LO_CODES}};
  for (const Group& gr : groups) {
    if (gr.hi == gr.lo) continue;
    const int64_t row_bytes = D * gr.bits / 8;
    const uint8_t* kp = head + L.off[gr.kp];  // fp16 [2, D]: min, scale
    for (int64_t j = 0; j < D; ++j) {
      km[j] = half_at(kp, j);
      ks[j] = half_at(kp, D + j);
    }
    for (int64_t i = gr.lo; i < gr.hi; ++i) {
      const uint8_t* krow = head + L.off[gr.kc] + (i - gr.lo) * row_bytes;
      const uint8_t* vrow = head + L.off[gr.vc] + (i - gr.lo) * row_bytes;
      const float vmin = half_at(vtp, i), vstep = half_at(vtp, B + i);
      float* ko = k + i * D;
      float* vo = v + i * D;
      for (int64_t j = 0; j < D; ++j) {
        const float kprod = static_cast<float>(get_code(krow, j, gr.bits, row_bytes)) * ks[j];
        ko[j] = kprod + km[j];
        const float vprod = static_cast<float>(get_code(vrow, j, gr.bits, row_bytes)) * vstep;
        const float vdq = vprod + vmin;
        vo[j] = vdq * c[j];
      }
    }
  }
}

std::tuple<Tensor, Tensor> dequantize_pages(const Tensor& pages, std::vector<int64_t> layout,
                                            std::vector<int64_t> offsets) {
  const PageLayout L = parse_layout(layout, offsets);  // pages: checked by kernels.ops.dequantize_pages
  const Tensor p = pages.contiguous();
  const int64_t N = p.size(0), H = L.num_kv_heads, B = L.block_size, D = L.head_size;
  Tensor k = at::empty({N, H, B, D}, p.options().dtype(at::kFloat));
  Tensor v = at::empty({N, H, B, D}, p.options().dtype(at::kFloat));
  const uint8_t* pp = p.data_ptr<uint8_t>();
  float* kp = k.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  // A head section is B * D elements; several per task keep one page on one thread.
  const int64_t grain = std::max<int64_t>(1, (SERIAL_WORK / 8) / (B * D));
  at::parallel_for(0, N * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      dequantize_head(pp + (i / H) * L.page_bytes + (i % H) * L.head_bytes, L, kp + i * B * D,
                      vp + i * B * D);
  });
  return {k, v};
}

}  // namespace
}  // namespace zc

TORCH_LIBRARY_FRAGMENT(zipcache, m) {
  m.def("dequantize_pages(Tensor pages, int[] layout, int[] offsets) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(zipcache, CPU, m) { m.impl("dequantize_pages", &zc::dequantize_pages); }
