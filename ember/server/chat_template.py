"""Chat templates: find the model's Jinja chat template in the engine folder and render it.

Looked up in this order (the first that exists wins):
1. ``manifest.tokenizer["chat_template"]`` (a string written at compile time);
2. ``<folder>/tokenizer/chat_template.jinja`` (the file Hugging Face tokenizers now save);
3. ``"chat_template"`` in ``<folder>/tokenizer/tokenizer_config.json`` (older HF folders).
A folder with none of these serves ``/v1/completions`` only; ``/v1/chat/completions`` then
answers 400 saying so. Templates run in Jinja's immutable sandbox, as in transformers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ember.errors import ArtifactError


def find_chat_template(folder: str | Path | None, manifest: Any = None) -> str | None:
    """The chat template text, or None when the engine folder has none."""
    tok = getattr(manifest, "tokenizer", None) or {}
    if isinstance(tok, dict) and isinstance(tok.get("chat_template"), str):
        return tok["chat_template"]
    if folder is None:
        return None
    tdir = Path(folder) / "tokenizer"
    if (tdir / "chat_template.jinja").is_file():
        return (tdir / "chat_template.jinja").read_text()
    cfg = tdir / "tokenizer_config.json"
    if cfg.is_file():
        try:
            value = json.loads(cfg.read_text()).get("chat_template")
        except (ValueError, AttributeError) as e:
            raise ArtifactError(f"{cfg}: not valid JSON ({e}); recompile the folder") from e
        if isinstance(value, list):  # HF allows named templates: [{"name": "default", "template": ...}]
            value = next((t.get("template") for t in value if t.get("name") == "default"), None)
        if isinstance(value, str):
            return value
    return None


class ChatTemplate:
    """A compiled chat template. ``render(messages)`` -> the prompt string (shape: text)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        from jinja2 import StrictUndefined  # noqa: F401 - import check: jinja2 ships with the serve extra
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise ArtifactError(f"the engine folder's chat template does not parse ({e}); fix or remove it") from e
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Raises ``ValueError`` with the template's own message when it refuses the messages."""
        from jinja2.exceptions import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise ValueError(f"the chat template rejected these messages: {e}") from e
