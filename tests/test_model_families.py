"""Every registered family against transformers: random-weight Hugging Face folders built with
transformers' own config classes, compiled by ``ember compile`` and run on the CPU step graph.

Prompts are longer than the sliding windows and generations run past
``original_max_position_embeddings`` where the family has one; the fusion invariant (tokens
fused with staggered arrivals == tokens alone) holds for each family.
"""
from __future__ import annotations

import time

import pytest
import torch

import ember
from ember.compiler.compile import CompileOptions, compile_decoder
from ember.errors import ConfigError
from ember.export.config import config_from_hf
from ember.export.tokenizer_builtin import build_builtin_tokenizer

from test_fusion import alone, make_requests

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=96, bos_token_id=1, eos_token_id=2, pad_token_id=0)
WINDOW = 8
# family -> (model_type, config fields beyond BASE)
FAMILIES = {
    "llama3-rope": ("llama", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama-yarn": ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-linear": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral-window": ("mistral", dict(sliding_window=WINDOW)),
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": ("qwen3", dict(head_dim=32, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)),
    "phi3-longrope": ("phi3", dict(partial_rotary_factor=0.5, original_max_position_embeddings=16, rope_scaling={
        "type": "longrope", "long_factor": [1.0 + 0.5 * i for i in range(4)], "short_factor": [1.0 + 0.1 * i for i in range(4)]})),
    "phi3-window": ("phi3", dict(sliding_window=WINDOW)),
    "gemma3_text": ("gemma3_text", dict(head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2, query_pre_attn_scalar=16,
                                        final_logit_softcapping=3.0, rope_scaling={"rope_type": "linear", "factor": 2.0})),
}


def hf_folder(name: str, folder, seed: int = 0):
    """A random-weight transformers model of FAMILIES[name], saved with a tokenizer; returns the model."""
    model_type, extra = FAMILIES[name]
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **BASE, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms at 1 and zero biases would hide a misplaced norm or bias: make them all matter
        for n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.05))
    model.save_pretrained(folder)
    build_builtin_tokenizer(BASE["vocab_size"]).save(str(folder / "tokenizer.json"))
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_engine(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    model = hf_folder(request.param, d / "hf")
    compile_decoder(str(d / "hf"), d / "engine", CompileOptions(quiet=True))
    return request.param, model, d / "engine"


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' own ``generate`` (greedy): through ``prepare_inputs_for_generation``, so
    Phi-3 drops and recomputes its cache with the long LongRoPE factors when a sequence first
    passes original_max_position_embeddings, as a user running transformers gets."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_tokens_equal_transformers(family_engine):
    """Prompts longer than the window (chunked prefill of 8), generations well past position 16
    (original_max_position_embeddings of the scaled-RoPE configs) and past 3 wraps of a window
    layer's KV ring (16 positions for the window of 8), prompts of 16 and 20 tokens; one prompt
    longer than the ring prefilled in one chunk (only its last 16 positions stay in the ring).
    LongRoPE: generations that cross 16 are recomputed with the long factors, as transformers'
    ``generate`` does; the 16- and 20-token prompts take them from the first chunk (or, at
    exactly 16, on the first generated token)."""
    name, model, folder = family_engine
    new_tokens = 36
    prompts = [list(range(20, 33)), [5, 6, 7], [100 + (7 * i) % 90 for i in range(11)],
               [40 + (5 * i) % 200 for i in range(16)], [30 + (11 * i) % 250 for i in range(20)]]
    with ember.load(folder, prefill_chunk=8) as eng:
        got = [r.token_ids for r in eng.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)]
        recomputes, switch = eng.stats()["longrope_recomputes_total"], eng.scheduler.rope_switch
    for p, g in zip(prompts, got):
        assert g == hf_greedy(model, p, new_tokens), (name, p)
    # LongRoPE: every prompt within the switch (16) crosses it while generating, recomputed once
    assert (switch is not None) == (FAMILIES[name][1].get("rope_scaling", {}).get("type") == "longrope")
    assert recomputes == (0 if switch is None else 4)
    if FAMILIES[name][1].get("sliding_window"):
        long_prompt = [100 + (11 * i) % 150 for i in range(40)]
        with ember.load(folder, prefill_chunk=64, verify="size") as eng:
            got = eng.generate([long_prompt], max_new_tokens=8, ignore_eos=True)[0].token_ids
        assert got == hf_greedy(model, long_prompt, 8), name


def test_longrope_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from ember.models.rope import rope_tables

    model_type, extra = FAMILIES["phi3-longrope"]
    hf = transformers.AutoConfig.for_model(model_type, **BASE, **extra)
    cfg = config_from_hf(hf.to_dict())
    ours = rope_tables(cfg, "global")
    short, factor = ROPE_INIT_FUNCTIONS["longrope"](hf, None, seq_len=1)
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](hf, None, seq_len=17)
    torch.testing.assert_close(ours["inv_freq"], short)
    torch.testing.assert_close(ours["long_inv_freq"], long)
    assert ours["factor"] == pytest.approx(factor) and factor > 1 and cfg.longrope_switch == 16


def test_loading_reads_the_longrope_switch_and_refuses_an_old_longrope_graph(tmp_path):
    """A LongRoPE step graph takes ``rope_long`` and the scheduler gets the switch; a LongRoPE
    folder compiled before that input (each position rotated by itself) is refused: recompile."""
    from types import SimpleNamespace

    from ember.engine_format.decoder_spec import longrope_switch
    from ember.engine_format.roles import role_from_name
    from ember.errors import ArtifactError

    model_type, extra = FAMILIES["phi3-longrope"]
    cfg = config_from_hf(transformers.AutoConfig.for_model(model_type, **BASE, **extra).to_dict()).to_dict()
    plain = config_from_hf({"model_type": "llama", **BASE}).to_dict()
    def spec(name):
        return SimpleNamespace(name=name, role=role_from_name(name)[0])

    old = SimpleNamespace(inputs=[spec(n) for n in ("input_ids", "positions", "past_lengths", "new_lengths", "past_key.0")])
    new = SimpleNamespace(inputs=old.inputs + [spec("rope_long")])
    assert longrope_switch(cfg, new, str(tmp_path)) == 16 and longrope_switch(plain, old, str(tmp_path)) is None
    with pytest.raises(ArtifactError, match="LongRoPE scaling but the step graph lacks the rope_long input; recompile"):
        longrope_switch(cfg, old, str(tmp_path))
    with pytest.raises(ArtifactError, match="has no LongRoPE scaling but the step graph takes the rope_long"):
        longrope_switch(plain, new, str(tmp_path))


def test_fused_staggered_equals_alone(family_engine):
    """The fusion invariant with windows (their KV rings wrap), prefill chunks, fused batches and compaction."""
    name, _, folder = family_engine
    reqs = [(p[:40], min(n, 16), delay) for p, n, delay in make_requests(24, seed=5, vocab=250)]
    with ember.load(folder, max_batch=1, verify="size") as solo:
        cache: dict = {}
        for p, n, _ in reqs:
            alone(solo, cache, p, n)
    with ember.load(folder, max_batch=5, prefill_chunk=6, verify="size") as eng:
        handles = []
        for p, n, delay in reqs:
            time.sleep(delay)
            handles.append(eng.submit(p, max_new_tokens=n, ignore_eos=True))
        results = [h.result(timeout=120) for h in handles]
        recomputes, switch = eng.stats()["longrope_recomputes_total"], eng.scheduler.rope_switch
    bad = [i for i, ((p, n, _), r) in enumerate(zip(reqs, results)) if r.token_ids != cache[(tuple(p), n)]]
    assert not bad, f"{name}: {len(bad)} of {len(reqs)} fused requests differ from their solo run"
    if switch is not None:  # LongRoPE: fused requests crossed the switch and were recomputed amid the others
        crossing = sum(len(p) <= switch < len(p) + n - 1 for p, n, _ in reqs)
        assert crossing >= 3 and recomputes == crossing


def test_manifest_records_the_description(family_engine):
    name, model, folder = family_engine
    cfg = ember.engine_format.manifest.read_manifest(folder).model["config"]
    hc = model.config
    assert cfg["head_dim"] == (getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads)
    windows = getattr(model.config, "layer_types", None)
    if FAMILIES[name][1].get("sliding_window") and windows:
        assert [bool(w) for w in cfg["layer_windows"]] == [t == "sliding_attention" for t in windows]
    # the window layers keep a ring of 16 positions (the window of 8 rounded up to RING_ALIGN)
    assert cfg["kv_rings"] == ([16 if w else 0 for w in cfg["layer_windows"]] if cfg["layer_windows"] else [])


@pytest.mark.parametrize("model_type, field, value, message", [
    ("llama", "rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "rope_scaling.rope_type='dynamic'"),
    ("qwen3", "num_experts", 8, "num_experts"),
    ("gemma3_text", "use_bidirectional_attention", True, "use_bidirectional_attention"),
    ("phi3", "rope_scaling", {"type": "longrope", "long_factor": [1.0], "short_factor": [1.0],
                              "original_max_position_embeddings": 16}, "long_factor"),
    ("mistral", "hidden_act", "gelu", "hidden_act"),
])
def test_unsupported_fields_fail_naming_the_field(model_type, field, value, message):
    cfg = {"model_type": model_type, **{k: v for k, v in BASE.items() if k != "pad_token_id"}, field: value}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        config_from_hf(cfg)


def test_fused_decode_and_tp_refuse_what_they_cannot_express():
    from ember.compiler.compile import wants_fused_decode
    from ember.export.tp import plan_tp

    qwen3 = config_from_hf({"model_type": "qwen3", **BASE, "num_attention_heads": 4, "head_dim": 32})
    assert "q_norm" in qwen3.fused_decode_refusal()
    assert not wants_fused_decode(CompileOptions(dtype="fp16"), qwen3.family, qwen3.head_dim, qwen3.fused_decode_refusal())
    with pytest.raises(ConfigError, match="--fused-decode on does not apply to this qwen3 model"):
        wants_fused_decode(CompileOptions(fused_decode="on"), qwen3.family, qwen3.head_dim, qwen3.fused_decode_refusal())
    gemma = config_from_hf({"model_type": "gemma3_text", **BASE, "head_dim": 16})
    with pytest.raises(ConfigError, match=r"--tp 2: .*\(1 \+ w\) RMSNorm"):
        plan_tp(gemma, 2)
    llama3 = config_from_hf({"model_type": "llama", **BASE, **FAMILIES["llama3-rope"][1]})
    assert llama3.fused_decode_refusal() is None and plan_tp(llama3, 2).tp == 2  # scaled frequencies only


def _loaded_source(name: str, folder):
    from ember.export.sources import resolve_decoder_source

    hf_folder(name, folder)
    return resolve_decoder_source(str(folder))


@pytest.mark.parametrize("name", ["llama3-rope", "llama-linear", "mistral-window"])
def test_fused_decode_part_from_the_description(name, tmp_path):
    """Scaled RoPE reaches the fused part through the step model's frequencies; a windowed
    model is refused with the reason and keeps the step graph."""
    from ember.export.gqa_decode import build_decode_graph, check_decode_graph
    from ember.export.onnx_export import save_onnx

    src = _loaded_source(name, tmp_path / "hf")
    if src.config.has_windows:
        assert "sliding-window" in src.config.fused_decode_refusal()
        with pytest.raises(ConfigError, match="sliding-window"):
            build_decode_graph(src.model, src.config, "float32")
        return
    save_onnx(build_decode_graph(src.model, src.config, "float32"), tmp_path / "decode.onnx")
    assert check_decode_graph(src.model, src.config, tmp_path / "decode.onnx", batch=3, capacity=40) < 1e-4


@pytest.mark.parametrize("name", ["llama3-rope", "qwen3", "mistral-window"])
def test_tp2_matches_torch(name, tmp_path):
    """TP=2 segments summed as the all-reduce does == the unsharded model (llama3 RoPE, Qwen3's
    q/k norms and explicit head_dim, Mistral's window)."""
    from ember.compiler.tp_compile import check_tp_against_torch, compile_tp
    from ember.progress import StageLog

    src = _loaded_source(name, tmp_path / "hf")
    (tmp_path / "tp").mkdir()
    parts = compile_tp(src, tmp_path / "tp", CompileOptions(tp=2, quiet=True, validate=False), StageLog(3, quiet=True))
    rel = [[p.file for p in parts if p.extra["rank"] == r] for r in range(2)]
    assert check_tp_against_torch(src.model, src.config, tmp_path / "tp", rel) < 1e-4


def test_inspect_says_why_the_fused_part_is_missing(tmp_path, capsys):
    from ember.cli import main

    hf_folder("qwen3", tmp_path / "hf")
    assert main(["compile", str(tmp_path / "hf"), "-o", str(tmp_path / "e"), "--dtype", "fp16", "--quiet"]) == 0
    assert main(["inspect", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "fused decode    not built: q/k normalisation" in out and "head_dim 32" in out
    assert "sliding window 8 on 1 of 3 layers (KV ring of 16 positions)" in out


@pytest.mark.parametrize("name", ["llama3-rope", "mistral-window", "qwen2-window", "qwen3", "phi3-longrope", "gemma3_text"])
def test_int8_compiles_and_generates(name, tmp_path):
    hf_folder(name, tmp_path / "hf")
    m = compile_decoder(str(tmp_path / "hf"), tmp_path / "e", CompileOptions(quantize="int8", quiet=True))
    assert m.quantization["scheme"] == "int8"
    with ember.load(tmp_path / "e") as eng:
        r = eng.generate([list(range(20, 32))], max_new_tokens=6, ignore_eos=True)[0]
    assert len(r.token_ids) == 6 and r.finish_reason.value == "length"
