"""Pure-PyTorch reference quantizers: the ground truth every kernel is tested against."""
from .block import quantize_pack_blocks, topk_salient_mask, unpack_dequantize_blocks
from .packing import pack_bits, unpack_bits
from .uniform import dequantize, quantize, quant_params

__all__ = [
    "dequantize",
    "pack_bits",
    "quant_params",
    "quantize",
    "quantize_pack_blocks",
    "topk_salient_mask",
    "unpack_bits",
    "unpack_dequantize_blocks",
]
