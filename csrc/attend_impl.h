// Attention over packed zipcache pages: the ISA-independent body.
//
// Included once per ISA by attend_{scalar,avx2,avx512}.cpp, each of which sets
// `#pragma GCC target(...)`, ZC_NS (internal namespace) and ZC_ISA first. Only GCC vector extensions (8 x fp32)
// and, where ZC_F16C is defined, the F16C conversion intrinsic are used, so
// the same source is the portable scalar path (SSE2 lowering) and the AVX2 /
// AVX-512 paths. No torch headers: nothing inline here can leak ISA-specific
// code into another translation unit.
//
// ZC_F16C marks the x86 AVX2 / AVX-512 builds (F16C and AVX2 intrinsics allowed).
//
// Math per block, for G query rows of one KV head (scaled queries q_h):
//   key   k_tj = code_tj * s_j + m_j            (channelwise, per precision group)
//   score q_h . k_t = sum_j (q_hj s_j) code_tj + sum_j q_hj m_j
//   value v_tj = (code_tj * step_t + min_t) * c_j  (CSTQ)
//   sum_t p_t v_tj = c_j * (sum_t (p_t step_t) code_tj + sum_t p_t min_t)
// so codes are only ever converted to fp32 and fed to FMAs; no dequantized tile.

namespace ZC_NS {

using zc::AttnArgs;
using zc::PageLayout;
using zc::Unit;

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint8_t v8u8 __attribute__((vector_size(8)));

#ifndef ZC_ACC_REGS
#define ZC_ACC_REGS 8  // fp32 vector accumulators the value loop may keep live
#endif

static inline v8f load8(const float* p) {
  v8f r;
  __builtin_memcpy(&r, p, sizeof(r));
  return r;
}
static inline void store8(float* p, v8f v) { __builtin_memcpy(p, &v, sizeof(v)); }
template <typename V>
static inline V loadv(const float* p) {  // one vector of any width
  V r;
  __builtin_memcpy(&r, p, sizeof(r));
  return r;
}
static inline v8f splat(float x) { return (v8f){x, x, x, x, x, x, x, x}; }
static inline float hsum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}
static inline float hmax(v8f v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// float16 bits -> float32, exact (normals, subnormals, zeros; params are finite).
static inline float half_to_float_scalar(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu, bits;
  if (e == 0) {
    if (m == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int shift = 0;
      while (!(m & 0x400u)) { m <<= 1; ++shift; }
      m &= 0x3FFu;
      bits = sign | ((uint32_t)(113 - shift) << 23) | (m << 13);
    }
  } else if (e == 31) {
    bits = sign | 0x7F800000u | (m << 13);
  } else {
    bits = sign | ((e + 112u) << 23) | (m << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// n float16 values (n % 8 == 0) -> float32.
static inline void halves_to_floats(const uint8_t* src, float* dst, int64_t n) {
#ifdef ZC_F16C
  for (int64_t i = 0; i < n; i += 8) {
    __m128i h = _mm_loadu_si128((const __m128i*)(src + 2 * i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#else
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h;
    __builtin_memcpy(&h, src + 2 * i, 2);
    dst[i] = half_to_float_scalar(h);
  }
#endif
}

// exp for the softmax (Cephes-style range reduction + degree-5 polynomial,
// ~1-2 ulp on the range that matters; inputs are <= 0 here).
static inline v8f vexp(v8f x) {
  const v8f hi = splat(88.3762626647949f), lo = splat(-87.3365447504f);
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  v8f t = x * splat(1.44269504088896341f) + splat(0.5f);
  v8i ti = __builtin_convertvector(t, v8i);  // truncation
  v8f tf = __builtin_convertvector(ti, v8f);
  v8i gt = tf > t;                           // -1 where truncation rounded up
  ti = ti + gt;
  tf = __builtin_convertvector(ti, v8f);     // floor(t)
  v8f r = x - tf * splat(0.693359375f) - tf * splat(-2.12194440e-4f);
  v8f y = splat(1.9875691500E-4f);
  y = y * r + splat(1.3981999507E-3f);
  y = y * r + splat(8.3334519073E-3f);
  y = y * r + splat(4.1665795894E-2f);
  y = y * r + splat(1.6666665459E-1f);
  y = y * r + splat(5.0000001201E-1f);
  y = y * r * r + r + splat(1.0f);
  v8i e = (ti + 127) << 23;
  v8f pow2;
  __builtin_memcpy(&pow2, &e, sizeof(pow2));
  return y * pow2;
}

// 8 bytes -> 8 int32 lanes (vpmovzxbd where available; GCC does not find it alone).
static inline v8i bytes_to_i32(const uint8_t* p) {
#ifdef ZC_F16C
  return (v8i)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
#else
  v8u8 b;
  __builtin_memcpy(&b, p, 8);
  return __builtin_convertvector(b, v8i);
#endif
}

// 8 consecutive codes (little-endian bit stream, first code in the low bits) of
// BITS bits starting at byte p -> fp32. 8 codes of b bits are exactly b bytes.
template <int BITS>
static inline v8f unpack8(const uint8_t* p) {
  if constexpr (BITS == 8) {
    return __builtin_convertvector(bytes_to_i32(p), v8f);
  } else {
    uint32_t w;
    if constexpr (BITS == 4) {
      __builtin_memcpy(&w, p, 4);
    } else if constexpr (BITS == 3) {
      w = (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16);
    } else {
      w = (uint32_t)p[0] | ((uint32_t)p[1] << 8);
    }
    const v8u shifts = {0 * BITS, 1 * BITS, 2 * BITS, 3 * BITS,
                        4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS};
    v8u x = ((v8u){w, w, w, w, w, w, w, w} >> shifts) & (uint32_t)((1u << BITS) - 1);
    return __builtin_convertvector((v8i)x, v8f);
  }
}

// How a code row is turned into fp32 vectors, one "step" of STEP_BYTES bytes at a
// time giving NV vectors of 8 lanes. Lane order need not be channel order: the
// dot products and the per-channel value sums only need queries and outputs in
// the same (permuted) order, see `channel`.
template <int BITS, bool BYTE_LANES>
struct Codes {  // natural order: 8 codes from BITS bytes, lane i = channel 8 s + i
  static constexpr int NV = 1, STEP_BYTES = BITS;
  static inline void unpack(const uint8_t* p, v8f* x) { x[0] = unpack8<BITS>(p); }
  static inline int channel(int s, int k, int i) { return 8 * s + i + 0 * k; }
};
template <int BITS>
struct Codes<BITS, true> {  // 2 or 4 bits: 8 bytes -> 8/BITS vectors, lane i = byte i, vector k = k-th code of it
  // Vector k is masked in place, not shifted down: it holds code * 2^(k*BITS), and
  // the exact power-of-two factor is folded into the query (keys) or applied to the
  // sums (values), see lane_scale.
  static constexpr int NV = 8 / BITS, STEP_BYTES = 8;
  static inline void unpack(const uint8_t* p, v8f* x) {
    const v8i w = bytes_to_i32(p);
    for (int k = 0; k < NV; ++k) x[k] = __builtin_convertvector(w & (((1 << BITS) - 1) << (k * BITS)), v8f);
  }
  static inline int channel(int s, int k, int i) { return (8 * s + i) * NV + k; }
};

// Byte-lane order needs whole 8-byte steps per row.
static inline bool byte_lanes(int bits, int64_t D) { return (bits == 2 || bits == 4) && (D * bits) % 64 == 0; }

#ifdef ZC_PAIR16
// AVX-512: two tokens per 16-lane register, token t in lanes 0-7 and token t + 1 in
// lanes 8-15, each half in the 8-lane order above. Per lane the arithmetic is the
// 8-lane path's, so key scores keep their bits; value sums add the two halves at the
// end (a different summation order, same terms).
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline v16f join8(v8f a, v8f b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
static inline v8f low8(v16f v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7); }
static inline v8f high8(v16f v) { return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15); }

template <int BITS, bool BYTE_LANES>
struct CodesPair {  // any order: each row unpacked as in Codes, then joined
  using C = Codes<BITS, BYTE_LANES>;
  static inline void unpack(const uint8_t* p0, const uint8_t* p1, v16f* x) {
    v8f a[C::NV], b[C::NV];
    C::unpack(p0, a);
    C::unpack(p1, b);
    for (int k = 0; k < C::NV; ++k) x[k] = join8(a[k], b[k]);
  }
};
template <int BITS>
struct CodesPair<BITS, true> {  // byte lanes: 8 bytes of each row -> 16 int32 lanes at once
  static constexpr int NV = 8 / BITS;
  static inline void unpack(const uint8_t* p0, const uint8_t* p1, v16f* x) {
    const __m128i b = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i*)p0), _mm_loadl_epi64((const __m128i*)p1));
    const v16i w = (v16i)_mm512_cvtepu8_epi32(b);
    for (int k = 0; k < NV; ++k) x[k] = __builtin_convertvector(w & (((1 << BITS) - 1) << (k * BITS)), v16f);
  }
};
#endif

// perm[p] = channel held by vector position p (p = (s * NV + k) * 8 + i).
template <int BITS, bool BL>
static void fill_perm(int64_t D, int16_t* perm) {
  using C = Codes<BITS, BL>;
  const int64_t steps = D * BITS / 8 / C::STEP_BYTES;
  for (int64_t st = 0; st < steps; ++st)
    for (int k = 0; k < C::NV; ++k)
      for (int i = 0; i < 8; ++i) perm[(st * C::NV + k) * 8 + i] = (int16_t)C::channel((int)st, k, i);
}
// perm as above; scale[p] = 2^-(k*BITS) undoes the in-place masking of vector k.
static void channel_perm(int bits, int64_t D, int16_t* perm, float* scale) {
  const bool bl = byte_lanes(bits, D);
  if (bits == 2 && bl) fill_perm<2, true>(D, perm);
  else if (bits == 4 && bl) fill_perm<4, true>(D, perm);
  else for (int64_t j = 0; j < D; ++j) perm[j] = (int16_t)j;
  const int nv = bl ? 8 / bits : 1;
  for (int64_t p = 0; p < D; ++p) scale[p] = bl ? 1.f / (float)(1u << (((p / 8) % nv) * bits)) : 1.f;
}

// r[i] = sum of the lanes of v[i] (8 vectors -> one), a shuffle/add tree.
static inline v8f pair_sums(v8f a, v8f b) {
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
static inline v8f reduce8(const v8f* v) {
  v8f u0 = pair_sums(pair_sums(v[0], v[1]), pair_sums(v[2], v[3]));
  v8f u1 = pair_sums(pair_sums(v[4], v[5]), pair_sums(v[6], v[7]));
  return __builtin_shufflevector(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
}

// Scores of ntok tokens of one precision group for G rows:
// sc[h * ld + t] = sum_p qs[h][p] * code_t[perm p] + c0[h]  (qs in the codes' lane order).
template <int BITS, bool BL, int G>
static void key_scores(const uint8_t* codes, int64_t ntok, int64_t D, const float* qs,
                       const float* c0, float* sc, int64_t ld) {
  using C = Codes<BITS, BL>;
  constexpr int NV = C::NV;
  const int64_t row_bytes = D * BITS / 8, steps = row_bytes / C::STEP_BYTES;
  // Dot products of one code row with the G queries qv, in vectors V of W lanes: unpack(st,
  // x) gives code step st as NV vectors, qv[h] holds W / 8 copies of each 8-lane query
  // block (qv[h] at stride D * W / 8). Two accumulator sets: twice the independent FMA
  // chains, fed by even/odd planes (NV >= 2) or even/odd steps.
  auto dot = [&](auto* acc, const float* qv, auto unpack) {
    using V = decltype(acc[0] + acc[0]);
    constexpr int W = sizeof(V) / sizeof(float);
    const int64_t hs = D * W / 8;
    V a2[2][G];
    for (int h = 0; h < G; ++h) a2[0][h] = a2[1][h] = V{};
    if constexpr (NV >= 2) {
      for (int64_t st = 0; st < steps; ++st) {
        V x[NV];
        unpack(st, x);
        for (int k = 0; k < NV; ++k)
          for (int h = 0; h < G; ++h) a2[k & 1][h] += loadv<V>(qv + h * hs + (st * NV + k) * W) * x[k];
      }
    } else {
      int64_t st = 0;
      for (; st + 2 <= steps; st += 2) {
        V x0[1], x1[1];
        unpack(st, x0);
        unpack(st + 1, x1);
        for (int h = 0; h < G; ++h) {
          a2[0][h] += loadv<V>(qv + h * hs + st * W) * x0[0];
          a2[1][h] += loadv<V>(qv + h * hs + (st + 1) * W) * x1[0];
        }
      }
      if (st < steps) {
        V x0[1];
        unpack(st, x0);
        for (int h = 0; h < G; ++h) a2[0][h] += loadv<V>(qv + h * hs + st * W) * x0[0];
      }
    }
    for (int h = 0; h < G; ++h) acc[h] = a2[0][h] + a2[1][h];
  };
  auto row_dot = [&](const uint8_t* row, v8f* acc) {
    dot(acc, qs, [&](int64_t st, v8f* x) { C::unpack(row + st * C::STEP_BYTES, x); });
  };
  int64_t t = 0;
#ifdef ZC_PAIR16
  // The queries twice per 16 lanes: qd[h][16 j + i] = qd[h][16 j + 8 + i] = qs[h][8 j + i].
  alignas(64) float qd[G * 2 * zc::MAX_HEAD];
  for (int h = 0; h < G; ++h)
    for (int64_t j = 0; j < D; j += 8) {
      store8(qd + h * 2 * D + 2 * j, load8(qs + h * D + j));
      store8(qd + h * 2 * D + 2 * j + 8, load8(qs + h * D + j));
    }
  auto row_dot2 = [&](const uint8_t* r0, const uint8_t* r1, v16f* acc) {
    dot(acc, qd, [&](int64_t st, v16f* x) {
      CodesPair<BITS, BL>::unpack(r0 + st * C::STEP_BYTES, r1 + st * C::STEP_BYTES, x);
    });
  };
  for (; t + 8 <= ntok; t += 8) {  // 8 tokens as 4 pairs, then one shuffle tree per row
    v8f red[G][8];
    for (int tt = 0; tt < 8; tt += 2) {
      v16f acc[G];
      row_dot2(codes + (t + tt) * row_bytes, codes + (t + tt + 1) * row_bytes, acc);
      for (int h = 0; h < G; ++h) {
        red[h][tt] = low8(acc[h]);
        red[h][tt + 1] = high8(acc[h]);
      }
    }
    for (int h = 0; h < G; ++h) store8(sc + h * ld + t, reduce8(red[h]) + splat(c0[h]));
  }
#else
  for (; t + 8 <= ntok; t += 8) {  // 8 tokens, then one shuffle tree per row
    v8f red[G][8];
    for (int tt = 0; tt < 8; ++tt) {
      v8f acc[G];
      row_dot(codes + (t + tt) * row_bytes, acc);
      for (int h = 0; h < G; ++h) red[h][tt] = acc[h];
    }
    for (int h = 0; h < G; ++h) store8(sc + h * ld + t, reduce8(red[h]) + splat(c0[h]));
  }
#endif
  for (; t < ntok; ++t) {
    v8f acc[G];
    row_dot(codes + t * row_bytes, acc);
    for (int h = 0; h < G; ++h) sc[h * ld + t] = hsum(acc[h]) + c0[h];
  }
}

constexpr int64_t VALUE_PART = 128;

// accblk[h][p] += sum_t w[h * ld + t] * code_t[perm p] for ntok tokens of one group
// (accblk in the codes' lane order). Rows go in tiles of HT so the NV * HT
// accumulators stay in registers.
template <int BITS, bool BL, int G>
static void value_accum_part(const uint8_t* codes, int64_t ntok, int64_t D, const float* w,
                             int64_t ld, float* accblk) {
  using C = Codes<BITS, BL>;
  constexpr int NV = C::NV;
  constexpr int HT0 = ZC_ACC_REGS / NV > 0 ? ZC_ACC_REGS / NV : 1;
  constexpr int HT = HT0 < G ? HT0 : G;
  const int64_t row_bytes = D * BITS / 8, steps = row_bytes / C::STEP_BYTES;
#ifdef ZC_PAIR16
  // The weights of each token pair as one 16-lane vector, built once for all steps.
  alignas(64) float wpair[G * VALUE_PART / 2 * 16];
  for (int h = 0; h < G; ++h)
    for (int64_t t = 0; t + 2 <= ntok; t += 2) {
      const float* wr = w + h * ld + t;
      const v16f wv = join8(splat(wr[0]), splat(wr[1]));
      __builtin_memcpy(wpair + (h * (ntok / 2) + t / 2) * 16, &wv, sizeof(wv));
    }
#endif
  for (int h0 = 0; h0 < G; h0 += HT) {
    const int nh = G - h0 < HT ? G - h0 : HT;
    for (int64_t st = 0; st < steps; ++st) {
      v8f acc[NV][HT];
      for (int k = 0; k < NV; ++k)
        for (int h = 0; h < HT; ++h) acc[k][h] = splat(0.f);
      const uint8_t* col = codes + st * C::STEP_BYTES;
      int64_t t = 0;
#ifdef ZC_PAIR16
      {
        v16f acc2[NV][HT];
        for (int k = 0; k < NV; ++k)
          for (int h = 0; h < HT; ++h) acc2[k][h] = (v16f){};
        for (; t + 2 <= ntok; t += 2) {
          v16f x[NV];
          CodesPair<BITS, BL>::unpack(col + t * row_bytes, col + (t + 1) * row_bytes, x);
          for (int h = 0; h < HT; ++h) {
            if (h >= nh) break;
            const v16f wv = loadv<v16f>(wpair + ((h0 + h) * (ntok / 2) + t / 2) * 16);
            for (int k = 0; k < NV; ++k) acc2[k][h] += wv * x[k];
          }
        }
        for (int k = 0; k < NV; ++k)
          for (int h = 0; h < HT; ++h) acc[k][h] = low8(acc2[k][h]) + high8(acc2[k][h]);
      }
#endif
      for (; t < ntok; ++t) {
        v8f x[NV];
        C::unpack(col + t * row_bytes, x);
        for (int h = 0; h < HT; ++h) {
          if (h >= nh) break;
          const v8f wv = splat(w[(h0 + h) * ld + t]);
          for (int k = 0; k < NV; ++k) acc[k][h] += wv * x[k];
        }
      }
      for (int h = 0; h < nh; ++h)
        for (int k = 0; k < NV; ++k) {
          float* dst = accblk + (h0 + h) * D + (st * NV + k) * 8;
          store8(dst, load8(dst) + acc[k][h]);
        }
    }
  }
}

// value_accum_part over pieces of at most VALUE_PART tokens (its pair weights live on the stack).
template <int BITS, bool BL, int G>
static void value_accum(const uint8_t* codes, int64_t ntok, int64_t D, const float* w,
                        int64_t ld, float* accblk) {
  const int64_t row_bytes = D * BITS / 8;
  for (int64_t t = 0; t < ntok; t += VALUE_PART)
    value_accum_part<BITS, BL, G>(codes + t * row_bytes, ntok - t < VALUE_PART ? ntok - t : VALUE_PART, D, w + t,
                                  ld, accblk);
}

typedef void (*KeyFn)(const uint8_t*, int64_t, int64_t, const float*, const float*, float*, int64_t);
typedef void (*ValFn)(const uint8_t*, int64_t, int64_t, const float*, int64_t, float*);

template <int BITS, bool BL>
static KeyFn key_fn_g(int g) {
  switch (g) {
    case 1: return key_scores<BITS, BL, 1>;
    case 2: return key_scores<BITS, BL, 2>;
    case 3: return key_scores<BITS, BL, 3>;
    case 4: return key_scores<BITS, BL, 4>;
    default: return key_scores<BITS, BL, 8>;  // row counts are 1, 2, 3, 4 or 8 (zc::row_chunk)
  }
}
template <int BITS, bool BL>
static ValFn val_fn_g(int g) {
  switch (g) {
    case 1: return value_accum<BITS, BL, 1>;
    case 2: return value_accum<BITS, BL, 2>;
    case 3: return value_accum<BITS, BL, 3>;
    case 4: return value_accum<BITS, BL, 4>;
    default: return value_accum<BITS, BL, 8>;  // row counts are 1, 2, 3, 4 or 8 (zc::row_chunk)
  }
}
static KeyFn key_fn(int bits, int g, int64_t D) {
  const bool bl = byte_lanes(bits, D);
  switch (bits) {
    case 2: return bl ? key_fn_g<2, true>(g) : key_fn_g<2, false>(g);
    case 3: return key_fn_g<3, false>(g);
    case 4: return bl ? key_fn_g<4, true>(g) : key_fn_g<4, false>(g);
    default: return key_fn_g<8, false>(g);
  }
}
static ValFn val_fn(int bits, int g, int64_t D) {
  const bool bl = byte_lanes(bits, D);
  switch (bits) {
    case 2: return bl ? val_fn_g<2, true>(g) : val_fn_g<2, false>(g);
    case 3: return val_fn_g<3, false>(g);
    case 4: return bl ? val_fn_g<4, true>(g) : val_fn_g<4, false>(g);
    default: return val_fn_g<8, false>(g);
  }
}

// One precision group's per-channel key parameters -> qs[h][p] = qp[h][p] * s[perm p] * lscale[p]
// (qp: the rows' queries already in lane order) and c0[h] = sum_j q_hj m_j.
static inline void key_query_params(const uint8_t* params, const float* q, const float* qp,
                                    const int16_t* perm, const float* lscale, int G, int64_t D,
                                    float* mbuf, float* sbuf, float* sperm, float* qs, float* c0) {
  halves_to_floats(params, mbuf, D);
  halves_to_floats(params + 2 * D, sbuf, D);
  for (int64_t p = 0; p < D; ++p) sperm[p] = sbuf[perm[p]] * lscale[p];
  for (int h = 0; h < G; ++h) {
    v8f c = splat(0.f);
    for (int64_t j = 0; j < D; j += 8) {
      store8(qs + h * D + j, load8(qp + h * D + j) * load8(sperm + j));
      c += load8(q + h * D + j) * load8(mbuf + j);
    }
    c0[h] = hsum(c);
  }
}

static void run_unit(const AttnArgs& a, const Unit& u) {
  const PageLayout& L = a.L;
  const int64_t D = L.head_size, B = L.block_size, n_hi = L.n_hi, n_lo = B - n_hi;
  const int G = (int)u.nrows;
  const int64_t g = a.group, Hq = a.num_q_heads;
  constexpr int RD = zc::MAX_ROWS * zc::MAX_HEAD;
  alignas(32) float q[RD], qp_hi[RD], qp_lo[RD], qs_hi[RD], qs_lo[RD];
  alignas(32) float acc[RD], acc_hi[RD], acc_lo[RD], sum_hi[RD], sum_lo[RD], sum_min[RD];
  alignas(32) float c_hi[zc::MAX_HEAD], c_lo[zc::MAX_HEAD];
  alignas(32) float sc[zc::MAX_ROWS * zc::MAX_BLOCK];
  alignas(32) float tmin[zc::MAX_BLOCK], tstep[zc::MAX_BLOCK];
  alignas(32) float cbuf[zc::MAX_HEAD], mbuf[zc::MAX_HEAD], sbuf[zc::MAX_HEAD], sperm[zc::MAX_HEAD];
  int16_t perm_hi[zc::MAX_HEAD], perm_lo[zc::MAX_HEAD], inv_hi[zc::MAX_HEAD], inv_lo[zc::MAX_HEAD];
  float ls_hi[zc::MAX_HEAD], ls_lo[zc::MAX_HEAD];
  float c0_hi[zc::MAX_ROWS], c0_lo[zc::MAX_ROWS], m[zc::MAX_ROWS], l[zc::MAX_ROWS];
  float alpha[zc::MAX_ROWS], amin[zc::MAX_ROWS];
  int64_t out_row[zc::MAX_ROWS];

  const int64_t qbase = a.q_start[u.req];
  for (int r = 0; r < G; ++r) {
    int64_t row = u.row0 + r, qi = qbase + row / g, head = u.kv_head * g + row % g;
    out_row[r] = qi * Hq + head;
    __builtin_memcpy(q + r * D, a.q + out_row[r] * D, D * sizeof(float));
    m[r] = -__builtin_inff();
    l[r] = 0.f;
  }
  for (int64_t i = 0; i < G * D; ++i) sum_hi[i] = sum_lo[i] = sum_min[i] = 0.f;
  // Lane order of each group's codes; queries permuted once per unit.
  channel_perm((int)L.hi_bits, D, perm_hi, ls_hi);
  channel_perm((int)L.lo_bits, D, perm_lo, ls_lo);
  for (int64_t p = 0; p < D; ++p) {
    inv_hi[perm_hi[p]] = (int16_t)p;
    inv_lo[perm_lo[p]] = (int16_t)p;
  }
  for (int r = 0; r < G; ++r)
    for (int64_t p = 0; p < D; ++p) {
      qp_hi[r * D + p] = q[r * D + perm_hi[p]];
      qp_lo[r * D + p] = q[r * D + perm_lo[p]];
    }

  const KeyFn khi = n_hi ? key_fn((int)L.hi_bits, G, D) : nullptr;
  const KeyFn klo = n_lo ? key_fn((int)L.lo_bits, G, D) : nullptr;
  const ValFn vhi = n_hi ? val_fn((int)L.hi_bits, G, D) : nullptr;
  const ValFn vlo = n_lo ? val_fn((int)L.lo_bits, G, D) : nullptr;

  const int64_t nb = a.num_blocks[u.req];
  const int64_t b_begin = u.split * a.split_blocks;
  const int64_t b_end = b_begin + a.split_blocks < nb ? b_begin + a.split_blocks : nb;
  const int64_t* ids = a.block_table + u.req * a.bt_stride;
  for (int64_t b = b_begin; b < b_end; ++b) {
    const uint8_t* hp = a.pages + ids[b] * a.page_stride + u.kv_head * L.head_bytes;
    if (b + 1 < b_end) {  // the next page's head section is far away: hint it
      const uint8_t* nx = a.pages + ids[b + 1] * a.page_stride + u.kv_head * L.head_bytes;
      for (int64_t o = 0; o < L.head_bytes; o += 256) __builtin_prefetch(nx + o);
    }
    // (1) scores, storage order: salient tokens [0, n_hi), regular [n_hi, B).
    if (n_hi) {
      key_query_params(hp + L.off[zc::K_HI_PARAMS], q, qp_hi, perm_hi, ls_hi, G, D, mbuf, sbuf, sperm, qs_hi, c0_hi);
      khi(hp + L.off[zc::K_HI_CODES], n_hi, D, qs_hi, c0_hi, sc, B);
    }
    if (n_lo) {
      key_query_params(hp + L.off[zc::K_LO_PARAMS], q, qp_lo, perm_lo, ls_lo, G, D, mbuf, sbuf, sperm, qs_lo, c0_lo);
      klo(hp + L.off[zc::K_LO_CODES], n_lo, D, qs_lo, c0_lo, sc + n_hi, B);
    }
    // (2) online softmax; p * step becomes the value weight, p * min folds into amin.
    halves_to_floats(hp + L.off[zc::V_TOKEN_PARAMS], tmin, B);
    halves_to_floats(hp + L.off[zc::V_TOKEN_PARAMS] + 2 * B, tstep, B);
    for (int r = 0; r < G; ++r) {
      float* s = sc + r * B;
      v8f mx = load8(s);
      for (int64_t t = 8; t < B; t += 8) {
        v8f x = load8(s + t);
        mx = x > mx ? x : mx;
      }
      float m_new = hmax(mx);
      if (m[r] > m_new) m_new = m[r];
      alpha[r] = __builtin_expf(m[r] - m_new);  // exp(-inf) = 0 on the first block
      m[r] = m_new;
      v8f ps = splat(0.f), pm = splat(0.f), mn = splat(m_new);
      for (int64_t t = 0; t < B; t += 8) {
        v8f p = vexp(load8(s + t) - mn);
        ps += p;
        pm += p * load8(tmin + t);
        store8(s + t, p * load8(tstep + t));
      }
      l[r] = l[r] * alpha[r] + hsum(ps);
      amin[r] = hsum(pm);
    }
    // (3) values: sum_t p_t step_t code_tj per group (lane order), then per channel j:
    //     acc = acc * alpha + c_j * (hi_j + lo_j + sum_t p_t min_t).
    if (n_hi) {
      for (int64_t i = 0; i < G * D; ++i) acc_hi[i] = 0.f;
      vhi(hp + L.off[zc::V_HI_CODES], n_hi, D, sc, B, acc_hi);
    }
    if (n_lo) {
      for (int64_t i = 0; i < G * D; ++i) acc_lo[i] = 0.f;
      vlo(hp + L.off[zc::V_LO_CODES], n_lo, D, sc + n_hi, B, acc_lo);
    }
    //     Kept as three running sums, each in its own order: sum_hi and sum_lo in their
    //     groups' lane orders (the channel scale permuted once per block, no gather per
    //     row), sum_min per channel; they meet once, after the last block.
    halves_to_floats(hp + L.off[zc::V_CHANNEL_SCALE], cbuf, D);
    for (int64_t p = 0; p < D; ++p) {
      c_hi[p] = cbuf[perm_hi[p]] * ls_hi[p];
      c_lo[p] = cbuf[perm_lo[p]] * ls_lo[p];
    }
    for (int r = 0; r < G; ++r) {
      const v8f al = splat(alpha[r]), am = splat(amin[r]);
      for (int64_t j = 0; j < D; j += 8) {
        const int64_t i = r * D + j;
        store8(sum_min + i, load8(sum_min + i) * al + load8(cbuf + j) * am);
        if (n_hi) store8(sum_hi + i, load8(sum_hi + i) * al + load8(c_hi + j) * load8(acc_hi + i));
        if (n_lo) store8(sum_lo + i, load8(sum_lo + i) * al + load8(c_lo + j) * load8(acc_lo + i));
      }
    }
  }
  for (int r = 0; r < G; ++r)
    for (int64_t j = 0; j < D; ++j) {
      float v = sum_min[r * D + j];
      if (n_hi) v += sum_hi[r * D + inv_hi[j]];
      if (n_lo) v += sum_lo[r * D + inv_lo[j]];
      acc[r * D + j] = v;
    }
  // Partial result of this split: (m, l, acc) per row.
  float* part = a.partial + u.split * a.partial_split_stride;
  for (int r = 0; r < G; ++r) {
    float* dst = part + out_row[r] * (D + 2);
    dst[0] = m[r];
    dst[1] = l[r];
    __builtin_memcpy(dst + 2, acc + r * D, D * sizeof(float));
  }
}

}  // namespace ZC_NS

namespace zc {
namespace ZC_ISA {
void attend_units(const AttnArgs& a, const Unit* units, int64_t n) {
  for (int64_t i = 0; i < n; ++i) ::ZC_NS::run_unit(a, units[i]);
}
}  // namespace ZC_ISA
}  // namespace zc
