"""The trained reference diffusion pipeline: the shapes data, a tiny training run that is
deterministic and writes a folder `ember compile` accepts, and the cache that reuses it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ember.errors import InputError
from ember.reference import shapes
from ember.reference.diffusion_train import DiffusionTrainConfig, ensure_reference_pipeline, train_reference_pipeline

TINY = DiffusionTrainConfig(images=24, unet_channels=(16, 32), vae_channels=(16, 16, 16), text_hidden=32,
                            vae_steps=3, vae_batch=4, unet_steps=4, unet_batch=4)
WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors")


def digests(folder: Path) -> dict[str, str]:
    return {w: hashlib.sha256((folder / w).read_bytes()).hexdigest() for w in WEIGHTS}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref-diff")
    quiet = lambda s: None  # noqa: E731
    records = [train_reference_pipeline(TINY, root / name, log=quiet) for name in ("a", "b")]
    records.append(train_reference_pipeline(DiffusionTrainConfig(**{**TINY.__dict__, "seed": 1}), root / "seed1", log=quiet))
    return root, records


def test_shapes_are_seeded_balanced_and_drawn_in_their_colour() -> None:
    a, b = shapes.render_shapes(24, seed=3), shapes.render_shapes(24, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, shapes.render_shapes(24, seed=4).images)
    assert np.bincount(a.labels).tolist() == [2] * len(shapes.PROMPTS)
    for img, prompt in zip(a.images, a.prompts):
        colour = prompt.split()[1]
        painted = np.abs(img.astype(int) - shapes.BACKGROUND).sum(-1) > 100
        assert 0.05 < painted.mean() < 0.6, prompt  # one shape, neither a speck nor the whole frame
        mean = img[painted].mean(0)
        assert np.argmax(mean) == np.argmax(shapes.COLOURS[colour]), prompt
    with pytest.raises(InputError, match="unknown shape"):
        shapes.render_shape("purple", "circle", 32, np.random.default_rng(0))


def test_training_is_deterministic_and_the_seed_matters(tiny_runs) -> None:
    root, records = tiny_runs
    assert digests(root / "a") == digests(root / "b")
    other = digests(root / "seed1")
    assert all(other[w] != digests(root / "a")[w] for w in WEIGHTS)
    rec = json.loads((root / "a" / "training.json").read_text())
    assert rec["denoiser"]["steps"] == TINY.unet_steps and rec["stopped_by"] == "max_steps"
    assert rec["data"]["sha256"] == records[1]["data"]["sha256"] and rec["vae"]["scaling_factor"] > 0


def test_the_folder_compiles_and_generates(tiny_runs, tmp_path) -> None:
    import ember
    from ember.compiler.diffusion import DiffusionCompileOptions, compile_diffusion
    from ember.runtime.diffusion.pipeline import DiffusionPipeline

    root, _ = tiny_runs
    out = tmp_path / "eng"
    compile_diffusion(str(root / "a"), out, DiffusionCompileOptions(steps=4, quiet=True), open_pipeline=DiffusionPipeline)
    pipe = ember.load(out)
    res = pipe.generate(["a red circle", "a blue square"], steps=4, seed=0, cache=False)
    assert pipe.image_size == TINY.image_size and res.images[0].shape == (TINY.image_size, TINY.image_size, 3)
    assert res.latents.shape[-1] == TINY.latent_size


def test_ensure_trains_only_when_missing(tmp_path) -> None:
    logs: list[str] = []
    cfg = DiffusionTrainConfig(**{**TINY.__dict__, "unet_steps": 1, "vae_steps": 1})
    folder = ensure_reference_pipeline(tmp_path / "ref", cfg, log=logs.append)
    assert (folder / "model_index.json").exists() and any("missing" in s for s in logs)
    before, logs[:] = digests(folder), []
    ensure_reference_pipeline(tmp_path / "ref", cfg, log=logs.append)
    assert logs == [] and digests(folder) == before


def test_config_errors_name_the_field() -> None:
    with pytest.raises(InputError, match="image_size=30"):
        DiffusionTrainConfig(image_size=30)
    with pytest.raises(InputError, match="unet_steps=0"):
        DiffusionTrainConfig(unet_steps=0)
