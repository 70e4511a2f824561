"""HTTP load driver: many concurrent clients with mixed requests against one server.

Every request is checked for being well formed (status, JSON or server-sent events,
one finish reason per choice, token counts, stop strings honoured), and the run is
summarized in a :class:`LoadReport`. Loopback only, bounded in count and time.

The mix (each request draws one kind, prompt lengths drawn from short to the model's
limit; prompts are token ids of real English text, so their length is exact):

* ``complete``: ``/v1/completions``, greedy, token-id prompt;
* ``complete_n2``: the same with ``n=2`` and seeded sampling;
* ``complete_stream``: streamed completion;
* ``chat_stop``: ``/v1/chat/completions`` with stop strings;
* ``chat_stream_n2``: streamed chat, ``n=2``, stop strings;
* ``disconnect``: a streamed completion the client drops after a few events
  (the server must abort it and free what it held);
* ``too_long``: a prompt over the model's limit: must be a 400, never a 5xx.

Use :func:`run_load` (asyncio) or ``zipcache-vllm reliability load``.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

KINDS = ("complete", "complete_n2", "complete_stream", "chat_stop", "chat_stream_n2",
         "disconnect", "too_long")
STOP_STRINGS = [".", "\n"]
FINISH_REASONS = {"stop", "length"}


@dataclass
class LoadConfig:
    url: str
    model: str
    corpus_ids: list[int]  # token ids of real text, sliced into prompts
    clients: int = 64  # concurrent connections (each runs requests back to back)
    requests: int = 96  # total requests issued
    duration_s: float = 600.0  # no request is issued after this (bounded time)
    max_model_len: int = 512
    max_tokens: int = 8
    seed: int = 0
    weights: dict[str, float] = field(default_factory=lambda: {
        "complete": 3, "complete_n2": 1, "complete_stream": 2, "chat_stop": 1,
        "chat_stream_n2": 1, "disconnect": 2, "too_long": 0.25})
    request_timeout_s: float = 900.0


@dataclass
class RequestSpec:
    index: int
    kind: str
    prompt_ids: list[int]
    max_tokens: int
    disconnect_after: int = 0


@dataclass
class Outcome:
    index: int
    kind: str
    status: int  # HTTP status; 0 = transport error
    ok: bool  # well formed and as expected
    problem: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0


@dataclass
class LoadReport:
    requests: int
    clients: int
    peak_in_flight: int
    elapsed_s: float
    by_kind: dict[str, int]
    status_counts: dict[str, int]
    errors_5xx: int
    transport_errors: int
    malformed: int
    disconnected: int
    prompt_tokens: int
    completion_tokens: int
    max_prompt_tokens: int
    problems: list[str]

    @property
    def clean(self) -> bool:
        return not (self.errors_5xx or self.transport_errors or self.malformed)

    def to_dict(self) -> dict:
        return {**asdict(self), "clean": self.clean}


def prompt_lengths(n: int, max_len: int, rng: random.Random) -> list[int]:
    """``n`` prompt lengths from a few tokens to ``max_len``: half short (8-64), a third
    medium (65-256), the rest long (257 to ``max_len``), and ``max_len`` itself once.
    (Prefill dominates the cost on a CPU, so most prompts are short, as in chat traffic.)"""
    bands = [(8, 64)] * 6 + [(65, 256)] * 4 + [(257, max_len)] * 2
    out = []
    for i in range(n):
        lo, hi = bands[i % len(bands)]
        hi = min(hi, max_len)
        out.append(rng.randint(min(lo, hi), hi))
    if n:
        out[rng.randrange(n)] = max_len
    return out


def make_specs(cfg: LoadConfig) -> list[RequestSpec]:
    """The request mix, reproducible from ``cfg.seed``."""
    rng = random.Random(cfg.seed)
    kinds = list(cfg.weights)
    kind_of = rng.choices(kinds, weights=[cfg.weights[k] for k in kinds], k=cfg.requests)
    kind_of[:len(kinds)] = kinds  # every kind at least once, in the first wave
    rng.shuffle(kind_of)
    limit = cfg.max_model_len - cfg.max_tokens
    lengths = prompt_lengths(cfg.requests, limit, rng)
    ids, specs = cfg.corpus_ids, []
    if len(ids) < cfg.max_model_len + 64:
        raise ValueError(f"corpus of {len(ids)} tokens is shorter than max_model_len "
                         f"{cfg.max_model_len} + 64")
    for i, (kind, n) in enumerate(zip(kind_of, lengths)):
        if kind == "too_long":
            n = cfg.max_model_len + 32
        start = rng.randrange(0, len(ids) - n)
        specs.append(RequestSpec(i, kind, ids[start:start + n], cfg.max_tokens,
                                 disconnect_after=rng.randint(1, 4)))
    return specs


# -- checks -----------------------------------------------------------------------------

class Malformed(Exception):
    pass


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise Malformed(msg)


def check_completion(body: dict, n: int, prompt_tokens: int | None, max_tokens: int,
                     chat: bool, stop: list[str] | None) -> int:
    """Validate a non-streamed response; returns its completion tokens."""
    choices = body.get("choices")
    _need(isinstance(choices, list) and len(choices) == n, f"expected {n} choices, got {choices!r:.200}")
    _need(sorted(c.get("index") for c in choices) == list(range(n)), "choice indices")
    for c in choices:
        text = c["message"]["content"] if chat else c["text"]
        _need(isinstance(text, str), f"text is {type(text).__name__}")
        _need(c.get("finish_reason") in FINISH_REASONS, f"finish_reason {c.get('finish_reason')!r}")
        if stop and c["finish_reason"] == "stop" and c.get("stop_reason") in stop:
            _need(not any(s in text for s in stop), f"stop string left in {text!r:.80}")
    usage = body.get("usage") or {}
    if prompt_tokens is not None:
        _need(usage.get("prompt_tokens") == prompt_tokens,
              f"usage.prompt_tokens {usage.get('prompt_tokens')} != {prompt_tokens}")
    ct = usage.get("completion_tokens")
    _need(isinstance(ct, int) and 0 <= ct <= n * max_tokens, f"completion_tokens {ct}")
    return ct


def check_stream(events: list[str], n: int, chat: bool, stop: list[str] | None) -> int:
    """Validate server-sent events: JSON chunks, then ``[DONE]``; one finish per choice.
    Returns the completion tokens of the final usage chunk."""
    _need(bool(events) and events[-1] == "[DONE]", "stream does not end with [DONE]")
    finishes: Counter = Counter()
    texts: dict[int, str] = {}
    usage = None
    for ev in events[:-1]:
        _need(ev != "[DONE]", "[DONE] before the end")
        chunk = json.loads(ev)
        _need("error" not in chunk, f"error event {ev[:200]}")
        usage = chunk.get("usage") or usage
        for c in chunk.get("choices", []):
            i = c["index"]
            _need(0 <= i < n, f"choice index {i}")
            piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
            texts[i] = texts.get(i, "") + (piece or "")
            if c.get("finish_reason") is not None:
                _need(c["finish_reason"] in FINISH_REASONS, f"finish_reason {c['finish_reason']!r}")
                finishes[i] += 1
    _need(sorted(finishes) == list(range(n)) and set(finishes.values()) == {1},
          f"finish reasons per choice {dict(finishes)}")
    if stop:
        for i, t in texts.items():
            _need(not any(s in t for s in stop), f"stop string left in {t!r:.80}")
    _need(usage is not None and isinstance(usage.get("completion_tokens"), int),
          "no usage chunk at the end of the stream")
    return usage["completion_tokens"]


# -- one request ------------------------------------------------------------------------

def _body(spec: RequestSpec, cfg: LoadConfig, text_of) -> tuple[str, dict, int]:
    """(path, JSON body, n) for a spec."""
    common = {"model": cfg.model, "max_tokens": spec.max_tokens}
    if spec.kind in ("complete", "complete_stream", "disconnect", "too_long"):
        body = {**common, "prompt": spec.prompt_ids, "temperature": 0}
        if spec.kind in ("complete_stream", "disconnect"):
            body.update(stream=True, stream_options={"include_usage": True})
        return "/v1/completions", body, 1
    if spec.kind == "complete_n2":
        return "/v1/completions", {**common, "prompt": spec.prompt_ids, "n": 2,
                                   "temperature": 0.8, "seed": spec.index}, 2
    messages = [{"role": "user", "content": text_of(spec.prompt_ids[:max(8, len(spec.prompt_ids) // 2)])
                 + "\n\nSummarize the text above."}]
    body = {**common, "messages": messages, "stop": STOP_STRINGS, "temperature": 0}
    if spec.kind == "chat_stream_n2":
        body.update(stream=True, stream_options={"include_usage": True}, n=2, temperature=0.8,
                    seed=spec.index)
        return "/v1/chat/completions", body, 2
    return "/v1/chat/completions", body, 1


async def _events(resp, limit: int | None = None) -> list[str]:
    """``data:`` payloads of a server-sent-event response (stop after ``limit``)."""
    out: list[str] = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            out.append(line[6:])
            if limit is not None and len(out) >= limit:
                break
    return out


async def run_one(session, spec: RequestSpec, cfg: LoadConfig, text_of) -> Outcome:
    path, body, n = _body(spec, cfg, text_of)
    chat = path.endswith("chat/completions")
    stop = body.get("stop")
    t0 = time.monotonic()
    out = Outcome(spec.index, spec.kind, 0, False)
    try:
        async with session.post(cfg.url + path, json=body) as resp:
            out.status = resp.status
            if spec.kind == "too_long":
                text = await resp.text()
                out.ok = resp.status == 400 and "context length" in text.lower() or \
                    resp.status == 400 and "max_model_len" in text.lower()
                out.problem = "" if out.ok else f"over-long prompt: {resp.status} {text[:200]}"
            elif resp.status != 200:
                out.problem = f"HTTP {resp.status}: {(await resp.text())[:300]}"
            elif spec.kind == "disconnect":
                events = await _events(resp, spec.disconnect_after)
                _need(bool(events), "no event before the disconnect")
                json.loads(events[0])
                resp.close()  # drop the connection mid-stream: the server must abort
                out.ok = True
            elif body.get("stream"):
                out.completion_tokens = check_stream(await _events(resp), n, chat, stop)
                out.ok = True
            else:
                payload = await resp.json()
                out.completion_tokens = check_completion(
                    payload, n, None if chat else len(spec.prompt_ids), spec.max_tokens, chat, stop)
                out.prompt_tokens = payload["usage"]["prompt_tokens"]
                out.ok = True
    except Malformed as exc:
        out.problem = f"malformed: {exc}"
    except (asyncio.TimeoutError, OSError, ValueError, KeyError) as exc:
        out.problem = f"{type(exc).__name__}: {exc}"[:300]
    except Exception as exc:  # aiohttp.ClientError and friends: transport failures
        out.problem = f"{type(exc).__name__}: {exc}"[:300]
    out.latency_s = time.monotonic() - t0
    if out.ok and not out.prompt_tokens and spec.kind != "too_long" and not chat:
        out.prompt_tokens = len(spec.prompt_ids)
    return out


async def run_load(cfg: LoadConfig, text_of, progress: bool = True) -> tuple[LoadReport, list[Outcome]]:
    """Issue ``cfg.requests`` requests from ``cfg.clients`` concurrent clients.

    ``text_of(token_ids) -> str`` turns a prompt into text for the chat requests.
    """
    import aiohttp
    from tqdm import tqdm

    specs = make_specs(cfg)
    queue: asyncio.Queue = asyncio.Queue()
    for s in specs:
        queue.put_nowait(s)
    outcomes: list[Outcome] = []
    in_flight = peak = 0
    deadline = time.monotonic() + cfg.duration_s
    bar = tqdm(total=len(specs), desc="load", unit="req", disable=not progress)
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=cfg.clients, force_close=True)
    start = asyncio.Event()

    async def client(session) -> None:
        nonlocal in_flight, peak
        await start.wait()
        while time.monotonic() < deadline:
            try:
                spec = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                outcomes.append(await run_one(session, spec, cfg, text_of))
            finally:
                in_flight -= 1
                bar.update(1)

    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tasks = [asyncio.create_task(client(session)) for _ in range(cfg.clients)]
        start.set()  # every client starts together: the first wave is cfg.clients wide
        await asyncio.gather(*tasks)
    bar.close()
    elapsed = time.monotonic() - t0
    return summarize(outcomes, cfg.clients, peak, elapsed), outcomes


def summarize(outcomes: list[Outcome], clients: int, peak: int, elapsed: float) -> LoadReport:
    statuses = Counter(str(o.status) for o in outcomes)
    problems = [f"#{o.index} {o.kind}: {o.problem}" for o in outcomes if not o.ok]
    return LoadReport(
        requests=len(outcomes), clients=clients, peak_in_flight=peak, elapsed_s=round(elapsed, 1),
        by_kind=dict(Counter(o.kind for o in outcomes)), status_counts=dict(statuses),
        errors_5xx=sum(1 for o in outcomes if o.status >= 500),
        transport_errors=sum(1 for o in outcomes if o.status == 0),
        malformed=sum(1 for o in outcomes if not o.ok and 0 < o.status < 500),
        disconnected=sum(1 for o in outcomes if o.kind == "disconnect" and o.ok),
        prompt_tokens=sum(o.prompt_tokens for o in outcomes),
        completion_tokens=sum(o.completion_tokens for o in outcomes),
        max_prompt_tokens=max((o.prompt_tokens for o in outcomes), default=0),
        problems=problems[:20])
