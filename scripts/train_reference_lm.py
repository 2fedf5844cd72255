#!/usr/bin/env python
"""Train Ember's reference language model on the documentation that ships with Python.

    python scripts/train_reference_lm.py                       # default: 1200 steps, 6-30 min on 2 cores
    python scripts/train_reference_lm.py --max-steps 30 -o /tmp/ref-lm   # a quick check

Writes a Hugging Face folder (default artifacts/reference-lm/) that ``ember compile`` accepts,
with training.json (steps, times, train/held-out perplexity, unigram baseline, data hash, seed,
versions, machine). See docs/reference_model.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ember.reference.cli import run_training, training_parser  # noqa: E402
from ember.reference.train import DEFAULT_OUTPUT, TrainConfig, config_with, train_reference_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    ap = training_parser(__doc__, DEFAULT_OUTPUT)
    ap.add_argument("--minutes", type=float, help=f"wall-clock guard; stops early and says so (default {defaults.minutes})")
    ap.add_argument("--max-steps", type=int, help=f"optimizer steps; sets the LR schedule (default {defaults.max_steps})")
    ap.add_argument("--seed", type=int, help=f"default {defaults.seed}")
    ap.add_argument("--threads", type=int, help=f"torch threads, fixed for determinism (default {defaults.threads})")
    ap.add_argument("--batch-size", type=int, help=f"windows per step (default {defaults.batch_size})")
    ap.add_argument("--seq-len", type=int, help=f"tokens per window (default {defaults.seq_len})")
    ap.add_argument("--lr", type=float, help=f"peak learning rate (default {defaults.lr})")
    ap.add_argument("--vocab-size", type=int, help=f"BPE vocabulary (default {defaults.vocab_size})")
    ap.add_argument("--hidden-size", type=int, help=f"default {defaults.hidden_size}")
    ap.add_argument("--num-layers", type=int, help=f"default {defaults.num_layers}")
    ap.add_argument("--num-heads", type=int, help=f"default {defaults.num_heads}")
    ap.add_argument("--num-kv-heads", type=int, help=f"default {defaults.num_kv_heads}")
    ap.add_argument("--intermediate-size", type=int, help=f"default {defaults.intermediate_size}")
    ap.add_argument("--eval-windows", type=int, help=f"windows scored for the reported figures (default {defaults.eval_windows})")
    ap.add_argument("--max-modules", type=int, help="only the first N standard-library modules (quick checks)")
    return run_training(ap, argv, defaults, config_with, train_reference_model,
                        lambda r: f"{r['parameters']:,} parameters, held-out perplexity "
                                  f"{r['heldout']['perplexity']:.2f}, unigram {r['unigram_heldout']['perplexity']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
