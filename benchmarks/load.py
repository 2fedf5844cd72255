"""Load and fault test of `ember serve` over loopback.

Starts `python -m ember.server FOLDER` on 127.0.0.1 (or attaches to a running loopback
server with --url), then runs phases of increasing concurrency (closed loop: each client
sends its next request when the previous one ends). Besides normal requests (streaming and
not, greedy and seeded sampling, random prompt/output lengths) it injects faults:
clients that disconnect at a random moment, malformed JSON, oversized bodies, invalid
parameters; and every 50th request is a poisoned one, in turn: a lone-surrogate prompt,
temperature 1e-320, a prompt over the token limit, a stop list of thousands of strings,
control characters, and (where the folder has a chat template) a chat of as many messages
as the body limit holds and a chat with a lone surrogate. Normal requests set ignore_eos,
so each must return exactly its max_tokens. Every request is classified:

  completed        200 with a full answer of exactly max_tokens tokens (streams end with a
                   finish reason, usage and [DONE])
  disconnected     the client went away on purpose (the server must cancel it)
  rejected_4xx     an injected fault answered with the expected 4xx and an error message
  overloaded_429   queue full (allowed, counted)
  lost             anything else: timeouts, transport errors, 5xx, wrong status, a wrong
                   token count, truncated streams

The ramp runs --rounds times. After each round (server idle): KV usage, the server's open
file descriptors (/proc/PID/fd) and resident memory (VmRSS). Checks at the end: zero lost;
KV usage and running sequences back to zero after every round; /health 200; no 5xx answered
(server-side counter, so it covers clients that had already left); the server answered
every request whose client stayed (its /v1/completions + /v1/chat/completions response
counter lies between sent - disconnected and sent); no fd growth and no memory growth from the first round to
the last (fd and memory checks need a server this script started, and two rounds or more).
Bounded: a fixed request count per phase and a wall-clock cap. Writes results/load.json,
.md and .png.

    flock /tmp/ember-bench.lock python benchmarks/load.py --folder artifacts/gpt2-124m --rounds 3
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ember.server.cli import is_loopback  # noqa: E402
from ember.server.metrics import parse_prometheus  # noqa: E402
from ember.server.ready import ServerNotReady, wait_until_healthy  # noqa: E402

RESULTS = Path(__file__).with_name("results")
WORDS = ("the model of a small engine runs tokens through layers and every request gets its own "
         "cache memory while the scheduler fuses work across many sequences at once").split()
INVALID = [{"top_p": 5}, {"max_tokens": -1}, {"temperature": "hot"}, {"prompt": [1, 2, -3]}, {"n": 3},
           {"stop": ["a", "b", "c", "d", "e"]}, {"max_tokens": 100000}, {"seed": -2}]
POISON_EVERY = 50
POISONS = ("lone_surrogate", "tiny_temperature", "prompt_over_limit", "huge_stop_list", "control_chars",
           "chat_many_messages", "chat_lone_surrogate")  # the chat ones only where the folder has a template
FD_GROWTH_LIMIT = 8  # open fds at the end of the last round vs the first (a few may be mid-close)
RSS_GROWTH_LIMIT_MIB = 64  # resident memory, last round vs first (allocator noise, not leaks)


@dataclass
class Outcome:
    kind: str  # normal | disconnect | malformed | oversized | invalid | poison:NAME
    phase: int
    result: str  # completed | disconnected | rejected_4xx | overloaded_429 | lost
    reason: str  # detail: finish reason, status, exception name
    stream: bool = False
    latency_s: float | None = None
    ttft_s: float | None = None
    tokens: int = 0
    expected_tokens: int | None = None  # a completed request must have exactly this many


@dataclass
class Plan:
    phases: list[tuple[int, int]]  # (concurrent clients, requests)
    disconnect: float = 0.10
    malformed: float = 0.02
    oversized: float = 0.02
    invalid: float = 0.03
    max_tokens: tuple[int, int] = (2, 10)
    prompt_words: tuple[int, int] = (2, 12)
    seed: int = 0
    max_body_bytes: int = 65536
    request_timeout_s: float = 120.0
    rounds: int = 3
    stats: dict = field(default_factory=dict)


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def percentiles(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    s = sorted(xs)

    def q(p: float) -> float:
        return s[min(len(s) - 1, int(round(p * (len(s) - 1))))]
    return {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "max": s[-1]}


class Driver:
    def __init__(self, url: str, plan: Plan, has_chat: bool):
        self.url, self.plan = url, plan
        self.rng = random.Random(plan.seed)
        self.outcomes: list[Outcome] = []
        self.sent = 0
        self.poisons = [k for k in POISONS if has_chat or not k.startswith("chat_")]

    def body(self) -> dict:
        r = self.rng
        words = [r.choice(WORDS) for _ in range(r.randint(*self.plan.prompt_words))]
        b = {"prompt": " ".join(words), "max_tokens": r.randint(*self.plan.max_tokens), "ignore_eos": True}
        if r.random() < 0.5:
            b["temperature"] = 0
        else:
            b.update(temperature=0.8, top_p=0.95, top_k=40, seed=r.randrange(1 << 30))
        return b

    async def one(self, client: httpx.AsyncClient, phase: int) -> Outcome:
        self.sent += 1
        if self.sent % POISON_EVERY == 0:
            name = self.poisons[(self.sent // POISON_EVERY - 1) % len(self.poisons)]
            return await self.poison(client, name, phase)
        r = self.rng
        u, p = r.random(), self.plan
        edges = [("disconnect", p.disconnect), ("malformed", p.malformed), ("oversized", p.oversized),
                 ("invalid", p.invalid)]
        kind, acc = "normal", 0.0
        for name, share in edges:  # each kind is its share of all requests
            acc += share
            if u < acc:
                kind = name
                break
        body, stream = self.body(), r.random() < 0.5
        if kind == "malformed":
            raw = json.dumps(body)[: r.randint(1, 20)].encode()
            return await self.expect_4xx(client, kind, phase, raw, {400})
        if kind == "oversized":
            raw = json.dumps({**body, "prompt": "x" * (p.max_body_bytes + r.randint(1, 4 * p.max_body_bytes))}).encode()
            return await self.expect_4xx(client, kind, phase, raw, {413})
        if kind == "invalid":
            raw = json.dumps({**body, **r.choice(INVALID)}).encode()
            return await self.expect_4xx(client, kind, phase, raw, {400})
        body["stream"] = stream
        if stream:
            body["stream_options"] = {"include_usage": True}
        cut = r.uniform(0.0, 1.5) if kind == "disconnect" else None
        try:
            if cut is None:
                return await self.generate(client, kind, phase, body)
            return await asyncio.wait_for(self.generate(client, kind, phase, body), timeout=cut)
        except asyncio.TimeoutError:
            return Outcome(kind, phase, "disconnected", "client closed the connection", stream)

    async def poison(self, client: httpx.AsyncClient, name: str, phase: int) -> Outcome:
        """One poisoned request: rejected with the right 4xx, or (where the input is valid,
        only unusual) completed with exactly its max_tokens, never a 5xx."""
        kind, body, p = f"poison:{name}", self.body(), self.plan
        body.update(stream=self.rng.random() < 0.5, stream_options={"include_usage": True})
        if name == "lone_surrogate":
            raw = json.dumps({**body, "prompt": "hi \ud800 there"}).encode()
            return await self.expect_4xx(client, kind, phase, raw, {400})
        if name == "tiny_temperature":  # accepted range: behaves as greedy
            return await self.generate(client, kind, phase, {**body, "temperature": 1e-320})
        if name == "prompt_over_limit":  # far more tokens than any context, inside the body limit
            prompt = " ".join(self.rng.choice(WORDS) for _ in range((p.max_body_bytes - 512) // 8))
            return await self.expect_4xx(client, kind, phase, json.dumps({**body, "prompt": prompt}).encode(), {400})
        if name == "huge_stop_list":
            stops = [f"stop {i}" for i in range(p.max_body_bytes // 16)]
            return await self.expect_4xx(client, kind, phase, json.dumps({**body, "stop": stops}).encode(), {400})
        if name == "control_chars":  # valid text, only odd: served
            odd = body["prompt"] + " \x00\x01\x7f\u2028 end"
            return await self.generate(client, kind, phase, {**body, "prompt": odd})
        chat = {k: v for k, v in body.items() if k != "prompt"}
        if name == "chat_many_messages":  # as many as the body limit holds: more than any prompt-token limit
            n = (p.max_body_bytes - 512) // len(json.dumps({"role": "user", "content": ""}) + ", ")
            raw = json.dumps({**chat, "messages": [{"role": "user", "content": ""}] * n}).encode()
            return await self.expect_4xx(client, kind, phase, raw, {400}, "/v1/chat/completions")
        if name == "chat_lone_surrogate":
            raw = json.dumps({**chat, "messages": [{"role": "user", "content": "fine"},
                                                   {"role": "user", "content": "bad \udc00"}]}).encode()
            return await self.expect_4xx(client, kind, phase, raw, {400}, "/v1/chat/completions")
        raise ValueError(f"unknown poison {name!r}")

    async def expect_4xx(self, client, kind: str, phase: int, raw: bytes, want: set[int],
                         path: str = "/v1/completions") -> Outcome:
        try:
            resp = await client.post(self.url + path, content=raw,
                                     headers={"content-type": "application/json"}, timeout=self.plan.request_timeout_s)
        except httpx.HTTPError as e:
            return Outcome(kind, phase, "lost", type(e).__name__)
        msg = _error_message(resp)
        if resp.status_code in want and msg:
            return Outcome(kind, phase, "rejected_4xx", str(resp.status_code))
        if resp.status_code == 429:
            return Outcome(kind, phase, "overloaded_429", "429")
        return Outcome(kind, phase, "lost", f"status {resp.status_code}, expected {sorted(want)}: {msg!r}")

    async def generate(self, client, kind: str, phase: int, body: dict) -> Outcome:
        """A request with ignore_eos: completed only with exactly ``max_tokens`` tokens."""
        t0 = time.perf_counter()
        stream, want = body["stream"], body["max_tokens"]
        try:
            if not stream:
                resp = await client.post(self.url + "/v1/completions", json=body, timeout=self.plan.request_timeout_s)
                if resp.status_code != 200:
                    return self.bad_status(kind, phase, resp, stream)
                d = resp.json()
                reason, tokens = d["choices"][0]["finish_reason"], d["usage"]["completion_tokens"]
                ok = reason == "length" and tokens == want
                return Outcome(kind, phase, "completed" if ok else "lost", reason if ok else
                               f"{reason}: {tokens} tokens, expected {want}", stream,
                               time.perf_counter() - t0, None, tokens, want)
            ttft, reason, tokens, done = None, None, 0, False
            async with client.stream("POST", self.url + "/v1/completions", json=body,
                                     timeout=self.plan.request_timeout_s) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    return self.bad_status(kind, phase, resp, stream)
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    ev = json.loads(data)
                    if "error" in ev:
                        return Outcome(kind, phase, "lost", f"stream error: {ev['error']['message']}", stream)
                    if ev["choices"]:
                        ttft = ttft if ttft is not None else time.perf_counter() - t0
                        reason = ev["choices"][0]["finish_reason"] or reason
                    if "usage" in ev:
                        tokens = ev["usage"]["completion_tokens"]
            ok = done and reason == "length" and tokens == want
            why = reason if ok else f"{reason or 'truncated stream'}: {tokens} tokens, expected {want}"
            return Outcome(kind, phase, "completed" if ok else "lost", why, stream,
                           time.perf_counter() - t0, ttft, tokens, want)
        except httpx.HTTPError as e:
            return Outcome(kind, phase, "lost", f"{type(e).__name__}: {e}", stream)

    def bad_status(self, kind: str, phase: int, resp: httpx.Response, stream: bool) -> Outcome:
        if resp.status_code == 429:
            return Outcome(kind, phase, "overloaded_429", "429", stream)
        return Outcome(kind, phase, "lost", f"status {resp.status_code}: {_error_message(resp)!r}", stream)

    async def run_phase(self, index: int, clients: int, requests: int, deadline: float) -> dict:
        remaining = [requests]
        t0 = time.perf_counter()
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(limits=limits) as client:
            async def worker():
                while remaining[0] > 0 and time.monotonic() < deadline:
                    remaining[0] -= 1
                    self.outcomes.append(await self.one(client, index))
            await asyncio.gather(*(worker() for _ in range(clients)))
        return {"clients": clients, "requests": requests - remaining[0], "wall_s": time.perf_counter() - t0}


def _error_message(resp: httpx.Response) -> str:
    try:
        return resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return ""


async def wait_idle(url: str, timeout_s: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as c:
        while True:
            m = parse_prometheus((await c.get(url + "/metrics", timeout=10)).text)
            idle = m["ember_kv_used_tokens"] == 0 and m["ember_running_sequences"] == 0 and m["ember_queue_depth"] == 0
            if idle or time.monotonic() > deadline:
                return m
            await asyncio.sleep(0.1)


def server_resources(pid: int | None) -> dict[str, float | None]:
    """The server process's open file descriptors and resident memory (MiB); None without a pid."""
    if pid is None:
        return {"fds": None, "rss_mib": None}
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss_kib = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
    return {"fds": fds, "rss_mib": rss_kib / 1024}


async def has_chat_template(url: str) -> bool:
    async with httpx.AsyncClient() as c:
        r = await c.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                             "max_tokens": 1}, timeout=60)
    return r.status_code == 200


def start_server(folder: str, port: int, extra: list[str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "ember.server", folder, "--port", str(port), "--no-access-log",
                             *extra], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(proc, f"http://127.0.0.1:{port}", timeout_s=300, poll_s=0.2)
    except ServerNotReady as e:
        if proc.poll() is None:
            proc.kill()
        raise SystemExit(f"{e}; see {log_path}") from None
    return proc


def summarize(driver: Driver, phases: list[dict], rounds: list[dict], before: dict, after: dict, healthy: bool,
              info: dict) -> dict:
    outs = driver.outcomes
    by_result = Counter(o.result for o in outs)
    lost = [o for o in outs if o.result == "lost"]
    done = [o for o in outs if o.result == "completed"]
    sent = len(outs)
    served = sum(v - before.get(k, 0) for k, v in after.items()  # the chat endpoint takes the chat poisons
                 if k.startswith(('ember_http_responses_total{endpoint="/v1/completions"',
                                  'ember_http_responses_total{endpoint="/v1/chat/completions"')))
    errors_5xx = sum(v - before.get(k, 0) for k, v in after.items()
                     if k.startswith("ember_http_responses_total{") and 'status="5' in k)
    tokens = sum(o.tokens for o in done)
    wall = sum(p["wall_s"] for p in phases)
    for i, p in enumerate(phases):
        ph = [o for o in outs if o.phase == i]
        p["completed"] = sum(o.result == "completed" for o in ph)
        p["latency_s"] = percentiles([o.latency_s for o in ph if o.result == "completed"])
    measured = len(rounds) >= 2 and rounds[0]["fds"] is not None
    checks = {
        "zero_lost_requests": not lost,
        "every_completed_request_has_its_exact_token_count": bool(done) and all(o.tokens == o.expected_tokens
                                                                                for o in done),
        "kv_returned_to_zero_after_every_round": all(r["kv_used_tokens"] == 0 and r["running"] == 0 for r in rounds),
        "healthy_at_end": healthy,
        # A client that left before its request was read gets no response; every other one must.
        "server_answered_every_request_whose_client_stayed": sent - by_result["disconnected"] <= served <= sent,
        "no_server_errors_5xx": errors_5xx == 0,
        # None = not measured (an attached server, or a single round): reported, never counted as a pass.
        "no_fd_growth": rounds[-1]["fds"] - rounds[0]["fds"] <= FD_GROWTH_LIMIT if measured else None,
        "no_memory_growth": rounds[-1]["rss_mib"] - rounds[0]["rss_mib"] <= RSS_GROWTH_LIMIT_MIB if measured else None,
    }
    return {
        "machine": machine(), **info, "load_average_1m_end": round(os.getloadavg()[0], 2),
        "requests_sent": sent,
        "by_result": dict(by_result),
        "by_kind_and_result": {f"{k}/{r}": n for (k, r), n in sorted(Counter((o.kind, o.result) for o in outs).items())},
        "completed_finish_reasons": dict(Counter(o.reason for o in done)),
        "rejected_statuses": dict(Counter(f"{o.kind}:{o.reason}" for o in outs if o.result == "rejected_4xx")),
        "lost_reasons": dict(Counter(o.reason for o in lost)),
        "latency_s": {"all_completed": percentiles([o.latency_s for o in done]),
                      "streaming_ttft": percentiles([o.ttft_s for o in done if o.ttft_s is not None])},
        "output_tokens": tokens, "output_tokens_per_s": tokens / wall if wall else 0.0, "wall_s": wall,
        "phases": phases, "rounds": rounds,
        "limits": {"fd_growth": FD_GROWTH_LIMIT, "rss_growth_mib": RSS_GROWTH_LIMIT_MIB},
        "server": {"responses_to_completions": served, "responses_5xx": errors_5xx, "client_disconnects_seen": after.get("ember_client_disconnects_total", 0)
                   - before.get("ember_client_disconnects_total", 0),
                   "cancelled_by_engine": after.get('ember_request_finish_total{reason="cancelled"}', 0)
                   - before.get('ember_request_finish_total{reason="cancelled"}', 0),
                   "kv_used_tokens_at_end": after["ember_kv_used_tokens"],
                   "kv_capacity_tokens": after.get("ember_kv_capacity_tokens")},
        "checks": checks, "passed": all(v is not False for v in checks.values()),
    }


def markdown(r: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f}"
    lines = [f"# `ember serve` load/fault test: {r['model']}", "",
             f"Machine: {r['machine']} (1-min load average {r['load_average_1m_start']} at the start, "
             f"{r['load_average_1m_end']} at the end: other work shares these cores, so latencies vary between "
             f"runs; the checks do not). Server: `{r['server_args']}`. Seed {r['plan']['seed']}.", "",
             f"**{r['requests_sent']} requests** over {len(r['rounds'])} round(s), "
             f"{'PASSED' if r['passed'] else 'FAILED'}: "
             + ", ".join(f"{k} = {'not measured' if v is None else v}" for k, v in r["checks"].items()), "",
             "| outcome | requests |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(r["by_result"].items())]
    lines += ["", "| kind / outcome | requests |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in r["by_kind_and_result"].items()]
    lines += ["", "| round | phase | clients | requests | completed | wall s | p50 ms | p90 ms | p99 ms |",
              "|---|---|---|---|---|---|---|---|---|"]
    for i, p in enumerate(r["phases"]):
        lat = p["latency_s"]
        lines.append(f"| {p['round']} | {i} | {p['clients']} | {p['requests']} | {p['completed']} | {p['wall_s']:.1f} | "
                     f"{ms(lat['p50'])} | {ms(lat['p90'])} | {ms(lat['p99'])} |")
    lines += ["", f"Server after each round, idle (growth limits, last round vs first: {r['limits']['fd_growth']} fds, "
              f"{r['limits']['rss_growth_mib']} MiB):", "",
              "| round | open fds | RSS MiB | KV used tokens | running |", "|---|---|---|---|---|"]
    for i, rd in enumerate(r["rounds"]):
        rss = "-" if rd["rss_mib"] is None else f"{rd['rss_mib']:.1f}"
        lines.append(f"| {i} | {rd['fds'] if rd['fds'] is not None else '-'} | {rss} | {rd['kv_used_tokens']:.0f} | "
                     f"{rd['running']:.0f} |")
    a, t = r["latency_s"]["all_completed"], r["latency_s"]["streaming_ttft"]
    lines += ["", "| latency (completed requests) | p50 ms | p90 ms | p99 ms | max ms |", "|---|---|---|---|---|",
              f"| end to end | {ms(a['p50'])} | {ms(a['p90'])} | {ms(a['p99'])} | {ms(a['max'])} |",
              f"| time to first token (streaming) | {ms(t['p50'])} | {ms(t['p90'])} | {ms(t['p99'])} | {ms(t['max'])} |",
              "", f"Output: {r['output_tokens']} tokens, {r['output_tokens_per_s']:.1f} tokens/s over {r['wall_s']:.0f} s. "
              f"Server side: {r['server']['responses_to_completions']} responses to /v1/completions and "
              "/v1/chat/completions, "
              f"{r['server']['client_disconnects_seen']} client disconnects seen, "
              f"{r['server']['cancelled_by_engine']} requests cancelled by the engine, "
              f"KV used at the end: {r['server']['kv_used_tokens_at_end']:.0f} tokens."]
    if r["lost_reasons"]:
        lines += ["", "Lost: " + "; ".join(f"{k} ({v})" for k, v in r["lost_reasons"].items())]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    """Latency percentiles of completed requests against concurrent clients (one line each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = max(p["round"] for p in r["phases"])
    phases = [p for p in r["phases"] if p["round"] == last]  # the last round: everything warmed up
    clients = [p["clients"] for p in phases]
    fig, ax = plt.subplots(figsize=(6, 4))
    for q in ("p50", "p90", "p99"):
        ax.plot(clients, [p["latency_s"][q] for p in phases], marker="o", label=q)
    ax.set_xscale("log", base=2)
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("end-to-end latency (s)")
    ax.set_title(f"ember serve {r['model']}: {r['requests_sent']} requests, {r['plan']['disconnect']:.0%} disconnects",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default="artifacts/gpt2-124m", help="engine folder to serve")
    ap.add_argument("--url", help="attach to a running server instead (loopback only)")
    ap.add_argument("--phases", default="8:64,16:128,32:256,64:1000", help="clients:requests,... (a ramp)")
    ap.add_argument("--disconnect", type=float, default=0.10, help="fraction of requests the client abandons")
    ap.add_argument("--max-tokens", default="2:10", help="uniform range of max_tokens")
    ap.add_argument("--max-duration", type=float, default=2400.0, help="wall-clock cap for all rounds, seconds")
    ap.add_argument("--rounds", type=int, default=3, help="times the whole ramp runs (fd and memory growth are "
                                                           "measured from the first round to the last)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-args", default="--max-batch 64 --max-queue 256",
                    help="extra `ember serve` options when this script starts the server")
    ap.add_argument("--out", default=str(RESULTS / "load"), help="output path without extension")
    a = ap.parse_args(argv)
    phases = [tuple(int(x) for x in p.split(":")) for p in a.phases.split(",")]
    lo, hi = (int(x) for x in a.max_tokens.split(":"))
    plan = Plan(phases=phases, disconnect=a.disconnect, max_tokens=(lo, hi), seed=a.seed, rounds=a.rounds)
    proc = None
    server_args = a.server_args.split() + ["--max-body-bytes", str(plan.max_body_bytes)]
    if a.url:
        if not is_loopback(urlparse(a.url).hostname or ""):
            raise SystemExit(f"--url {a.url}: this load test only drives loopback servers (127.0.0.1 / ::1)")
        url = a.url.rstrip("/")
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        log_path = Path(tempfile.gettempdir()) / f"ember-load-server-{port}.log"
        proc = start_server(a.folder, port, server_args, log_path)
        print(f"server log: {log_path}", flush=True)
        print(f"server ready in {time.perf_counter() - t0:.1f} s at {url}", flush=True)
    try:
        driver = Driver(url, plan, has_chat=asyncio.run(has_chat_template(url)))
        load_start = round(os.getloadavg()[0], 2)
        before = parse_prometheus(httpx.get(url + "/metrics", timeout=10).text)
        deadline = time.monotonic() + a.max_duration
        done_phases, rounds = [], []
        for rnd in range(plan.rounds):
            for clients, n in phases:
                info = asyncio.run(driver.run_phase(len(done_phases), clients, n, deadline))
                done_phases.append({"round": rnd, **info})
                print(f"round {rnd} phase {len(done_phases) - 1}: {clients} clients, {info['requests']} requests in "
                      f"{info['wall_s']:.1f} s", flush=True)
            idle = asyncio.run(wait_idle(url, 60))
            time.sleep(1.0)  # the clients' connections are closed: let the server finish closing its side
            rounds.append({"kv_used_tokens": idle["ember_kv_used_tokens"], "running": idle["ember_running_sequences"],
                           **server_resources(proc.pid if proc else None)})
            print(f"round {rnd} done: {rounds[-1]}", flush=True)
        after = asyncio.run(wait_idle(url, 60))
        healthy = httpx.get(url + "/health", timeout=10).status_code == 200
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        result = summarize(driver, done_phases, rounds, before, after, healthy,
                           {"model": model, "server_args": " ".join(server_args) if proc else f"attached to {url}",
                            "plan": {k: v for k, v in asdict(plan).items() if k != "stats"},
                            "load_average_1m_start": load_start})
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    try:
        plot(result, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    print(markdown(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
