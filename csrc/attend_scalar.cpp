// Attention kernel, scalar build (see attend_impl.h). Every header is included
// BEFORE the target pragma, so no inline function of a shared header is
// compiled for this ISA (which could otherwise leak into other callers).
#include <cstdint>

#include "zc_kernels.h"

// Portable: x86-64 baseline (SSE2) or any other architecture GCC targets.
#define ZC_NS zc_impl_scalar
#define ZC_ISA scalar
#include "attend_impl.h"
