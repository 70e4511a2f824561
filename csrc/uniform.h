// Asymmetric uniform quantization with float16 parameters: a bit-exact port of
// zipcache_vllm/quant/uniform.py (sanitize, fp16_round, quant_params, quantize) shared by
// the page packer (ops.cpp) and the 8-bit staging of the decode step (decode.cpp). Built
// without -mfma like its callers, so `code * step + min` rounds twice as in PyTorch.
#pragma once
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace zc {
namespace {

constexpr float EPS = 6.103515625e-05f;  // 2^-14
constexpr float FP16_MAX = 65504.f;

inline uint16_t h_bits(c10::Half h) { return h.x; }
inline c10::Half h_from_bits(uint16_t b) { return c10::Half(b, c10::Half::from_bits()); }

// torch.nextafter(y, +-inf) on float16 (y finite).
inline c10::Half h_nextafter(c10::Half y, bool up) {
  uint16_t b = h_bits(y);
  if ((b & 0x7FFF) == 0) return h_from_bits(up ? 0x0001 : 0x8001);
  const bool positive = !(b & 0x8000);
  return h_from_bits(positive == up ? b + 1 : b - 1);
}

// uniform.fp16_round: float16 rounding of x towards +inf (up) or -inf, saturating.
inline c10::Half fp16_round(float x, bool up) {
  c10::Half y(std::min(std::max(x, -FP16_MAX), FP16_MAX));
  const float yf = static_cast<float>(y);
  if (up ? yf < x : yf > x) y = h_nextafter(y, up);
  float r = static_cast<float>(y);
  if (r > FP16_MAX) y = c10::Half(FP16_MAX);
  if (r < -FP16_MAX) y = c10::Half(-FP16_MAX);
  return y;
}

inline void quant_params(float xmin, float xmax, int bits, c10::Half& m, c10::Half& s) {
  const float levels = static_cast<float>((1 << bits) - 1);
  m = fp16_round(xmin, false);
  float step = (xmax - static_cast<float>(m)) / levels;
  if (!(step >= EPS)) step = EPS;
  s = fp16_round(step, true);
}

// Code of x for a group with minimum m and step s: clamp(round_half_even((x - m) / s), 0, hi).
// x is finite (sanitized), m finite and s >= 2^-14, so the quotient is finite. It is
// clamped to [-1, hi + 1] before rounding, which leaves every clamped code unchanged
// and keeps |y| < 2^22, where adding and subtracting 1.5 * 2^23 rounds half to even
// exactly (the portable build has no `roundss`). Branch-free, so loops over a row
// vectorize (the division too: one per element, the exact IEEE quotient).
inline float code_of(float x, float m, float s, float hi) {
  constexpr float MAGIC = 12582912.f;
  float y = (x - m) / s;
  y = y < -1.f ? -1.f : (y > hi + 1.f ? hi + 1.f : y);
  const float q = (y + MAGIC) - MAGIC;
  return q < 0.f ? 0.f : (q > hi ? hi : q);
}

inline float sanitize(float x) {
  if (std::isnan(x)) return 0.f;
  return std::min(std::max(x, -FP16_MAX), FP16_MAX);
}

}  // namespace
}  // namespace zc
