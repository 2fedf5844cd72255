"""Coloured shapes drawn with Pillow: the training data of the reference diffusion model.

Every image is one filled shape (circle, square, triangle) in one of four colours on a dark
background, at a random position, size and (triangles, squares) rotation, described by the
prompt ``"a {colour} {shape}"``. Drawn at 4x the output size and downsampled (antialiased edges).
A seeded ``numpy`` generator makes the set a pure function of (seed, count, size).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ember.errors import InputError

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (24, 24, 28)
SUPERSAMPLE = 4


def prompt_for(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


PROMPTS = tuple(prompt_for(c, s) for c in COLOURS for s in SHAPES)


@dataclass(frozen=True)
class ShapeSet:
    """images: uint8 [N, size, size, 3]; labels: index into ``PROMPTS`` per image."""

    images: np.ndarray
    labels: np.ndarray

    @property
    def prompts(self) -> list[str]:
        return [PROMPTS[i] for i in self.labels]

    def as_tensor_range(self) -> np.ndarray:
        """float32 [N, 3, size, size] in [-1, 1] (the VAE's input range)."""
        return (self.images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def render_shape(colour: str, shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One image, uint8 [size, size, 3]; position, radius and angle drawn from ``rng``."""
    from PIL import Image, ImageDraw

    if colour not in COLOURS or shape not in SHAPES:
        raise InputError(f"unknown shape {colour!r} {shape!r}; colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}")
    big = size * SUPERSAMPLE
    radius = rng.uniform(0.22, 0.36) * big
    cx, cy = rng.uniform(radius + 0.04 * big, big - radius - 0.04 * big, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    else:
        corners = 4 if shape == "square" else 3
        r = radius * (1.2 if shape == "square" else 1.25)  # similar area to the circle
        pts = [(cx + r * math.cos(angle + 2 * math.pi * k / corners), cy + r * math.sin(angle + 2 * math.pi * k / corners))
               for k in range(corners)]
        draw.polygon(pts, fill=fill)
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def render_shapes(count: int, size: int = 32, seed: int = 0) -> ShapeSet:
    """``count`` images cycling through the 12 prompts (balanced classes), randomness from ``seed``."""
    if count < 1 or size < 8:
        raise InputError(f"count={count}, size={size}: need count >= 1 and size >= 8")
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(PROMPTS)
    images = np.empty((count, size, size, 3), np.uint8)
    for i, label in enumerate(labels):
        colour, shape = PROMPTS[label].split()[1:]
        images[i] = render_shape(colour, shape, size, rng)
    return ShapeSet(images=images, labels=labels.astype(np.int64))
