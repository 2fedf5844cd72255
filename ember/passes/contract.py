"""The contract every compile pass keeps, and the loop that runs a list of them.

A ``Pass`` names what it needs of the graph (``requires``: facts an earlier stage
established, e.g. ``"float-weights"``) and what it leaves (``ensures``; ``removes``: facts
that no longer hold after it). ``run(model, context)`` returns a ``PassResult``: the model
(the same object, edited in place, or a new one), whether it changed, and a record for the
manifest. ``run_passes`` checks each pass's requirements against the facts so far, logs it
as a stage and keeps every result, so a pass's outcome is never lost.

The passes' own functions keep their shapes (``(model, modified)``, ``model``, ...); a
``Pass`` wraps one (``ember.compiler.decoder_passes``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx

from ember.errors import ConfigError

# Facts about a freshly exported step graph (``export/onnx_export.py``).
EXPORTED_FACTS = frozenset({"step-graph", "float-weights"})


@dataclass(frozen=True)
class PassResult:
    """What one pass did: the model to carry on with, whether it changed anything, and what
    the manifest records of it (JSON-serializable)."""

    model: onnx.ModelProto
    changed: bool
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes may read besides the model: ``folder`` holds the model's external weights
    (read one tensor at a time); ``options`` the compile options; ``source`` the model
    source (tokenizer, config) where a pass calibrates; ``facts`` what holds of the model
    now (``run_passes`` keeps it)."""

    folder: Path | None = None
    options: Any = None
    source: Any = None
    log: Any = None  # a progress.StageLog, or None for silence
    nbits_cache: Any = None  # block-wise quantization: a matmul_nbits.NBitsCache shared with another graph, or None
    facts: set[str] = field(default_factory=lambda: set(EXPORTED_FACTS))


@dataclass(frozen=True)
class Pass:
    """One graph pass: ``name``; ``stage``, the progress line; ``fn(model, context) -> PassResult``."""

    name: str
    fn: Callable[[onnx.ModelProto, PassContext], PassResult]
    requires: frozenset[str] = frozenset()
    ensures: frozenset[str] = frozenset()
    removes: frozenset[str] = frozenset()
    stage: str = ""

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        missing = sorted(self.requires - context.facts)
        if missing:
            raise ConfigError(f"pass {self.name!r} requires {', '.join(missing)} of the graph, which does not hold "
                              f"here (facts: {', '.join(sorted(context.facts)) or 'none'}); run it before the pass "
                              f"that removes it, or after one that ensures it")
        result = self.fn(model, context)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {self.name!r} returned {type(result).__name__}, not a PassResult")
        context.facts = (context.facts - self.removes) | self.ensures
        return result


@dataclass(frozen=True)
class PassRecord:
    """One pass's entry in the manifest's ``extra["passes"]``."""

    name: str
    changed: bool
    record: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "changed": self.changed, **({"record": self.record} if self.record else {})}


def run_passes(passes: list[Pass], model: onnx.ModelProto, context: PassContext
               ) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """Run ``passes`` in order, each as a stage of ``context.log``; returns the last model and
    every pass's record, in order."""
    records = []
    for p in passes:
        if context.log is not None:
            with context.log.stage(p.stage or p.name):
                result = p.run(model, context)
        else:
            result = p.run(model, context)
        model = result.model
        records.append(PassRecord(p.name, result.changed, result.record))
    return model, records
