// Host-side helpers shared by the op files (ops.cpp, decode.cpp). Torch-free
// signatures over raw pointers; the callers check shapes and dtypes.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "zc_kernels.h"

namespace zc {

// Best kernel ISA of this CPU ("avx512", "avx2" or "scalar"), detected once by CPUID.
const std::string& best_isa();

// The ISA to run with: `requested` ("" or "auto" = best_isa()), checked to be known and
// supported by this CPU.
std::string resolve_isa(const std::string& requested);

// Parse the layout vector and section offsets passed from Python (layout.py).
PageLayout parse_layout(const std::vector<int64_t>& layout, const std::vector<int64_t>& offsets);

// Below this many multiply-adds (~0.3 ms on one AVX2 core) a call is not split
// across threads.
constexpr int64_t SERIAL_WORK = int64_t(2) << 20;

// Attention of pre-scaled float queries qf [nq, Hq, D] over each request's packed
// blocks: request r owns query rows [q_start[r], q_start[r+1]) and blocks
// block_table[r * bt_stride + 0 .. num_blocks[r]). Writes out [nq, Hq, D] (normalized,
// 0 where no block) and lse [Hq, nq] (natural log, -inf where no block).
struct PackedQuery {
  const float* qf;
  int64_t nq, num_q_heads;
  const uint8_t* pages;
  int64_t page_stride, num_pages;
  const int64_t* block_table;
  int64_t bt_stride;
  const int64_t* num_blocks;
  const int64_t* q_start;
  int64_t nreq;
};
void packed_attention(const PageLayout& L, const PackedQuery& p, const std::string& isa, float* out,
                      float* lse);

}  // namespace zc
