"""Host wrappers of the kernels: route by device, check, then launch.

:func:`kernel_path` is the one place that decides which implementation runs an op:

* ``"triton"``: CUDA tensors, the Triton kernels (:mod:`.gpu`, ``triton_kernels/``);
  ``ZIPCACHE_VLLM_KERNELS=triton`` forces it on CPU tensors for the tests (Triton's
  interpreter, ``TRITON_INTERPRET=1``);
* ``"cpp"``: CPU tensors, the C++ kernels (``torch.ops.zipcache``, ``csrc/``);
* ``"torch"``: CPU tensors when the C++ extension cannot be built (no compiler, compile
  error: a warning, ONCE) or with ``ZIPCACHE_VLLM_KERNELS=torch`` (``reference``, its
  older spelling, still works): the portable PyTorch path (:mod:`.portable`, the page
  format's own ``quant.block`` functions, ``quant.rotation``).

Every public function validates shapes, dtypes, devices and strides and raises
``ValueError`` on misuse before launching; the kernels trust these checks (the C++ ops
keep only cheap asserts where a bad argument would reach memory it must not, see
``csrc/``). :class:`DecodePlan` checks a decode step's index tensors once, at plan time,
for every layer. ``ZIPCACHE_VLLM_KERNEL_ISA=scalar|avx2|avx512`` forces the C++
kernels' ISA variant.

Layout parameters come from :class:`~zipcache_vllm.layout.BlockLayout` (block
size, head size, KV heads, bit widths, salient count) and its ``sections``
(byte offsets): the dataclass stays the single source of truth.

Attention results are float32 ``out [nq, Hq, D]`` and the natural-log
log-sum-exp of the scaled scores ``lse [Hq, nq]`` (``-inf`` and ``out = 0`` for
a request with no packed block), ready for a log-sum-exp merge with the staging
part (:mod:`zipcache_vllm.engine.attention`).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..layout import BlockLayout, StagingLayout
from ..quant import rotation
from ..quant.block import quantize_pack_blocks, unpack_dequantize_blocks
from . import build, portable

# Section order expected by csrc/zc_kernels.h (enum SectionIdx).
SECTION_ORDER = ("k_hi_codes", "k_lo_codes", "v_hi_codes", "v_lo_codes", "k_hi_params",
                 "k_lo_params", "v_channel_scale", "v_token_params", "mask")
MAX_HEAD_SIZE = 256  # csrc MAX_HEAD
MAX_BLOCK_SIZE = 1024  # csrc MAX_BLOCK
Q_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
TORCH_ROUTE = ("torch", "reference")  # ZIPCACHE_VLLM_KERNELS values that force the portable path

_fallback_warned = False
# What the fallback costs, measured with `zipcache-vllm bench kernels --contexts 1024,4096
# --batches 1,8 --timer cpu`, with and without ZIPCACHE_VLLM_KERNELS=torch (one thread,
# SmolLM2 and Llama-like shapes): decode attention 18-24x slower than the C++ kernels,
# about 10x slower than vLLM's own bf16 CPU attention.
REFERENCE_COST = ("about 20x slower decode attention than the C++ kernels and about 10x slower "
                  "than vLLM's bf16 attention (zipcache-vllm bench kernels, 1k-4k context)")


def _forced_route() -> str:
    """``ZIPCACHE_VLLM_KERNELS``, lower case ("" = route by device)."""
    return os.environ.get("ZIPCACHE_VLLM_KERNELS", "").lower()


def _use_extension() -> bool:
    """True when the C++ ops are usable and not switched off; a failed build warns once."""
    global _fallback_warned
    if _forced_route() in TORCH_ROUTE:
        return False
    try:
        build.load()
        return True
    except build.KernelBuildError as exc:
        if not _fallback_warned:
            _fallback_warned = True
            warnings.warn(
                f"\n*** zipcache C++ kernels unavailable: {exc}\n*** Using the portable PyTorch path instead, "
                f"{REFERENCE_COST}.\n*** Fix: install zipcache_vllm with the kernels built against the "
                "installed torch (pip install --no-build-isolation ...) or give this machine a C++ "
                "compiler (they then compile on first use); ZIPCACHE_VLLM_KERNELS=torch silences "
                "this.", RuntimeWarning, stacklevel=3)
        return False


def uses_triton(t: torch.Tensor) -> bool:
    """Whether ops on ``t`` run the Triton kernels (:func:`kernel_path` ``"triton"``): CUDA
    tensors, or forced for tests with ``ZIPCACHE_VLLM_KERNELS=triton`` (then under
    ``TRITON_INTERPRET=1`` on CPU tensors)."""
    return t.is_cuda or _forced_route() == "triton"


def kernel_path(t: torch.Tensor) -> str:
    """Which implementation runs an op on ``t``: ``"triton"``, ``"cpp"`` or ``"torch"``
    (the module docstring); the only routing decision of the package."""
    if uses_triton(t):
        return "triton"
    return "cpp" if t.is_cpu and _use_extension() else "torch"


def _check_same_device(**tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"tensors must be on one device, got {sorted(map(str, devices))}")


def kernels_available() -> bool:
    """Whether the C++ extension is built and loaded (builds it on first call)."""
    try:
        build.load()
        return True
    except build.KernelBuildError:
        return False


def _requested_isa() -> str:
    """``ZIPCACHE_VLLM_KERNEL_ISA`` ("" = the CPU's best), passed to the C++ ops."""
    return os.environ.get("ZIPCACHE_VLLM_KERNEL_ISA", "")


def cpu_isa() -> str:
    """ISA variant the CPU kernels run with: ``avx512``, ``avx2`` or ``scalar`` (``torch``:
    the portable PyTorch path)."""
    if not _use_extension():
        return "torch"
    return _requested_isa() or torch.ops.zipcache.cpu_isa()


@lru_cache(maxsize=64)
def _arange(n: int) -> torch.Tensor:
    """Cached int64 ``arange(n)`` (query_start_loc of a decode batch; never written to)."""
    return torch.arange(n, dtype=torch.int64)


@lru_cache(maxsize=256)
def layout_args(layout: BlockLayout) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The integer layout vector and section offsets passed to the C++ ops, for a layout the
    kernels support (checked and computed once per layout: a failed check is not cached)."""
    _check_layout(layout)
    offs = {s.name: s.offset for s in layout.sections}
    return ((layout.block_size, layout.head_size, layout.num_kv_heads, layout.hi_bits,
             layout.lo_bits, layout.n_hi, layout.head_bytes, layout.page_bytes),
            tuple(offs[name] for name in SECTION_ORDER))


def _check_layout(layout: BlockLayout) -> None:
    if not isinstance(layout, BlockLayout):
        raise ValueError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if layout.head_size > MAX_HEAD_SIZE or layout.block_size > MAX_BLOCK_SIZE:
        raise ValueError(f"kernels support head_size <= {MAX_HEAD_SIZE} and block_size <= "
                         f"{MAX_BLOCK_SIZE}, got {layout.head_size} and {layout.block_size}")


def _check_cpu(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_cpu:
            raise ValueError(f"{name} must be on the CPU, got {t.device}")


def _check_pages(pages: torch.Tensor, layout: BlockLayout) -> None:
    page_bytes = layout_args(layout)[0][7]
    if pages.dtype != torch.uint8 or pages.dim() != 2 or pages.shape[1] != page_bytes:
        raise ValueError(f"pages must be uint8 [num_pages, {page_bytes}], got "
                         f"{pages.dtype} {list(pages.shape)}")
    if pages.stride(1) != 1 or pages.stride(0) < page_bytes:
        raise ValueError(f"pages must have rows of contiguous bytes, got strides {pages.stride()}")


def _check_q(q: torch.Tensor, layout: BlockLayout) -> None:
    if q.dim() != 3 or q.dtype not in Q_DTYPES:
        raise ValueError(f"q must be [n, Hq, D] of {Q_DTYPES}, got {q.dtype} {list(q.shape)}")
    if q.shape[2] != layout.head_size or q.shape[1] % layout.num_kv_heads:
        raise ValueError(f"q must be [n, Hq, {layout.head_size}] with Hq a multiple of "
                         f"{layout.num_kv_heads} KV heads, got {list(q.shape)}")


def _check_index(name: str, t: torch.Tensor, dim: int) -> None:
    if t.dtype not in INDEX_DTYPES or t.dim() != dim:
        raise ValueError(f"{name} must be a {dim}-d int32/int64 tensor, got {t.dtype} {list(t.shape)}")


def attend_packed_varlen(q: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor,
                         num_blocks: torch.Tensor, query_start_loc: torch.Tensor,
                         layout: BlockLayout, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each request's queries over its complete packed blocks (no mask).

    Args:
        q: ``[nq, Hq, D]`` float32/bfloat16/float16, rows of request ``r`` are
            ``query_start_loc[r]:query_start_loc[r+1]``.
        pages: uint8 ``[num_pages, page_bytes]``, one layer's cache.
        block_table: int32/int64 ``[nreq, max_blocks]``; request ``r`` reads its first
            ``num_blocks[r]`` entries (any order: attention is order-free here).
        num_blocks: int32/int64 ``[nreq]``.
        query_start_loc: int32/int64 ``[nreq + 1]``, from 0 to ``nq``.
        layout: the pages' :class:`BlockLayout`; scale: softmax scale.
    Returns:
        ``out`` float32 ``[nq, Hq, D]``, ``lse`` float32 ``[Hq, nq]`` (natural log).
    """
    _check_layout(layout)
    path = kernel_path(q)
    tensors = dict(q=q, pages=pages, block_table=block_table, num_blocks=num_blocks,
                   query_start_loc=query_start_loc)
    if path == "triton":
        _check_same_device(**tensors)
    else:
        _check_cpu(**tensors)
    _check_q(q, layout)
    _check_pages(pages, layout)
    _check_index("block_table", block_table, 2)
    _check_index("num_blocks", num_blocks, 1)
    _check_index("query_start_loc", query_start_loc, 1)
    nreq = block_table.shape[0]
    if num_blocks.shape[0] != nreq or query_start_loc.shape[0] != nreq + 1:
        raise ValueError(f"num_blocks must be [{nreq}] and query_start_loc [{nreq + 1}], got "
                         f"{list(num_blocks.shape)} and {list(query_start_loc.shape)}")
    if path == "triton":  # values unchecked: reading them would sync with the device
        from . import gpu

        return gpu.attend_packed_varlen(q, pages, block_table, num_blocks, query_start_loc,
                                        layout, float(scale))
    if path == "cpp":  # the op checks the values itself, in its one pass over them
        lay, offs = layout_args(layout)
        return torch.ops.zipcache.attend_packed(q, pages, block_table, num_blocks, query_start_loc,
                                                lay, offs, float(scale), _requested_isa())
    if nreq:
        nb_min, nb_max = int(num_blocks.min()), int(num_blocks.max())
        if nb_min < 0 or nb_max > block_table.shape[1]:
            raise ValueError(f"num_blocks must be in [0, {block_table.shape[1]}], got [{nb_min}, {nb_max}]")
        qsl = query_start_loc
        if int(qsl[0]) != 0 or int(qsl[-1]) != q.shape[0] or bool((qsl[1:] < qsl[:-1]).any()):
            raise ValueError(f"query_start_loc must rise from 0 to nq={q.shape[0]}, got {qsl.tolist()}")
        if nb_max:
            used = torch.arange(block_table.shape[1]).unsqueeze(0) < num_blocks.unsqueeze(1)
            ids = block_table[used]
            if int(ids.min()) < 0 or int(ids.max()) >= pages.shape[0]:
                raise ValueError(f"block ids must be in [0, {pages.shape[0]}), got "
                                 f"[{int(ids.min())}, {int(ids.max())}]")
    return portable.attend_packed_varlen(q, pages, block_table, num_blocks, query_start_loc,
                                         layout, float(scale))


def attend_packed(q: torch.Tensor, pages: torch.Tensor, block_ids: torch.Tensor,
                  layout: BlockLayout, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One request: ``q [nq, Hq, D]`` over the packed blocks ``block_ids [nb]`` (int32/int64).

    Returns ``out`` float32 ``[nq, Hq, D]`` and ``lse`` float32 ``[Hq, nq]``.
    """
    _check_index("block_ids", block_ids, 1)
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be [nq, Hq, D], got {getattr(q, 'shape', type(q))}")
    nb = block_ids.shape[0]
    dev = block_ids.device
    return attend_packed_varlen(q, pages, block_ids.reshape(1, nb),
                                torch.tensor([nb], dtype=torch.int64, device=dev),
                                torch.tensor([0, q.shape[0]], dtype=torch.int64, device=dev), layout, scale)


def attend_packed_batch(q: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor,
                        num_blocks: torch.Tensor, layout: BlockLayout,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched decode: request ``r`` has one query ``q[r]`` and blocks ``block_table[r, :num_blocks[r]]``.

    Args: q ``[nreq, Hq, D]``, block_table int32/int64 ``[nreq, max_blocks]``, num_blocks ``[nreq]``.
    Returns ``out`` float32 ``[nreq, Hq, D]`` and ``lse`` float32 ``[Hq, nreq]``.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be [nreq, Hq, D], got {getattr(q, 'shape', type(q))}")
    if block_table.dim() != 2 or block_table.shape[0] != q.shape[0]:
        raise ValueError(f"block_table must be [{q.shape[0]}, max_blocks], got {list(block_table.shape)}")
    qsl = _arange(q.shape[0] + 1) if q.is_cpu else torch.arange(q.shape[0] + 1, device=q.device)
    return attend_packed_varlen(q, pages, block_table, num_blocks, qsl, layout, scale)


def quantize_pack(k: torch.Tensor, v: torch.Tensor, salient: torch.Tensor,
                  layout: BlockLayout) -> torch.Tensor:
    """Quantize full blocks into pages, byte-identical to ``quant.block.quantize_pack_blocks``.

    Args:
        k, v: ``[N, B, H, D]`` float32/bfloat16/float16 keys (after RoPE) and values.
        salient: bool ``[N, H, B]`` with exactly ``layout.n_hi`` True per (block, head).
    Returns:
        uint8 ``[N, layout.page_bytes]``.
    """
    _check_layout(layout)
    path = kernel_path(k)
    if path == "triton":
        _check_same_device(k=k, v=v, salient=salient)
    else:
        _check_cpu(k=k, v=v, salient=salient)
    B, H, D = layout.block_size, layout.num_kv_heads, layout.head_size
    if k.dim() != 4 or tuple(k.shape[1:]) != (B, H, D) or v.shape != k.shape:
        raise ValueError(f"k and v must be [N, {B}, {H}, {D}], got {list(k.shape)} and {list(v.shape)}")
    if k.dtype not in Q_DTYPES or v.dtype not in Q_DTYPES:
        raise ValueError(f"k and v must be one of {Q_DTYPES}, got {k.dtype} and {v.dtype}")
    n = k.shape[0]
    if salient.dtype != torch.bool or tuple(salient.shape) != (n, H, B):
        raise ValueError(f"salient must be bool [{n}, {H}, {B}], got {salient.dtype} {list(salient.shape)}")
    if n and not bool((salient.sum(-1) == layout.n_hi).all()):
        raise ValueError(f"every (block, head) needs exactly n_hi={layout.n_hi} salient tokens")
    if path == "triton":
        from . import gpu

        return gpu.quantize_pack(k, v, salient, layout)
    if path == "torch":
        return quantize_pack_blocks(k, v, salient, layout)
    lay, offs = layout_args(layout)
    return torch.ops.zipcache.quantize_pack(k, v, salient, lay, offs)


def dequantize_pages(pages: torch.Tensor, layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 keys and values ``[N, H, B, D]`` of pages ``uint8 [N, page_bytes]``, tokens in
    storage order (salient first): the same bits as
    ``quant.block.unpack_dequantize_blocks(pages, layout, order="storage")``."""
    _check_layout(layout)
    _check_pages(pages, layout)
    if kernel_path(pages) == "cpp":
        lay, offs = layout_args(layout)
        return torch.ops.zipcache.dequantize_pages(pages, lay, offs)
    return unpack_dequantize_blocks(pages, layout, order="storage")


def decode_staged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                  pages: torch.Tensor, block_table: torch.Tensor, num_blocks: torch.Tensor,
                  slots: torch.Tensor, staged: torch.Tensor, probe: torch.Tensor,
                  pool_k: torch.Tensor, pool_v: torch.Tensor, pool_score: torch.Tensor,
                  pool_count: torch.Tensor, out: torch.Tensor, layout: BlockLayout,
                  scale: float) -> None:
    """Fused decode step of one layer for ``R`` rows with one new token each (in place).

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, H, D]`` (one float dtype); out: ``[T, Hq, D]`` (q's
            dtype or float32); all with unit inner stride; row ``r`` is ``rows[r]`` of these.
        pages: uint8 ``[num_pages, page_bytes]``; block_table int64 ``[R, max_blocks]``,
            num_blocks int64 ``[R]``: the row's complete packed blocks.
        slots, staged: int64 ``[R]``: the row's staging slot and its staged tokens
            (``0 <= staged < C``; the new token goes to index ``staged``).
        probe: float32 ``[R]``: 1 where the row's query scores its staged tokens, else 0.
        pool_k, pool_v: ``[S, H, C, D]`` one layer of the staging pool (any float dtype;
            the new K/V are rounded to it), ``C`` its capacity, a positive multiple of
            ``B`` (``B``: one block; ``2 B`` with a saliency delay of one block, which keeps a
            filled block staged until the next block's queries have scored it);
        pool_score float32 ``[S, H, C]``, pool_count float32 ``[S, C]``.
    Semantics: :func:`.portable.decode_staged` (its test oracle:
    :func:`.reference.decode_staged_ref`). A step that runs every layer over the same rows
    plans once (:class:`DecodePlan`) and runs it per layer.
    """
    _check_layout(layout)
    capacity = pool_k.shape[2] if isinstance(pool_k, torch.Tensor) and pool_k.dim() == 4 else None
    plan = DecodePlan.create(rows, block_table, num_blocks, slots, staged, probe, layout.block_size,
                             capacity=capacity)
    plan.run(q, k, v, pages, pool_k, pool_v, pool_score, pool_count, out, layout, scale)


def _decode_bounds(rows: torch.Tensor, block_table: torch.Tensor, num_blocks: torch.Tensor,
                   slots: torch.Tensor, staged: torch.Tensor,
                   capacity: int) -> tuple[int, int, int, int]:
    """Checks the values of a decode step's index tensors (on the host: on CUDA a few small
    device-to-host copies per step, none per layer; ``staged`` below the staging
    ``capacity``) and returns the exclusive upper bounds of the query rows, staging slots,
    block ids and staged indices they address, which every layer's tensors must cover
    (:meth:`DecodePlan.run` compares sizes only)."""
    R = rows.shape[0]
    if R == 0:
        return 0, 0, 0, 0
    rows_l, slots_l, staged_l, nb_l = (t.tolist() for t in (rows, slots, staged, num_blocks))
    if min(rows_l) < 0 or min(slots_l) < 0:
        raise ValueError(f"rows and slots must be >= 0, got {rows_l} and {slots_l}")
    if len(set(slots_l)) != R:
        raise ValueError(f"two rows share a staging slot: slots {slots_l}")
    if min(staged_l) < 0 or max(staged_l) >= capacity:
        raise ValueError(f"staged must be in [0, {capacity}), got {staged_l}")
    max_blocks = block_table.shape[1]
    if min(nb_l) < 0 or max(nb_l) > max_blocks:
        raise ValueError(f"num_blocks must be in [0, {max_blocks}], got {nb_l}")
    pages_end = 0
    if max(nb_l):
        used = _arange(max_blocks).unsqueeze(0) < num_blocks.cpu().unsqueeze(1)
        lo, hi = torch.aminmax(block_table.cpu()[used])
        if int(lo) < 0:
            raise ValueError(f"block ids must be >= 0, got {int(lo)}")
        pages_end = int(hi) + 1
    return max(rows_l) + 1, max(slots_l) + 1, pages_end, max(staged_l) + 1


def _check_decode_layer(bounds: tuple[int, int, int], staged_end: int, q: torch.Tensor,
                        k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor,
                        pool_k: torch.Tensor, pool_v: torch.Tensor, pool_score: torch.Tensor,
                        pool_count: torch.Tensor, out: torch.Tensor, layout: BlockLayout) -> None:
    """One layer's tensors of a planned decode step (the C++ op checks the same itself):
    the pool holds ``C`` tokens a slot, a positive multiple of the block size, at least
    ``staged_end`` (one past the largest staged index the plan addresses)."""
    _check_q(q, layout)
    _check_pages(pages, layout)
    H, B, D = layout.num_kv_heads, layout.block_size, layout.head_size
    T = q.shape[0]
    if tuple(k.shape) != (T, H, D) or v.shape != k.shape or out.shape != q.shape:
        raise ValueError(f"k, v must be [{T}, {H}, {D}] and out like q {list(q.shape)}, got "
                         f"{list(k.shape)}, {list(v.shape)}, {list(out.shape)}")
    if len({q.dtype, k.dtype, v.dtype}) != 1 or pool_v.dtype != pool_k.dtype:
        raise ValueError("q, k and v must share one dtype, and pool_k and pool_v another")
    if out.dtype not in (q.dtype, torch.float32):
        raise ValueError(f"out must be {q.dtype} or float32, got {out.dtype}")
    if any(t.stride(-1) != 1 for t in (q, k, v, out, pool_k)):
        raise ValueError("q, k, v, out and the pool need a unit inner stride")
    if pool_k.dtype not in Q_DTYPES:
        raise ValueError(f"pool_k/pool_v must be one of {Q_DTYPES}, got {pool_k.dtype}")
    S = pool_k.shape[0]
    C = pool_k.shape[2] if pool_k.dim() == 4 else 0
    if (pool_k.dim() != 4 or tuple(pool_k.shape[1:]) != (H, C, D) or C < B or C % B
            or pool_v.shape != pool_k.shape or tuple(pool_score.shape) != (S, H, C)
            or tuple(pool_count.shape) != (S, C)
            or pool_score.dtype != torch.float32 or pool_count.dtype != torch.float32):
        raise ValueError(f"pool must be k/v [S, {H}, C, {D}] with C a positive multiple of "
                         f"B={B}, score float32 [S, {H}, C], count float32 [S, C]; got k "
                         f"{list(pool_k.shape)}, score {list(pool_score.shape)}, count "
                         f"{list(pool_count.shape)}")
    rows_end, slots_end, pages_end = bounds
    if T < rows_end or S < slots_end or pages.shape[0] < pages_end or C < staged_end:
        raise ValueError(f"the plan addresses query rows < {rows_end}, staging slots < {slots_end}, "
                         f"pages < {pages_end} and staged tokens < {staged_end}; this layer has "
                         f"{T}, {S}, {pages.shape[0]} and {C}")


@dataclass(frozen=True)
class DecodePlan:
    """The decode rows of a step, checked once (flashinfer's plan / run split).

    :meth:`create` picks the kernel path (:func:`kernel_path`) and checks the per-step
    index tensors (see :func:`decode_staged`): devices, dtypes, shapes, and their values
    (rows, slots, staged counts below ``capacity``, block ids), for every layer;
    :meth:`run`, called once per layer, checks only that layer's own tensors (their shapes
    cover the plan's ``bounds`` and ``staged_end``) and launches.
    """

    rows: torch.Tensor
    block_table: torch.Tensor
    num_blocks: torch.Tensor
    slots: torch.Tensor
    staged: torch.Tensor
    probe: torch.Tensor
    path: str  # kernel_path: "triton", "cpp" or "torch"
    isa: str  # ZIPCACHE_VLLM_KERNEL_ISA at plan time ("" = the CPU's best)
    bounds: tuple[int, int, int]  # exclusive bounds of the rows, slots and block ids addressed
    # Paged staging (None: the pool's slots): each row's page run [R, pages] in the cache.
    stage_ids: torch.Tensor | None = None
    staging: StagingLayout | None = None
    # The staging capacity the staged counts were checked against (staged < capacity).
    capacity: int | None = None
    # One past the largest staged index (0 without rows): what every layer's staging must
    # hold at least. None: the capacity (or the block size).
    staged_end: int | None = None

    @classmethod
    def create(cls, rows: torch.Tensor, block_table: torch.Tensor, num_blocks: torch.Tensor,
               slots: torch.Tensor, staged: torch.Tensor, probe: torch.Tensor,
               block_size: int, stage_ids: torch.Tensor | None = None,
               staging: StagingLayout | None = None, *,
               capacity: int | None = None) -> "DecodePlan":
        """``stage_ids`` int64 ``[R, staging.pages]``: with paged staging, the page run each
        row's staged tokens are in (its ``slots`` are then only bookkeeping keys).

        ``capacity``: the staged tokens a row holds at most (``staged < capacity``), a
        positive multiple of ``block_size`` (a staging pool's third dimension); None:
        ``staging.capacity`` with paged staging, else ``block_size`` (one staged block)."""
        tensors = dict(rows=rows, block_table=block_table, num_blocks=num_blocks, slots=slots,
                       staged=staged, probe=probe)
        if (stage_ids is None) != (staging is None):
            raise ValueError("paged staging needs both stage_ids and its staging layout")
        if staging is not None and staging.block_size != block_size:
            raise ValueError(f"staging layout block size {staging.block_size} != {block_size}")
        if capacity is None:
            capacity = staging.capacity if staging is not None else block_size
        if (not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < block_size
                or capacity % block_size):
            raise ValueError(f"capacity must be a positive multiple of the block size {block_size}, "
                             f"got {capacity!r}")
        if staging is not None and capacity > staging.capacity:
            raise ValueError(f"capacity {capacity} exceeds the staging layout's {staging.capacity}")
        if stage_ids is not None:
            tensors["stage_ids"] = stage_ids
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        path = kernel_path(rows)
        if path == "triton":
            _check_same_device(**tensors)
        else:
            _check_cpu(**tensors)
        R = rows.shape[0]
        for name, t in (("rows", rows), ("num_blocks", num_blocks), ("slots", slots),
                        ("staged", staged)):
            if t.dtype != torch.int64 or tuple(t.shape) != (R,):
                raise ValueError(f"{name} must be int64 [{R}], got {t.dtype} {list(t.shape)}")
        if probe.dtype != torch.float32 or tuple(probe.shape) != (R,):
            raise ValueError(f"probe must be float32 [{R}], got {probe.dtype} {list(probe.shape)}")
        if block_table.dtype != torch.int64 or block_table.dim() != 2 or block_table.shape[0] != R:
            raise ValueError(f"block_table must be int64 [{R}, max_blocks], got "
                             f"{list(block_table.shape)}")
        *bounds, staged_end = _decode_bounds(rows, block_table, num_blocks, slots, staged, capacity)
        if stage_ids is not None:
            if stage_ids.dtype != torch.int64 or tuple(stage_ids.shape) != (R, staging.pages):
                raise ValueError(f"stage_ids must be int64 [{R}, {staging.pages}], got "
                                 f"{stage_ids.dtype} {list(stage_ids.shape)}")
            if R:
                lo, hi = (int(x) for x in torch.aminmax(stage_ids.cpu()))
                if lo < 0:
                    raise ValueError(f"stage_ids must be >= 0, got {lo}")
                bounds[2] = max(bounds[2], hi + 1)
            stage_ids = stage_ids.contiguous()
        # contiguous: the C++ op reads them as plain arrays
        return cls(rows.contiguous(), block_table.contiguous(), num_blocks.contiguous(),
                   slots.contiguous(), staged.contiguous(), probe.contiguous(), path,
                   _requested_isa(), tuple(bounds), stage_ids, staging, capacity, staged_end)

    def _staged_end(self, layout: BlockLayout) -> int:
        """The exclusive bound of the staged indices the plan addresses."""
        if self.staged_end is not None:
            return self.staged_end
        return self.capacity if self.capacity is not None else layout.block_size

    def _op_bounds(self, layout: BlockLayout) -> tuple[int, int, int, int]:
        """``bounds`` of the C++ ops: the plan's bounds and its staged bound."""
        return (*self.bounds, self._staged_end(layout))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`hadamard_rotate` of ``x`` into its own dtype on the plan's kernel path
        (the C++ op directly, without re-reading the kernel settings for every layer)."""
        if self.path == "cpp" and x.dtype in Q_DTYPES:
            return torch.ops.zipcache.hadamard_rotate(x, x.dtype, self.isa)
        return hadamard_rotate(x, x.dtype)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor,
            pool_k: torch.Tensor, pool_v: torch.Tensor, pool_score: torch.Tensor,
            pool_count: torch.Tensor, out: torch.Tensor, layout: BlockLayout,
            scale: float) -> None:
        """One layer's fused decode step over the planned rows (arguments as in
        :func:`decode_staged`).

        The layer's tensors are checked once (ValueError): on the C++ path by the op itself
        (shapes against the layout and the plan's ``bounds``, a few integer compares), so
        the per-layer Python is one cached layout lookup and the launch; on the other paths
        here. With paged staging the pool arguments are None: the staged tokens are the
        rows' page runs of ``pages`` (:meth:`run_paged`)."""
        if self.staging is not None:
            return self.run_paged(q, k, v, pages, out, layout, scale)
        if self.path == "cpp":
            if not isinstance(layout, BlockLayout):  # unhashable ones too: ValueError, not TypeError
                _check_layout(layout)
            lay, offs = layout_args(layout)
            torch.ops.zipcache.decode_staged(
                q, k, v, self.rows, pages, self.block_table, self.num_blocks, self.slots,
                self.staged, self.probe, pool_k, pool_v, pool_score, pool_count, out, lay, offs,
                float(scale), self.isa, self._op_bounds(layout))
            return
        _check_layout(layout)
        tensors = dict(q=q, k=k, v=v, pages=pages, pool_k=pool_k, pool_v=pool_v,
                       pool_score=pool_score, pool_count=pool_count, out=out)
        if self.path == "triton":
            _check_same_device(rows=self.rows, **tensors)
        else:
            _check_cpu(**tensors)
        _check_decode_layer(self.bounds, self._staged_end(layout), layout=layout, **tensors)
        meta = (self.rows, pages, self.block_table, self.num_blocks, self.slots, self.staged,
                self.probe, (pool_k, pool_v, pool_score, pool_count), out)
        if self.path == "triton":
            from . import gpu

            gpu.decode_staged(q, k, v, *meta, layout, float(scale))
        else:
            portable.decode_staged(q, k, v, *meta, layout, float(scale))

    def run_paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor,
                  out: torch.Tensor, layout: BlockLayout, scale: float) -> None:
        """:meth:`run` with paged staging: the C++ op reads and writes each row's page run in
        place (``zipcache::decode_paged``); the other paths gather the runs into dense slots,
        run the slot kernel and write the runs back (a copy per layer: the fallback)."""
        st = self.staging
        if self.path == "cpp":
            if not isinstance(layout, BlockLayout):
                _check_layout(layout)
            lay, offs = layout_args(layout)
            torch.ops.zipcache.decode_paged(
                q, k, v, self.rows, pages, self.block_table, self.num_blocks, self.stage_ids,
                self.staged, self.probe, out, lay, offs, st.args(), float(scale), self.isa,
                self._op_bounds(layout))
            return
        if q.dtype.itemsize != st.elt_bytes:
            raise ValueError(f"the staging layout holds {st.elt_bytes}-byte elements, q is {q.dtype}")
        R = self.rows.shape[0]
        q8 = st.kv_bits == 8
        k_st, v_st, score, count = portable.gather_staged(pages, self.stage_ids, st,
                                                          torch.float32 if q8 else q.dtype)
        # tokens past the staged ones hold stale bytes: zeros, so no NaN pattern reaches
        # the masked part of the slot kernel's sums
        stale = (torch.arange(st.capacity, device=q.device).unsqueeze(0)
                 >= self.staged.unsqueeze(1))[:, None, :, None]
        k_st, v_st = k_st.masked_fill(stale, 0).contiguous(), v_st.masked_fill(stale, 0).contiguous()
        score, count = score.contiguous(), count.contiguous()
        q_in, k_in, v_in, out_in = q, k, v, out
        if q8:  # the new tokens as the C++ op reads them back from their 8 bits, in float32
            q_in = q.float()
            k_in, v_in = k.to(torch.float32, copy=True), v.to(torch.float32, copy=True)
            k_in[self.rows] = portable.fake_quantize_rows8(k.index_select(0, self.rows))
            v_in[self.rows] = portable.fake_quantize_rows8(v.index_select(0, self.rows))
            out_in = torch.empty_like(q_in)
        slots = torch.arange(R, dtype=torch.int64, device=self.rows.device)
        dense = DecodePlan(self.rows, self.block_table, self.num_blocks, slots, self.staged,
                           self.probe, self.path, self.isa, (self.bounds[0], R, self.bounds[2]),
                           capacity=self.capacity, staged_end=self._staged_end(layout))
        dense.run(q_in, k_in, v_in, pages, k_st, v_st, score, count, out_in, layout, scale)
        # each run's tokens up to the new one only: its later pages may not be allocated yet
        # (StagingLayout.lookahead_blocks)
        written = self.staged + 1
        if not q8:
            portable.scatter_staged(pages, self.stage_ids, st, k_st, v_st, score, count,
                                    limit=written)
            return
        out[self.rows] = out_in.index_select(0, self.rows).to(out.dtype)
        portable.scatter_staged(pages, self.stage_ids, st, k_st, v_st, score, count,
                                kv_from=st.capacity, limit=written)
        portable.store_token(pages, self.stage_ids, st, self.staged,
                             k.index_select(0, self.rows), v.index_select(0, self.rows))


def hadamard_rotate(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x R`` along the last dimension (:mod:`zipcache_vllm.quant.rotation`), in ``dtype``
    (default float32): the same bits as the float64 matmul of ``quant.rotation`` rounded to
    float32 and then to ``dtype``, from one pass of the C++ butterfly on the CPU (eight
    doubles per register on AVX-512; that matmul elsewhere, or for float64 input)."""
    dtype = torch.float32 if dtype is None else dtype
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor with a last dimension to rotate")
    if not rotation.is_power_of_two(x.shape[-1]):
        raise ValueError(f"Hadamard rotation needs a power-of-two head size, got {x.shape[-1]}")
    if dtype not in Q_DTYPES:
        raise ValueError(f"dtype must be one of {Q_DTYPES}, got {dtype}")
    if x.dtype in Q_DTYPES and kernel_path(x) == "cpp":
        return torch.ops.zipcache.hadamard_rotate(x, dtype, _requested_isa())
    return rotation.hadamard_rotate(x).to(dtype)
