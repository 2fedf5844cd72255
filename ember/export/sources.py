"""Model sources: a local Hugging Face folder or a built-in config with seeded random weights.

``resolve_decoder_source`` returns a ready torch step model, its config and its tokenizer,
or fails with a ConfigError that names the folder/field and the fix. A folder's config.json is
checked against its weight files' shapes (ember/export/weights.py) before the model is allocated.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ember.errors import ConfigError
from ember.export.config import BUILTIN, DecoderConfig, config_from_hf, read_json_object
from ember.export.tokenizer_builtin import EOS_TOKEN, build_builtin_tokenizer
from ember.models.registry import family
from ember.export.weights import check_parameter_count, check_sizes_against_weights, one_line, read_weight_index


@dataclass
class DecoderSource:
    name: str
    config: DecoderConfig
    model: torch.nn.Module  # the family's step module (ember/models/) in eval mode, float32
    tokenizer: Any | None  # tokenizers.Tokenizer
    origin: str  # "builtin" | folder path
    seed: int | None = None
    chat_template: str | None = None  # Jinja chat template from the model folder, if any


def step_model_class(family_name: str):
    """The constructor ``cfg -> torch step module`` of a registered family (ember/models/)."""
    return family(family_name).step_model


def random_init_(model: torch.nn.Module, seed: int) -> None:
    """GPT-2-style init (normal std 0.02, norms at 1, biases 0), reproducible from ``seed``; every
    parameter is written. The values are those of ``torch.randn(shape, generator=g) * 0.02`` drawn in
    ``named_parameters`` order, made in place (no temporary the size of the weight)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if ("ln" in name or "norm" in name) and name.endswith("weight") else 0.0)
            else:
                torch.randn(p.shape, generator=g, out=p.data)
                p.mul_(0.02)


# Modules whose constructors initialize their weights (kaiming/normal draws: ~5 s for llama-1b's 1.1 B
# parameters) although ``random_init_`` then writes every parameter again.
_SELF_INITIALIZING = (nn.Linear, nn.Embedding)


@contextmanager
def uninitialized_weights() -> Iterator[None]:
    """While open, ``nn.Linear`` and ``nn.Embedding`` allocate their parameters without drawing an
    initial value; only for a model every parameter of which is written next (``random_init_``)."""
    saved = {cls: cls.__dict__["reset_parameters"] for cls in _SELF_INITIALIZING}
    try:
        for cls in saved:
            cls.reset_parameters = lambda self: None
        yield
    finally:
        for cls, reset in saved.items():
            cls.reset_parameters = reset


def is_builtin(source: str) -> bool:
    return source in BUILTIN


def resolve_decoder_source(source: str, seed: int = 0) -> DecoderSource:
    if is_builtin(source):
        tok = build_builtin_tokenizer(BUILTIN[source].vocab_size)
        eos = tok.token_to_id(EOS_TOKEN)
        cfg = replace(BUILTIN[source], bos_token_id=eos, eos_token_id=eos)
        with uninitialized_weights():  # random_init_ writes every parameter
            model = step_model_class(cfg.family)(cfg).eval()
        random_init_(model, seed)
        return DecoderSource(source, cfg, model, tok, "builtin", seed)
    folder = Path(source)
    if not folder.exists():
        names = ", ".join(BUILTIN)
        raise ConfigError(
            f"model source {source!r} is neither a folder nor a built-in config; pass a local Hugging Face "
            f"model folder (config.json + weights) or one of: {names}"
        )
    if not folder.is_dir():
        raise ConfigError(f"model source {source!r} is a file; pass the model's folder (with config.json)")
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ConfigError(f"{cfg_path} is missing: a Hugging Face model folder needs config.json")
    cfg = config_from_hf(read_json_object(cfg_path, "config.json"), where=str(cfg_path))
    weights = read_weight_index(folder)  # names and shapes only: nothing is allocated before the sizes agree
    check_sizes_against_weights(cfg, weights, where=str(cfg_path))
    with torch.device("meta"):
        n_params = sum(p.numel() for p in step_model_class(cfg.family)(cfg).parameters())
    check_parameter_count(n_params, weights, where=str(cfg_path))
    model = step_model_class(cfg.family)(cfg).eval()
    try:
        model.load_hf_state_dict(weights.load())
    except (KeyError, RuntimeError) as e:
        raise ConfigError(f"{folder}: weights do not fit the {cfg.family} config ({one_line(e)}); "
                          "use the config.json and weights of the same model") from e
    model.float()
    tok = load_hf_tokenizer(folder)
    return DecoderSource(folder.name, cfg, model, tok, str(folder.resolve()), chat_template=load_chat_template(folder))


def load_chat_template(folder: Path) -> str | None:
    """The folder's chat template: chat_template.jinja, or tokenizer_config.json's "chat_template"."""
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        try:
            return jinja.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{jinja} is not UTF-8 text (byte {e.start}); restore the model's original template") from e
    cfg = folder / "tokenizer_config.json"
    if cfg.exists():
        t = read_json_object(cfg, "tokenizer_config.json").get("chat_template")
        if isinstance(t, list):  # named templates: take the default one
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
        return t if isinstance(t, str) else None
    return None


def load_hf_tokenizer(folder: Path):
    """A ``tokenizers.Tokenizer`` from tokenizer.json, vocab.json+merges.txt, or via transformers."""
    from tokenizers import Tokenizer

    files = [folder / "tokenizer.json"]
    if not files[0].exists():
        files = [folder / "vocab.json", folder / "merges.txt"]
    if all(f.exists() for f in files):
        try:
            if len(files) == 1:
                return Tokenizer.from_file(str(files[0]))
            from tokenizers import decoders, models, pre_tokenizers

            tok = Tokenizer(models.BPE.from_file(*map(str, files)))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            return tok
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise ConfigError(f"{' + '.join(map(str, files))} could not be read as a tokenizer ({one_line(e)}); "
                              "restore the model's original tokenizer files") from e
    if any(folder.glob("tokenizer*")):
        try:  # e.g. sentencepiece tokenizer.model: convert once, at compile time
            from transformers import AutoTokenizer

            fast = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
            return fast.backend_tokenizer
        except Exception as e:
            raise ConfigError(f"{folder}: tokenizer files could not be converted ({one_line(e)}); "
                              "add the model's tokenizer.json") from e
    return None  # token-id-only engine: generate() then takes lists of ids
