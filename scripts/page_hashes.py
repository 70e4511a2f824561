"""Hashes of the engine step's pages and attention outputs, for every paged preset.

A refactoring check: run it before and after a change that must not move a bit, and
compare the outputs (``diff``). Drives the production step functions without vLLM, as
the backend does: ``plan_step`` + ``apply_step`` (decode rows through
``apply_decode_rows``, chunks block by block) for every paged preset (a paged FastGen
preset with its policy's engine state), and ``run_request_step`` over whole prompts (the
tiled local-window attention). Prompts of awkward lengths are prefilled in chunks of
``CHUNK`` tokens, then decoded ``DECODE`` steps; GQA 9 query heads : 3 KV heads, head
size 64, float32 and bfloat16 inputs; each request alone and all of them in one batch.
Every case runs with the C++ kernels and with the PyTorch reference kernels
(``ZIPCACHE_VLLM_KERNELS=reference``).

Each line gives three digests: ``pages`` (the cache pages vLLM holds, with a FastGen
request's rungs), ``staging`` (the staged tokens and their saliency accumulators) and
``out`` (the attention outputs).

Usage: ``python scripts/page_hashes.py > hashes.txt`` (deterministic: seeded, one thread).
"""
from __future__ import annotations

import hashlib
import os

import torch

from zipcache_vllm.config import list_presets, load_preset
from zipcache_vllm.eval.fastgen_sim import class_bytes
from zipcache_vllm.layout import BlockLayout, FastGenLayout
from zipcache_vllm.engine.plan import plan_step
from zipcache_vllm.policies import make_policy
from zipcache_vllm.engine.staging import StagedBlock, StagingPool
from zipcache_vllm.engine.step import apply_step, rotate_inputs, run_request_step

LENGTHS = (1, 127, 129, 300, 515)
CHUNK = 100
DECODE = 3
HQ, H, D = 9, 3, 64
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}
KERNELS = ("cpp", "reference")


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def _digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(_bytes(t))
    return h.hexdigest()


class _Request:
    def __init__(self, prompt: int, dtype: torch.dtype, seed: int, first_block: int, B: int) -> None:
        g = torch.Generator().manual_seed(seed)
        n = prompt + DECODE
        self.prompt, self.len = prompt, n
        self.q = torch.randn(n, HQ, D, generator=g).to(dtype)
        self.k = (torch.randn(n, H, D, generator=g) * 2).to(dtype)
        self.v = torch.randn(n, H, D, generator=g).to(dtype)
        special = torch.rand(n, generator=g) < 0.03
        special[0] = True
        punct = (torch.rand(n, generator=g) < 0.15) & ~special
        self.cls = class_bytes(special, punct, n)
        nb = -(-n // B) + 1
        # block ids in decreasing order, away from 0: the table is not the identity
        self.block_ids = torch.arange(first_block + nb - 1, first_block - 1, -1, dtype=torch.int32)
        self.pos = 0

    def chunks(self) -> list[int]:
        sizes = [min(CHUNK, self.prompt - a) for a in range(0, self.prompt, CHUNK)]
        return sizes + [1] * DECODE


def _run_steps(preset, dtype: torch.dtype, reqs: list[_Request]) -> tuple[str, str, str]:
    """Drive ``reqs`` together through the engine step (a request joins every step until
    its schedule ends); returns the digests of (pages and FastGen rungs, staging, outputs)."""
    B = preset.block_size
    fastgen = preset.paged_fastgen
    layout = (FastGenLayout if fastgen else BlockLayout).from_preset(preset, head_size=D,
                                                                     num_kv_heads=H)
    policy = make_policy(preset)
    num_blocks = max(int(r.block_ids.max()) for r in reqs) + 1
    pages = torch.zeros(num_blocks, layout.page_bytes, dtype=torch.uint8)
    pool = StagingPool(["layer0"], len(reqs) + 1, B, H, D, dtype)
    state = policy.engine_state(1, pool.num_slots, H, B, None)
    scale = D ** -0.5
    schedules = [r.chunks() for r in reqs]
    outs: list[torch.Tensor] = []
    for step in range(max(len(s) for s in schedules)):
        rows = [(r, s[step]) for r, s in zip(reqs, schedules) if step < len(s)]
        qsl, seq_lens, q, k, v, wins = [0], [], [], [], [], []
        table = torch.zeros(len(rows), max(r.block_ids.numel() for r, _ in rows), dtype=torch.int32)
        for i, (r, c) in enumerate(rows):
            sl = slice(r.pos, r.pos + c)
            q.append(r.q[sl]), k.append(r.k[sl]), v.append(r.v[sl])
            qsl.append(qsl[-1] + c)
            seq_lens.append(r.pos + c)
            table[i, :r.block_ids.numel()] = r.block_ids
            wins.append(r.cls[r.pos - r.pos % B:r.pos + c])
        plans = plan_step(pool, B, qsl, seq_lens, table)
        q, k, v = torch.cat(q), torch.cat(k), torch.cat(v)
        out = torch.zeros(q.shape, dtype=dtype)
        apply_step(pool, 0, plans, q, k, v, pages, layout, policy, scale, out,
                   state=state, prepared=wins)
        outs.append(out)
        for r, c in rows:
            r.pos += c
    cache = [pages] + ([state.rung] if fastgen else [])
    return _digest(cache), _digest([pool.k, pool.v, pool.score, pool.count]), _digest(outs)


def _run_request_step(preset, dtype: torch.dtype, r: _Request) -> tuple[str, str, str]:
    """The whole prompt as one ``run_request_step`` (tiled window attention), then decode;
    returns the digests of (pages, the tails' accumulators, outputs and log-sum-exps)."""
    B = preset.block_size
    layout = BlockLayout.from_preset(preset, head_size=D, num_kv_heads=H)
    policy = make_policy(preset)
    q, k = rotate_inputs(layout, r.q, r.k)
    pages = torch.zeros(r.len // B + 1, layout.page_bytes, dtype=torch.uint8)

    def empty() -> StagedBlock:
        return StagedBlock(torch.zeros(H, B, D), torch.zeros(H, B, D), torch.zeros(H, B),
                           torch.zeros(B))

    staged, outs, state, ctx, n_pages = empty(), [], [], 0, 0
    for a, b in [(0, r.prompt)] + [(t, t + 1) for t in range(r.prompt, r.len)]:
        res = run_request_step(q[a:b], k[a:b], r.v[a:b], ctx, torch.arange(n_pages), pages,
                               staged, layout, policy, D ** -0.5)
        n_new = res.pages.shape[0]
        pages[n_pages:n_pages + n_new] = res.pages
        n_pages += n_new
        staged, t = empty(), res.tail_len
        staged.k[:, :t], staged.v[:, :t] = res.tail_k, res.tail_v
        staged.score[:, :t], staged.count[:t] = res.tail_score, res.tail_count
        outs += [res.out, res.lse]
        state += [res.tail_score, res.tail_count]
        ctx = b
    return _digest([pages]), _digest(state), _digest(outs)


def main() -> None:
    torch.set_num_threads(1)
    combined = hashlib.sha256()
    for kernels in KERNELS:
        os.environ["ZIPCACHE_VLLM_KERNELS"] = "reference" if kernels == "reference" else ""
        for name in list_presets():
            preset = load_preset(name)
            if not (preset.quantizes or preset.paged_fastgen):
                line = f"{kernels} {name}: no pages (not an engine preset)"
                print(line)
                combined.update(line.encode())
                continue
            B = preset.block_size
            for dname, dtype in DTYPES.items():
                cases = []
                for i, n in enumerate(LENGTHS):
                    cases.append((f"len{n}", lambda n=n, i=i: _run_steps(
                        preset, dtype, [_Request(n, dtype, 1000 + i, 1, B)])))
                cases.append(("batch", lambda: _run_steps(preset, dtype, [
                    _Request(n, dtype, 2000 + i, 1 + 8 * i, B) for i, n in enumerate(LENGTHS)])))
                if not preset.paged_fastgen:
                    for n in (300, 515):
                        cases.append((f"request_step{n}", lambda n=n: _run_request_step(
                            preset, dtype, _Request(n, dtype, 3000 + n, 1, B))))
                for case, run in cases:
                    pages_h, staging_h, out_h = run()
                    line = f"{kernels} {name} {dname} {case}: pages={pages_h} staging={staging_h} out={out_h}"
                    print(line, flush=True)
                    combined.update(line.encode())
    print(f"combined: {combined.hexdigest()}")


if __name__ == "__main__":
    main()
