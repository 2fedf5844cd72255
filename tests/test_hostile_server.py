"""`ember serve` against hostile clients (issue 16): bad text, huge prompts and chats, clients
that stall mid-request or hold connections open, unexpected handler errors, SIGTERM, 429s.

Real server processes on loopback over gpt2-tiny (`plain`: default limits; `guarded`: 1 s
header/body timeouts), in-process apps (Starlette's TestClient) where a test needs to watch
or break the engine, and a fake engine for the Retry-After estimate.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from ember.errors import OverloadedError
from ember.server import openai_schema as oa
from ember.server.app import create_app
from ember.server.chat_template import ChatTemplate
from ember.server.completions import DecoderService, ServerLimits
from ember.server.metrics import ServerMetrics
from test_server import Server

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
NORMAL = {"prompt": "still served", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
BIG_CHAT = {"messages": [{"role": "user", "content": "hi"}] * 20_000, "max_tokens": 2}


@pytest.fixture(scope="module")
def chat_folder(gpt2_tiny, tmp_path_factory) -> Path:
    """gpt2-tiny with a chat template recorded (as text) in its manifest."""
    out = tmp_path_factory.mktemp("hostile") / "gpt2-tiny-chat"
    shutil.copytree(gpt2_tiny, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tokenizer"]["chat_template"] = CHAT_TEMPLATE
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def plain(chat_folder):
    s = Server(chat_folder)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def guarded(chat_folder):
    s = Server(chat_folder, "--header-timeout", "1", "--body-timeout", "1")
    yield s
    s.stop()


def post_raw(client: httpx.Client, url: str, path: str, raw: bytes) -> httpx.Response:
    return client.post(url + path, content=raw, headers={"content-type": "application/json"}, timeout=60)


def local_port(r: httpx.Response) -> int:
    """The client-side port of the connection that carried ``r`` (same port = same connection)."""
    return r.extensions["network_stream"].get_extra_info("client_addr")[1]


# -- text validation and keep-alive ------------------------------------------------------------------

SURROGATES = [  # (path, raw JSON body with a lone surrogate escape, the field the 400 must name)
    ("/v1/completions", rb'{"prompt": "a\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/completions", rb'{"prompt": ["ok \udfff"], "max_tokens": 2}', "prompt[0]"),
    ("/v1/completions", rb'{"prompt": "hi", "stop": "\ud800", "max_tokens": 2}', "stop"),
    ("/v1/completions", rb'{"prompt": "hi", "stop": ["x", "y\udbffz"], "max_tokens": 2}', "stop[1]"),
    ("/v1/chat/completions", rb'{"messages": [{"role": "system", "content": "fine"}, '
                             rb'{"role": "user", "content": "bad \ud83d"}]}', "messages[1].content"),
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "ok"}, '
                             rb'{"type": "text", "text": "\udc00"}]}]}', "messages[0].content[1].text"),
]


def test_lone_surrogates_are_a_400_naming_the_field(plain):
    with httpx.Client() as client:
        for path, raw, field in SURROGATES:
            r = post_raw(client, plain.url, path, raw)
            assert r.status_code == 400, (raw, r.text)
            err = r.json()["error"]
            assert err["param"] == field and f"'{field}'" in err["message"] and "surrogate" in err["message"], err
        paired = {"messages": [{"role": "user", "content": "a \U0001F600 pair is fine"}], "max_tokens": 2}
        chat = client.post(plain.url + "/v1/chat/completions", json=paired, timeout=60)
        assert chat.status_code == 200, chat.text
    assert "Traceback" not in plain.output()


def test_no_hostile_request_resets_the_keep_alive_connection(plain):
    hostile = [(path, raw) for path, raw, _ in SURROGATES] + [
        ("/v1/completions", b'{"prompt": "unterminated'),  # not JSON
        ("/v1/completions", json.dumps({"prompt": "x" * (2 << 20)}).encode()),  # 413 past the body limit
        ("/v1/completions", json.dumps({"prompt": "word " * 200_000}).encode()),  # ~1 MB prompt: 400
        ("/v1/chat/completions", json.dumps(BIG_CHAT).encode()),  # 20k messages: 400
    ]
    with httpx.Client() as client:
        for path, raw in hostile:
            r = post_raw(client, plain.url, path, raw)
            assert 400 <= r.status_code < 500 and r.json()["error"]["message"], (raw[:80], r.status_code, r.text[:300])
            after = client.post(plain.url + "/v1/completions", json=NORMAL, timeout=60)
            assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3, after.text
            assert local_port(after) == local_port(r), f"the connection was closed after {raw[:80]!r}"


# -- what a handler may not do on the event loop -------------------------------------------------------

def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


@pytest.fixture(scope="module")
def inproc(chat_folder):
    """The app in-process (engine loaded in this process, so a test can watch or break it)."""
    import ember

    app = create_app(lambda: ember.load(chat_folder, threads=1), model_name="m", folder=chat_folder,
                     limits=ServerLimits(max_body_bytes=4 << 20))
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, client.get("/health").text
            time.sleep(0.02)
        yield client, app.state.holder.engine


@pytest.fixture
def watched(inproc, monkeypatch):
    """(client, calls): every engine.encode of text (``submit`` re-reads token ids with it, a
    cheap loop over ints) and every chat-template render is recorded as (what, ran on the
    event loop's thread?)."""
    client, engine = inproc
    calls: list[tuple[str, bool]] = []
    encode, render = engine.encode, ChatTemplate.render

    def recording_encode(prompt):
        if isinstance(prompt, str):
            calls.append(("encode", on_event_loop()))
        return encode(prompt)

    def recording_render(self, messages, *args, **kwargs):
        calls.append(("render", on_event_loop()))
        return render(self, messages, *args, **kwargs)

    monkeypatch.setattr(engine, "encode", recording_encode, raising=False)
    monkeypatch.setattr(ChatTemplate, "render", recording_render)
    return client, calls


def test_tokenization_and_chat_rendering_run_off_the_event_loop(watched):
    client, calls = watched
    r = client.post("/v1/completions", json=NORMAL)
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert [what for what, _ in calls] == ["encode", "render"], calls
    assert not any(on_loop for _, on_loop in calls), f"ran on the event loop: {calls}"


def test_oversized_prompts_and_chats_are_refused_without_tokenizing(watched):
    client, calls = watched
    huge = "word " * 200_000  # ~1 MB, under this app's 4 MiB body limit
    for path, body, field in [("/v1/completions", {"prompt": huge}, "prompt"),
                              ("/v1/completions", {"prompt": [7] * 5000}, "prompt"),
                              ("/v1/chat/completions", BIG_CHAT, "messages"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]}, "messages")]:
        r = client.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text[:300]
        assert "limit" in r.json()["error"]["message"]
    assert calls == [], f"tokenized or rendered before the size check: {calls}"


def test_an_unexpected_error_is_a_json_500_and_never_escapes(inproc, monkeypatch):
    client, engine = inproc  # TestClient re-raises whatever escapes the app, as uvicorn would (then resetting)

    def broken_encode(prompt):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(engine, "encode", broken_encode, raising=False)
    r = client.post("/v1/completions", json=NORMAL)
    assert r.status_code == 500 and "tokenizer exploded" in r.json()["error"]["message"], r.text
    monkeypatch.undo()

    def broken_chunk(*args, **kwargs):
        raise RuntimeError("chunk exploded")

    monkeypatch.setattr(oa, "completion_chunk", broken_chunk)
    with client.stream("POST", "/v1/completions", json={**NORMAL, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]", events
    assert "chunk exploded" in json.loads(events[-2])["error"]["message"], events


# -- slow and idle clients -----------------------------------------------------------------------------

def test_half_a_body_gets_408_after_the_body_timeout(guarded):
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": \"half")
        sock.settimeout(10)
        answer = b""
        while chunk := sock.recv(65536):  # the server answers, then closes the connection
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), answer
    assert "--body-timeout" in json.loads(body)["error"]["message"]
    assert httpx.post(guarded.url + "/v1/completions", json=NORMAL, timeout=60).status_code == 200


@pytest.mark.parametrize("sent", [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n", b""])
def test_a_connection_without_complete_headers_is_closed_after_the_header_timeout(guarded, sent):
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(sent)
        sock.settimeout(10)
        assert sock.recv(65536) == b""  # closed by the server, long before this socket's 10 s timeout
    assert httpx.get(guarded.url + "/health", timeout=10).status_code == 200


def test_connections_past_the_default_limit_get_503_at_once(plain):
    limit = ServerLimits.max_connections
    held = [socket.create_connection(("127.0.0.1", plain.port)) for _ in range(limit)]
    try:
        with socket.create_connection(("127.0.0.1", plain.port)) as extra:
            extra.settimeout(10)
            answer = extra.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503") and b"--max-connections" in answer, answer[:300]
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10
    while True:  # the server notices the closed connections and takes new ones again
        try:
            if httpx.post(plain.url + "/v1/completions", json=NORMAL, timeout=10).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.05)


# -- lifecycle and backpressure ------------------------------------------------------------------------

def test_a_clean_drain_exits_0(gpt2_tiny):
    s = Server(gpt2_tiny)
    try:
        assert complete_ok(s.url)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0, s.output()[-2000:]
    finally:
        s.stop()


def complete_ok(url: str) -> bool:
    return httpx.post(url + "/v1/completions", json=NORMAL, timeout=60).status_code == 200


class QueueFullEngine:
    """An engine whose waiting queue (of ``queue_depth``) is full: every submit is refused."""

    max_positions, tokenizer, config, eos_token_id, manifest = 64, None, {}, None, None

    def __init__(self, queue_depth: int):
        self.queue_depth = queue_depth

    def stats(self) -> dict:
        return {"queue_depth": self.queue_depth}

    def submit(self, ids, params):
        raise OverloadedError(f"request queue is full ({self.queue_depth} waiting); retry later")


def retry_after(queue_depth: int, finished: tuple[int, int] | None, seconds: float) -> str:
    """The Retry-After of a 429 when ``finished`` (engine counter before, after) moved over ``seconds``."""
    now = [100.0]
    metrics = ServerMetrics(window_s=10, clock=lambda: now[0])
    if finished is not None:
        metrics.sample({"tokens_generated_total": 0, "requests_finished_total": finished[0]})
        now[0] += seconds
        metrics.sample({"tokens_generated_total": 0, "requests_finished_total": finished[1]})
    service = DecoderService(QueueFullEngine(queue_depth), ServerLimits(), metrics, "m")
    req = oa.parse(oa.CompletionRequest, {"prompt": [1, 2, 3]})
    with pytest.raises(oa.ApiError) as e:
        service.submit([1, 2, 3], req, 4)
    assert e.value.status == 429 and "queue is full" in e.value.message
    return e.value.headers["Retry-After"]


def test_retry_after_reflects_the_queue():
    assert retry_after(1, (0, 0), 8) == "8"  # a tiny queue, nothing finished for 8 s: at least 8 s away
    assert retry_after(2, (3, 3), 2.5) == "5"
    assert retry_after(6, (0, 20), 10) == "3"  # 2 finishes a second
    assert retry_after(12, (0, 20), 10) == "6"
    assert retry_after(1000, (0, 10), 10) == "60"  # capped
    assert retry_after(4, None, 0) == "1"  # no rate measured yet
