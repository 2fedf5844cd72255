"""Server pieces that need no engine: lifecycle states, metrics text, schema checks, chat templates."""
from __future__ import annotations

import json
import threading
import time

import pytest
from starlette.testclient import TestClient

from ember.server import openai_schema as oa
from ember.server.app import create_app
from ember.server.chat_template import ChatTemplate, find_chat_template
from ember.server.cli import is_loopback
from ember.server.metrics import Histogram, ServerMetrics, parse_prometheus


def test_health_is_503_while_loading_and_reports_a_failed_load():
    release = threading.Event()
    failures: list[str] = []

    def factory():
        release.wait(10)
        raise RuntimeError("disk on fire")

    app = create_app(factory, model_name="m", on_load_failure=failures.append)
    with TestClient(app) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = client.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "loading" in r.json()["error"]["message"]
        assert client.get("/metrics").text.startswith("# HELP ember_up")
        release.set()
        deadline = time.monotonic() + 10
        while client.get("/health").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        h = client.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "failed" and "disk on fire" in h.json()["error"]
        assert failures and "disk on fire" in failures[0]
        assert "disk on fire" in client.post("/v1/completions", json={"prompt": "x"}).json()["error"]["message"]


def test_histogram_is_cumulative_prometheus_text():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 7.0):
        h.observe(v)
    text = "\n".join(h.lines("lat"))
    values = parse_prometheus(text)
    assert values['lat_bucket{le="0.1"}'] == 2  # le is inclusive
    assert values['lat_bucket{le="1.0"}'] == 3
    assert values['lat_bucket{le="+Inf"}'] == 4 == values["lat_count"]
    assert values["lat_sum"] == pytest.approx(7.65)


def test_metrics_rates_come_from_engine_counters():
    t = [0.0]
    m = ServerMetrics(window_s=10, clock=lambda: t[0])
    m.sample({"tokens_generated_total": 0, "requests_finished_total": 0})
    t[0] = 2.0
    m.sample({"tokens_generated_total": 100, "requests_finished_total": 4})
    assert m.rates() == (50.0, 2.0)
    values = parse_prometheus(m.render({"queue_depth": 3, "kv_used_tokens": 5, "kv_capacity_tokens": 20,
                                        "tokens_generated_total": 100, "requests_finished_total": 4}, "ready"))
    assert values["ember_queue_depth"] == 3 and values["ember_kv_usage_ratio"] == 0.25
    assert values["ember_up"] == 1


def test_schema_names_the_bad_field():
    with pytest.raises(oa.ApiError) as e:
        oa.parse(oa.CompletionRequest, {"prompt": "x", "max_tokens": "many"})
    assert e.value.status == 400 and e.value.param == "max_tokens" and "'max_tokens'" in e.value.message
    with pytest.raises(oa.ApiError, match="only n=1"):
        oa.parse(oa.CompletionRequest, {"prompt": "x", "n": 2}).single_prompt()
    req = oa.parse(oa.CompletionRequest, {"prompt": [[1, 2, 3]], "stop": "\n", "top_k": -1})
    assert req.single_prompt() == [1, 2, 3]
    assert req.sampling_kwargs(5) == dict(max_new_tokens=5, temperature=1.0, top_k=0, top_p=1.0, seed=None,
                                          stop=("\n",), ignore_eos=False)
    with pytest.raises(oa.ApiError, match="text only"):
        oa.parse(oa.ChatRequest, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).messages[0].text()
    with pytest.raises(oa.ApiError, match="multiples of 8"):
        oa.parse(oa.ImageRequest, {"prompt": "cat", "size": "500x500"}).width_height()


def test_chat_template_lookup_order_and_rendering(tmp_path):
    assert find_chat_template(tmp_path) is None
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "cfg"}))
    assert find_chat_template(tmp_path) == "cfg"
    (tmp_path / "tokenizer" / "chat_template.jinja").write_text("file")
    assert find_chat_template(tmp_path) == "file"

    class M:
        tokenizer = {"file": "tokenizer/tokenizer.json", "chat_template": "manifest"}
    assert find_chat_template(tmp_path, M()) == "manifest"

    t = ChatTemplate("{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                     "{% if add_generation_prompt %}[assistant]{% endif %}", bos_token="<s>")
    assert t.render([{"role": "user", "content": "hi"}]) == "<s>[user]hi[assistant]"
    strict = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}ok")
    with pytest.raises(ValueError, match="user first"):
        strict.render([{"role": "system", "content": "x"}])


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.com")


def test_serve_passes_the_kv_layout_options_to_load():
    import argparse

    from ember.server.cli import LOAD_OPTIONS, add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(["folder", "--kv-layout", "paged", "--kv-block-size", "8", "--prefix-cache", "off"])
    options = {k: getattr(a, k) for k in LOAD_OPTIONS}
    assert options["kv_layout"] == "paged" and options["kv_block_size"] == 8 and options["prefix_caching"] is False
    assert {k: getattr(p.parse_args(["folder"]), k) for k in LOAD_OPTIONS}["prefix_caching"] is None  # load's default
