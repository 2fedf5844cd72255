"""Every registered family in FP16 on the GPU, through the fused decode part where it is built,
against transformers FP16 on the same GPU: top-1 agreement >= 99 % per family (issue 17).

Each family's random-weight Hugging Face folder (tests/test_model_families.py) is compiled with
``--dtype fp16`` (``--fused-decode auto``: the fused part is built where the family's description
allows, else decode runs on the step graph; the assertion message says which) and generates
greedily on ``cuda:0``. transformers then reads the same tokens teacher-forced, one at a time
through its KV cache, and its top-1 at each generated position is compared with Ember's token:
an FP16 rounding difference flips at most the one position where it happens, never the rest of
the generation. Random-weight logits are small (std ~0.4) and have near-ties that FP16 rounding
flips in either implementation (about 1 position in 100 here, FP16 against FP32 within
transformers alone), so the 99 % is asserted over the positions whose FP32 top-1 leads clearly
(``Agreement``); the agreement over all positions is in the message.

The same comparison runs on the CPU in FP32 (fused decode part forced on) for llama with llama3
RoPE scaling, where agreement must be exact: it keeps the comparison itself tested where there
is no GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import ember
from ember.compiler.compile import CompileOptions, compile_decoder

from gpu_env import cuda_reason
from test_model_families import BASE, FAMILIES, WINDOW, hf_folder

# transformers 5.25 warns that ``past_key_values`` is to be renamed ``cache``; the old name is the one older releases take
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values`.*deprecated:FutureWarning")

# Beside FAMILIES' windowed and scaled variants (most of which the fused part refuses), the plain
# configs it covers: every family that can have a fused decode part runs one on the GPU.
FUSED_CONFIGS = {"gpt2": ("gpt2", {}), "mistral": ("mistral", {}), "qwen2": ("qwen2", {}), "phi3": ("phi3", {})}
CONFIGS = {**FAMILIES, **FUSED_CONFIGS}

# Longer than the sliding windows; shorter than, equal to and longer than phi3-longrope's
# original_max_position_embeddings (16), generations well past it.
PROMPTS = [np.random.default_rng(i).integers(3, BASE["vocab_size"], n).tolist() for i, n in enumerate((13, 9, 16, 11, 20))]
NEW_TOKENS = 32
assert all(WINDOW < len(p) for p in PROMPTS)


def family_folder(name: str, folder, seed: int = 0):
    """``hf_folder`` for FAMILIES and FUSED_CONFIGS alike (a FUSED_CONFIGS entry is lent to FAMILIES for the call)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(FAMILIES, name, CONFIGS[name])
        return hf_folder(name, folder, seed)


def ember_greedy(folder, device: str) -> tuple[list[list[int]], bool, int]:
    """Ember's greedy tokens for PROMPTS (all admitted in one step), whether the engine holds a
    fused decode session, and how many steps ran through it."""
    with ember.load(folder, device=device, max_batch=len(PROMPTS), admit_batch=len(PROMPTS)) as eng:
        decode, calls = eng.executor.decode, [0]
        if decode is not None:
            run = decode.run

            def counted(*args, **kwargs):
                calls[0] += 1
                return run(*args, **kwargs)

            decode.run = counted
        tokens = [r.token_ids for r in eng.generate(PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)]
    return tokens, decode is not None, calls[0]


class _ForceTokens:
    """A logits processor that makes ``generate`` pick ``tokens`` (Ember's), one per step."""

    def __init__(self, prompt_len: int, tokens: list[int]):
        self.prompt_len, self.tokens = prompt_len, tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[input_ids.shape[1] - self.prompt_len]] = 0
        return forced


def transformers_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """transformers' logits (float32 [len(tokens), V]) after ``prompt`` and after each of ``tokens``
    but the last, teacher-forced through its own ``generate`` (its raw logits, the next token
    forced to Ember's): the path a user runs, Phi-3's LongRoPE cache recompute included."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    if getattr(model.config, "rope_scaling", None) and model.config.rope_scaling.get("rope_type", model.config.rope_scaling.get("type")) == "longrope":
        return _prefix_forward_logits(model, prompt, tokens)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=len(tokens),
                             min_new_tokens=len(tokens), do_sample=False, eos_token_id=None, pad_token_id=0,
                             logits_processor=LogitsProcessorList([_ForceTokens(len(prompt), tokens)]),
                             output_logits=True, return_dict_in_generate=True)
    assert out.sequences[0, len(prompt):].tolist() == tokens
    return torch.stack([row[0] for row in out.logits]).float().cpu()


def _prefix_forward_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """LongRoPE's reference: each next-token distribution from one forward of the whole prefix
    without a cache, where transformers picks the factor set by the prefix's length -- the
    semantics Phi-3's ``generate`` implements with its cache recompute at the switch, and Ember
    with its recompute (docs/models.md), but independent of how a transformers version caches.
    On the device (H100, 2026-12-07, its own transformers) ``generate`` disagreed with Ember
    from the switch on (32 % top-1), while Ember's CUDA tokens equalled Ember's CPU tokens, which
    agree with this host's transformers (measured): the reference, not the engine, differed."""
    device = next(model.parameters()).device
    seq = list(prompt) + list(tokens)
    with torch.no_grad():
        return torch.stack([model(torch.tensor([seq[:len(prompt) + j]], device=device)).logits[0, -1]
                            for j in range(len(tokens))]).float().cpu()


@dataclass
class Agreement:
    """Ember's tokens against transformers' top-1 at every generated position; the decisive
    positions are those whose FP32 top-1 leads its top-2 by more than ``gap`` = 4 x the rms logit
    error of transformers in the compared dtype against itself in FP32 (0 in FP32): random-weight
    logits have near-ties that any rounding of that size flips (ember/passes/quant_accuracy.py)."""
    hits: torch.Tensor  # bool [positions]
    decisive: torch.Tensor  # bool [positions]
    gap: float
    fused: bool  # the folder has a fused decode part (and the engine decoded through it)
    refusal: str | None  # what the fused part cannot express (manifest: model.fused_decode_refusal)

    @property
    def path(self) -> str:
        return "fused decode part" if self.fused else f"step graph (fused decode part not built: {self.refusal})"

    @property
    def all_rows(self) -> float:
        return self.hits.float().mean().item()

    @property
    def decisive_rows(self) -> float:
        return self.hits[self.decisive].float().mean().item()

    def __str__(self) -> str:
        return (f"top-1 agreement {self.all_rows:.2%} over all {len(self.hits)} positions, "
                f"{self.decisive_rows:.2%} over the {int(self.decisive.sum())} whose FP32 top-1 leads by > "
                f"{self.gap:.2g} (near-ties left out); decode on the {self.path}")


def top1_agreement(model, tokens: list[list[int]], device: str, dtype: torch.dtype, **decode) -> Agreement:
    """``model`` (transformers, FP32) teacher-forced on Ember's ``tokens`` for PROMPTS, on ``device`` in ``dtype``."""
    model.to(device=device, dtype=torch.float32)
    ref32 = torch.cat([transformers_logits(model, p, g) for p, g in zip(PROMPTS, tokens)])
    ref = ref32 if dtype == torch.float32 else torch.cat(
        [transformers_logits(model.to(dtype=dtype), p, g) for p, g in zip(PROMPTS, tokens)])
    gap = 4 * (ref - ref32).pow(2).mean().sqrt().item()
    top2 = ref32.topk(2, dim=-1).values
    return Agreement(hits=ref.argmax(-1) == torch.tensor(tokens).flatten(), decisive=top2[:, 0] - top2[:, 1] > gap,
                     gap=gap, **decode)


def compare_family(name: str, root, device: str, options: CompileOptions) -> Agreement:
    """Compile CONFIGS[name] with ``options``, generate greedily on ``device`` and compare with
    transformers in the same dtype. Checks that the engine decodes through the fused part
    exactly when the manifest has one."""
    model = family_folder(name, root / "hf")
    manifest = compile_decoder(str(root / "hf"), root / "engine", options)
    built = manifest.find_part("decode") is not None
    tokens, has_decode, calls = ember_greedy(root / "engine", device)
    assert has_decode == built, f"{name}: manifest has a decode part: {built}, engine decodes through one: {has_decode}"
    if built:  # every step after the one prefill of all prompts is a pure decode step
        assert calls >= NEW_TOKENS - 1, f"{name}: {calls} of {NEW_TOKENS - 1} decode steps ran the fused part"
    assert [len(t) for t in tokens] == [NEW_TOKENS] * len(PROMPTS)
    dtype = torch.float16 if options.dtype == "fp16" else torch.float32
    return top1_agreement(model, tokens, device, dtype, fused=built, refusal=manifest.model.get("fused_decode_refusal"))


@pytest.mark.gpu
@pytest.mark.skipif(cuda_reason() is not None, reason=str(cuda_reason()))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp16_cuda_top1_agrees_with_transformers(name, tmp_path):
    """Issue 17's must-show: FP16 on the GPU, through the fused decode part wherever the family's
    description allows one (``--fused-decode auto`` must then build it), >= 99 % top-1 agreement."""
    r = compare_family(name, tmp_path, "cuda:0", CompileOptions(dtype="fp16", quiet=True))
    print(f"{name}: {r}")
    assert r.fused == (r.refusal is None), f"{name}: --fused-decode auto built the part: {r.fused} ({r.refusal})"
    assert r.decisive.float().mean().item() >= 0.9, f"{name}: too few decisive positions (FP16 noise is large): {r}"
    assert r.decisive_rows >= 0.99, f"{name}: {r}"


@pytest.mark.parametrize("name, fused", [("llama3-rope", "on"), ("phi3-longrope", "auto")])
def test_fp32_cpu_top1_equals_transformers(name, fused, tmp_path):
    """The GPU test's comparison on the CPU, FP32: exact, through the fused decode part for
    llama3 RoPE and on the step graph for Phi-3 LongRoPE (generations past the switch)."""
    r = compare_family(name, tmp_path, "cpu", CompileOptions(fused_decode=fused, quiet=True))
    assert r.fused == (fused == "on") and len(r.hits) == NEW_TOKENS * len(PROMPTS)
    assert r.all_rows == 1.0, f"{name}: {r}"
