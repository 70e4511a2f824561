"""Bytes per token of every quantizing preset, part by part, from :class:`BlockLayout`."""
from __future__ import annotations

from ..config import list_presets, load_preset
from ..layout import BlockLayout


def layout_rows(head_size: int, num_kv_heads: int, presets: list[str] | None = None) -> list[dict]:
    rows = []
    for name in presets or list_presets():
        preset = load_preset(name)
        if not preset.quantizes:
            continue
        L = BlockLayout.from_preset(preset, head_size, num_kv_heads)
        b = L.breakdown()
        rows.append({
            "preset": name,
            "bits": f"{L.hi_bits}/{L.lo_bits}",
            "salient": f"{L.n_hi}/{L.block_size}",
            "page_bytes": L.page_bytes,
            "codes": sum(v for k, v in b.items() if k.endswith("_codes")),
            "key_params": b["k_hi_params"] + b["k_lo_params"],
            "value_params": b["v_channel_scale"] + b["v_token_params"],
            "mask": b["mask"],
            "padding": b["padding"],
            "bytes_per_token_per_head": L.bytes_per_token_per_head,
            "compression": L.compression_vs_bf16,
        })
    return rows


def markdown(rows: list[dict], head_size: int, num_kv_heads: int) -> str:
    out = [f"Head size {head_size}, {num_kv_heads} KV heads per page; bytes per token per KV head "
           f"(bf16: {4 * head_size}). Staging (one bf16 block per running request) is not included here.",
           "",
           "| preset | bits hi/lo | salient per block | page bytes (layer, block) | codes | key params | "
           "value params | mask | padding | total | vs bf16 |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['preset']} | {r['bits']} | {r['salient']} | {r['page_bytes']} | {r['codes']:.3f} | "
                   f"{r['key_params']:.3f} | {r['value_params']:.3f} | {r['mask']:.3f} | {r['padding']:.3f} | "
                   f"{r['bytes_per_token_per_head']:.3f} | {r['compression']:.2f}x |")
    return "\n".join(out)
