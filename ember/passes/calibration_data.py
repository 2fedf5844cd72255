"""Calibration data: prompts (a built-in set or a user file) and decoder step-graph feeds made
from tokenized prompts by running the float step graph (prefill, then greedy decode steps).

Feeds follow the step-graph contract (docs/design.md §3.1): ``input_ids``/``positions`` int64 [B, T],
``past_lengths``/``new_lengths`` int64 [B], ``past_key.{i}``/``past_value.{i}`` float [B, Hkv, P, D];
a LongRoPE graph's ``rope_long`` int64 [B] is 0 (short factors).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from ember.errors import ConfigError
from ember.passes.calibration import StatsCollector, with_outputs
from ember.passes.quant_graph import ort_session

# Varied English (narrative, technical, dialogue, lists, code-ish) so activation ranges of
# calibration resemble serving traffic. The first half calibrates; the second half is held out.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "In 1969, two astronauts walked on the surface of the Moon for the first time.",
    "To install the package, run pip install and then import it in your script.",
    "She opened the letter slowly, afraid of what the last page might say.",
    "The mitochondria is the part of the cell that produces most of its energy.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "Q: What is the capital of France?\nA: The capital of France is Paris.",
    "Ingredients: two cups of flour, one egg, a pinch of salt, and warm milk.",
    "The committee will meet on Tuesday to review the budget for next year.",
    "Rain fell all night, and by morning the river had burst its banks.",
    "A neural network learns by adjusting its weights to reduce a loss function.",
    "Dear customer, your order has shipped and should arrive within five days.",
    "The old lighthouse keeper climbed the stairs one last time before dawn.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar and oxygen.",
    "He said, \"I will be there at noon,\" but he never arrived.",
    "SELECT name, age FROM users WHERE age > 30 ORDER BY name;",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Once upon a time, in a kingdom by the sea, there lived a curious princess.",
    "Step 1: preheat the oven. Step 2: mix the batter. Step 3: bake for twenty minutes.",
    "The theory of relativity changed how physicists think about space and time.",
    "Please remember to water the plants and feed the cat while I am away.",
    "The train to Berlin departs from platform nine at a quarter past eight.",
    "Large language models generate text one token at a time, conditioned on the past.",
    "The orchestra tuned their instruments as the audience slowly found their seats.",
    "Error: file not found. Check the path and try again.",
    "Mountains covered in snow rose above the quiet valley and its frozen lake.",
    "The recipe calls for fresh basil, ripe tomatoes and a drizzle of olive oil.",
    "Our quarterly revenue grew by twelve percent, driven by strong sales in Asia.",
    "The detective examined the footprints near the window and frowned.",
    "for i in range(10):\n    print(i * i)",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The children laughed as the kite climbed higher into the bright blue sky.",
    # ---- held out ----
    "The museum's new exhibit features paintings from the early Renaissance.",
    "A balanced diet includes vegetables, whole grains, fruit and lean protein.",
    "The spacecraft entered orbit around Mars after a journey of seven months.",
    "He tapped the microphone twice and began to speak to the crowd.",
    "Compilers translate source code written by people into machine instructions.",
    "The bakery on the corner sells warm bread every morning at six.",
    "Two plus two equals four, and four times three equals twelve.",
    "The hikers reached the summit just as the clouds began to clear.",
    "Our team released a new version of the library with faster startup.",
    "The cat slept on the windowsill, warmed by the afternoon sun.",
    "During the storm, the power went out and we lit candles in the kitchen.",
    "The professor explained how vaccines train the immune system.",
    "import numpy as np\nx = np.arange(10)\nprint(x.mean())",
    "The ship's captain ordered the crew to lower the sails before the wind rose.",
    "Traffic on the highway slowed to a crawl because of the accident.",
    "Q: How many legs does a spider have?\nA: A spider has eight legs.",
    "The garden was full of roses, tulips and tall yellow sunflowers.",
    "Electric cars use batteries instead of gasoline to power their motors.",
    "She practiced the piano every evening until the melody felt natural.",
    "The city council approved a plan to build a new public library.",
    "Light travels about three hundred thousand kilometers every second.",
    "The referee blew the whistle and the match ended in a draw.",
    "Remember to back up your files before installing the update.",
    "An old map showed a hidden path through the forest to the sea.",
    "The chef tasted the soup and added a little more pepper.",
    "Satellites help forecasters predict the path of hurricanes.",
    "The library closes at nine, so we should finish our work soon.",
    "Birds migrate south in the autumn to find warmer weather and food.",
    "The engineer measured the bridge's vibration with a small sensor.",
    "A gentle breeze carried the smell of salt from the harbor.",
    "The lecture covered the history of writing systems around the world.",
    "After dinner, they played cards by the fire until midnight.",
)
_SPLIT = 32


def default_prompts(split: str = "calib") -> list[str]:
    """The built-in prompts: ``split`` "calib" (32 prompts) or "heldout" (32 others)."""
    if split not in ("calib", "heldout"):
        raise ConfigError(f"prompt split {split!r} is not 'calib' or 'heldout'")
    return list(DEFAULT_PROMPTS[:_SPLIT] if split == "calib" else DEFAULT_PROMPTS[_SPLIT:])


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a user file: a JSON list of strings, or plain text with one prompt per line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"calibration file {p} does not exist; give --calib a text file (one prompt a line) "
                          "or a JSON list of strings")
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"calibration file {p} starts with '[' but is not valid JSON ({e})") from e
        if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
            raise ConfigError(f"calibration file {p}: the JSON must be a list of strings")
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    prompts = [x for x in prompts if x.strip()]
    if not prompts:
        raise ConfigError(f"calibration file {p} holds no prompts")
    return prompts


def _kv_layout(model: onnx.ModelProto) -> tuple[int, int, int]:
    """(num_layers, Hkv, D) read from the ``past_key.{i}`` inputs of a step graph."""
    past = [v for v in model.graph.input if v.name.startswith("past_key.")]
    if not past:
        raise ConfigError("the graph has no past_key.{i} inputs: it is not a decoder step graph")
    dims = past[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not dims[1].HasField("dim_value") or not dims[3].HasField("dim_value"):
        raise ConfigError(f"input {past[0].name!r} must be [batch, Hkv, past, D] with fixed Hkv and D")
    return len(past), int(dims[1].dim_value), int(dims[3].dim_value)


def float_step_session(model: onnx.ModelProto, observe: StatsCollector | None = None, threads: int = 0,
                       base_dir=None):
    """The ONNX Runtime session ``decoder_step_feeds`` runs: over ``model``, with ``observe``'s tensors
    as extra outputs where given (fetched only when asked, so the session also serves calls without it)."""
    extra = _extra_outputs(model, observe)
    return ort_session(with_outputs(model, extra) if extra else model, threads, base_dir=base_dir)


def _extra_outputs(model: onnx.ModelProto, observe: StatsCollector | None) -> list[str]:
    """``observe``'s tensors that are not already outputs of ``model``."""
    outputs = {o.name for o in model.graph.output}
    return [] if observe is None else [n for n in observe.names if n not in outputs]


def decoder_step_feeds(model: onnx.ModelProto, prompts_ids: Sequence[Sequence[int]], past_capacity: int,
                       batch_size: int = 8, decode_steps: int = 1, threads: int = 0,
                       base_dir=None, outputs: list | None = None, observe: StatsCollector | None = None,
                       session=None) -> list[dict[str, np.ndarray]]:
    """Step-graph feeds for prompts: per batch of ``batch_size`` prompts, one prefill feed
    (prompts right-padded to the longest, ``past_lengths`` 0, a zero pool of ``past_capacity``)
    then ``decode_steps`` decode feeds (T=1) whose next tokens and past K/V come from running
    the float ``model`` greedily. Prompt length + decode_steps must fit in ``past_capacity``.
    Weights ``model`` keeps in external files are read from ``base_dir``. Given a list as ``outputs``,
    the float model's outputs on every feed (all graph outputs, in graph order) are appended to it, so
    an accuracy report need not run the float model again (``quant_accuracy.accuracy_report``).
    Given ``observe``, its tensors are fetched from those same runs (every feed is then run, the last
    decode step's too) and accumulated into it: the activation stats calibration needs, without
    running the feeds again (``calibration.collect_stats(observed=)``). ``session``: an ONNX Runtime
    session over ``with_outputs(model, observe.names)`` (``float_step_session``) to run instead of
    opening one, so that two calls (calibration and held-out prompts) share it.
    """
    if not prompts_ids or any(len(p) == 0 for p in prompts_ids):
        raise ConfigError("every calibration prompt must have at least one token")
    longest = max(len(p) for p in prompts_ids)
    if longest + decode_steps > past_capacity:
        raise ConfigError(f"past_capacity={past_capacity} is too small for a {longest}-token prompt plus "
                          f"{decode_steps} decode steps; raise it or shorten the prompts")
    layers, hkv, d = _kv_layout(model)
    # a LongRoPE graph's per-row factor set: short, as the runtime runs prompts within
    # original_max_position_embeddings (calibration prompts are short)
    longrope = any(v.name == "rope_long" for v in model.graph.input)
    observed = _extra_outputs(model, observe)
    run_last = outputs is not None or observe is not None  # the last decode step's outputs are wanted too
    sess = session
    if sess is None and (decode_steps or run_last):
        sess = float_step_session(model, observe, threads, base_dir)
    graph_outputs = [o.name for o in model.graph.output]
    feeds: list[dict[str, np.ndarray]] = []
    for start in range(0, len(prompts_ids), batch_size):
        rows = [list(p) for p in prompts_ids[start:start + batch_size]]
        b, t = len(rows), max(len(r) for r in rows)
        lengths = np.array([len(r) for r in rows], np.int64)
        ids = np.zeros((b, t), np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        # every step's pools are views into one block: one allocation (huge pages, where numpy asks for them)
        # instead of 2 x layers small ones, whose page faults cost llama-1b 5 s of calibration
        pool_names = [f"past_{kv}.{i}" for i in range(layers) for kv in ("key", "value")]
        block = np.zeros((len(pool_names), b, hkv, past_capacity, d), np.float32)
        pool = dict(zip(pool_names, block))
        feed = {"input_ids": ids, "positions": np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy(),
                "past_lengths": np.zeros(b, np.int64), "new_lengths": lengths, **pool,
                **({"rope_long": np.zeros(b, np.int64)} if longrope else {})}
        past_len = np.zeros(b, np.int64)
        for step in range(decode_steps + 1):
            feeds.append(feed)
            if step == decode_steps and not run_last:
                break
            res = dict(zip(graph_outputs + observed, sess.run(graph_outputs + observed, feed)))
            if observe is not None:
                for name in observe.names:
                    observe.add(name, res[name])
                for name in observed:
                    del res[name]  # a prefill's activations (~2 MB each for llama-1b): not kept past this step
            if outputs is not None:
                outputs.append([res[n] for n in graph_outputs])
            if step == decode_steps:
                break
            block = block.copy()
            pool = dict(zip(pool_names, block))
            for i in range(layers):
                for kv in ("key", "value"):
                    new = res[f"new_{kv}.{i}"]
                    for r in range(b):
                        n = int(feed["new_lengths"][r])
                        pool[f"past_{kv}.{i}"][r, :, past_len[r]:past_len[r] + n] = new[r, :, :n]
            past_len = past_len + feed["new_lengths"]
            nxt = np.argmax(res["logits"], axis=-1).astype(np.int64)
            feed = {"input_ids": nxt[:, None], "positions": past_len[:, None].copy(), "past_lengths": past_len.copy(),
                    "new_lengths": np.ones(b, np.int64), **pool, **({"rope_long": np.zeros(b, np.int64)} if longrope else {})}
    return feeds
