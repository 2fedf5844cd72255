"""docs/engine-format.md is enough to write a loader: ``FOREIGN_LOADER`` runs an engine folder's
step graph greedily with only json, numpy, onnxruntime and tokenizers (in a fresh interpreter
that never imports Ember) and must produce ``ember generate``'s tokens."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ember.cli import main

# Written from docs/engine-format.md alone: tensors found by role, right padding, new_lengths,
# a preallocated cache masked by past_lengths, new K/V appended along axis 2, last-token logits.
FOREIGN_LOADER = r'''
import json, sys
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

folder, prompt, max_new = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = json.load(open(f"{folder}/manifest.json"))
assert m["kind"] == "decoder" and m["schema_version"] <= 2, m["schema_version"]
step = next(p for p in m["parts"] if p["name"] == "step")
ins = {(t["role"], t["layer"]): t for t in step["inputs"]}
outs = {(t["role"], t["layer"]): i for i, t in enumerate(step["outputs"])}
cfg = m["model"]["config"]
layers, max_pos = cfg["num_layers"], cfg["max_positions"]
head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_heads"]
tokenizer = Tokenizer.from_file(f"{folder}/{m['tokenizer']['file']}")
session = ort.InferenceSession(f"{folder}/{step['file']}", providers=["CPUExecutionProvider"])

# one row of a batch of 2: row 1 is a padding row that only checks masking does not leak
kinds = ("key", "value")
cache = {(k, i): np.zeros((2, cfg["num_kv_heads"], max_pos, head_dim), ins[("past_" + k, i)]["dtype"])
         for i in range(layers) for k in kinds}
new = tokenizer.encode(prompt).ids
past, generated = 0, []
while len(generated) < max_new:
    t = len(new)
    tokens = np.zeros((2, t), np.int64)
    tokens[0] = new
    feeds = {ins[("token_ids", None)]["name"]: tokens,
             ins[("positions", None)]["name"]: np.stack([np.arange(past, past + t)] * 2).astype(np.int64),
             ins[("past_lengths", None)]["name"]: np.array([past, 0], np.int64),
             ins[("new_lengths", None)]["name"]: np.array([t, 1], np.int64)}
    for (k, i), buf in cache.items():
        feeds[ins[("past_" + k, i)]["name"]] = buf
    out = session.run(None, feeds)
    for (k, i), buf in cache.items():
        buf[0, :, past:past + t] = out[outs[("new_" + k, i)]][0, :, :t]
    past += t
    token = int(np.argmax(out[outs[("logits", None)]][0]))
    generated.append(token)
    new = [token]
print(json.dumps({"token_ids": generated, "ember_imported": any(n.split(".")[0] == "ember" for n in sys.modules)}))
'''


def foreign_tokens(folder, prompt: str, n: int) -> list[int]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", FOREIGN_LOADER, str(folder), prompt, str(n)], capture_output=True,
                       text=True, env=env, cwd=str(folder), timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ember_imported"] is False
    return out["token_ids"]


def ember_generate_tokens(folder, prompt: str, n: int, capsys) -> list[int]:
    assert main(["generate", str(folder), prompt, "--max-new-tokens", str(n), "--ignore-eos", "--json",
                 "--threads", "1"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]


@pytest.mark.parametrize("model", ["gpt2_tiny", "llama_tiny"])
def test_a_loader_written_from_the_spec_matches_ember_generate(model, request, capsys):
    folder = request.getfixturevalue(model)  # compiled by ember.compiler (tests/conftest.py)
    prompt, n = "the quick brown fox", 12
    assert foreign_tokens(folder, prompt, n) == ember_generate_tokens(folder, prompt, n, capsys)
