// Host side of the zipcache CPU kernels: torch op registration (namespace
// `zipcache`), argument checks, work partitioning, run-time ISA dispatch,
// the split-K log-sum-exp merge, and the bit-exact quantize/pack of full blocks.
//
// Argument checks: the host wrappers in zipcache_vllm/kernels/ops.py check shapes,
// dtypes, strides and devices (ValueError) before calling an op, and the ops trust
// them. What stays here is what memory safety needs and no wrapper checks: the layout
// vector (parse_layout: the fixed-size buffers and code widths of the kernels), and
// attend_packed's index values (block ids, lengths), checked in the op's one pass over
// them as TORCH_CHECK_VALUE (also a Python ValueError) to keep the hot path free of
// extra tensor ops. decode.cpp has its own note.
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <omp.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/mul.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "host.h"
#include "uniform.h"
#include "zc_kernels.h"

namespace zc {

// --------------------------------------------------------------------------- layout
// A few integer compares per call, kept because the kernels size stack buffers by MAX_HEAD /
// MAX_BLOCK, run 8-wide loops over D and B, and pack only these code widths: a layout
// outside them would write past a buffer.
PageLayout parse_layout(const std::vector<int64_t>& layout, const std::vector<int64_t>& offsets) {
  TORCH_CHECK(layout.size() == 8, "layout must be [B, D, H, hi_bits, lo_bits, n_hi, head_bytes, page_bytes]");
  TORCH_CHECK(offsets.size() == NUM_SECTIONS, "offsets must list the ", int(NUM_SECTIONS), " section offsets");
  PageLayout L;
  L.block_size = layout[0];
  L.head_size = layout[1];
  L.num_kv_heads = layout[2];
  L.hi_bits = layout[3];
  L.lo_bits = layout[4];
  L.n_hi = layout[5];
  L.head_bytes = layout[6];
  L.page_bytes = layout[7];
  for (int i = 0; i < NUM_SECTIONS; ++i) L.off[i] = offsets[i];
  auto ok_bits = [](int64_t b) { return b == 2 || b == 3 || b == 4 || b == 8; };
  TORCH_CHECK(ok_bits(L.hi_bits) && ok_bits(L.lo_bits), "bits must be 2, 3, 4 or 8");
  TORCH_CHECK(L.head_size % 8 == 0 && L.head_size <= MAX_HEAD, "head size must be a multiple of 8, <= ", MAX_HEAD);
  TORCH_CHECK(L.block_size % 8 == 0 && L.block_size <= MAX_BLOCK, "block size must be a multiple of 8, <= ", MAX_BLOCK);
  TORCH_CHECK(L.n_hi >= 0 && L.n_hi <= L.block_size, "n_hi out of range");
  TORCH_CHECK(L.page_bytes == L.num_kv_heads * L.head_bytes, "page_bytes != H * head_bytes");
  return L;
}

namespace {

std::string detect_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return "avx512";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return "avx2";
#endif
  return "scalar";
}

}  // namespace

// --------------------------------------------------------------------------- ISA
const std::string& best_isa() {
  static const std::string isa = detect_isa();
  return isa;
}

std::string resolve_isa(const std::string& requested) {
  const std::string& best = best_isa();
  std::string isa = requested.empty() || requested == "auto" ? best : requested;
  TORCH_CHECK(isa == "scalar" || isa == "avx2" || isa == "avx512", "unknown isa '", isa,
              "' (choose auto, scalar, avx2, avx512)");
  const int rank_req = isa == "scalar" ? 0 : isa == "avx2" ? 1 : 2;
  const int rank_best = best == "scalar" ? 0 : best == "avx2" ? 1 : 2;
  TORCH_CHECK(rank_req <= rank_best, "isa '", isa, "' is not supported by this CPU (best: ", best, ")");
  return isa;
}

namespace {

using at::Tensor;

using AttendFn = void (*)(const AttnArgs&, const Unit*, int64_t);

AttendFn pick(const std::string& requested) {
  const std::string isa = resolve_isa(requested);
  if (isa == "avx512") return avx512::attend_units;
  if (isa == "avx2") return avx2::attend_units;
  return scalar::attend_units;
}

std::string cpu_isa() { return best_isa(); }

// --------------------------------------------------------------------------- attention
}  // namespace

void packed_attention(const PageLayout& L, const PackedQuery& p, const std::string& isa, float* op,
                      float* lp) {
  const int64_t nreq = p.nreq, Hq = p.num_q_heads, Hk = L.num_kv_heads, D = L.head_size, nq = p.nq;
  const int64_t g = Hq / Hk;
  const int64_t* nbp = p.num_blocks;
  const int64_t* qsp = p.q_start;
  int64_t max_nb = 0, base_units = 0;
  for (int64_t r = 0; r < nreq; ++r) {
    max_nb = std::max(max_nb, nbp[r]);
    if (nbp[r] > 0) base_units += Hk * ((qsp[r + 1] - qsp[r]) * g + MAX_ROWS - 1) / MAX_ROWS;
  }

  // Split-K over blocks only when (request, kv head, row chunk) units are too few
  // to keep every thread busy; partial results are merged by log-sum-exp below.
  // Small calls run in the calling thread: waking a team costs more than the work,
  // and on a busy machine a parallel region waits for a descheduled worker.
  int64_t work = 0;  // multiply-adds (keys + values)
  for (int64_t r = 0; r < nreq; ++r) work += nbp[r] * (qsp[r + 1] - qsp[r]) * Hq * L.block_size * D * 2;
  const int nthreads = work < SERIAL_WORK ? 1 : at::get_num_threads();
  int64_t split_blocks = std::max<int64_t>(max_nb, 1);
  const int64_t target = 4 * static_cast<int64_t>(nthreads);
  if (nthreads > 1 && base_units > 0 && base_units < target) {
    const int64_t want = (target + base_units - 1) / base_units;
    split_blocks = std::max<int64_t>(2, (max_nb + want - 1) / want);
  }
  const int64_t S = std::max<int64_t>(1, (max_nb + split_blocks - 1) / split_blocks);

  std::vector<Unit> units;
  for (int64_t r = 0; r < nreq; ++r) {
    const int64_t rows = (qsp[r + 1] - qsp[r]) * g;
    const int64_t splits = (nbp[r] + split_blocks - 1) / split_blocks;
    for (int64_t s = 0; s < splits; ++s)
      for (int64_t h = 0; h < Hk; ++h)
        for (int64_t r0 = 0, n = 0; r0 < rows; r0 += n) {
          n = row_chunk(rows - r0);
          units.push_back(Unit{r, h, r0, n, s});
        }
  }

  std::vector<float> partial(static_cast<size_t>(S * nq * Hq * (D + 2)));
  AttnArgs a;
  a.L = L;
  a.q = p.qf;
  a.pages = p.pages;
  a.page_stride = p.page_stride;
  a.block_table = p.block_table;
  a.bt_stride = p.bt_stride;
  a.num_blocks = nbp;
  a.q_start = qsp;
  a.num_q_heads = Hq;
  a.group = g;
  a.split_blocks = split_blocks;
  a.partial_split_stride = nq * Hq * (D + 2);
  a.partial = partial.data();
  AttendFn fn = pick(isa);
  const int64_t n_units = static_cast<int64_t>(units.size());
  if (n_units == 1 || nthreads == 1) {
    fn(a, units.data(), n_units);
  } else {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t i = 0; i < n_units; ++i) fn(a, &units[i], 1);
  }

  // Merge splits: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M), lse = M + log L.
  // Cheap (S x rows x D): serial, no second parallel region.
  const float* pp = a.partial;
  const int64_t pstride = a.partial_split_stride;
  for (int64_t r = 0; r < nreq; ++r) {
    const int64_t splits = (nbp[r] + split_blocks - 1) / split_blocks;
    for (int64_t row = qsp[r] * Hq; row < qsp[r + 1] * Hq; ++row) {
      const int64_t qi = row / Hq, h = row % Hq;
      float* o = op + row * D;
      if (splits == 0) {
        std::fill(o, o + D, 0.f);
        lp[h * nq + qi] = -std::numeric_limits<float>::infinity();
        continue;
      }
      float M = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < splits; ++s) M = std::max(M, pp[s * pstride + row * (D + 2)]);
      float Lsum = 0.f;
      std::fill(o, o + D, 0.f);
      for (int64_t s = 0; s < splits; ++s) {
        const float* src = pp + s * pstride + row * (D + 2);
        const float w = std::exp(src[0] - M);
        Lsum += src[1] * w;
        for (int64_t j = 0; j < D; ++j) o[j] += src[2 + j] * w;
      }
      const float inv = 1.f / Lsum;
      for (int64_t j = 0; j < D; ++j) o[j] *= inv;
      lp[h * nq + qi] = M + std::log(Lsum);
    }
  }
}

namespace {

std::tuple<Tensor, Tensor> attend_packed(const Tensor& q, const Tensor& pages, const Tensor& block_table,
                                         const Tensor& num_blocks, const Tensor& query_start_loc,
                                         std::vector<int64_t> layout, std::vector<int64_t> offsets,
                                         double scale, std::string isa) {
  // Shapes, dtypes and strides: checked by kernels.ops.attend_packed_varlen. The index
  // values are checked below (the wrapper leaves them to this pass).
  const PageLayout L = parse_layout(layout, offsets);
  const int64_t nreq = block_table.size(0), Hq = q.size(1), nq = q.size(0);

  Tensor qf = q.to(at::kFloat).mul(scale).contiguous();
  Tensor bt = block_table.to(at::kLong).contiguous();
  Tensor nbt = num_blocks.to(at::kLong).contiguous();
  Tensor qsl = query_start_loc.to(at::kLong).contiguous();
  const int64_t* nbp = nbt.data_ptr<int64_t>();
  const int64_t* qsp = qsl.data_ptr<int64_t>();
  const int64_t* btp = bt.data_ptr<int64_t>();
  const int64_t num_pages = pages.size(0);
  TORCH_CHECK_VALUE(qsp[0] == 0 && qsp[nreq] == nq, "query_start_loc must start at 0 and end at nq=", nq);
  for (int64_t r = 0; r < nreq; ++r) {
    TORCH_CHECK_VALUE(nbp[r] >= 0 && nbp[r] <= bt.size(1), "num_blocks[", r, "]=", nbp[r],
                      " must be in [0, ", bt.size(1), "]");
    TORCH_CHECK_VALUE(qsp[r + 1] >= qsp[r], "query_start_loc must be non-decreasing");
    for (int64_t b = 0; b < nbp[r]; ++b)
      TORCH_CHECK_VALUE(btp[r * bt.size(1) + b] >= 0 && btp[r * bt.size(1) + b] < num_pages,
                        "block id ", btp[r * bt.size(1) + b], " of request ", r, " must be in [0, ",
                        num_pages, ")");
  }
  Tensor out = at::empty({nq, Hq, L.head_size}, qf.options());
  Tensor lse = at::empty({Hq, nq}, qf.options());
  PackedQuery p{qf.data_ptr<float>(), nq, Hq, pages.data_ptr<uint8_t>(), pages.stride(0), num_pages,
                btp, bt.size(1), nbp, qsp, nreq};
  packed_attention(L, p, isa, out.data_ptr<float>(), lse.data_ptr<float>());
  return {out, lse};
}

// --------------------------------------------------------------------------- quantize / pack
// Bit-exact port of quant/uniform.py (uniform.h) + quant/block.py::quantize_pack_blocks.
// Codes of one row of D elements, (x[j] - m[j * stride]) / s[j * stride] (stride 1: one
// (m, s) per channel; stride 0: one for the whole row), packed little-endian, `bits`
// wide, into `row` (zeroed).
inline void pack_row(const float* x, const float* m, const float* s, int64_t stride, int64_t D,
                     int bits, uint8_t* row) {
  const float hi = static_cast<float>((1 << bits) - 1);
  uint8_t c[MAX_HEAD];
  for (int64_t j = 0; j < D; ++j) c[j] = static_cast<uint8_t>(code_of(x[j], m[j * stride], s[j * stride], hi));
  if (bits == 8) {
    std::memcpy(row, c, static_cast<size_t>(D));
  } else if (bits == 4) {
    for (int64_t b = 0; b < D / 2; ++b) row[b] = static_cast<uint8_t>(c[2 * b] | (c[2 * b + 1] << 4));
  } else if (bits == 2) {
    for (int64_t b = 0; b < D / 4; ++b)
      row[b] = static_cast<uint8_t>(c[4 * b] | (c[4 * b + 1] << 2) | (c[4 * b + 2] << 4) | (c[4 * b + 3] << 6));
  } else {
    for (int64_t j = 0; j < D; ++j) {  // 3 bits: codes straddle bytes
      const int64_t bit = j * bits;
      row[bit >> 3] |= static_cast<uint8_t>(c[j] << (bit & 7));
      if ((bit & 7) + bits > 8) row[(bit >> 3) + 1] |= static_cast<uint8_t>(c[j] >> (8 - (bit & 7)));
    }
  }
}

inline void put_half(uint8_t* dst, int64_t i, c10::Half h) {
  std::memcpy(dst + 2 * i, &h.x, 2);
}

void pack_head(const float* k, const float* v, const bool* sal, const PageLayout& L, int64_t k_tok_stride,
               int64_t v_tok_stride, uint8_t* out) {
  const int64_t B = L.block_size, D = L.head_size, n_hi = L.n_hi;
  std::vector<int64_t> order;
  order.reserve(B);
  for (int64_t t = 0; t < B; ++t) if (sal[t]) order.push_back(t);
  for (int64_t t = 0; t < B; ++t) if (!sal[t]) order.push_back(t);
  std::vector<float> ks(B * D), vn(B * D), c(D, 0.f), chf(D);
  for (int64_t i = 0; i < B; ++i) {
    const float* kr = k + order[i] * k_tok_stride;
    const float* vr = v + order[i] * v_tok_stride;
    float* ksr = ks.data() + i * D;
    float* vnr = vn.data() + i * D;
    for (int64_t j = 0; j < D; ++j) {
      ksr[j] = sanitize(kr[j]);
      vnr[j] = sanitize(vr[j]);
      c[j] = std::max(c[j], std::fabs(vnr[j]));
    }
  }
  for (int64_t j = 0; j < D; ++j) {
    c10::Half ch = fp16_round(std::sqrt(c[j]), true);
    if (static_cast<float>(ch) < EPS) ch = c10::Half(1.f);
    put_half(out + L.off[V_CHANNEL_SCALE], j, ch);
    chf[j] = static_cast<float>(ch);
  }
  for (int64_t i = 0; i < B; ++i) {
    float* vnr = vn.data() + i * D;
    for (int64_t j = 0; j < D; ++j) vnr[j] = vnr[j] / chf[j];
  }

  struct Group { int64_t lo, hi; int bits; int kc, kp, vc; };
  const Group groups[2] = {{0, n_hi, int(L.hi_bits), K_HI_CODES, K_HI_PARAMS, V_HI_CODES},
                           {n_hi, B, int(L.lo_bits), K_LO_CODES, K_LO_PARAMS, V_LO_CODES}};
  uint8_t* vtp = out + L.off[V_TOKEN_PARAMS];
  std::vector<float> kmn(D), kmx(D), kmf(D), ksf(D);
  for (const Group& gr : groups) {
    if (gr.hi == gr.lo) continue;
    const int64_t row_bytes = D * gr.bits / 8;
    // keys: channelwise over the group's tokens (min / max in token order, per channel)
    std::copy(ks.begin() + gr.lo * D, ks.begin() + (gr.lo + 1) * D, kmn.begin());
    std::copy(kmn.begin(), kmn.end(), kmx.begin());
    for (int64_t i = gr.lo + 1; i < gr.hi; ++i) {
      const float* x = ks.data() + i * D;
      for (int64_t j = 0; j < D; ++j) {
        kmn[j] = std::min(kmn[j], x[j]);
        kmx[j] = std::max(kmx[j], x[j]);
      }
    }
    for (int64_t j = 0; j < D; ++j) {
      c10::Half m, s;
      quant_params(kmn[j], kmx[j], gr.bits, m, s);
      put_half(out + L.off[gr.kp], j, m);
      put_half(out + L.off[gr.kp], D + j, s);
      kmf[j] = static_cast<float>(m);
      ksf[j] = static_cast<float>(s);
    }
    for (int64_t i = gr.lo; i < gr.hi; ++i)
      pack_row(ks.data() + i * D, kmf.data(), ksf.data(), 1, D, gr.bits,
               out + L.off[gr.kc] + (i - gr.lo) * row_bytes);
    // values: per token over the channels of v / c
    for (int64_t i = gr.lo; i < gr.hi; ++i) {
      const float* x = vn.data() + i * D;
      float mn = x[0], mx = x[0];
      for (int64_t j = 1; j < D; ++j) {
        mn = std::min(mn, x[j]);
        mx = std::max(mx, x[j]);
      }
      c10::Half m, s;
      quant_params(mn, mx, gr.bits, m, s);
      put_half(vtp, i, m);
      put_half(vtp, B + i, s);
      const float mf = static_cast<float>(m), sf = static_cast<float>(s);
      pack_row(x, &mf, &sf, 0, D, gr.bits, out + L.off[gr.vc] + (i - gr.lo) * row_bytes);
    }
  }
  if (n_hi > 0 && n_hi < B)
    for (int64_t t = 0; t < B; ++t)
      if (sal[t]) out[L.off[MASK] + (t >> 3)] |= static_cast<uint8_t>(1u << (t & 7));
}

Tensor quantize_pack(const Tensor& k, const Tensor& v, const Tensor& salient, std::vector<int64_t> layout,
                     std::vector<int64_t> offsets) {
  const PageLayout L = parse_layout(layout, offsets);
  // Shapes and dtypes (k, v [N, B, H, D]; salient bool [N, H, B] with n_hi per row):
  // checked by kernels.ops.quantize_pack.
  const int64_t B = L.block_size, H = L.num_kv_heads;
  const int64_t N = k.size(0);
  // float32 in the input's strides (a strided view of the staging pool is not copied twice)
  Tensor kf = k.to(at::kFloat), vf = v.to(at::kFloat);
  if (kf.stride(3) != 1) kf = kf.contiguous();
  if (vf.stride(3) != 1) vf = vf.contiguous();
  Tensor sal = salient.contiguous();
  Tensor pages = at::zeros({N, L.page_bytes}, k.options().dtype(at::kByte));
  const float* kp = kf.data_ptr<float>();
  const float* vp = vf.data_ptr<float>();
  const bool* sp = sal.data_ptr<bool>();
  uint8_t* op = pages.data_ptr<uint8_t>();
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / H, h = i % H;
      pack_head(kp + n * kf.stride(0) + h * kf.stride(2), vp + n * vf.stride(0) + h * vf.stride(2),
                sp + (n * H + h) * B, L, kf.stride(1), vf.stride(1), op + n * L.page_bytes + h * L.head_bytes);
    }
  });
  return pages;
}

}  // namespace
}  // namespace zc

TORCH_LIBRARY(zipcache, m) {
  m.def(
      "attend_packed(Tensor q, Tensor pages, Tensor block_table, Tensor num_blocks, Tensor query_start_loc, "
      "int[] layout, int[] offsets, float scale, str isa) -> (Tensor, Tensor)");
  m.def("quantize_pack(Tensor k, Tensor v, Tensor salient, int[] layout, int[] offsets) -> Tensor");
  m.def("cpu_isa() -> str", &zc::cpu_isa);
}

TORCH_LIBRARY_IMPL(zipcache, CPU, m) {
  m.impl("attend_packed", &zc::attend_packed);
  m.impl("quantize_pack", &zc::quantize_pack);
}
