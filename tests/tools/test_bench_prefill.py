"""`zipcache-vllm bench prefill`: both sides attend the same prompt, and the table is built.

vLLM's side (its CPU_ATTN ops) must equal explicit causal attention up to bf16 rounding,
and zipcache's side (the backend step) must approximate it as the backend tests'
end-to-end tolerance allows: so the timed calls do the same work.
"""
import pytest
import torch

from zipcache_vllm.bench import prefill
from zipcache_vllm.bench.kernels import VllmCpuAttention

from _dense import dense_reference


@pytest.mark.parametrize("Hq,Hk,D,ctx", [(9, 3, 64, 300), (8, 2, 128, 129)])
def test_both_sides_attend_the_same_prompt(Hq, Hk, D, ctx):
    q, k, v = prefill.inputs(Hq, Hk, D, ctx, seed=1)
    expect = dense_reference(q, k, v, D ** -0.5)
    zc_call, zc_out, layout = prefill.zipcache_call(q, k, v, "zipcache")
    vl_call, vl_out, _ = VllmCpuAttention().prefill_setup(q, k, v, layout.block_size)
    zc_call()
    vl_call()
    torch.testing.assert_close(vl_out.float(), expect, atol=2e-2, rtol=2e-2)
    # packed blocks (4/2-bit) are lossy: relative error of the whole output, as the
    # backend's end-to-end tests measure it
    rel = float((zc_out.float() - expect).norm() / expect.norm())
    assert rel < 0.25, rel
    # the first block's queries see only full-precision keys: no quantization error there
    B = layout.block_size
    torch.testing.assert_close(zc_out[:B].float(), expect[:B], atol=2e-2, rtol=2e-2)


def test_quick_run_builds_the_table():
    res = prefill.run(quick=True)
    assert [(r["shape"], r["ctx"]) for r in res["rows"]] == [("smollm2", 512), ("llama", 512)]
    assert all(r["t_vllm"] > 0 and r["t_zc"] > 0 for r in res["rows"])
    table = prefill.format_table(res)
    assert table.count("\n| ") == 3  # header + 2 rows
    assert "zipcache / vLLM speed" in table


def test_profile_table_names_the_step_s_ops():
    table = prefill.profile_table("zipcache", 9, 3, 64, 300, rows=5)
    lines = table.splitlines()
    assert lines[0].startswith("| op | self ms | calls | share of ") and len(lines) == 2 + 5
    assert any("flash_attention" in line for line in lines[2:])  # the prefix / window attention
    shares = [int(line.rsplit("|", 2)[1].strip().rstrip("%")) for line in lines[2:]]
    assert shares == sorted(shares, reverse=True) and sum(shares) <= 101
