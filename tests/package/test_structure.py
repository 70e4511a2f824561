"""Package structure: the step engine (``zipcache_vllm/engine/``) never imports vLLM,
and no package imports another package's private names.

Everything that touches vLLM lives in ``zipcache_vllm/vllm_plugin/``; the engine is
driven by its backend and must stay importable and testable without vLLM. Checked
statically (every import statement of every engine module), so a lazy import inside
a function is caught too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import zipcache_vllm

ENGINE = Path(zipcache_vllm.__file__).resolve().parent / "engine"


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import statement; relative imports resolved against
    the module's package (``from ..vllm_plugin import x`` -> ``zipcache_vllm.vllm_plugin``)."""
    package = ["zipcache_vllm", "engine"]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.append((node.lineno, module))
            out += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return out


def test_engine_modules_exist():
    names = {p.stem for p in ENGINE.glob("*.py")}
    assert {"__init__", "attention", "saliency", "plan", "step", "staging", "fastgen"} <= names


def test_engine_imports_no_vllm():
    bad = []
    for path in sorted(ENGINE.rglob("*.py")):
        for line, module in _imports(path):
            parts = module.split(".")
            if parts[0] == "vllm" or parts[:2] == ["zipcache_vllm", "vllm_plugin"]:
                bad.append(f"{path.relative_to(ENGINE.parent)}:{line} imports {module}")
    assert not bad, bad


def _package_of(path: Path) -> list[str]:
    """The package a module's relative imports resolve against (``__init__`` included)."""
    return ["zipcache_vllm", *path.relative_to(ENGINE.parent).parts[:-1]]


def test_no_private_name_is_imported_from_another_package():
    """``from ..eval.offline import _logits`` ties two packages to a helper one of them
    may change at will: a name another package needs is public."""
    bad = []
    root = ENGINE.parent
    for path in sorted(root.rglob("*.py")):
        package = _package_of(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package[:len(package) - node.level + 1]
            target = base + (node.module.split(".") if node.module else [])
            if target[:2] == package[:2] or len(target) < 2:
                continue  # the same top-level package (or the package root)
            bad += [f"{path.relative_to(root)}:{node.lineno} imports {'.'.join(target)}.{a.name}"
                    for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad
