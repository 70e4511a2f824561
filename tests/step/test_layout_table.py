"""`zipcache-vllm layout`: parts add up to the page the packer writes."""
import pytest
import torch

from zipcache_vllm.cli import main as cli_main
from zipcache_vllm.config import load_preset
from zipcache_vllm.layout import BlockLayout
from zipcache_vllm.planner.layout_table import layout_rows
from zipcache_vllm.quant import quantize_pack_blocks, topk_salient_mask


@pytest.mark.parametrize("head_size,heads", [(64, 3), (128, 8)])
def test_parts_sum_to_the_packed_page(head_size, heads):
    for row in layout_rows(head_size, heads):
        parts = row["codes"] + row["key_params"] + row["value_params"] + row["mask"] + row["padding"]
        assert parts == pytest.approx(row["bytes_per_token_per_head"])
        preset = load_preset(row["preset"])
        layout = BlockLayout.from_preset(preset, head_size, heads)
        B = layout.block_size
        k = torch.randn(1, B, heads, head_size)
        page = quantize_pack_blocks(k, k, topk_salient_mask(torch.rand(1, heads, B), layout.n_hi), layout)
        assert page.numel() == row["page_bytes"] == row["bytes_per_token_per_head"] * B * heads


def test_cli_prints_every_quantizing_preset(capsys):
    assert cli_main(["layout"]) == 0
    out = capsys.readouterr().out
    for name in ("zipcache", "zipcache_hc", "kivi2", "kivi3", "kivi4"):
        assert f"| {name} |" in out
    assert "| fastgen" not in out
    assert cli_main(["layout", "--presets", "nope"]) == 2


def test_no_quantizing_preset_is_an_error(monkeypatch, capsys):
    """An installation without its presets prints no empty table with exit 0: it fails and says where
    it looked."""
    from zipcache_vllm.planner import layout_table

    monkeypatch.setattr(layout_table, "list_presets", lambda: ["none"])
    assert cli_main(["layout"]) == 2
    assert "no quantizing preset" in capsys.readouterr().err
