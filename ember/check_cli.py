"""``ember check FOLDER [--reference FILE.onnx] [--tol NAME=VALUE ...] [--json]`` (see ember/check.py)."""
from __future__ import annotations

import json
import sys

from ember.errors import InputError

NOTHING_COMPARED = ("no backend other than the reference is present here; run it where onnxruntime-gpu and a GPU "
                    "or TensorRT are, or pass --reference FILE.onnx to compare the CPU engine with another graph")


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="compare an engine folder's parts on every backend present against ONNX Runtime CPU")
    p.add_argument("folder")
    p.add_argument("--reference", help="float ONNX to compare against (default: each part's own ONNX graph)")
    p.add_argument("--tol", action="append", default=[], metavar="OUTPUT=REL",
                   help="relative tolerance for one output (repeatable), e.g. --tol logits=0.05")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=_cmd_check)


def _parse_tols(items: list[str]) -> dict[str, float]:
    out = {}
    for it in items:
        name, _, val = it.partition("=")
        try:
            out[name] = float(val)
        except ValueError:
            raise InputError(f"--tol {it!r} must look like OUTPUT=NUMBER, e.g. logits=0.02") from None
    return out


def _cmd_check(a) -> int:
    from ember.check import check_folder, format_report, rows_to_json

    rows = check_folder(a.folder, reference=a.reference, tolerances=_parse_tols(a.tol), seed=a.seed)
    print(json.dumps(rows_to_json(rows), indent=2) if a.json else format_report(rows))
    if not rows:  # a check that compared nothing has not passed
        print(f"ember: check: nothing was compared in {a.folder}: {NOTHING_COMPARED}", file=sys.stderr)
        return 1
    return 0 if all(r.ok for r in rows) else 1
