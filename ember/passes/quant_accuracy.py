"""Accuracy of a quantized graph against its float original, on held-out inputs."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from ember.errors import ConfigError
from ember.passes.quant_graph import ort_session


def accuracy_report(float_model: onnx.ModelProto, quant_model: onnx.ModelProto,
                    feeds: Sequence[dict[str, np.ndarray]], logits_output: str = "logits",
                    threads: int = 0, base_dir=None, float_outputs: Sequence[Sequence[np.ndarray]] | None = None
                    ) -> dict[str, Any]:
    """Run both graphs in ONNX Runtime on every feed and compare every output (one session at a
    time, so a multi-GiB float graph and its quantized copy are never loaded together; weights kept
    in external files are read from ``base_dir``). ``float_outputs``: the float graph's outputs on every
    feed where already computed (``decoder_step_feeds(..., outputs=)``), in graph output order.

    Per output: ``rel_error`` = ||q - f||_2 / ||f||_2 over all feeds, ``max_abs_error``.
    For ``logits_output`` (last axis = vocabulary): ``top1_agreement`` = fraction of rows whose
    argmax matches, over ``rows`` rows; ``top1_agreement_decisive`` = the same over the
    ``decisive_rows`` whose float top-1/top-2 gap exceeds ``decisive_gap`` = 4 x the rms logit
    error (near-ties, common in random-weight models, flip under any perturbation of that size).
    ``max_rel_error`` is the worst output's rel_error.
    """
    if not feeds:
        raise ConfigError("accuracy_report needs at least one held-out feed")
    names = [o.name for o in float_model.graph.output]
    if float_outputs is None:
        f_sess = ort_session(float_model, threads, base_dir=base_dir)
        refs = [f_sess.run(names, feed) for feed in feeds]
        del f_sess
    elif len(float_outputs) != len(feeds):
        raise ConfigError(f"float_outputs has {len(float_outputs)} entries for {len(feeds)} feeds")
    else:
        refs = list(float_outputs)
    q_sess = ort_session(quant_model, threads, base_dir=base_dir)
    diff2 = dict.fromkeys(names, 0.0)
    ref2 = dict.fromkeys(names, 0.0)
    max_abs = dict.fromkeys(names, 0.0)
    agree = rows = 0
    gaps: list[np.ndarray] = []
    hits: list[np.ndarray] = []
    for feed, ref_outputs in zip(feeds, refs):
        ref = dict(zip(names, ref_outputs))
        got = dict(zip(names, q_sess.run(names, feed)))
        for n in names:
            r, g = ref[n].astype(np.float64), got[n].astype(np.float64)
            if r.size == 0:
                continue
            diff2[n] += float(np.sum((g - r) ** 2))
            ref2[n] += float(np.sum(r ** 2))
            max_abs[n] = max(max_abs[n], float(np.max(np.abs(g - r))))
        if logits_output in ref:
            r = ref[logits_output].reshape(-1, ref[logits_output].shape[-1])
            g = got[logits_output].reshape(r.shape)
            hit = np.argmax(r, -1) == np.argmax(g, -1)
            top2 = np.sort(r, axis=-1)[:, -2:]
            gaps.append(top2[:, 1] - top2[:, 0])
            hits.append(hit)
            agree += int(np.sum(hit))
            rows += r.shape[0]
    outputs = {n: {"rel_error": float(np.sqrt(diff2[n] / ref2[n])) if ref2[n] > 0 else float(np.sqrt(diff2[n])),
                   "max_abs_error": max_abs[n]} for n in names}
    report: dict[str, Any] = {
        "feeds": len(feeds),
        "outputs": outputs,
        "max_rel_error": max(o["rel_error"] for o in outputs.values()),
        "worst_output": max(outputs, key=lambda n: outputs[n]["rel_error"]),
    }
    if rows:
        report["top1_agreement"] = agree / rows
        report["rows"] = rows
        n_logits = sum(h.size for h in hits) * ref[logits_output].shape[-1]
        gap = 4.0 * float(np.sqrt(diff2[logits_output] / max(n_logits, 1)))
        decisive = np.concatenate(gaps) > gap
        report["decisive_gap"] = gap
        report["decisive_rows"] = int(decisive.sum())
        if decisive.any():
            report["top1_agreement_decisive"] = float(np.concatenate(hits)[decisive].mean())
    return report


def format_accuracy(report: dict[str, Any]) -> str:
    """One line for compile logs."""
    line = f"max rel error {report['max_rel_error']:.3%} ({report['worst_output']}) over {report['feeds']} feeds"
    if "top1_agreement" in report:
        line += f"; top-1 agreement {report['top1_agreement']:.2%} over {report['rows']} rows"
        if "top1_agreement_decisive" in report:
            line += (f" ({report['top1_agreement_decisive']:.2%} over the {report['decisive_rows']} rows whose float "
                     f"top-1 leads by > {report['decisive_gap']:.3g})")
    return line
