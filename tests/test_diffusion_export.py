"""UNet split and ONNX export of the diffusion parts vs diffusers/transformers (sd-tiny)."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ember.errors import ConfigError
from ember.export.diffusion.config import builtin_config
from ember.export.diffusion.onnx_export import PART_IO, export_parts
from ember.export.diffusion.source import build_builtin, check_unet_config, load_source
from ember.export.diffusion.unet_split import UNetFull, UNetShallow


@pytest.fixture(scope="module")
def tiny():
    return build_builtin(builtin_config("sd-tiny"))


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_onnx")
    return export_parts(tiny, folder, branch=0)


def _inputs(src, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, src.sample_size, src.sample_size, generator=g)
    t = torch.tensor([981.0, 500.0, 21.0][:batch])  # per-sample timesteps
    ctx = torch.randn(batch, src.max_text_length, src.unet.config.cross_attention_dim, generator=g)
    return x, t, ctx


def _run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_full_and_shallow_onnx_match_diffusers(tiny, exported) -> None:
    x, t, ctx = _inputs(tiny)
    with torch.no_grad():
        ref = tiny.unet(x, t, ctx).sample.numpy()
        _, cached = UNetFull(tiny.unet, 0)(x, t, ctx)
    feeds = {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ctx.numpy()}
    noise, cached_onnx = _run(exported["unet_full"], feeds)
    np.testing.assert_allclose(noise, ref, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(cached_onnx, cached.numpy(), atol=1e-5 * np.abs(cached.numpy()).max())
    b, cc = cached.shape[:2]
    qc = UNetShallow(tiny.unet, 0).quant_channels
    shallow = _run(exported["unet_shallow"], {**feeds, "cached": cached_onnx, "cache_scale": np.ones((b, cc), np.float32),
                                              "cache_bias": np.zeros((b, cc), np.float32), "quant_scale": np.ones((b, qc), np.float32),
                                              "quant_bias": np.zeros((b, qc), np.float32)})[0]
    np.testing.assert_allclose(shallow, ref, atol=1e-5 * np.abs(ref).max())
    # the correction inputs act: a non-identity cache row changes the output
    moved = _run(exported["unet_shallow"], {**feeds, "cached": cached_onnx, "cache_scale": np.full((b, cc), 0.5, np.float32),
                                            "cache_bias": np.zeros((b, cc), np.float32), "quant_scale": np.ones((b, qc), np.float32),
                                            "quant_bias": np.zeros((b, qc), np.float32)})[0]
    assert np.abs(moved - ref).max() > 1e-3


@pytest.mark.parametrize("branch", [0, 1])
def test_every_branch_reproduces_the_unet_given_the_true_cache(tiny, branch: int) -> None:
    x, t, ctx = _inputs(tiny, seed=branch)
    with torch.no_grad():
        ref = tiny.unet(x, t, ctx).sample
        noise, cached = UNetFull(tiny.unet, branch)(x, t, ctx)
        sh = UNetShallow(tiny.unet, branch)
        b, cc, qc = x.shape[0], sh.cache_channels, sh.quant_channels
        out = sh(x, t, ctx, cached, torch.ones(b, cc), torch.zeros(b, cc), torch.ones(b, qc), torch.zeros(b, qc))
    assert cached.shape[1] == cc
    torch.testing.assert_close(noise, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_text_encoder_and_vae_match(tiny, exported) -> None:
    ids = np.array([e.ids for e in tiny.tokenizer.encode_batch(["a red cube", ""])], dtype=np.int64)
    assert ids.shape == (2, tiny.max_text_length)
    with torch.no_grad():
        ref = tiny.text_encoder(torch.from_numpy(ids)).last_hidden_state.numpy()
        z = torch.randn(2, 4, tiny.sample_size, tiny.sample_size)
        img = tiny.vae.decode(z / tiny.vae.config.scaling_factor).sample.numpy()
    np.testing.assert_allclose(_run(exported["text_encoder"], {"input_ids": ids})[0], ref, atol=1e-5)
    got = _run(exported["vae_decoder"], {"latents": z.numpy()})[0]
    assert got.shape == (2, 3, tiny.image_size, tiny.image_size)
    np.testing.assert_allclose(got, img, atol=1e-5 * np.abs(img).max())
    assert PART_IO["unet_shallow"][0][3] == "cached"


def test_bad_sources_and_branches_fail_clearly(tiny, tmp_path) -> None:
    with pytest.raises(ConfigError, match="out of range.*0 \\(shallowest\\) .. 1"):
        UNetFull(tiny.unet, 2)
    with pytest.raises(ConfigError, match="down block 'AttnDownBlock2D' is not supported"):
        check_unet_config({"down_block_types": ["AttnDownBlock2D"]}, "unet/config.json")
    with pytest.raises(ConfigError, match="class_embed_type"):
        check_unet_config({"class_embed_type": "timestep"}, "unet/config.json")
    with pytest.raises(ConfigError, match="unknown built-in diffusion config 'sd-huge'"):
        load_source("sd-huge")
    with pytest.raises(ConfigError, match="neither a folder"):
        load_source(tmp_path / "nowhere")
    folder = tmp_path / "pipe"
    for part in ("unet", "text_encoder", "tokenizer"):
        (folder / part).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ConfigError, match="lacks pipeline part\\(s\\) vae, scheduler"):
        load_source(folder)
