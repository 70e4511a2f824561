"""The offline quality harness end to end on the embedded model (quick mode)."""
import json
import math

import pytest

from zipcache_vllm.cli import main as cli_main
from zipcache_vllm.layout import BlockLayout
from zipcache_vllm.config import load_preset

PRESETS = ["kivi2", "kivi3", "kivi4", "random_mixed", "h2o_mixed", "zipcache", "zipcache_hc", "fastgen_t90"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory, model_dir):
    out = tmp_path_factory.mktemp("eval")
    rc = cli_main(["eval", "--offline", "--quick", "--presets", ",".join(PRESETS), "--model", str(model_dir),
                   "--json", str(out / "rows.json"), "--markdown", str(out / "table.md")])
    assert rc == 0
    assert "| zipcache |" in (out / "table.md").read_text()
    return {r["label"]: r for r in json.loads((out / "rows.json").read_text())}


@pytest.mark.slow
def test_every_preset_runs_and_reports_finite_metrics(rows):
    assert set(PRESETS) | {"none (bf16)"} == set(rows)
    for r in rows.values():
        assert all(math.isfinite(r[k]) for k in ("bytes_per_token", "compression", "kl", "top1", "ppl"))
    assert rows["none (bf16)"]["kl"] == 0.0


@pytest.mark.slow
def test_bytes_come_from_the_layout(rows):
    for name in ("kivi3", "zipcache", "zipcache_hc"):
        layout = BlockLayout.from_preset(load_preset(name), 64, 3)
        assert rows[name]["bytes_per_token"] == pytest.approx(layout.bytes_per_token_per_head)
    assert 0.0 < rows["fastgen_t90"]["extra"]["kept_fraction"] < 1.0


@pytest.mark.slow
def test_quality_orders_as_the_methods_predict(rows):
    kl = {k: r["kl"] for k, r in rows.items()}
    assert kl["kivi4"] < kl["kivi3"] < kl["kivi2"]
    # same bytes, better saliency: normalized attention beats accumulated attention and chance
    assert kl["zipcache"] < kl["h2o_mixed"]
    assert kl["zipcache"] < kl["random_mixed"]
    # fewer salient tokens cost quality
    assert kl["zipcache"] < kl["zipcache_hc"] < kl["kivi2"]


def test_presets_and_ablations_by_name():
    """``--presets`` takes preset names and ablation labels (``abl:...``)."""
    from zipcache_vllm.config import PresetError
    from zipcache_vllm.eval.offline import named_variants

    base, rotated = named_variants(["zipcache", "abl:values=rotated"])
    assert (base.label, rotated.label) == ("zipcache", "abl:values=rotated")
    assert base.preset.value_rotation == "none" and rotated.preset.value_rotation == "hadamard"
    assert BlockLayout.from_preset(rotated.preset, 64, 3).page_bytes == BlockLayout.from_preset(
        base.preset, 64, 3).page_bytes  # same bytes
    with pytest.raises(PresetError, match="abl:values=rotated"):
        named_variants(["abl:nope"])
