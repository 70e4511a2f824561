"""Packaging without building anything: where the package data is looked up, what setup.py
maps into the wheel, user presets next to the built-in ones, and the kernels' fallbacks.

tests/package/test_wheel_install.py builds and installs the real wheel (slow).
"""
from __future__ import annotations

import ast
import fnmatch
import shutil
import warnings
from pathlib import Path

import pytest

from zipcache_vllm import config, resources
from zipcache_vllm.config import CONFIG_DIR, PresetError, list_presets, load_preset

REPO = Path(__file__).resolve().parents[2]
USER_PRESET = "name: mine\nmethod: zipcache\nhi_bits: 4\nlo_bits: 2\nsalient_ratio: 0.25\n"


def _data_packages() -> dict[str, tuple[str, list[str]]]:
    """setup.py's DATA_PACKAGES literal (read, not executed: running setup.py builds)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "DATA_PACKAGES":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no DATA_PACKAGES")


# --------------------------------------------------------------------------- data folders
def test_checkout_reads_the_repository_folders():
    for name in resources.DATA_DIRS:
        assert resources.data_dir(name) == REPO / name
    assert CONFIG_DIR == REPO / "configs"
    from zipcache_vllm.kernels import build, triton_loader
    from zipcache_vllm.planner import hardware, model_spec

    assert build.CSRC == REPO / "csrc"
    assert triton_loader.TRITON_DIR == REPO / "triton_kernels"
    assert hardware.CATALOG_PATH.is_file() and hardware.CATALOG_PATH.is_relative_to(CONFIG_DIR)
    assert model_spec.bundled_models() == ["llama3_1_8b", "llama3_8b"]


def test_installed_copy_wins_over_the_checkout(tmp_path, monkeypatch):
    pkg = tmp_path / "site-packages" / "zipcache_vllm"
    (pkg / "configs").mkdir(parents=True)
    monkeypatch.setattr(resources, "PKG_DIR", pkg)
    assert resources.data_dir("configs") == pkg / "configs"
    # Neither an installed copy nor a checkout folder: the installed location, for the error.
    assert resources.data_dir("csrc") == pkg / "csrc"
    (tmp_path / "site-packages" / "csrc").mkdir()
    assert resources.data_dir("csrc") == tmp_path / "site-packages" / "csrc"
    with pytest.raises(ValueError, match="configs, triton_kernels, csrc"):
        resources.data_dir("docs")


def test_setup_maps_every_data_file_into_the_package():
    """Each file the runtime reads from configs/, triton_kernels/ and csrc/ matches setup.py's
    package_data (or is a module of the mapped package), so the wheel carries it."""
    packages = _data_packages()
    assert {folder for folder, _ in packages.values()} == set(resources.DATA_DIRS)
    for name, (folder, patterns) in packages.items():
        assert name == f"zipcache_vllm.{folder}"
        files = [p.relative_to(REPO / folder).as_posix() for p in (REPO / folder).rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts]
        assert files
        left = [f for f in files if not (any(fnmatch.fnmatchcase(f, pat) for pat in patterns)
                                         or ("/" not in f and f.endswith(".py")))]
        assert not left, f"{folder}/: not shipped by setup.py's package_data: {left}"
    from zipcache_vllm.kernels import build

    assert set(build.SOURCES + build.HEADERS) <= {p.name for p in (REPO / "csrc").iterdir()}


# --------------------------------------------------------------------------- presets
def test_user_presets_add_to_the_builtin_ones(tmp_path, monkeypatch):
    from zipcache_vllm.dtypes import cache_dtypes

    builtin = list_presets()
    (tmp_path / "mine.yaml").write_text(USER_PRESET)
    monkeypatch.setenv("ZIPCACHE_VLLM_CONFIG_DIR", str(tmp_path))
    assert list_presets() == sorted(builtin + ["mine"])
    assert load_preset("mine").salient_ratio == 0.25
    assert load_preset("zipcache") is not None
    assert cache_dtypes()["zipcache_mine"] == "mine"
    monkeypatch.delenv("ZIPCACHE_VLLM_CONFIG_DIR")
    assert list_presets() == builtin


def test_user_preset_may_not_replace_a_builtin(tmp_path, monkeypatch):
    (tmp_path / "kivi2.yaml").write_text("name: kivi2\nmethod: kivi\nhi_bits: 3\nlo_bits: 3\n")
    monkeypatch.setenv("ZIPCACHE_VLLM_CONFIG_DIR", str(tmp_path))
    with pytest.raises(PresetError, match=r"kivi2\.yaml: user preset 'kivi2'.*built-in preset.*rename"):
        list_presets()
    with pytest.raises(PresetError, match="rename"):
        load_preset("zipcache")


def test_copy_of_the_builtin_folder_plus_own_presets_is_accepted(tmp_path, monkeypatch):
    """The old way (copy configs/, add one's own files) and a variable naming the built-in
    folder itself both keep working."""
    user = tmp_path / "presets"
    shutil.copytree(CONFIG_DIR, user)
    (user / "mine.yaml").write_text(USER_PRESET)
    monkeypatch.setenv("ZIPCACHE_VLLM_CONFIG_DIR", str(user))
    assert "mine" in list_presets()
    assert config.preset_files()["zipcache"] == CONFIG_DIR / "zipcache.yaml"
    monkeypatch.setenv("ZIPCACHE_VLLM_CONFIG_DIR", str(CONFIG_DIR))
    assert config.user_config_dir() is None


def test_user_config_dir_must_be_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ZIPCACHE_VLLM_CONFIG_DIR", str(tmp_path / "missing"))
    with pytest.raises(PresetError, match="is not a folder"):
        list_presets()


def test_no_builtin_presets_is_an_error_not_an_empty_table(tmp_path, monkeypatch, capsys):
    """An install without its package data must not look like a working plugin: the CLI's
    preset table fails, and so does the dtype list the plugin registers."""
    from zipcache_vllm.cli import main
    from zipcache_vllm.dtypes import cache_dtypes

    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    with pytest.raises(PresetError, match="no built-in presets"):
        cache_dtypes()
    assert main(["layout"]) != 0
    captured = capsys.readouterr()
    assert "no built-in presets" in captured.err and "| preset |" not in captured.out


# --------------------------------------------------------------------------- C++ kernels
def test_install_time_key_does_not_depend_on_a_compiler(monkeypatch):
    """A runtime without a compiler still loads the extension built at install time; the
    compile-on-first-use cache does depend on the compiler."""
    from zipcache_vllm.kernels import build

    key, jit = build.build_key(), build.jit_key()
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert build.build_key() == key
    assert build.jit_key() != jit


def test_missing_sources_are_a_kernel_build_error(tmp_path, monkeypatch):
    from zipcache_vllm.kernels import build

    monkeypatch.setattr(build, "CSRC", tmp_path)
    with pytest.raises(build.KernelBuildError, match="C\\+\\+ sources not found"):
        build.build_key()


def test_reference_fallback_warning_names_its_cost_and_the_fix(monkeypatch):
    from zipcache_vllm.kernels import build, ops

    def fail(verbose=False):
        raise build.KernelBuildError("no compiler (simulated)")

    monkeypatch.setattr(build, "load", fail)
    monkeypatch.setattr(ops, "_fallback_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not ops._use_extension() and not ops._use_extension()
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "no compiler (simulated)" in msg and ops.REFERENCE_COST in msg
    assert "x slower" in msg and "--no-build-isolation" in msg
