// Shared declarations of the zipcache CPU kernels (no torch headers here: the
// ISA-specific translation units include this file under `#pragma GCC target`).
#pragma once
#include <cstdint>

namespace zc {

// Byte offsets of the sections inside one head section (layout.py `sections`).
enum SectionIdx {
  K_HI_CODES = 0, K_LO_CODES, V_HI_CODES, V_LO_CODES,
  K_HI_PARAMS, K_LO_PARAMS, V_CHANNEL_SCALE, V_TOKEN_PARAMS, MASK, NUM_SECTIONS
};

constexpr int MAX_ROWS = 8;      // query rows (query x head-of-group) fused per unit

// Rows of a unit: the kernels are instantiated for 1, 2, 3, 4 and 8 rows only
// (compile time); other counts are split into those.
inline int64_t row_chunk(int64_t remaining) {
  return remaining >= 8 ? 8 : remaining >= 4 ? 4 : remaining;
}
constexpr int MAX_HEAD = 256;    // largest head size supported
constexpr int MAX_BLOCK = 1024;  // largest block size supported

struct PageLayout {
  int64_t block_size, head_size, num_kv_heads, hi_bits, lo_bits, n_hi;
  int64_t head_bytes, page_bytes;
  int64_t off[NUM_SECTIONS];
};

// Everything one attention unit needs (raw pointers, all checked by the host op).
struct AttnArgs {
  PageLayout L;
  const float* q;            // [nq_total, Hq, D], already multiplied by the softmax scale
  const uint8_t* pages;      // [num_pages, page_stride]
  int64_t page_stride;       // bytes between consecutive pages
  const int64_t* block_table;  // [nreq, bt_stride]
  int64_t bt_stride;
  const int64_t* num_blocks;   // [nreq]
  const int64_t* q_start;      // [nreq + 1] first query row of each request
  int64_t num_q_heads;         // Hq
  int64_t group;               // Hq / Hk
  int64_t split_blocks;        // blocks per split-K chunk
  int64_t partial_split_stride;  // floats between two splits of the partial buffer
  float* partial;              // [S, nq_total * Hq, D + 2]: (m, l, acc[D]) per row
};

// One unit of work: request, kv head, first row (of the request's nq*g rows),
// number of rows (<= MAX_ROWS), split index.
struct Unit {
  int64_t req, kv_head, row0, nrows, split;
};

#define ZC_DECLARE_ISA(ns)                                            \
  namespace ns {                                                      \
  void attend_units(const AttnArgs& a, const Unit* units, int64_t n); \
  }
ZC_DECLARE_ISA(scalar)
ZC_DECLARE_ISA(avx2)
ZC_DECLARE_ISA(avx512)
#undef ZC_DECLARE_ISA

// Element type of a rotation's input or output row.
enum class FloatKind { f32, bf16, f16 };

namespace avx512 {
// One row of the Hadamard rotation (rotate.cpp): y = x H / sqrt(D), float64 butterfly.
// Returns false, having maybe written part of y, when it cannot give the portable
// loop's bits (D not a power of two in [8, 256], or a NaN into a half output).
bool rotate_row(const void* x, FloatKind in, void* y, FloatKind out, int64_t D);
}  // namespace avx512

}  // namespace zc
