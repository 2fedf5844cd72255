"""What the reference-model training scripts share (``scripts/train_reference_*.py``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from ember.errors import EmberError


def training_parser(doc: str, default_output: Path) -> argparse.ArgumentParser:
    """The scripts' parser: described by the first paragraph of ``doc``, with ``-o/--output``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("-o", "--output", type=Path, default=default_output, help=f"folder (default {default_output})")
    return ap


def add_overrides(ap: argparse.ArgumentParser, defaults, helps: dict[str, str]) -> None:
    """``--name-with-dashes`` for each config field in ``helps``, typed and documented from the
    field's default in ``defaults`` (None when not given: keep the default)."""
    for name, text in helps.items():
        value = getattr(defaults, name)
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), help=f"{text} (default {value})")


def run_training(ap: argparse.ArgumentParser, argv: list[str] | None, defaults, config_with: Callable,
                 train: Callable, summary: Callable[[dict], str]) -> int:
    """Parse ``argv`` with ``ap``; train with ``defaults`` overridden by the options (every one but
    ``output``, None = keep the default) into ``output``; print progress, then ``wrote OUTPUT
    (summary(record))``. Returns the exit status: 2 with the error's message on an ``EmberError``."""
    args = ap.parse_args(argv)
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k != "output"}
    try:
        cfg = config_with(defaults, **overrides)
        record = train(cfg, args.output, log=lambda s: print(s, flush=True))
    except EmberError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({summary(record)})")
    return 0
