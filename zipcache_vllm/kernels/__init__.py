"""Fast CPU kernels for packed zipcache pages (C++ in ``csrc/``, built on first use).

Public entry points (host wrappers with argument checks, see :mod:`.ops`):

* :func:`attend_packed` - one request's queries over its packed blocks.
* :func:`attend_packed_batch` - batched decode, one query per request.
* :func:`attend_packed_varlen` - several requests with several queries each.
* :func:`quantize_pack` - full blocks to pages, byte-identical to the reference.
* :func:`decode_staged` - fused decode step: packed + staged attention, staging
  append, saliency accumulation (one call per layer); :class:`DecodePlan` splits it
  into a per-step plan (index tensors checked once) and a per-layer run.
* :func:`dequantize_pages` - pages to float32 keys/values (the prefill's dense prefix).
* :func:`hadamard_rotate` - the key/query rotation of rotated presets.

Falls back to the pure-PyTorch reference (:mod:`.reference`, warning once) when
the extension cannot be built. Importing this package is cheap: nothing is
compiled before the first kernel call.
"""
from .ops import (DecodePlan, attend_packed, attend_packed_batch, attend_packed_varlen, cpu_isa, decode_staged,
                  dequantize_pages, hadamard_rotate, kernels_available, layout_args, quantize_pack,
                  uses_triton)

__all__ = ["DecodePlan", "attend_packed", "attend_packed_batch", "attend_packed_varlen", "cpu_isa", "decode_staged",
           "dequantize_pages", "hadamard_rotate", "kernels_available", "layout_args", "quantize_pack",
           "uses_triton"]
