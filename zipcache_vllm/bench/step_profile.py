"""Where a decode step's time goes, per KV dtype: vLLM's torch profiler in the engine.

``zipcache-vllm bench decode --profile`` gives each engine vLLM's own profiler
(``profiler_config``: torch, CPU activities, no stacks). After the timed cells it
profiles the decode steps of one more round at the first cell: the worker process
writes torch's op table (``<worker>.profiler_out.txt``), and this module reads it
back as milliseconds per decode step for the ops that cost the most, self time (an
op's own time, without the ops it calls). A step is counted by vLLM's attention entry
point, called once per layer per step.

The profiler slows every op a little, so the figures of a ``--profile`` run show the
split of a step, not the speed; compare speeds from runs without it.
"""
from __future__ import annotations

import re
from pathlib import Path

# vLLM's attention entry point: once per attention layer per step, for every KV dtype.
STEP_MARKER = "vllm::unified_attention_with_output"
_UNITS = {"s": 1e3, "ms": 1.0, "us": 1e-3, "ns": 1e-6}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(s|ms|us|ns)", text.strip())
    if not m:
        raise ValueError(f"not a profiler time: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_table(text: str) -> tuple[list[tuple[str, float, int]], float]:
    """torch's ``key_averages().table()`` as ``[(name, self ms, calls)]`` in its order,
    and the self CPU total in ms. Columns are found by the header's names."""
    lines = text.splitlines()
    head = next((i for i, line in enumerate(lines) if "Self CPU %" in line and "Name" in line), None)
    if head is None:
        raise ValueError("no profiler table (header with 'Name' and 'Self CPU %') in the text")
    cols = re.split(r"\s{2,}", lines[head].strip())
    i_self, i_calls = cols.index("Self CPU"), cols.index("# of Calls")
    rows = []
    for line in lines[head + 2:]:
        if line.startswith("---"):
            break
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != len(cols):
            continue  # an op name with two spaces in a row: not ours to guess
        rows.append((cells[0], _ms(cells[i_self]), int(cells[i_calls])))
    total = re.search(r"Self CPU time total:\s*(\S+)", text)
    if total is None:
        raise ValueError("no 'Self CPU time total' line in the profiler table")
    return rows, _ms(total.group(1))


def summarize(text: str, layers: int, top: int = 12) -> dict:
    """Per decode step: total self ms, and the ``top`` ops as ``[name, ms, share]``."""
    rows, total = parse_table(text)
    marker = [calls for name, _, calls in rows if name == STEP_MARKER]
    if not marker or marker[0] % layers:
        raise ValueError(f"cannot count steps: {STEP_MARKER} calls {marker} for {layers} layers")
    steps = marker[0] // layers
    ops = sorted(rows, key=lambda r: -r[1])[:top]
    return {"steps": steps, "step_ms": total / steps,
            "ops": [[name, ms / steps, ms / total] for name, ms, _ in ops]}


def read_summary(profile_dir: Path, layers: int, top: int = 12) -> dict:
    """The summary of the one profiler table vLLM's worker wrote under ``profile_dir``."""
    files = sorted(Path(profile_dir).glob("*.profiler_out.txt"))
    if len(files) != 1:
        raise ValueError(f"expected one profiler table under {profile_dir}, found {len(files)}")
    return summarize(files[0].read_text(), layers, top)


def format_profiles(engines: dict) -> str:
    """Markdown: one table per dtype that has a ``profile``."""
    out = []
    for d, eng in engines.items():
        prof = eng.get("profile")
        if not prof:
            continue
        out += [f"`{d}`: {prof['step_ms']:.1f} ms of profiled self time per decode step "
                f"({prof['steps']} steps at {prof['ctx']} tokens, batch {prof['batch']}):", "",
                "| op (self time) | ms / step | share |", "|---|---:|---:|"]
        out += [f"| `{name}` | {ms:.2f} | {share:.0%} |" for name, ms, share in prof["ops"]]
        out.append("")
    return "\n".join(out).rstrip()
