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


def _package_of(path: Path) -> list[str]:
    """The package a module's relative imports resolve against (``__init__`` included)."""
    return ["zipcache_vllm", *path.relative_to(ENGINE.parent).parts[:-1]]


def _imports(path: Path) -> list[tuple[int, str, list[str], bool]]:
    """``(line, module, names, relative)`` of every import statement, lazy ones included;
    relative imports resolved against the module's package (``from ..vllm_plugin import
    x`` in ``engine/`` -> ``zipcache_vllm.vllm_plugin``, names ``["x"]``)."""
    package = _package_of(path)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, [], False) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.append((node.lineno, module, [a.name for a in node.names], bool(node.level)))
    return out


def test_engine_modules_exist():
    """One step flow, split by concern; a method's own code lives in its policy class
    (FastGen's step included: ``policies/fastgen.py``), never in a second flow here."""
    names = {p.stem for p in ENGINE.glob("*.py")}
    assert names == {"__init__", "attention", "saliency", "plan", "step", "staging"}


def test_engine_imports_no_vllm():
    bad = []
    for path in sorted(ENGINE.rglob("*.py")):
        for line, module, names, _ in _imports(path):
            for target in [module] + [f"{module}.{n}" for n in names]:
                parts = target.split(".")
                if parts[0] == "vllm" or parts[:2] == ["zipcache_vllm", "vllm_plugin"]:
                    bad.append(f"{path.relative_to(ENGINE.parent)}:{line} imports {target}")
    assert not bad, bad


def test_no_private_name_is_imported_from_another_package():
    """``from ..eval.offline import _logits`` ties two packages to a helper one of them
    may change at will: a name another package needs is public."""
    bad = []
    root = ENGINE.parent
    for path in sorted(root.rglob("*.py")):
        own = _package_of(path)[:2]
        for line, module, names, relative in _imports(path):
            target = module.split(".")
            if not relative or len(target) < 2 or target[:2] == own:
                continue  # the same top-level package (or the package root)
            bad += [f"{path.relative_to(root)}:{line} imports {module}.{n}"
                    for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def _package_edges() -> dict[str, set[str]]:
    """Top-level package (or module) -> the ones it imports, lazy imports included."""
    root = ENGINE.parent
    edges: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        source = path.relative_to(root).parts[0].removesuffix(".py")
        for _, module, names, _ in _imports(path):
            target = module.split(".")
            if target[0] != "zipcache_vllm":
                continue
            found = [target[1]] if len(target) > 1 else names
            edges.setdefault(source, set()).update(n for n in found if n != source)
    return edges


def test_packages_import_each_other_without_cycles():
    """The packages form layers (engine below vllm_plugin, tools above both): a cycle,
    even through a function-local import, means two packages are one."""
    edges = _package_edges()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, cycles
