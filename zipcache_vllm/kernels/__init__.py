"""The kernels over packed zipcache pages and their host wrappers.

C++ kernels for the CPU (``csrc/``, built at install or on first use), Triton kernels for
CUDA (``triton_kernels/``, :mod:`.gpu`), and a portable PyTorch path (:mod:`.portable`)
when the C++ extension cannot be built; :func:`kernel_path` (:mod:`.ops`) routes every
call by its tensors' device. :mod:`.reference` holds the tests' oracles.

Public entry points (host wrappers with argument checks, see :mod:`.ops`):

* :func:`attend_packed` - one request's queries over its packed blocks.
* :func:`attend_packed_batch` - batched decode, one query per request.
* :func:`attend_packed_varlen` - several requests with several queries each.
* :func:`quantize_pack` - full blocks to pages, byte-identical to ``quant.block``.
* :func:`decode_staged` - fused decode step: packed + staged attention, staging
  append, saliency accumulation (one call per layer); :class:`DecodePlan` splits it
  into a per-step plan (index tensors checked once) and a per-layer run.
* :func:`dequantize_pages` - pages to float32 keys/values (the prefill's dense prefix).
* :func:`hadamard_rotate` - the key/query rotation of rotated presets.
* :func:`gather_staged` / :func:`scatter_staged` - paged staging
  (:class:`~zipcache_vllm.layout.StagingLayout`) to dense tensors and back;
  :func:`move_staged` moves staged tokens between page runs, bit-exact.

Without the C++ extension the CPU runs the portable path, warning once. Importing this
package is cheap: nothing is compiled before the first kernel call.
"""
from .ops import (DecodePlan, attend_packed, attend_packed_batch, attend_packed_varlen, cpu_isa, decode_staged,
                  dequantize_pages, hadamard_rotate, kernel_path, kernels_available, layout_args,
                  quantize_pack, uses_triton)
from .portable import gather_staged, move_staged, scatter_staged

__all__ = ["DecodePlan", "attend_packed", "attend_packed_batch", "attend_packed_varlen", "cpu_isa", "decode_staged",
           "dequantize_pages", "hadamard_rotate", "kernel_path", "kernels_available", "layout_args",
           "gather_staged", "move_staged", "quantize_pack", "scatter_staged", "uses_triton"]
