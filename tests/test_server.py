"""`ember serve` end to end: a real server process on loopback over a compiled gpt2-tiny.

Each server is `python -m ember.server FOLDER ...` (the code behind `ember serve`), driven
with httpx. Servers: `plain` (chat template added to its folder, default limits),
`tight` (1 slot, queue of 2, API key), and per-test servers for SIGTERM.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from ember.engine_format.manifest import file_record
from ember.server.metrics import parse_prometheus
from ember.server.ready import ServerNotReady, wait_until_healthy

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
LONG = {"max_tokens": 200, "ignore_eos": True, "temperature": 0}  # the longest run gpt2-tiny's 256 positions allow


@pytest.fixture(scope="session")
def tiny_folder(gpt2_tiny) -> Path:
    return gpt2_tiny  # conftest.py's session-wide compiled gpt2-tiny


@pytest.fixture(scope="session")
def chat_folder(tiny_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("server-chat") / "gpt2-tiny-chat"
    shutil.copytree(tiny_folder, out)
    (out / "tokenizer" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    manifest = json.loads((out / "manifest.json").read_text())  # only a template the manifest records is used
    manifest["tokenizer"]["chat_template"] = file_record(out, "tokenizer/chat_template.jinja")
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess; ``url`` once /health answered 200."""

    def __init__(self, folder: Path, *args: str, ready_timeout_s: float = 60.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(folder.parent / f"server-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "ember.server", str(folder), "--port", str(self.port),
                                      "--no-access-log", "--threads", "1", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.saw_loading = False

        def seen(r) -> None:
            self.saw_loading |= r.status_code == 503 and r.json()["status"] == "loading"

        try:
            wait_until_healthy(self.proc, self.url, ready_timeout_s, on_response=seen)
        except ServerNotReady as e:
            self.stop()
            raise RuntimeError(f"{e}:\n{self.output()}") from None

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def metrics(self, **headers) -> dict[str, float]:
        r = httpx.get(self.url + "/metrics", headers=headers, timeout=10)
        assert r.status_code == 200, r.text
        return parse_prometheus(r.text)

    def wait_idle(self, timeout_s: float = 10.0, **headers) -> dict[str, float]:
        """Metrics once no sequence runs and no KV is held (fails the test on timeout)."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.metrics(**headers)
            if m["ember_kv_used_tokens"] == 0 and m["ember_running_sequences"] == 0 and m["ember_queue_depth"] == 0:
                return m
            assert time.monotonic() < deadline, f"server not idle after {timeout_s} s: {m}"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def plain(chat_folder):
    s = Server(chat_folder, "--max-batch", "8", "--max-body-bytes", "4096")
    yield s
    s.stop()


API_KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def tight(tiny_folder):
    s = Server(tiny_folder, "--max-batch", "1", "--max-queue", "2", "--api-key", API_KEY)
    yield s
    s.stop()


def complete(url: str, body: dict, headers: dict | None = None, timeout: float | httpx.Timeout = 60) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=timeout)


def stream_events(url: str, path: str, body: dict, headers: dict | None = None) -> list:
    """All SSE payloads of one streaming request (JSON-decoded; "[DONE]" kept as a string)."""
    out = []
    with httpx.stream("POST", url + path, json={**body, "stream": True}, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


# -- basic API -------------------------------------------------------------------------------------

def test_health_models_metrics(plain):
    h = httpx.get(plain.url + "/health").json()
    assert h["status"] == "ready" and h["kind"] == "decoder" and h["model"] == "gpt2-tiny-chat"
    models = httpx.get(plain.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["gpt2-tiny-chat"]
    m = plain.metrics()
    for name in ("ember_up", "ember_queue_depth", "ember_running_sequences", "ember_kv_used_tokens",
                 "ember_generation_tokens_per_second", 'ember_time_to_first_token_seconds_bucket{le="+Inf"}',
                 "ember_time_per_output_token_seconds_count"):
        assert name in m, name
    assert m["ember_up"] == 1


@pytest.mark.parametrize("prompt", ["Hello world", "The quick brown fox jumps over", [5, 17, 300, 2]])
def test_streaming_equals_non_streaming_greedy(plain, prompt):
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    r = complete(plain.url, body)
    assert r.status_code == 200, r.text
    whole = r.json()
    assert whole["object"] == "text_completion" and whole["usage"]["completion_tokens"] == 24
    events = stream_events(plain.url, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert sum(c["choices"][0]["finish_reason"] is None for c in chunks) >= 24  # a chunk per token
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"] == whole["usage"]
    assert len({e["id"] for e in events[:-1]}) == 1


def test_stop_string_stream_equals_whole(plain):
    body = {"prompt": "Stop somewhere", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    free = complete(plain.url, body).json()["choices"][0]["text"]
    stop = free[len(free) // 2: len(free) // 2 + 3]
    assert len(stop) == 3, free
    whole = complete(plain.url, {**body, "stop": [stop]}).json()["choices"][0]
    assert whole["finish_reason"] == "stop" and stop not in whole["text"] and free.startswith(whole["text"])
    events = stream_events(plain.url, "/v1/completions", {**body, "stop": [stop]})
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == whole["text"]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_chat_completions_stream_and_whole_agree(plain):
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}],
            "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    r = httpx.post(plain.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    whole = r.json()
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["role"] == "assistant"
    # The rendered template is the prompt: its token count is what the template produces.
    assert whole["usage"]["prompt_tokens"] > len("be brief hi there") // 4
    events = stream_events(plain.url, "/v1/chat/completions", body)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == whole["choices"][0]["message"]["content"]


def test_chat_without_template_is_a_clear_400(tight):
    r = httpx.post(tight.url + "/v1/chat/completions", headers=AUTH, json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


def test_image_request_on_decoder_is_a_clear_400(plain):
    r = httpx.post(plain.url + "/v1/images/generations", json={"prompt": "a cat"})
    assert r.status_code == 400 and "decoder" in r.json()["error"]["message"]


# -- malformed requests ----------------------------------------------------------------------------

BAD_REQUESTS = [
    (b'{"prompt": "hi", "max_tokens": ', 400, "not valid JSON"),
    (b'[1, 2, 3]', 400, "JSON object"),
    ({"max_tokens": 4}, 400, "'prompt'"),
    ({"prompt": "hi", "top_p": 3}, 400, "'top_p'"),
    ({"prompt": "hi", "temperature": -1}, 400, "'temperature'"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "'max_tokens'"),
    ({"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 255}, 400, "maximum context length"),
    ({"prompt": "word " * 600}, 400, "prompt"),
    ({"prompt": [1, 2, 99999]}, 400, "[0, 512)"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": "hi", "n": 3}, 400, "'n'"),
    ({"prompt": ["a", "b"]}, 400, "batch"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "'stop'"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "not served here"),
    ({"prompt": "x" * 5000}, 413, "exceeds this server's limit"),
]


def test_malformed_requests_get_4xx_with_message_and_server_keeps_serving(plain):
    for body, status, fragment in BAD_REQUESTS:
        if isinstance(body, bytes):
            r = httpx.post(plain.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
        else:
            r = complete(plain.url, body)
        assert r.status_code == status, (body if isinstance(body, bytes) else str(body)[:80], r.text)
        assert fragment in r.json()["error"]["message"], (fragment, r.text)
    for path, method in [("/v1/nothing", "GET"), ("/v1/completions", "GET")]:
        r = httpx.request(method, plain.url + path)
        assert r.status_code in (404, 405) and r.json()["error"]["message"]
    r = complete(plain.url, {"prompt": "still alive", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(plain.url + "/health").status_code == 200


def test_client_leaving_mid_body_is_quiet(plain):
    key = 'ember_http_responses_total{endpoint="/v1/completions",status="499"}'
    before = plain.metrics().get(key, 0)
    with socket.create_connection(("127.0.0.1", plain.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": \"half")
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while plain.metrics().get(key, 0) < before + 1:
        assert time.monotonic() < deadline, plain.output()[-3000:]
        time.sleep(0.05)
    assert "Traceback" not in plain.output()
    assert complete(plain.url, {"prompt": "still here", "max_tokens": 2}).status_code == 200


def test_a_failing_request_fails_alone(plain):
    good = {"prompt": "Alone or together", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    alone = complete(plain.url, good).json()["choices"][0]["text"]
    bad = [{"prompt": "x", "top_k": -7}, {"prompt": [1, -4]}, {"prompt": "x", "seed": -1}]
    with ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(complete, plain.url, good if i % 2 == 0 else bad[i % 3]) for i in range(12)]
        results = [f.result() for f in futs]
    for i, r in enumerate(results):
        if i % 2 == 0:
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == alone
        else:
            assert r.status_code == 400 and r.json()["error"]["message"]


# -- disconnects, backpressure, auth --------------------------------------------------------------

def test_disconnect_mid_stream_cancels_and_frees_kv(plain):
    before = plain.wait_idle()
    with httpx.stream("POST", plain.url + "/v1/completions", timeout=60,
                      json={"prompt": "Tell me a long story", "stream": True, **LONG}) as r:
        lines = r.iter_lines()
        got: list[str] = []
        for line in lines:
            if line.startswith("data: "):
                got.append(line)
            if len(got) == 2:
                break
    # The connection is closed here, long before 200 tokens could have been sent.
    after = plain.wait_idle()
    assert after["ember_client_disconnects_total"] == before["ember_client_disconnects_total"] + 1
    key = 'ember_request_finish_total{reason="cancelled"}'
    deadline = time.monotonic() + 10
    while after.get(key, 0) < before.get(key, 0) + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
        after = plain.metrics()
    assert after.get(key, 0) == before.get(key, 0) + 1
    generated = after["ember_generation_tokens_total"] - before["ember_generation_tokens_total"]
    assert generated < LONG["max_tokens"], "the request ran to the end: it was not cancelled"


def test_disconnect_while_waiting_non_streaming_frees_kv(plain):
    before = plain.wait_idle()
    # eight long requests keep every slot busy, so the answer cannot come within the client's timeout
    with ThreadPoolExecutor(8) as pool:
        busy = [pool.submit(complete, plain.url, {"prompt": f"busy {i}", **LONG}) for i in range(8)]
        with pytest.raises(httpx.TimeoutException):
            complete(plain.url, {"prompt": "waiting for the answer", **LONG}, timeout=httpx.Timeout(10, read=0.05))
        assert all(f.result().status_code == 200 for f in busy)
    after = plain.wait_idle()
    assert after["ember_client_disconnects_total"] == before["ember_client_disconnects_total"] + 1
    assert complete(plain.url, {"prompt": "next", "max_tokens": 2}).status_code == 200


def test_429_with_retry_after_past_the_queue(tight):
    body = {"prompt": "fill the queue", **LONG}
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: complete(tight.url, body, AUTH), range(12)))
    codes = sorted(r.status_code for r in results)
    assert 429 in codes and 200 in codes, codes
    assert set(codes) <= {200, 429}
    for r in results:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1 and "queue is full" in r.json()["error"]["message"]
        else:
            assert r.json()["usage"]["completion_tokens"] == LONG["max_tokens"]
    m = tight.wait_idle(**AUTH)
    assert m['ember_http_responses_total{endpoint="/v1/completions",status="429"}'] == codes.count(429)
    assert complete(tight.url, {"prompt": "after", "max_tokens": 2}, AUTH).status_code == 200


def test_api_key(tight):
    assert complete(tight.url, {"prompt": "x", "max_tokens": 1}).status_code == 401
    r = complete(tight.url, {"prompt": "x", "max_tokens": 1}, {"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(tight.url + "/metrics").status_code == 401
    assert httpx.get(tight.url + "/health").status_code == 200  # probes need no key
    assert complete(tight.url, {"prompt": "x", "max_tokens": 1}, AUTH).status_code == 200


# -- lifecycle -------------------------------------------------------------------------------------

def test_sigterm_drains_in_flight(tiny_folder):
    s = Server(tiny_folder, "--max-batch", "2", "--drain-timeout", "20")
    try:
        events: list = []
        started = threading.Event()

        def consume():
            with httpx.stream("POST", s.url + "/v1/completions", timeout=60,
                              json={"prompt": "drain me", "stream": True, **LONG}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()

        t = threading.Thread(target=consume)
        t.start()
        assert started.wait(30)
        s.proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert events[-1] == "[DONE]", events[-3:]
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        s.proc.wait(30)
        with pytest.raises(httpx.TransportError):
            httpx.get(s.url + "/health", timeout=2)
        log = s.output()
        assert "Waiting for application shutdown" in log and "Traceback" not in log, log
    finally:
        s.stop()


def test_sigterm_deadline_cancels_what_is_left(tiny_folder):
    s = Server(tiny_folder, "--max-batch", "1", "--max-queue", "64", "--drain-timeout", "0.5")
    try:
        def run(i: int) -> str:
            body = {"prompt": f"backlog {i}", **LONG}
            try:
                if i % 2 == 0:
                    return str(complete(s.url, body, timeout=60).status_code)
                with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                    if r.status_code != 200:  # e.g. 503: it arrived after SIGTERM
                        return str(r.status_code)
                    events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                return "error event" if "error" in json.loads(events[-2]) else "200"
            except httpx.TransportError as e:
                return type(e).__name__
        with ThreadPoolExecutor(24) as pool:
            futs = [pool.submit(run, i) for i in range(24)]
            deadline = time.monotonic() + 30
            while True:  # every request is inside the engine, with a backlog far longer than 0.5 s
                m = s.metrics()
                submitted = m["ember_engine_requests_finished_total"] + m["ember_running_sequences"] + m["ember_queue_depth"]
                if submitted == 24 and m["ember_queue_depth"] >= 10:
                    break
                assert time.monotonic() < deadline, m
                time.sleep(0.02)
            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            s.proc.wait(30)
            exit_s = time.monotonic() - t0
            outcomes = [f.result(timeout=30) for f in futs]
        assert exit_s < 5, exit_s
        assert "200" in outcomes, outcomes  # some finished inside the deadline
        # The rest were cancelled and told so: 503 for plain requests, an error event for streams.
        assert "503" in outcomes and "error event" in outcomes, outcomes
        assert set(outcomes) <= {"200", "503", "error event"}, outcomes
        log = s.output()
        assert "drain deadline (0.5 s) passed: cancelled" in log and "Traceback" not in log, log
    finally:
        s.stop()


def test_load_failure_exits_nonzero(tmp_path):
    bad = tmp_path / "not-an-engine"
    bad.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-m", "ember.server", str(bad), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 1 and "failed to load" in p.stderr, p.stderr[-2000:]


# -- images ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    from ember.compiler.diffusion import DiffusionCompileOptions, compile_diffusion
    from ember.runtime.diffusion.pipeline import DiffusionPipeline

    out = tmp_path_factory.mktemp("server-sd") / "sd-tiny"
    compile_diffusion("sd-tiny", out, DiffusionCompileOptions(steps=4, validate=False, quiet=True), open_pipeline=DiffusionPipeline)
    s = Server(out, "--max-queue", "4")
    yield s
    s.stop()


def test_image_generation_returns_pngs(image_server):
    import base64
    import io

    from PIL import Image

    url = image_server.url
    assert httpx.get(url + "/health").json()["kind"] == "diffusion"
    body = {"prompt": "a red cube", "n": 2, "num_inference_steps": 4, "seed": 3}
    r = httpx.post(url + "/v1/images/generations", json=body, timeout=120)
    assert r.status_code == 200, r.text
    images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in r.json()["data"]]
    assert len(images) == 2 and images[0].format == "PNG" and images[0].size[0] == images[0].size[1] >= 8
    again = httpx.post(url + "/v1/images/generations", json=body, timeout=120).json()
    assert again["data"][0]["b64_json"] == r.json()["data"][0]["b64_json"]  # seeded: reproducible
    for bad, fragment in [({"prompt": "x", "size": "1000x1000"}, "compiled for"), ({"prompt": ""}, "'prompt'"),
                          ({"prompt": "x", "n": 9}, "'n'"), ({"prompt": "x", "response_format": "url"}, "response_format")]:
        r = httpx.post(url + "/v1/images/generations", json=bad, timeout=60)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
    r = complete(url, {"prompt": "text please"})
    assert r.status_code == 400 and "images/generations" in r.json()["error"]["message"]
