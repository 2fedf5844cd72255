"""The built-in models' tokenizer: a byte-level BPE trained, deterministically, on a small
bundled English corpus plus seeded pseudo-words (no hub access here). The pseudo-words let
the vocabulary fill a large model's embedding (e.g. GPT-2's 50,257 ids), so text sampled
from random weights decodes to visible word-like text instead of ids with no string.
Byte-level means every string round-trips."""
from __future__ import annotations

import random
from pathlib import Path

from ember.errors import ConfigError

EOS_TOKEN = "<|endoftext|>"
_CORPUS = Path(__file__).with_name("tokenizer_corpus.txt")
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ea", "ou", "y")] + \
    ["th", "sh", "ch", "qu", "str", "pl", "gr"]


def _pseudo_lines(vocab_size: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(6 * vocab_size)]
    return [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]


def build_builtin_tokenizer(vocab_size: int):
    """Return a ``tokenizers.Tokenizer`` with exactly ``vocab_size`` ids (ids all fit the model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ConfigError(f"vocab_size={vocab_size} is too small for the byte-level built-in tokenizer (need >= 258)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    english = _CORPUS.read_text().splitlines()
    tok.train_from_iterator(english * 20 + _pseudo_lines(vocab_size), trainer=trainer)
    return tok
