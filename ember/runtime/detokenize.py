"""Incremental detokenization with stop strings.

Each new token is decoded in a short window (the ids since the previous release, plus the
tokens before them as context, as vLLM does), so the cost per token is constant and
SentencePiece's leading-space rules and multi-token UTF-8 characters come out right.
While stop strings are set, the last ``max(len(stop)) - 1`` characters are held back so a
stop string is never streamed before it is recognised.
"""
from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # decoded text so far (complete characters only; cut at a stop string)
        self.emitted = 0  # characters of ``text`` already released
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] is context already turned into text
        self._read = 0

    def add(self, token_ids: list[int]) -> str:
        """Update with all generated ids so far; return the newly releasable text delta."""
        if self.tokenizer is None or self.stopped:
            return ""
        dec = self.tokenizer.decode
        before = dec(token_ids[self._prefix:self._read], skip_special_tokens=True) if self._read > self._prefix else ""
        now = dec(token_ids[self._prefix:], skip_special_tokens=True)
        if len(now) <= len(before) or now.endswith("\ufffd"):  # nothing complete yet
            return ""
        start = max(0, len(self.text) - max(self.hold, 0) - 1)
        self.text += now[len(before):]
        self._prefix, self._read = self._read, len(token_ids)
        for s in self.stop:
            i = self.text.find(s, max(0, start - len(s)))
            if i >= 0:
                self.text, self.stopped = self.text[:i], True
                return self._release(len(self.text))
        return self._release(max(self.emitted, len(self.text) - self.hold))

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        delta = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return delta
