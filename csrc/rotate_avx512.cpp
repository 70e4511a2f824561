// Hadamard rotation of rows, avx512 build (op `zipcache::hadamard_rotate`, rotate.cpp
// has the contract). The same float64 butterfly as the portable loop, eight doubles
// per register: stages h = 1, 2, 4 swap lanes inside a register, stages h >= 8 pair
// whole registers. Every butterfly is the same u + w, u - w in float64, so the bits
// are the portable loop's; the roundings (float64 -> float32 -> bf16/half) are the
// IEEE round-to-nearest-even ones c10 uses. Headers come before the target pragma.
#include <cstdint>
#include <cstring>

#include "zc_kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")

namespace zc {
namespace avx512 {
namespace {

// Eight inputs as doubles (every source value is exact as a float, and as a double).
inline __m512d load8(const void* p, FloatKind kind) {
  __m256 f;
  if (kind == FloatKind::f32) {
    f = _mm256_loadu_ps(static_cast<const float*>(p));
  } else {
    const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
    f = kind == FloatKind::bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                                : _mm256_cvtph_ps(h);
  }
  return _mm512_cvtps_pd(f);
}

// float32 -> bfloat16 bits, round to nearest even; NaN -> 0x7FC0 (c10::BFloat16's rule).
inline __m128i to_bf16(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  return _mm256_cvtepi32_epi16(r);
}

// Eight results: double -> float32 (round to nearest even) -> the output type.
// Returns false if a value is NaN and the output is half (the caller redoes the row
// with c10's conversion, whose NaN bits the hardware's need not match).
inline bool store8(void* p, FloatKind kind, __m512d d) {
  const __m256 f = _mm512_cvtpd_ps(d);
  if (kind == FloatKind::f32) {
    _mm256_storeu_ps(static_cast<float*>(p), f);
  } else if (kind == FloatKind::bf16) {
    _mm_storeu_si128(static_cast<__m128i*>(p), to_bf16(f));
  } else {
    if (_mm256_movemask_ps(_mm256_cmp_ps(f, f, _CMP_UNORD_Q))) return false;
    _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
  }
  return true;
}

inline int64_t elem_bytes(FloatKind kind) { return kind == FloatKind::f32 ? 4 : 2; }

// NV registers of eight doubles: a compile-time count keeps the row in registers.
template <int64_t NV>
bool rotate_row_n(const void* x, FloatKind in, void* y, FloatKind out) {
  constexpr int64_t nv = NV, D = 8 * NV;
  const int64_t ie = 8 * elem_bytes(in), oe = 8 * elem_bytes(out);
  __m512d a[NV];
  for (int64_t i = 0; i < nv; ++i) a[i] = load8(static_cast<const char*>(x) + i * ie, in);
  for (int64_t i = 0; i < nv; ++i) {  // h = 1, 2, 4: partner lanes in the same register
    __m512d t = _mm512_permute_pd(a[i], 0x55);
    a[i] = _mm512_mask_sub_pd(_mm512_add_pd(a[i], t), 0xAA, t, a[i]);
    t = _mm512_permutex_pd(a[i], 0x4E);
    a[i] = _mm512_mask_sub_pd(_mm512_add_pd(a[i], t), 0xCC, t, a[i]);
    t = _mm512_shuffle_f64x2(a[i], a[i], 0x4E);
    a[i] = _mm512_mask_sub_pd(_mm512_add_pd(a[i], t), 0xF0, t, a[i]);
  }
  for (int64_t hv = 1; hv < nv; hv <<= 1)  // h = 8 hv: partner registers
    for (int64_t i = 0; i < nv; i += 2 * hv)
      for (int64_t j = i; j < i + hv; ++j) {
        const __m512d u = a[j], w = a[j + hv];
        a[j] = _mm512_add_pd(u, w);
        a[j + hv] = _mm512_sub_pd(u, w);
      }
  const __m512d scale = _mm512_set1_pd(1.0 / __builtin_sqrt(static_cast<double>(D)));
  bool stored = true;
  for (int64_t i = 0; i < nv; ++i)
    stored &= store8(static_cast<char*>(y) + i * oe, out, _mm512_mul_pd(a[i], scale));
  return stored;
}

}  // namespace

bool rotate_row(const void* x, FloatKind in, void* y, FloatKind out, int64_t D) {
  switch (D) {
    case 8: return rotate_row_n<1>(x, in, y, out);
    case 16: return rotate_row_n<2>(x, in, y, out);
    case 32: return rotate_row_n<4>(x, in, y, out);
    case 64: return rotate_row_n<8>(x, in, y, out);
    case 128: return rotate_row_n<16>(x, in, y, out);
    case 256: return rotate_row_n<32>(x, in, y, out);
    default: return false;  // other sizes: the portable loop
  }
}

}  // namespace avx512
}  // namespace zc
#else
// Not x86: the host never dispatches here; keep the symbol so the library links.
bool zc::avx512::rotate_row(const void*, FloatKind, void*, FloatKind, int64_t) { return false; }
#endif
