"""The image-generation pipeline over a compiled diffusion folder.

prompt -> tokenizer -> text encoder -> fused DDIM loop with CFG (full/shallow UNet engines
per the cache schedule, DEC rows as engine inputs) -> VAE decoder -> uint8 images / PNG.

Two paths over one loop (``denoise.run_loop``): the host path (``device='cpu'``: numpy and ONNX
Runtime's CPU provider, no torch) and the device path (``device='cuda:N'``, or ``'cpu'`` with
``io_binding=True`` for tests: torch tensors bound through IOBinding, everything between the
prompt's token ids and the final image stays on the device; ``device_engines.py``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ember.engine_format.manifest import Manifest, resolve_member
from ember.errors import ArtifactError, ConfigError, InputError
from ember.runtime.diffusion.ddim import DDIM
from ember.runtime.diffusion.denoise import HOST, DecRows, DenoiseJob, LoopStats, Observer, run_loop, torch_ops
from ember.runtime.diffusion.engines import PartSession
from ember.runtime.text_input import check_text


@dataclass
class ImageResult:
    """images: uint8 [H, W, 3] per prompt; latents: final x_0 [N, C, h, w]; seconds per stage."""

    images: list[np.ndarray]
    latents: np.ndarray
    timings: dict[str, float]
    loop: LoopStats
    notes: list[str] = field(default_factory=list)

    def save(self, path: str | Path, index: int = 0) -> Path:
        from PIL import Image

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.images[index]).save(path, format="PNG")
        return path


def to_uint8(images: np.ndarray) -> list[np.ndarray]:
    """[N, 3, H, W] in [-1, 1] -> list of uint8 [H, W, 3] (as diffusers' image processor)."""
    x = np.clip(images / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return [np.round(i * 255).astype(np.uint8) for i in x]


class DiffusionPipeline:
    """Owns its engine sessions. ``generate`` is the public entry; ``run_jobs`` the fused loop."""

    def __init__(self, folder: Path, manifest: Manifest, threads: int | None = None,
                 backend: str | None = None, device: str = "cpu", io_binding: bool | None = None,
                 cuda_graph: bool | None = None) -> None:
        """``device``: 'cpu' or 'cuda[:N]'. ``io_binding`` (default: on for CUDA, off for 'cpu')
        selects the device path; ``cuda_graph`` (default on for CUDA, ``EMBER_CUDA_GRAPH=0`` turns it
        off) captures the UNet engines per batch size (``device_engines.DevicePartSession``; on the
        CPU: the same static-batch sessions without a capture)."""
        import os

        from ember.runtime.loader import load_tokenizer

        spec = manifest.extra.get("diffusion")
        if not isinstance(spec, dict):
            raise ArtifactError(f"{folder}/manifest.json has no 'diffusion' section; recompile the folder")
        self.folder, self.manifest, self.spec = folder, manifest, spec
        if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda")):
            raise InputError(f"device {device!r} is not understood; use 'cpu', 'cuda' or 'cuda:N'")
        self.device = device
        cuda_only = [p.name for p in manifest.parts if p.extra.get("cuda_only")]
        if cuda_only and not device.startswith("cuda"):
            raise ConfigError(f"{folder}: parts {cuda_only} use ONNX Runtime's CUDA-only UNet ops (compiled with "
                              f"--ort-unet-fusions); load with device='cuda:N' (CLI: --device cuda:0), or recompile "
                              f"without --ort-unet-fusions to run on the CPU")
        self.ctx = None
        if io_binding if io_binding is not None else device != "cpu":
            from ember.runtime.diffusion.device_engines import DeviceContext, DevicePartSession

            self.ctx = DeviceContext.make(device)
            graphs = cuda_graph if cuda_graph is not None else (self.ctx.is_cuda and
                                                                 os.environ.get("EMBER_CUDA_GRAPH", "1") != "0")

            def part(name: str, graph: bool = False):
                return DevicePartSession(folder, manifest.part(name), self.ctx, threads, backend=backend,
                                         cuda_graph=graph and graphs)
            self.ops = torch_ops(self.ctx.device)
        elif device != "cpu":
            raise InputError(f"device={device!r} runs the device path; io_binding=False is for 'cpu' only")
        else:
            def part(name: str, graph: bool = False):
                return PartSession(folder, manifest.part(name), threads, backend=backend)
            self.ops = HOST
        self.text = part("text_encoder")
        self.full = part("unet_full", graph=True)
        self.shallow = part("unet_shallow", graph=True)
        self.vae = part("vae_decoder")
        self.tokenizer = load_tokenizer(folder, manifest)
        if self.tokenizer is None:
            raise ArtifactError(f"{folder}/manifest.json records no tokenizer; recompile the folder")
        self.sampler = DDIM.from_config(spec["scheduler"])
        self.cache = spec["cache"]
        self.dec = self._load_dec(spec.get("dec"))
        self._device_dec: DecRows | None = None

    @property
    def device_status(self) -> dict[str, str]:
        """Per UNet engine: its CUDA graph status and captured batch sizes (device path only)."""
        if self.ctx is None:
            return {}
        return {e.name: e.cuda_graph_status + (f" ({e.graph_mode}, batches {e.graph_batches})" if e.graph_batches else "")
                for e in (self.full, self.shallow)}

    def _on_device(self, a: np.ndarray):
        """A host array as the loop's array kind (a device tensor on the device path)."""
        if self.ctx is None:
            return a
        import torch

        with self.active():  # allocated and filled on the pipeline's stream, where it is used
            return torch.from_numpy(np.ascontiguousarray(a)).to(self.ctx.device)

    def _rows_on_device(self, rows: DecRows) -> DecRows:
        """Correction rows as the loop's array kind (the folder's DEC tables are moved once)."""
        if self.ctx is None:
            return rows
        if rows is self.dec and self._device_dec is not None:
            return self._device_dec
        moved = DecRows(*(self._on_device(getattr(rows, k)) for k in ("cache_scale", "cache_bias", "quant_scale", "quant_bias")))
        if rows is self.dec:
            self._device_dec = moved
        return moved

    # ---- configuration -------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return int(self.spec["image_size"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c, h = int(self.spec["latent_channels"]), int(self.spec["latent_size"])
        return c, h, h

    def _load_dec(self, dec: dict[str, Any] | None) -> DecRows | None:
        if not dec:
            return None
        table = next((t for t in self.manifest.tables if isinstance(t, dict) and t.get("file") == dec.get("file")), None)
        if table is None:  # only files the manifest records (and the loader checked) are read
            raise ArtifactError(f"{self.folder}/manifest.json: the DEC tables {dec.get('file')!r} are not among the "
                                f"manifest's tables; recompile the folder")
        with np.load(resolve_member(self.folder, table["file"], "tables"), allow_pickle=False) as z:
            return DecRows(*(z[k].astype(np.float32) for k in ("cache_scale", "cache_bias", "quant_scale", "quant_bias")))

    def _identity(self, steps: int) -> DecRows:
        cc, qc = int(self.spec["cache_channels"]), int(self.spec["quant_channels"])
        return DecRows(np.ones((steps, cc), np.float32), np.zeros((steps, cc), np.float32),
                       np.ones((steps, qc), np.float32), np.zeros((steps, qc), np.float32))

    def plan(self, steps: int, cache: bool = True, dec: bool = True) -> tuple[np.ndarray, DecRows, list[str]]:
        """(full-step mask [steps], correction rows, notes) for a request of ``steps`` steps."""
        notes: list[str] = []
        full = np.ones(steps, dtype=bool)
        if not cache or self.cache["method"] == "none":
            return full, self._identity(steps), notes
        budget, compiled = int(self.cache["budget"]), int(self.cache["steps"])
        if steps < budget:
            raise InputError(
                f"steps={steps} is fewer than the cache budget of {budget} full steps this engine was compiled for; "
                f"use steps >= {budget} (compiled for {compiled}) or recompile with a larger --cache-interval"
            )
        if steps == compiled:
            full[:] = False
            full[self.cache["full_steps"]] = True
            rows = self.dec if (dec and self.dec is not None) else self._identity(steps)
            return full, rows, notes
        interval = max(1, round(float(self.cache["interval"])))
        full[:] = False
        full[::interval] = True
        notes.append(f"schedule and DEC tables were compiled for {compiled} steps; {steps} steps use a uniform "
                     f"interval of {interval} without DEC")
        return full, self._identity(steps), notes

    # ---- stages --------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]):
        """prompts -> text embeddings [N, S, D] (a float32 array; a device tensor on the device path)."""
        ids = np.array([e.ids for e in self.tokenizer.encode_batch(list(prompts))], dtype=np.int64)
        want = int(self.spec["max_text_length"])
        if ids.shape[1] != want:
            raise ArtifactError(f"tokenizer gives {ids.shape[1]} tokens per prompt, the text encoder takes {want}; recompile")
        with self.active():
            return self.text.run({"input_ids": self._on_device(ids)})[0]

    def decode(self, latents) -> np.ndarray:
        """x_0 latents [N, C, h, w] (host array or device tensor) -> images [N, 3, H, W] float32 in about [-1, 1]."""
        if self.ctx is None:
            return self.vae.run({"latents": np.asarray(latents, np.float32)})[0].astype(np.float32, copy=False)
        with self.active():
            lat = self._on_device(np.asarray(latents, np.float32)) if isinstance(latents, np.ndarray) else latents
            return self.ops.to_host(self.vae.run({"latents": lat})[0])

    def run_jobs(self, jobs: list[DenoiseJob], observer: Observer | None = None) -> LoopStats:
        with self.active():
            return run_loop(jobs, self.sampler, self.full, self.shallow, observer, ops=self.ops)

    def active(self):
        """The context engine calls run in: the device stream on CUDA (a no-op on the host path)."""
        import contextlib

        return self.ctx.active() if self.ctx is not None else contextlib.nullcontext()

    def synchronize(self) -> None:
        """Wait for the device's queued work (timings on the device path)."""
        if self.ctx is not None:
            self.ctx.synchronize()

    # ---- public API ----------------------------------------------------------------------
    def make_jobs(self, prompts: Sequence[str], *, negative_prompt: str | Sequence[str] = "", steps: int | None = None,
                  seed: int | Sequence[int] = 0, guidance_scale: float | None = None, latents: np.ndarray | None = None,
                  cache: bool = True, dec: bool = True, stagger: int = 0) -> tuple[list[DenoiseJob], list[str]]:
        """One DenoiseJob per prompt (job i joins at iteration i * stagger)."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise InputError(f"prompts must be a list of strings, got {type(prompts).__name__}: pass [text, ...]")
        n = len(prompts)
        negs = [negative_prompt] * n if isinstance(negative_prompt, str) else negative_prompt
        if not isinstance(negs, (list, tuple)):
            raise InputError(f"negative_prompt must be a string or a list of strings, got {type(negs).__name__}")
        for name, texts in (("prompts", prompts), ("negative_prompt", negs)):
            for i, text in enumerate(texts):
                check_text(text, f"{name}[{i}]")
        steps = int(self.spec["steps"]) if steps is None else int(steps)
        g = float(self.spec["guidance_scale"] if guidance_scale is None else guidance_scale)
        negs = list(negs)
        seeds = [seed + i for i in range(n)] if isinstance(seed, int) else list(seed)
        if len(negs) != n or len(seeds) != n:
            raise InputError(f"got {n} prompts but {len(negs)} negative prompts and {len(seeds)} seeds; give one each")
        if stagger < 0:
            raise InputError(f"stagger={stagger} must be >= 0")
        if latents is not None and latents.shape != (n, *self.latent_shape):
            raise InputError(f"latents have shape {list(latents.shape)}; this engine takes {[n, *self.latent_shape]}")
        full, rows, notes = self.plan(steps, cache, dec)
        rows = self._rows_on_device(rows)
        timesteps = self.sampler.timesteps(steps)
        cfg = g > 1.0
        emb = self.encode(list(negs) + list(prompts) if cfg else list(prompts))
        jobs = []
        for i in range(n):
            x = latents[i] if latents is not None else np.random.default_rng(seeds[i]).standard_normal(self.latent_shape)
            text = self.ops.stack([emb[i], emb[n + i]]) if cfg else emb[i:i + 1]
            x = self._on_device(np.asarray(x, np.float32))
            jobs.append(DenoiseJob(text=text, latents=x, timesteps=timesteps, full=full.copy(),
                                   guidance_scale=g, dec=rows, start=i * stagger))
        return jobs, notes

    def generate(self, prompts: str | Sequence[str], *, negative_prompt: str | Sequence[str] = "", steps: int | None = None,
                 seed: int | Sequence[int] = 0, guidance_scale: float | None = None, height: int | None = None,
                 width: int | None = None, latents: np.ndarray | None = None, cache: bool = True, dec: bool = True,
                 stagger: int = 0, decode: bool = True) -> ImageResult:
        """Generate one image per prompt (fused into shared UNet calls).

        steps default to the compiled count; seeds default to seed, seed+1, ...; ``latents``
        [N, C, h, w] replaces the seeded initial noise; ``cache=False`` runs every step full;
        ``dec=False`` feeds identity corrections; ``stagger`` delays request i by i*stagger steps.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Iterable):
            raise InputError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
        prompts = list(prompts)
        if not prompts:
            raise InputError("no prompts given; pass at least one prompt")
        size = self.image_size
        for name, v in (("height", height), ("width", width)):
            if v is not None and int(v) != size:
                raise InputError(f"{name}={v}: this engine was compiled for {size}x{size} images; "
                                 f"use {size} or recompile with `ember compile ... --image-size {v}`")
        with self.active():  # every device tensor of the request lives on the pipeline's stream
            t0 = time.perf_counter()
            jobs, notes = self.make_jobs(prompts, negative_prompt=negative_prompt, steps=steps, seed=seed,
                                         guidance_scale=guidance_scale, latents=latents, cache=cache, dec=dec, stagger=stagger)
            self.synchronize()
            t1 = time.perf_counter()
            loop = self.run_jobs(jobs)
            self.synchronize()
            t2 = time.perf_counter()
            final = self.ops.stack([j.latents for j in jobs])
            images = to_uint8(self.decode(final)) if decode else []
            final = self.ops.to_host(final)
            t3 = time.perf_counter()
            timings = {"text_s": t1 - t0, "loop_s": t2 - t1, "unet_s": loop.unet_seconds, "vae_s": t3 - t2, "total_s": t3 - t0}
        notes += [f"{name}: CUDA graphs {st}" for name, st in self.device_status.items() if st.startswith("unavailable")]
        return ImageResult(images=images, latents=final, timings=timings, loop=loop, notes=notes)

    def close(self) -> None:
        """Sessions are freed with the object; present for ``with`` use."""

    def __enter__(self) -> "DiffusionPipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
