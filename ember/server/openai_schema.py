"""OpenAI-compatible request parsing and response bodies.

Requests are validated here, before anything reaches the engine; a bad field raises
``ApiError`` (HTTP 4xx) whose message names the field and the accepted values. Responses
follow the OpenAI wire format (``text_completion``, ``chat.completion``, their streaming
``chunk`` objects, ``list`` of models, ``{"error": {...}}``) so existing clients work.

Extensions beyond OpenAI's fields (as in vLLM): ``top_k`` (0 or -1 = off) and
``ignore_eos``. Fields OpenAI defines but Ember does not implement (``n`` > 1, ``logprobs``,
``echo``, ``best_of`` > 1, penalties, ``logit_bias``, ``suffix``) are refused with a 400
rather than silently ignored; unknown fields (``user``, ...) are ignored.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ember.errors import InputError
from ember.runtime.requests import Completion, FinishReason
from ember.runtime.text_input import check_text


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def check_texts(fields: list[tuple[str, str]]) -> None:
    """Every (field, text) pair must be Unicode scalar values (no lone surrogate such as a
    JSON ``"\\ud800"``): else a 400 naming the field, before anything is tokenized."""
    for field, text in fields:
        try:
            check_text(text, f"'{field}'")
        except InputError as e:
            raise ApiError(400, str(e), param=field, code="invalid_text") from None


def _indexed(name: str, value: str | list | None) -> list[tuple[str, str]]:
    """``[(name, value)]`` for a string, ``[(name[i], item)]`` for the strings of a list."""
    if isinstance(value, str):
        return [(name, value)]
    return [(f"{name}[{i}]", v) for i, v in enumerate(value or []) if isinstance(v, str)]


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions (OpenAI defaults)."""

    model_config = ConfigDict(extra="ignore", strict=False)

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False
    n: int = 1
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def _refuse_unsupported(self) -> None:
        unsupported = [
            ("n", self.n != 1, "only n=1 is supported; send separate requests"),
            ("logprobs", self.logprobs not in (None, False, 0), "logprobs are not supported"),
            ("presence_penalty", self.presence_penalty != 0, "penalties are not supported (use 0)"),
            ("frequency_penalty", self.frequency_penalty != 0, "penalties are not supported (use 0)"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
        ]
        for name, bad, why in unsupported:
            if bad:
                raise ApiError(400, f"'{name}': {why}", param=name)

    def text_fields(self) -> list[tuple[str, str]]:
        """The user text this request carries, as (field, text) pairs (see ``check_texts``)."""
        return _indexed("model", self.model) + _indexed("stop", self.stop)

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "'stop': at most 4 non-empty strings", param="stop")
        return tuple(stops)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage", False))

    def sampling_kwargs(self, max_tokens: int) -> dict[str, Any]:
        """Keyword arguments of ``ember.runtime.requests.SamplingParams``."""
        return dict(max_new_tokens=max_tokens, temperature=self.temperature, top_k=max(self.top_k, 0),
                    top_p=self.top_p, seed=self.seed, stop=self.stop_strings(), ignore_eos=self.ignore_eos)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def text_fields(self) -> list[tuple[str, str]]:
        return _indexed("prompt", self.prompt) + super().text_fields()

    def single_prompt(self) -> str | list[int]:
        """The one prompt (a string or token ids); batches of several prompts are refused."""
        self._refuse_unsupported()
        for name, bad, why in [("echo", self.echo, "echo is not supported"),
                               ("best_of", self.best_of not in (None, 1), "only best_of=1 is supported"),
                               ("suffix", bool(self.suffix), "suffix (insertion) is not supported")]:
            if bad:
                raise ApiError(400, f"'{name}': {why}", param=name)
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ApiError(400, f"'prompt': got a batch of {len(p)} prompts; send one prompt per request",
                               param="prompt")
            p = p[0]
        if isinstance(p, list) and not p:
            raise ApiError(400, "'prompt': empty token list", param="prompt")
        return p


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text_fields(self, name: str) -> list[tuple[str, str]]:
        if not isinstance(self.content, list):
            return _indexed(f"{name}.content", self.content)
        return [(f"{name}.content[{j}].text", part["text"]) for j, part in enumerate(self.content)
                if isinstance(part.get("text"), str)]

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"'messages': content part of type {part.get('type')!r} is not supported "
                                    "(text only)", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def text_fields(self) -> list[tuple[str, str]]:
        fields = [f for i, m in enumerate(self.messages) for f in m.text_fields(f"messages[{i}]")]
        return fields + super().text_fields()

    def requested_max_tokens(self) -> int | None:
        self._refuse_unsupported()
        return self.max_completion_tokens or self.max_tokens


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1, le=4)
    size: str | None = None  # "WxH"
    response_format: Literal["b64_json"] = "b64_json"
    num_inference_steps: int | None = Field(None, ge=1, le=200)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=0)

    def text_fields(self) -> list[tuple[str, str]]:
        return _indexed("prompt", self.prompt) + _indexed("negative_prompt", self.negative_prompt) + \
            _indexed("model", self.model)

    def width_height(self) -> tuple[int, int] | None:
        if self.size is None:
            return None
        try:
            w, h = (int(v) for v in self.size.lower().split("x"))
        except ValueError:
            raise ApiError(400, f"'size': {self.size!r} is not WIDTHxHEIGHT (e.g. '512x512')", param="size") from None
        if not (8 <= w <= 2048 and 8 <= h <= 2048) or w % 8 or h % 8:
            raise ApiError(400, f"'size': {self.size!r}: width and height must be multiples of 8 in [8, 2048]",
                           param="size")
        return w, h


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body against ``model``; a bad field becomes a 400 naming it."""
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "body"
        more = f" (and {len(e.errors()) - 1} more errors)" if len(e.errors()) > 1 else ""
        raise ApiError(400, f"'{field}': {err['msg']}{more}", param=field) from None


# -- responses -----------------------------------------------------------------------------

_OPENAI_FINISH = {FinishReason.LENGTH: "length", FinishReason.EOS: "stop", FinishReason.STOP: "stop",
                  FinishReason.CANCELLED: "cancelled", FinishReason.ERROR: "error"}


def finish_reason(reason: FinishReason) -> str:
    return _OPENAI_FINISH[reason]


@dataclass
class ResponseIds:
    """The id/created/model triple every response and chunk of one request carries."""

    id: str
    created: int
    model: str

    @staticmethod
    def new(prefix: str, model: str) -> "ResponseIds":
        return ResponseIds(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)


def usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.token_ids),
            "total_tokens": c.prompt_tokens + len(c.token_ids)}


def completion_body(ids: ResponseIds, c: Completion) -> dict[str, Any]:
    return {"id": ids.id, "object": "text_completion", "created": ids.created, "model": ids.model,
            "choices": [{"index": 0, "text": c.text, "logprobs": None, "finish_reason": finish_reason(c.finish_reason)}],
            "usage": usage(c)}


def completion_chunk(ids: ResponseIds, text: str, reason: str | None = None) -> dict[str, Any]:
    return {"id": ids.id, "object": "text_completion", "created": ids.created, "model": ids.model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}


def chat_body(ids: ResponseIds, c: Completion) -> dict[str, Any]:
    return {"id": ids.id, "object": "chat.completion", "created": ids.created, "model": ids.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                         "finish_reason": finish_reason(c.finish_reason)}],
            "usage": usage(c)}


def chat_chunk(ids: ResponseIds, text: str | None, reason: str | None = None, role: bool = False) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    return {"id": ids.id, "object": "chat.completion.chunk", "created": ids.created, "model": ids.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}


def usage_chunk(ids: ResponseIds, obj: str, c: Completion) -> dict[str, Any]:
    return {"id": ids.id, "object": obj, "created": ids.created, "model": ids.model, "choices": [], "usage": usage(c)}


def models_body(name: str, created: int, kind: str) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "ember",
                                        "kind": kind}]}
