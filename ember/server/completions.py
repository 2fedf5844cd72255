"""Text generation endpoints over a ``DecoderEngine``: /v1/completions and /v1/chat/completions.

One request = one ``engine.submit``. Checks before submitting (each a 400 naming the field
or limit): every text field is valid Unicode (no lone surrogates), the prompt (or chat) is
not longer in bytes than ``max_prompt_tokens`` tokens could be, a chat has at most
``max_prompt_tokens`` messages, the prompt is non-empty, its token ids are in the
vocabulary, it fits ``max_prompt_tokens``, ``max_tokens`` fits ``max_tokens_limit``, and
prompt + max_tokens fit the model's positions. Chat templates are rendered and prompts
tokenized on a small thread pool, never on the event loop, and only after the byte checks.
A full engine queue is a 429 with ``Retry-After`` (seconds, estimated from the queue depth
and the recent finish rate). Streaming answers are server-sent events; the concatenated
deltas equal the non-streaming text.
"""
from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Callable, TypeVar

from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from ember.errors import InputError, OverloadedError
from ember.runtime.requests import FinishReason, RequestHandle, SamplingParams
from ember.server import openai_schema as oa
from ember.server.chat_template import ChatTemplate, find_chat_template
from ember.server.limits import PROMPT_BYTES_PER_TOKEN, ServerLimits
from ember.server.metrics import ServerMetrics
from ember.server.streaming import EventStream, collect, drain, sse

__all__ = ["CLIENT_CLOSED", "DecoderService", "ServerLimits"]

CLIENT_CLOSED = 499  # nginx's "client closed request": logged, never seen by the (gone) client
TEXT_THREADS = 2  # threads that render chat templates and tokenize prompts
RETRY_AFTER_MAX_S = 60
T = TypeVar("T")


class DecoderService:
    """Validates, submits and answers text requests for one loaded decoder engine."""

    def __init__(self, engine: Any, limits: ServerLimits, metrics: ServerMetrics, model_name: str,
                 folder: str | Path | None = None):
        self.engine, self.limits, self.metrics, self.model_name = engine, limits, metrics, model_name
        self.max_positions = int(engine.max_positions)
        self.max_prompt_tokens = min(limits.max_prompt_tokens or self.max_positions - 1, self.max_positions - 1)
        self.max_tokens_limit = min(limits.max_tokens_limit or self.max_positions - 1, self.max_positions - 1)
        self.max_prompt_bytes = self.max_prompt_tokens * PROMPT_BYTES_PER_TOKEN
        self.tokenizer = engine.tokenizer
        source = find_chat_template(folder, getattr(engine, "manifest", None))
        self.chat_template = ChatTemplate(source, *self._special_tokens()) if source and self.tokenizer else None
        self._reapers: set[asyncio.Task] = set()
        self.inflight: set[RequestHandle] = set()  # submitted, answer not yet sent (event loop only)
        self._text_pool = ThreadPoolExecutor(TEXT_THREADS, thread_name_prefix="ember-text")

    def close(self) -> None:
        self._text_pool.shutdown(wait=False, cancel_futures=True)

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the text thread pool, so a long tokenization never stalls the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._text_pool, fn, *args)

    def _special_tokens(self) -> tuple[str, str]:
        def name(i: Any) -> str:
            return (self.tokenizer.id_to_token(int(i)) or "") if (self.tokenizer and i is not None) else ""
        return name((self.engine.config or {}).get("bos_token_id")), name(self.engine.eos_token_id)

    # -- request preparation -----------------------------------------------------------------
    def check_prompt_size(self, prompt: str | list[int], field: str = "prompt") -> None:
        """Refuse, without tokenizing, a prompt too long for ``max_prompt_tokens`` whatever its encoding."""
        if isinstance(prompt, str):
            size = len(prompt.encode("utf-8"))
            if size > self.max_prompt_bytes:
                raise oa.ApiError(400, f"'{field}': {size} bytes of text cannot fit this server's limit of "
                                       f"{self.max_prompt_tokens} prompt tokens (at most {self.max_prompt_bytes} "
                                       "bytes are tokenized); shorten it", param=field, code="prompt_too_long")
        elif len(prompt) > self.max_prompt_tokens:
            raise oa.ApiError(400, f"'{field}': {len(prompt)} tokens exceeds this server's limit of "
                                   f"{self.max_prompt_tokens} prompt tokens; shorten the prompt", param=field)

    async def encode(self, prompt: str | list[int], *, chat: bool = False) -> list[int]:
        """Token ids of a prompt (the engine's own encoding; a rendered chat prompt already
        carries its special tokens, so none are added to it), tokenized off the event loop."""
        self.check_prompt_size(prompt, "messages" if chat else "prompt")
        try:
            if chat:
                ids = (await self.off_loop(lambda: self.tokenizer.encode(prompt, add_special_tokens=False))).ids
            else:
                ids = [int(t) for t in await self.off_loop(self.engine.encode, prompt)]
        except InputError as e:
            raise oa.ApiError(400, f"'prompt': {e}", param="prompt") from None
        if not ids:
            raise oa.ApiError(400, "'prompt': empty prompt (it encodes to no tokens)", param="prompt")
        if len(ids) > self.max_prompt_tokens:
            raise oa.ApiError(400, f"'prompt': {len(ids)} tokens exceeds this server's limit of "
                                   f"{self.max_prompt_tokens} prompt tokens; shorten the prompt", param="prompt")
        return ids

    def budget(self, n_prompt: int, requested: int | None, default: int | None) -> int:
        """max_tokens to generate: the request's, else ``default``, else what the context leaves."""
        room = self.max_positions - n_prompt
        want = requested if requested is not None else (default if default is not None else min(room, self.max_tokens_limit))
        if want > self.max_tokens_limit:
            raise oa.ApiError(400, f"'max_tokens': {want} exceeds this server's limit of {self.max_tokens_limit}",
                              param="max_tokens")
        if want > room:
            raise oa.ApiError(400, f"this model's maximum context length is {self.max_positions} tokens: the prompt "
                                   f"has {n_prompt} and max_tokens asks for {want}; reduce max_tokens to <= {room} "
                                   "or shorten the prompt", param="max_tokens")
        return want

    def submit(self, ids: list[int], req: oa.SamplingFields, max_tokens: int) -> RequestHandle:
        try:
            params = SamplingParams(**req.sampling_kwargs(max_tokens))
            return self.engine.submit(ids, params)
        except OverloadedError as e:
            raise oa.ApiError(429, str(e), type="overloaded", code="queue_full",
                              headers={"Retry-After": str(self.retry_after_s())}) from None
        except InputError as e:
            raise oa.ApiError(400, str(e)) from None

    def cancel_inflight(self) -> int:
        """Cancel every request still being answered (the drain deadline passed); their
        clients get a 503 / an error event. Returns how many were cancelled."""
        handles = [h for h in self.inflight if not h.done]
        for h in handles:
            h.cancel()
        return len(handles)

    def retry_after_s(self) -> int:
        """Seconds until the waiting queue has likely drained: its depth x the recent seconds
        per finished request (1 to RETRY_AFTER_MAX_S; 1 while no rate is known yet)."""
        try:
            depth = max(1.0, float(self.engine.stats().get("queue_depth", 0)))
        except Exception:  # noqa: BLE001 - an estimate only
            depth = 1.0
        per_finish = self.metrics.seconds_per_finish()
        if per_finish is None:
            return 1
        return int(min(RETRY_AFTER_MAX_S, max(1, math.ceil(depth * per_finish - 1e-9))))

    # -- endpoints ---------------------------------------------------------------------------
    async def completions(self, body: Any, receive: Receive) -> Response:
        req = oa.parse(oa.CompletionRequest, body)
        oa.check_texts(req.text_fields())
        self._check_model(req.model)
        ids = await self.encode(req.single_prompt())
        return await self._answer(req, ids, self.budget(len(ids), req.max_tokens, 16), receive, chat=False)

    async def chat_completions(self, body: Any, receive: Receive) -> Response:
        if self.chat_template is None:
            raise oa.ApiError(400, f"model {self.model_name!r} has no chat template (none in its manifest or "
                                   "tokenizer folder), so /v1/chat/completions is unavailable: use /v1/completions, "
                                   "or compile from a tokenizer that has one", code="no_chat_template")
        req = oa.parse(oa.ChatRequest, body)
        oa.check_texts(req.text_fields())
        self._check_model(req.model)
        requested = req.requested_max_tokens()
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        self.check_chat_size(messages)
        try:
            text = await self.off_loop(self.chat_template.render, messages)
        except ValueError as e:
            raise oa.ApiError(400, str(e), param="messages") from None
        ids = await self.encode(text, chat=True)
        return await self._answer(req, ids, self.budget(len(ids), requested, None), receive, chat=True)

    def check_chat_size(self, messages: list[dict[str, str]]) -> None:
        """Refuse, without rendering, a chat that cannot fit ``max_prompt_tokens``: more messages than
        that (every template marks each message with at least one token), or more text than
        ``check_prompt_size`` allows."""
        if len(messages) > self.max_prompt_tokens:
            raise oa.ApiError(400, f"'messages': {len(messages)} messages cannot fit this server's limit of "
                                   f"{self.max_prompt_tokens} prompt tokens; send fewer messages",
                              param="messages", code="prompt_too_long")
        size = sum(len(m["content"].encode("utf-8")) for m in messages)
        if size > self.max_prompt_bytes:
            raise oa.ApiError(400, f"'messages': {size} bytes of text cannot fit this server's limit of "
                                   f"{self.max_prompt_tokens} prompt tokens (at most {self.max_prompt_bytes} "
                                   "bytes are tokenized); shorten the chat", param="messages", code="prompt_too_long")

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise oa.ApiError(404, f"model {model!r} is not served here; this server serves {self.model_name!r} "
                                   "(GET /v1/models)", param="model", code="model_not_found")

    async def _answer(self, req: oa.SamplingFields, ids: list[int], max_tokens: int, receive: Receive,
                      chat: bool) -> Response:
        handle = self.submit(ids, req, max_tokens)
        rid = oa.ResponseIds.new("chatcmpl" if chat else "cmpl", self.model_name)
        self.inflight.add(handle)
        if req.stream:
            return EventStream(self._events(handle, rid, chat, req.include_usage()),
                               on_disconnect=lambda: self._client_gone(handle), on_close=lambda: self._release(handle))
        try:
            c = await collect(handle, receive)
        finally:
            self._release(handle)
        if c is None:
            self._client_gone(handle)
            return Response(status_code=CLIENT_CLOSED)
        self.metrics.observe_completion(c)
        if c.finish_reason == FinishReason.ERROR:
            raise oa.ApiError(500, f"generation failed: {c.error}", type="server_error")
        if c.finish_reason == FinishReason.CANCELLED:
            raise oa.ApiError(503, "the request was cancelled (server shutting down)", type="service_unavailable")
        return JSONResponse(oa.chat_body(rid, c) if chat else oa.completion_body(rid, c))

    async def _events(self, handle: RequestHandle, rid: oa.ResponseIds, chat: bool,
                      include_usage: bool) -> AsyncIterator[bytes]:
        def chunk(text: str | None, reason: str | None = None) -> bytes:
            return sse(oa.chat_chunk(rid, text, reason) if chat else oa.completion_chunk(rid, text or "", reason))

        sent: list[str] = []
        if chat:
            yield sse(oa.chat_chunk(rid, "", role=True))
        async for ev in handle:  # one chunk per token, even when its text is "" (a partial
            sent.append(ev.text)    # UTF-8 character, or a token the tokenizer cannot spell)
            yield chunk(ev.text)
        c = handle.result()
        self.metrics.observe_completion(c)
        if c.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
            why = f"generation failed: {c.error}" if c.finish_reason == FinishReason.ERROR else \
                "the request was cancelled (server shutting down)"
            yield sse(oa.error_body(why, "server_error"))
        else:
            # Text the engine held back (e.g. an incomplete UTF-8 tail) goes out with the finish reason.
            streamed = "".join(sent)
            yield chunk(c.text[len(streamed):] if c.text.startswith(streamed) else None,
                        oa.finish_reason(c.finish_reason))
            if include_usage:
                yield sse(oa.usage_chunk(rid, "chat.completion.chunk" if chat else "text_completion", c))
        yield sse("[DONE]")

    def _release(self, handle: RequestHandle) -> None:
        """The answer is over (sent, failed, or abandoned): forget it and stop its generation."""
        self.inflight.discard(handle)
        if not handle.done:
            handle.cancel()

    def _client_gone(self, handle: RequestHandle) -> None:
        """The client disconnected: cancel (idempotent) and count the finish once the engine retires it."""
        self.metrics.disconnects += 1
        handle.cancel()
        task = asyncio.ensure_future(self._reap(handle))
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)

    async def _reap(self, handle: RequestHandle) -> None:
        self.metrics.observe_completion(await drain(handle))
