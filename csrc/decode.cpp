// Fused decode step of one layer (op `zipcache::decode_staged`): for R requests with
// one new token each, in one call,
//
//   1. attention of the token's queries over the request's packed pages (the unit
//      kernels of attend_impl.h, dequantizing in registers),
//   2. the new K/V written into the request's staging slot at index s (its count of
//      staged tokens), attention over the staged tokens 0..s (causal: all of them),
//      merged with (1) by log-sum-exp; the output written in the model dtype,
//   3. the saliency accumulators of the slot updated: tokens t < s add the token's
//      probe attention exp(score - lse) summed over the query heads of the KV group,
//      token s starts from it, tokens s < t < C are cleared (stale); the count of probe
//      queries that saw each token likewise (probe[r] is 1 for a probe row, else 0).
//
// A slot holds up to C = blocks * B staged tokens (its capacity: the pool's third
// dimension, StagingLayout.capacity with paged staging): the block being filled and, with
// a saliency delay, the filled blocks that wait for the next blocks' queries to score
// them. C = B is one block, the staging without a delay.
//
// Called once per layer by zipcache_vllm/engine/step.py::apply_decode_rows through
// kernels.DecodePlan.run; the same formula in PyTorch ops is the portable path
// zipcache_vllm/kernels/portable.py::decode_staged, and the tests hold both to the oracle
// zipcache_vllm/kernels/reference.py::decode_staged_ref. A row whose block fills is then
// packed by the caller from the slot, which holds all its tokens and accumulators.
//
// Argument checks: DecodePlan.create checks the step's index tensors once for all
// layers (int64 / float32 [R] and [R, max_blocks], contiguous, rows and slots >= 0,
// slots distinct, 0 <= staged < the plan's capacity, 0 <= num_blocks <= max_blocks, block
// ids >= 0) and passes `bounds`, the exclusive upper bounds of the query rows, slots,
// block ids and staged indices they address. This op does not read them again: per layer
// it checks only the layer's own tensors, which no plan sees (a few integer compares, no
// pass over the data), the staging capacity against the staged bound included.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "host.h"
#include "uniform.h"

namespace zc {
namespace {

using at::Tensor;

template <typename T>
inline float to_f(T x) {
  return static_cast<float>(x);
}

typedef float v8f __attribute__((vector_size(32)));

// sum_j a[j] * b[j] in eight interleaved partial sums (vectorized without -ffast-math).
inline float dot_product(const float* a, const float* b, int64_t D) {
  v8f acc = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t j = 0;
  for (; j + 8 <= D; j += 8) {
    v8f x, y;
    __builtin_memcpy(&x, a + j, sizeof(x));
    __builtin_memcpy(&y, b + j, sizeof(y));
    acc += x * y;
  }
  float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; j < D; ++j) sum += a[j] * b[j];
  return sum;
}

// Row i, head j of a [n, heads, D] tensor with unit inner stride.
template <typename T>
inline T* at3(const Tensor& t, int64_t i, int64_t j) {
  return t.data_ptr<T>() + i * t.stride(0) + j * t.stride(1);
}

// Where one (row, KV head)'s staged tokens live, and how a token's key and value rows ([D])
// are stored (`store`, from the step's dtype T) and read back as float (`load`); its score
// and its count (the count is shared by the heads of the row) are float32 in place.
template <typename P>
struct SlotStage {  // a slot of the staging pool: [C, D] rows at stride s2
  P* kb;
  P* vb;
  int64_t s2;
  float* score;
  float* count;
  template <typename T>
  void store(int64_t t, const T* kn, const T* vn, int64_t D) const {
    P* ks = kb + t * s2;
    P* vs = vb + t * s2;
    for (int64_t j = 0; j < D; ++j) {
      ks[j] = static_cast<P>(to_f(kn[j]));
      vs[j] = static_cast<P>(to_f(vn[j]));
    }
  }
  void load(int64_t t, float* kf, float* vf, int64_t D) const {
    const P* kt = kb + t * s2;
    const P* vt = vb + t * s2;
    for (int64_t j = 0; j < D; ++j) {
      kf[j] = to_f(kt[j]);
      vf[j] = to_f(vt[j]);
    }
  }
  float* sc(int64_t t) const { return score + t; }
  float* cn(int64_t t) const { return count + t; }
  // stale tokens past s whose score and count the step zeroes: all of the slot's C
  int64_t clear_end(int64_t, int64_t C) const { return C; }
};

template <typename P>
struct PagedStage {  // a page run of the cache (layout.StagingLayout, K/V in P): T tokens per page
  uint8_t* base;
  int64_t stride;  // bytes between pages
  const int64_t* ids;  // the run's pages
  int64_t T, h, H, D, voff, soff, coff;
  uint8_t* page(int64_t t) const { return base + ids[t / T] * stride; }
  P* key(int64_t t) const { return reinterpret_cast<P*>(page(t)) + (h * T + t % T) * D; }
  P* value(int64_t t) const { return reinterpret_cast<P*>(page(t) + voff) + (h * T + t % T) * D; }
  template <typename T_>
  void store(int64_t t, const T_* kn, const T_* vn, int64_t) const {
    P* ks = key(t);
    P* vs = value(t);
    for (int64_t j = 0; j < D; ++j) {
      ks[j] = static_cast<P>(to_f(kn[j]));
      vs[j] = static_cast<P>(to_f(vn[j]));
    }
  }
  void load(int64_t t, float* kf, float* vf, int64_t) const {
    const P* kt = key(t);
    const P* vt = value(t);
    for (int64_t j = 0; j < D; ++j) {
      kf[j] = to_f(kt[j]);
      vf[j] = to_f(vt[j]);
    }
  }
  float* sc(int64_t t) const { return reinterpret_cast<float*>(page(t) + soff) + h * T + t % T; }
  float* cn(int64_t t) const { return reinterpret_cast<float*>(page(t) + coff) + t % T; }
  // only the page of token s: the run's later pages may not be allocated yet
  // (StagingLayout.lookahead_blocks) and are never written
  int64_t clear_end(int64_t s, int64_t C) const { return std::min(C, (s / T + 1) * T); }
};

// One row of D elements as 8-bit codes with float16 (min, step): quant/uniform.py's
// quantize of the sanitized row over its own range (the simulator's _fake_int8).
template <typename T>
inline void quantize_row8(const T* x, int64_t D, uint8_t* codes, c10::Half* params) {
  float xs[MAX_HEAD];
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  for (int64_t j = 0; j < D; ++j) {
    xs[j] = sanitize(to_f(x[j]));
    lo = std::min(lo, xs[j]);
    hi = std::max(hi, xs[j]);
  }
  c10::Half m, s;
  quant_params(lo, hi, 8, m, s);
  const float mf = static_cast<float>(m), sf = static_cast<float>(s);
  for (int64_t j = 0; j < D; ++j) codes[j] = static_cast<uint8_t>(code_of(xs[j], mf, sf, 255.f));
  params[0] = m;
  params[1] = s;
}

// quant/uniform.py's dequantize: code * step + min, two roundings (no FMA in this build).
inline void dequantize_row8(const uint8_t* codes, const c10::Half* params, int64_t D, float* out) {
  const float mf = static_cast<float>(params[0]), sf = static_cast<float>(params[1]);
  for (int64_t j = 0; j < D; ++j) {
    const float prod = static_cast<float>(codes[j]) * sf;
    out[j] = prod + mf;
  }
}

struct PagedStage8 {  // a page run of the cache with 8-bit K/V (layout.StagingLayout, kv_bits 8)
  uint8_t* base;
  int64_t stride;
  const int64_t* ids;
  int64_t T, h, H, D, voff, poff, soff, coff;
  uint8_t* page(int64_t t) const { return base + ids[t / T] * stride; }
  int64_t row(int64_t t) const { return h * T + t % T; }
  uint8_t* kcode(int64_t t) const { return page(t) + row(t) * D; }
  uint8_t* vcode(int64_t t) const { return page(t) + voff + row(t) * D; }
  c10::Half* kpar(int64_t t) const { return reinterpret_cast<c10::Half*>(page(t) + poff) + row(t) * 2; }
  c10::Half* vpar(int64_t t) const { return reinterpret_cast<c10::Half*>(page(t) + poff + 4 * H * T) + row(t) * 2; }
  template <typename T_>
  void store(int64_t t, const T_* kn, const T_* vn, int64_t) const {
    quantize_row8(kn, D, kcode(t), kpar(t));
    quantize_row8(vn, D, vcode(t), vpar(t));
  }
  void load(int64_t t, float* kf, float* vf, int64_t) const {
    dequantize_row8(kcode(t), kpar(t), D, kf);
    dequantize_row8(vcode(t), vpar(t), D, vf);
  }
  float* sc(int64_t t) const { return reinterpret_cast<float*>(page(t) + soff) + h * T + t % T; }
  float* cn(int64_t t) const { return reinterpret_cast<float*>(page(t) + coff) + t % T; }
  // only the page of token s: the run's later pages may not be allocated yet
  // (StagingLayout.lookahead_blocks) and are never written
  int64_t clear_end(int64_t s, int64_t C) const { return std::min(C, (s / T + 1) * T); }
};

// stage_of(r, h): the staging of row r, KV head h (a SlotStage, PagedStage or PagedStage8),
// C tokens (staged[r] < C, checked by the plan and the bounds).
template <typename T, typename StageOf>
void decode_rows(const PageLayout& L, const Tensor& q, const Tensor& k, const Tensor& v, const int64_t* rows,
                 int64_t R, const PackedQuery& packed_args, const int64_t* staged, const float* probe,
                 const StageOf& stage_of, int64_t C, const Tensor& out, double scale, const std::string& isa) {
  const int64_t Hq = q.size(1), H = L.num_kv_heads, D = L.head_size, g = Hq / H;
  const float fscale = static_cast<float>(scale);
  const bool out_f32 = out.scalar_type() == at::kFloat;  // else out has q's dtype

  // (1) packed pages: gather the rows' queries (scaled, float), one kernel call.
  std::vector<float> qf(static_cast<size_t>(R * Hq * D));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t h = 0; h < Hq; ++h) {
      const T* src = at3<T>(q, rows[r], h);
      float* dst = qf.data() + (r * Hq + h) * D;
      for (int64_t j = 0; j < D; ++j) dst[j] = to_f(src[j]) * fscale;
    }
  std::vector<int64_t> q_start(static_cast<size_t>(R + 1));
  for (int64_t r = 0; r <= R; ++r) q_start[r] = r;
  std::vector<float> out_p(static_cast<size_t>(R * Hq * D)), lse_p(static_cast<size_t>(Hq * R));
  PackedQuery pq = packed_args;
  pq.qf = qf.data();
  pq.nq = R;
  pq.num_q_heads = Hq;
  pq.q_start = q_start.data();
  pq.nreq = R;
  packed_attention(L, pq, isa, out_p.data(), lse_p.data());

  // (2) + (3) per (row, kv head): stage the token, attend the staged tokens, merge, score.
  const int64_t work = R * H * C * g * D * 2;
  at::parallel_for(0, R * H, work < SERIAL_WORK ? R * H : 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kf(static_cast<size_t>(C * D)), vf(static_cast<size_t>(C * D));
    std::vector<float> sc(static_cast<size_t>(g * C)), prob(static_cast<size_t>(C)), acc(static_cast<size_t>(D));
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = u / H, h = u % H, s = staged[r];
      const auto st = stage_of(r, h);
      const T* kn = at3<T>(k, rows[r], h);
      const T* vn = at3<T>(v, rows[r], h);
      st.store(s, kn, vn, D);
      // The staged tokens 0..s (the new one as stored) as float rows, read once for the g
      // query heads.
      for (int64_t t = 0; t <= s; ++t) st.load(t, kf.data() + t * D, vf.data() + t * D, D);
      std::fill(prob.begin(), prob.end(), 0.f);
      for (int64_t qh = 0; qh < g; ++qh) {
        const int64_t head = h * g + qh;
        const float* qr = qf.data() + (r * Hq + head) * D;
        float* srow = sc.data() + qh * C;
        float m = lse_p[head * R + r];
        for (int64_t t = 0; t <= s; ++t) {
          const float dot = dot_product(qr, kf.data() + t * D, D);
          srow[t] = dot;
          m = std::max(m, dot);
        }
        // m is finite: the staged tokens include at least the new one.
        const float lp = lse_p[head * R + r];
        const float wp = std::isinf(lp) ? 0.f : std::exp(lp - m);
        const float* op = out_p.data() + (r * Hq + head) * D;
        for (int64_t j = 0; j < D; ++j) acc[j] = wp * op[j];
        float den = wp;
        for (int64_t t = 0; t <= s; ++t) {
          const float p = std::exp(srow[t] - m);
          den += p;
          const float* vt = vf.data() + t * D;
          for (int64_t j = 0; j < D; ++j) acc[j] += p * vt[j];
        }
        const float inv = 1.f / den, lse = m + std::log(den);
        if (out_f32) {
          float* o = at3<float>(out, rows[r], head);
          for (int64_t j = 0; j < D; ++j) o[j] = acc[j] * inv;
        } else {
          T* o = at3<T>(out, rows[r], head);
          for (int64_t j = 0; j < D; ++j) o[j] = static_cast<T>(acc[j] * inv);
        }
        if (probe[r] != 0.f)
          for (int64_t t = 0; t <= s; ++t) prob[t] += std::exp(srow[t] - lse);
      }
      const float pr = probe[r];
      for (int64_t t = 0; t < s; ++t) *st.sc(t) += prob[t] * pr;
      *st.sc(s) = prob[s] * pr;
      const int64_t clear = st.clear_end(s, C);
      for (int64_t t = s + 1; t < clear; ++t) *st.sc(t) = 0.f;
      if (h == 0) {
        for (int64_t t = 0; t < s; ++t) *st.cn(t) += pr;
        *st.cn(s) = pr;
        for (int64_t t = s + 1; t < clear; ++t) *st.cn(t) = 0.f;
      }
    }
  });
}

// The step's own tensors, as both ops take them: q [T, Hq, D], k/v [T, H, D], out like q
// (q's dtype or float32), unit inner strides, one dtype for q, k and v.
void check_step_io(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, int64_t H, int64_t D) {
  const auto dt = q.scalar_type();
  TORCH_CHECK_VALUE(q.dim() == 3 && q.size(2) == D && q.size(1) % H == 0 && q.stride(2) == 1,
              "q must be [T, Hq, D] with unit inner stride");
  TORCH_CHECK_VALUE(k.dim() == 3 && k.size(1) == H && k.size(2) == D && k.stride(2) == 1 && v.sizes() == k.sizes() &&
                  v.stride(2) == 1 && k.size(0) == q.size(0),
              "k and v must be [T, H, D] with unit inner stride");
  TORCH_CHECK_VALUE(out.sizes() == q.sizes() && out.stride(2) == 1, "out must be shaped like q");
  TORCH_CHECK_VALUE(k.scalar_type() == dt && v.scalar_type() == dt, "q, k and v must share one dtype");
  TORCH_CHECK_VALUE(out.scalar_type() == dt || out.scalar_type() == at::kFloat, "out must have q's dtype or float32");
}

// The plan's bounds (DecodePlan.run): exclusive upper bounds of what its index tensors address.
void check_bounds(const std::vector<int64_t>& bounds) {
  TORCH_CHECK_VALUE(bounds.size() == 4, "bounds must be [rows_end, slots_end, pages_end, staged_end]");
}

void decode_staged(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& rows, const Tensor& pages,
                   const Tensor& block_table, const Tensor& num_blocks, const Tensor& slots, const Tensor& staged,
                   const Tensor& probe, const Tensor& pool_k, const Tensor& pool_v, const Tensor& pool_score,
                   const Tensor& pool_count, const Tensor& out, std::vector<int64_t> layout,
                   std::vector<int64_t> offsets, double scale, std::string isa, std::vector<int64_t> bounds) {
  const PageLayout L = parse_layout(layout, offsets);
  const int64_t H = L.num_kv_heads, D = L.head_size, B = L.block_size;
  const auto dt = q.scalar_type();
  // The layer's tensors: the loops below index them by the layout's H, D, the pool's
  // capacity C and the plan's rows, slots, block ids and staged indices with raw pointers,
  // so a wrong shape or a tensor smaller than the plan's bounds would read or write outside it.
  check_step_io(q, k, v, out, H, D);
  TORCH_CHECK_VALUE(pool_v.scalar_type() == pool_k.scalar_type(), "pool_k and pool_v must share one dtype");
  TORCH_CHECK_VALUE(pool_k.dim() == 4 && pool_k.size(1) == H && pool_k.size(2) >= B && pool_k.size(2) % B == 0 &&
                  pool_k.size(3) == D && pool_k.stride(3) == 1 && pool_v.sizes() == pool_k.sizes() &&
                  pool_v.strides() == pool_k.strides(),
              "pool_k/pool_v must be [S, H, C, D] (C a positive multiple of B=", B, ") with unit inner stride");
  const int64_t S = pool_k.size(0), C = pool_k.size(2);
  TORCH_CHECK_VALUE(pool_score.scalar_type() == at::kFloat && pool_score.is_contiguous() && pool_score.dim() == 3 &&
                  pool_score.size(0) == S && pool_score.size(1) == H && pool_score.size(2) == C,
              "pool_score must be contiguous float32 [S, H, C]");
  TORCH_CHECK_VALUE(pool_count.scalar_type() == at::kFloat && pool_count.is_contiguous() && pool_count.dim() == 2 &&
                  pool_count.size(0) == S && pool_count.size(1) == C,
              "pool_count must be contiguous float32 [S, C]");
  TORCH_CHECK_VALUE(pages.scalar_type() == at::kByte && pages.dim() == 2 && pages.size(1) == L.page_bytes &&
                  pages.stride(1) == 1 && pages.stride(0) >= L.page_bytes,
              "pages must be uint8 [num_pages, page_bytes] with rows of contiguous bytes");
  const int64_t num_pages = pages.size(0);
  check_bounds(bounds);
  TORCH_CHECK_VALUE(q.size(0) >= bounds[0] && S >= bounds[1] && num_pages >= bounds[2] && C >= bounds[3],
              "the plan addresses query rows < ", bounds[0], ", staging slots < ", bounds[1], ", pages < ",
              bounds[2], " and staged tokens < ", bounds[3], "; this layer has ", q.size(0), ", ", S, ", ",
              num_pages, " and ", C);
  const int64_t R = rows.size(0);
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* nbp = num_blocks.data_ptr<int64_t>();
  const int64_t* slp = slots.data_ptr<int64_t>();
  const int64_t* stp = staged.data_ptr<int64_t>();
  const int64_t* btp = block_table.data_ptr<int64_t>();
  const int64_t bt_stride = block_table.size(1);
  if (R == 0) return;
  PackedQuery pq{nullptr, 0, 0, pages.data_ptr<uint8_t>(), pages.stride(0), num_pages, btp, bt_stride, nbp,
                 nullptr, 0};
  float* psc = pool_score.data_ptr<float>();
  float* pcn = pool_count.data_ptr<float>();
  const float* prp = probe.data_ptr<float>();
  const int64_t pk_s0 = pool_k.stride(0), pk_s1 = pool_k.stride(1), pk_s2 = pool_k.stride(2);
  auto run = [&](auto q_tag, auto pool_tag) {
    using T = decltype(q_tag);
    using P = decltype(pool_tag);
    P* pkb = pool_k.data_ptr<P>();
    P* pvb = pool_v.data_ptr<P>();
    auto stage_of = [&](int64_t r, int64_t h) {
      const int64_t slot = slp[r];
      return SlotStage<P>{pkb + slot * pk_s0 + h * pk_s1, pvb + slot * pk_s0 + h * pk_s1, pk_s2,
                          psc + (slot * H + h) * C, pcn + slot * C};
    };
    decode_rows<T>(L, q, k, v, rp, R, pq, stp, prp, stage_of, C, out, scale, isa);
  };
  auto with_pool = [&](auto q_tag) {
    switch (pool_k.scalar_type()) {
      case at::kFloat: return run(q_tag, float{});
      case at::kBFloat16: return run(q_tag, c10::BFloat16{});
      case at::kHalf: return run(q_tag, c10::Half{});
      default: TORCH_CHECK_VALUE(false, "staging pool must be float32, bfloat16 or float16, got ", pool_k.scalar_type());
    }
  };
  switch (dt) {
    case at::kFloat: return with_pool(float{});
    case at::kBFloat16: return with_pool(c10::BFloat16{});
    case at::kHalf: return with_pool(c10::Half{});
    default: TORCH_CHECK_VALUE(false, "q must be float32, bfloat16 or float16, got ", dt);
  }
}

// decode_staged with the staged tokens in the cache itself (paged staging, see
// zipcache_vllm/layout.py::StagingLayout): row r's up to C staged tokens are in the pages
// stage_ids[r, 0..E-1] of `pages`, T tokens per page, in q's dtype or in 8 bits (kv_bits 8:
// a token's rows are quantized when it is staged, before its own query reads them back).
// `staging` is StagingLayout.args(): [T, E, elt_bytes, v_offset, score_offset,
// count_offset, kv_bits, params_offset, C]. The plan's bounds cover stage_ids too
// (DecodePlan.create).
void decode_paged(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& rows, const Tensor& pages,
                  const Tensor& block_table, const Tensor& num_blocks, const Tensor& stage_ids, const Tensor& staged,
                  const Tensor& probe, const Tensor& out, std::vector<int64_t> layout, std::vector<int64_t> offsets,
                  std::vector<int64_t> staging, double scale, std::string isa, std::vector<int64_t> bounds) {
  const PageLayout L = parse_layout(layout, offsets);
  const int64_t H = L.num_kv_heads, D = L.head_size, B = L.block_size;
  const auto dt = q.scalar_type();
  check_step_io(q, k, v, out, H, D);
  TORCH_CHECK_VALUE(pages.scalar_type() == at::kByte && pages.dim() == 2 && pages.size(1) == L.page_bytes &&
                  pages.stride(1) == 1 && pages.stride(0) >= L.page_bytes && pages.stride(0) % 4 == 0,
              "pages must be uint8 [num_pages, page_bytes] with rows of contiguous bytes, 4-byte aligned");
  TORCH_CHECK_VALUE(staging.size() == 9, "staging must be [T, pages, elt_bytes, v_offset, score_offset, "
                    "count_offset, kv_bits, params_offset, capacity]");
  const int64_t T = staging[0], E = staging[1], elt = staging[2], voff = staging[3], soff = staging[4],
                coff = staging[5], kv_bits = staging[6], poff = staging[7], C = staging[8];
  const bool q8 = kv_bits == 8;
  TORCH_CHECK_VALUE(kv_bits == 0 || q8, "staging kv_bits must be 0 (the model dtype) or 8, got ", kv_bits);
  TORCH_CHECK_VALUE(C >= B && C % B == 0, "staging capacity must be a positive multiple of B=", B, ", got ", C);
  TORCH_CHECK_VALUE(T >= 1 && E >= 1 && T * E >= C && elt == q.element_size() &&
                  voff == H * T * D * (q8 ? 1 : elt) && poff == 2 * voff &&
                  soff == poff + (q8 ? 8 * H * T : 0) && (!q8 || D % 2 == 0) && coff == soff + 4 * H * T &&
                  coff + 4 * T <= L.page_bytes,
              "the staging layout does not fit this page layout and q's dtype");
  const int64_t R = rows.size(0);
  TORCH_CHECK_VALUE(stage_ids.scalar_type() == at::kLong && stage_ids.is_contiguous() && stage_ids.dim() == 2 &&
                  stage_ids.size(0) == R && stage_ids.size(1) == E,
              "stage_ids must be contiguous int64 [R, pages]");
  const int64_t num_pages = pages.size(0);
  check_bounds(bounds);
  TORCH_CHECK_VALUE(q.size(0) >= bounds[0] && num_pages >= bounds[2] && C >= bounds[3],
              "the plan addresses query rows < ", bounds[0], ", pages < ", bounds[2], " and staged tokens < ",
              bounds[3], "; this layer has ", q.size(0), ", ", num_pages, " and a staging capacity of ", C);
  if (R == 0) return;
  const int64_t* btp = block_table.data_ptr<int64_t>();
  PackedQuery pq{nullptr, 0, 0, pages.data_ptr<uint8_t>(), pages.stride(0), num_pages, btp, block_table.size(1),
                 num_blocks.data_ptr<int64_t>(), nullptr, 0};
  uint8_t* base = pages.data_ptr<uint8_t>();
  const int64_t stride = pages.stride(0);
  const int64_t* ids = stage_ids.data_ptr<int64_t>();
  auto run = [&](auto q_tag) {
    using P = decltype(q_tag);
    auto go = [&](const auto& stage_of) {
      decode_rows<P>(L, q, k, v, rows.data_ptr<int64_t>(), R, pq, staged.data_ptr<int64_t>(),
                     probe.data_ptr<float>(), stage_of, C, out, scale, isa);
    };
    if (q8)
      go([&](int64_t r, int64_t h) {
        return PagedStage8{base, stride, ids + r * E, T, h, H, D, voff, poff, soff, coff};
      });
    else
      go([&](int64_t r, int64_t h) { return PagedStage<P>{base, stride, ids + r * E, T, h, H, D, voff, soff, coff}; });
  };
  switch (dt) {
    case at::kFloat: return run(float{});
    case at::kBFloat16: return run(c10::BFloat16{});
    case at::kHalf: return run(c10::Half{});
    default: TORCH_CHECK_VALUE(false, "q must be float32, bfloat16 or float16, got ", dt);
  }
}

}  // namespace
}  // namespace zc

TORCH_LIBRARY_FRAGMENT(zipcache, m) {
  m.def(
      "decode_staged(Tensor q, Tensor k, Tensor v, Tensor rows, Tensor pages, Tensor block_table, "
      "Tensor num_blocks, Tensor slots, Tensor staged, Tensor probe, Tensor(a!) pool_k, Tensor(b!) pool_v, "
      "Tensor(c!) pool_score, Tensor(d!) pool_count, Tensor(e!) out, int[] layout, int[] offsets, float scale, "
      "str isa, int[] bounds) -> ()");
}

TORCH_LIBRARY_FRAGMENT(zipcache, m) {
  m.def(
      "decode_paged(Tensor q, Tensor k, Tensor v, Tensor rows, Tensor(a!) pages, Tensor block_table, "
      "Tensor num_blocks, Tensor stage_ids, Tensor staged, Tensor probe, Tensor(b!) out, int[] layout, "
      "int[] offsets, int[] staging, float scale, str isa, int[] bounds) -> ()");
}

TORCH_LIBRARY_IMPL(zipcache, CPU, m) {
  m.impl("decode_staged", &zc::decode_staged);
  m.impl("decode_paged", &zc::decode_paged);
}
