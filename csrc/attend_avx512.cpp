// Attention kernel, avx512 build (see attend_impl.h). Every header is included
// BEFORE the target pragma, so no inline function of a shared header is
// compiled for this ISA (which could otherwise leak into other callers).
#include <cstdint>

#include "zc_kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#define ZC_F16C 1
#define ZC_ACC_REGS 16
#define ZC_PAIR16 1  // two tokens per 512-bit register (attend_impl.h)
#define ZC_NS zc_impl_avx512
#define ZC_ISA avx512
#include "attend_impl.h"
#else
// Not x86: the host never dispatches here; keep the symbol so the library links.
void zc::avx512::attend_units(const AttnArgs&, const Unit*, int64_t) { __builtin_trap(); }
#endif
