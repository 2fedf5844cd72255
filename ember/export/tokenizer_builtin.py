"""The built-in models' tokenizer: a byte-level BPE trained, deterministically, on a small
bundled English corpus (no hub access here). Byte-level means every string round-trips."""
from __future__ import annotations

from pathlib import Path

from ember.errors import ConfigError

EOS_TOKEN = "<|endoftext|>"
_CORPUS = Path(__file__).with_name("tokenizer_corpus.txt")


def build_builtin_tokenizer(vocab_size: int):
    """Return a ``tokenizers.Tokenizer`` whose ids all fit in ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ConfigError(f"vocab_size={vocab_size} is too small for the byte-level built-in tokenizer (need >= 258)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 2048),
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = _CORPUS.read_text().splitlines()
    tok.train_from_iterator(text, trainer=trainer)
    return tok
