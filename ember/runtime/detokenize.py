"""Incremental detokenization with stop strings.

Text is re-decoded from all generated ids (exact for byte-level BPE and SentencePiece) and
released as deltas; while stop strings are set, the last ``max(len(stop)) - 1`` characters
are held back so a stop string is never streamed before it is recognised.
"""
from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # full decoded text so far (complete characters only)
        self.emitted = 0  # characters of ``text`` already released
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
        """Update with all generated ids; return the newly releasable text delta."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
            return ""
        self.text = text
        for s in self.stop:
            i = text.find(s, max(0, self.emitted - len(s)))
            if i >= 0:
                self.text, self.stopped = text[:i], True
                return self._release(len(self.text))
        return self._release(max(self.emitted, len(text) - self.hold))

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        delta = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return delta
