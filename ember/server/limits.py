"""What the server accepts: request sizes, time allowed to send a request, open connections.

Every limit is a ``ServerLimits`` field, an ``ember serve`` option and a row of the table in
docs/serving.md. None = derived from the model (its maximum positions).
"""
from __future__ import annotations

from dataclasses import dataclass

from ember.errors import InputError

# A prompt of N tokens is at most N * this many UTF-8 bytes in any tokenizer worth serving
# (English averages ~4 bytes a token, long whitespace/punctuation runs a few dozen), so a
# longer text cannot fit the prompt-token limit and is refused before it is tokenized.
PROMPT_BYTES_PER_TOKEN = 64


@dataclass(frozen=True)
class ServerLimits:
    """What one ``ember serve`` accepts; each field is the option of the same name."""

    max_body_bytes: int = 1 << 20  # request body, bytes (413 past it)
    max_prompt_tokens: int | None = None  # default: max_positions - 1
    max_tokens_limit: int | None = None  # largest max_tokens accepted; default: max_positions - 1
    drain_timeout_s: float = 30.0  # SIGTERM: in-flight requests get this long, then are cancelled
    max_queue: int | None = None  # image requests waiting (decoders: the engine's own max_queue)
    header_timeout_s: float = 10.0  # request line + headers must arrive within this (else closed)
    body_timeout_s: float = 30.0  # the whole body must arrive within this once headers are in (else 408)
    max_connections: int = 512  # open connections; past it a new one gets 503 and is closed

    def __post_init__(self) -> None:
        checks = [("max_body_bytes", "--max-body-bytes", 1), ("drain_timeout_s", "--drain-timeout", 0),
                  ("header_timeout_s", "--header-timeout", 1e-3), ("body_timeout_s", "--body-timeout", 1e-3),
                  ("max_connections", "--max-connections", 1)]
        for name, option, least in checks:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= least):
                raise InputError(f"{option} {value!r} (ServerLimits.{name}) is invalid: give a number >= {least:g}")
