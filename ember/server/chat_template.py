"""Chat templates: find the model's Jinja chat template in the engine folder and render it.

An engine folder's template is the one its manifest records: ``manifest.tokenizer["chat_template"]``
is a file record (``tokenizer/chat_template.jinja`` with size and sha256, checked as it is read)
or, in folders compiled before templates became files, the template text itself. Files the
manifest does not record are never read. Without a manifest (a Hugging Face folder) the
lookup is ``tokenizer/chat_template.jinja``, then ``"chat_template"`` in
``tokenizer/tokenizer_config.json``. A folder without a template serves ``/v1/completions``
only; ``/v1/chat/completions`` then answers 400 saying so. Templates run in Jinja's immutable
sandbox, as in transformers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ember.errors import ArtifactError


def find_chat_template(folder: str | Path | None, manifest: Any = None) -> str | None:
    """The chat template text, or None when the engine folder has none."""
    if manifest is not None:
        tok = getattr(manifest, "tokenizer", None) or {}
        inline = tok.get("chat_template") if isinstance(tok, dict) else None
        if isinstance(inline, str):
            return inline
        return _recorded_template(folder, manifest)
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


def _recorded_template(folder: str | Path | None, manifest: Any) -> str | None:
    from ember.engine_format.manifest import MANIFEST_NAME, read_member, tokenizer_members

    _, member = tokenizer_members(manifest, f"{folder}/{MANIFEST_NAME}")
    if member is None:
        return None
    if folder is None:
        raise ArtifactError("the manifest records a chat template file but no engine folder was given to read it from")
    data = read_member(folder, member)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{Path(folder) / member.file} is not UTF-8 text (byte {e.start}); recompile the folder") from e


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
