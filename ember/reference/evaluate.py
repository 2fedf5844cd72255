"""Held-out perplexity and top-1 agreement of a torch model or an Ember engine folder.

Everything is scored on the same token windows (``token_windows``: non-overlapping, evenly
picked when capped): a window of T tokens gives T-1 predictions (token t+1 from tokens 0..t), and
perplexity is exp(mean negative log-likelihood) over every prediction of every window.

A *scorer* maps a batch of windows, int64 [B, T], to logits float32 [B, T, V]:
- a Hugging Face folder (config.json) or a ``torch.nn.Module``: one forward pass;
- an Ember engine folder (manifest.json): the folder's step graph on ONNX Runtime (the session
  ``ember.load`` builds, see ``runtime/loader.py``), fed one token per row per call with the K/V
  cache carried between calls -- the decode path a deployed engine runs -- since the step graph
  returns only each row's last logits;
- any callable with that signature.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ember.engine_format.decoder_spec import kv_geometry
from ember.engine_format.roles import PAST_KEY
from ember.errors import InputError

Scorer = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PerplexityResult:
    nll: float  # mean negative log-likelihood, nats per token
    perplexity: float
    tokens: int  # predictions scored

    def to_dict(self) -> dict:
        return asdict(self)


def token_windows(ids: np.ndarray, window: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows of ``window`` tokens from a token stream, int64 [N, window]; when
    more than ``max_windows`` fit, that many evenly spaced ones."""
    if window < 2:
        raise InputError(f"window={window} must be at least 2 tokens (one prediction needs two)")
    n = len(ids) // window
    if n == 0:
        raise InputError(f"{len(ids)} tokens do not fill one window of {window}; pass more text or a smaller window")
    windows = np.asarray(ids[: n * window], dtype=np.int64).reshape(n, window)
    if max_windows is not None and n > max_windows:
        windows = windows[np.linspace(0, n - 1, max_windows).round().astype(int)]
    return windows


def encode_texts(tokenizer, texts: Sequence[str], eos_id: int | None) -> np.ndarray:
    """One token stream: each text's tokens, an EOS after each when the tokenizer has one."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text).ids
        if eos_id is not None:
            ids.append(eos_id)
    return np.asarray(ids, dtype=np.int64)


def nll_of_logits(logits: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Per-prediction negative log-likelihood [B, T-1] of logits [B, T, V] for windows [B, T]."""
    z = logits[:, :-1].astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    target = np.take_along_axis(z, windows[:, 1:, None], axis=-1)[..., 0]
    return log_norm - target


@dataclass(frozen=True)
class WindowScores:
    """One scoring pass over token windows: the perplexity and each prediction's top-1 token,
    so comparing several targets against one reference scores each target once."""
    result: PerplexityResult
    top1: np.ndarray  # int64 [N, T-1]: the predicted token at every scored position
    margin: np.ndarray  # float32 [N, T-1]: top-1 minus top-2 logit (nats) at every scored position

    def agreement(self, other: "WindowScores", min_margin: float | None = None) -> float:
        """Fraction of predictions where both picked the same top-1 token (same windows); with
        ``min_margin``, only over the predictions where *this* target's top-1 leads its top-2 by
        at least that many nats (near-ties flip under any perturbation, so they say little)."""
        if self.top1.shape != other.top1.shape:
            raise InputError(f"top-1 arrays of shape {self.top1.shape} and {other.top1.shape} come from different "
                             f"windows; score both targets on the same windows")
        same = self.top1 == other.top1
        if min_margin is not None:
            same = same[self.margin >= min_margin]
        return float(same.mean()) if same.size else float("nan")


def score_windows(scorer: Scorer | str | os.PathLike, windows: np.ndarray, batch: int = 16) -> WindowScores:
    """Perplexity and top-1 predictions of ``scorer`` over every prediction in ``windows``."""
    score = as_scorer(scorer)
    total, count, top1, margin = 0.0, 0, [], []
    for i in range(0, len(windows), batch):
        logits = score(windows[i:i + batch])
        nll = nll_of_logits(logits, windows[i:i + batch])
        total, count = total + float(nll.sum()), count + nll.size
        scored = logits[:, :-1].astype(np.float32)
        top2 = np.partition(scored, -2, axis=-1)[..., -2:]
        top1.append(scored.argmax(-1))
        margin.append(top2[..., 1] - top2[..., 0])
    mean = total / count
    return WindowScores(PerplexityResult(mean, math.exp(mean), count), np.concatenate(top1).astype(np.int64),
                        np.concatenate(margin))


def perplexity(scorer: Scorer | str | os.PathLike, windows: np.ndarray, batch: int = 16) -> PerplexityResult:
    """exp(mean NLL) of ``scorer`` over every prediction in ``windows``."""
    return score_windows(scorer, windows, batch).result


def top1_agreement(a: Scorer | str | os.PathLike, b: Scorer | str | os.PathLike, windows: np.ndarray,
                   batch: int = 16) -> float:
    """Fraction of predictions (every position but each window's last) where a and b pick the same top-1 token."""
    return score_windows(a, windows, batch).agreement(score_windows(b, windows, batch))


def evaluate_perplexity(folder_or_engine, texts: Sequence[str], window: int = 128,
                        max_windows: int | None = None, batch: int = 16) -> PerplexityResult:
    """Held-out perplexity of a Hugging Face folder or an Ember engine folder on ``texts``,
    tokenized with the folder's own tokenizer (``folder_tokenizer``)."""
    tokenizer, eos = folder_tokenizer(folder_or_engine)
    windows = token_windows(encode_texts(tokenizer, texts, eos), window, max_windows)
    return perplexity(folder_or_engine, windows, batch)


def as_scorer(target) -> Scorer:
    if isinstance(target, (str, os.PathLike)):
        folder = Path(target)
        if (folder / "manifest.json").is_file():
            return engine_scorer(folder)
        if (folder / "config.json").is_file():
            return torch_scorer(load_torch_model(folder))
        raise InputError(f"{folder} is neither an Ember engine folder (manifest.json) nor a Hugging Face model "
                         f"folder (config.json); pass one of those")
    try:
        import torch

        if isinstance(target, torch.nn.Module):
            return torch_scorer(target)
    except ImportError:
        pass
    if callable(target):
        return target
    raise InputError(f"{type(target).__name__} cannot be scored; pass a folder, a torch model or a callable "
                     f"mapping int64 [B, T] windows to [B, T, V] logits")


def load_torch_model(folder: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()


def torch_scorer(model) -> Scorer:
    import torch

    def score(windows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(windows)).logits.float().numpy()
    return score


def engine_scorer(folder: Path, threads: int | None = None) -> Scorer:
    """The engine folder's step graph, one token per row per call, K/V carried between calls."""
    from ember.engine_format.decoder_spec import check_decoder_config
    from ember.engine_format.manifest import read_manifest, verify_files
    from ember.runtime.backend_choice import onnx_graph
    from ember.ort.session import StepSession
    from ember.runtime.kv_pool import KVPool

    manifest = read_manifest(folder)
    if manifest.kind != "decoder":
        raise InputError(f"{folder} is a {manifest.kind} engine; perplexity needs a decoder engine folder")
    verify_files(folder, manifest, check_hashes=False)
    cfg = check_decoder_config(manifest.model, str(folder / "manifest.json"))
    part = manifest.part("step")
    geometry = kv_geometry(cfg)
    kv_dtype = np.float16 if part.tensor(PAST_KEY, layer=0).dtype == "float16" else np.float32
    session = StepSession(onnx_graph(folder, part), geometry.num_layers, threads=threads,
                          disabled_optimizers=part.extra.get("ort_disabled_optimizers"))

    def score(windows: np.ndarray) -> np.ndarray:
        b, t = windows.shape
        pool = KVPool(*geometry[:3], slots=b, max_capacity=t, capacity=t, dtype=kv_dtype,
                      layer_rings=geometry.layer_rings)  # the layout the step graph was built for
        ones = np.ones(b, np.int64)
        logits = []
        for pos in range(t):
            step_logits, new = session.run(np.ascontiguousarray(windows[:, pos:pos + 1]),
                                           np.full((b, 1), pos, np.int64), np.full(b, pos, np.int64), ones,
                                           pool.views(0, b))
            pool.write(0, new, ones)
            logits.append(step_logits)
        return np.stack(logits, axis=1)
    return score


def folder_tokenizer(folder) -> tuple:
    """(tokenizers.Tokenizer, eos id or None) of a Hugging Face folder or an engine folder."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        from ember.engine_format.manifest import read_manifest
        from ember.runtime.loader import load_tokenizer

        manifest = read_manifest(folder)
        tok, eos = load_tokenizer(folder, manifest), manifest.model["config"].get("eos_token_id")
    elif (folder / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = folder / "config.json"
        eos = json.loads(config.read_text()).get("eos_token_id") if config.is_file() else None
    else:
        tok = None
    if tok is None:
        raise InputError(f"{folder} has no tokenizer; pass token windows to perplexity() instead of texts")
    return tok, eos
