"""Hugging Face ``generate`` on the same weights, static batches (greedy).

The torch model is rebuilt from the engine folder's manifest: a built-in config is
re-created from its name + seed (``resolve_decoder_source``) and its step-model weights are
mapped back to the ``transformers`` layout; a folder-compiled model is loaded from the
folder recorded as its origin. Needs torch + transformers (the ``export`` extra).
"""
from __future__ import annotations

import time

from ember.bench.batch_arms import drive_batches
from ember.bench.metrics import ArmResult, RequestRecord
from ember.bench.model import BenchModel
from ember.bench.workload import BenchRequest
from ember.errors import ConfigError


def build_hf_model(model: BenchModel):
    """The ``transformers`` causal LM with the engine's weights, float32, eval mode."""
    import transformers

    from ember.export.config import DecoderConfig, to_hf_config
    from ember.export.sources import resolve_decoder_source

    m = model.manifest.model
    cfg = DecoderConfig.from_dict(m["config"])
    if m.get("origin") == "builtin":
        src = resolve_decoder_source(m["name"], seed=int(m.get("seed") or 0))
        hf = to_hf_config(cfg)
        config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
        hf_model = transformers.AutoModelForCausalLM.from_config(config)
        sd = src.model.hf_state_dict()  # the family's weight table, inverted
        missing, unexpected = hf_model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight") and "rotary" not in k and ".attn.bias" not in k]
        if missing or unexpected:
            raise ConfigError(f"could not map {m['name']} weights to transformers: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
        if cfg.tie_word_embeddings:
            hf_model.tie_weights()
    else:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(m["origin"], torch_dtype="float32")
    return hf_model.float().eval()


class HFBatchRunner:
    """Runs one batch with ``generate`` (left padding, greedy, fixed length when ignore_eos)."""

    def __init__(self, hf_model, eos_token_id: int | None, ignore_eos: bool = True, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.model, self.eos, self.ignore_eos = hf_model, eos_token_id, ignore_eos

    def __call__(self, reqs: list[BenchRequest], recs: list[RequestRecord], deadline: float) -> bool:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        b = len(reqs)
        tmax = max(len(r.prompt_ids) for r in reqs)
        pad = self.eos if self.eos is not None else 0
        ids = torch.full((b, tmax), pad, dtype=torch.long)
        mask = torch.zeros((b, tmax), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, tmax - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, tmax - len(r.prompt_ids):] = 1
        steps = max(r.max_new_tokens for r in reqs)

        class Stamp(StoppingCriteria):  # called once per generated token, for the whole batch
            def __call__(self, input_ids, scores, **kw):
                now = time.perf_counter()
                for i, r in enumerate(reqs):
                    if recs[i].finished is None:
                        recs[i].token_times.append(now)
                        recs[i].token_ids.append(int(input_ids[i, -1]))
                        if len(recs[i].token_ids) >= r.max_new_tokens:
                            recs[i].finished = now
                stop = now >= deadline
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool)

        kw = {"min_new_tokens": steps} if self.ignore_eos else {}
        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                pad_token_id=pad, eos_token_id=None if self.ignore_eos else self.eos,
                                stopping_criteria=StoppingCriteriaList([Stamp()]), **kw)
        return all(r.finished is not None for r in recs)


def run_hf(model: BenchModel, requests: list[BenchRequest], batch_size: int, ignore_eos: bool = True,
           cap_s: float | None = None, progress=None, hf_model=None) -> ArmResult:
    runner = HFBatchRunner(hf_model if hf_model is not None else build_hf_model(model), model.eos_token_id,
                           ignore_eos, model.threads)
    res = drive_batches("hf-generate", requests, runner, "static", batch_size, cap_s=cap_s, progress=progress)
    res.notes = f"transformers generate (torch, same weights), static batches of {batch_size}"
    return res
