"""Shared fixtures: tiny compiled engines (session-scoped, built once per test run)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def engines_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


def _compiled(engines_dir, name: str, folder: str | None = None, **options):
    from ember.compiler.compile import CompileOptions, compile_decoder

    out = engines_dir / (folder or name)
    if not (out / "manifest.json").exists():
        compile_decoder(name, out, CompileOptions(quiet=True, **options))
    return out


@pytest.fixture(scope="session")
def gpt2_tiny(engines_dir):
    """Engine folder of the built-in gpt2-tiny config (seed 0)."""
    return _compiled(engines_dir, "gpt2-tiny")


@pytest.fixture(scope="session")
def llama_tiny(engines_dir):
    """Engine folder of the built-in llama-tiny config (seed 0)."""
    return _compiled(engines_dir, "llama-tiny")


@pytest.fixture(scope="session")
def llama_tiny_paged(engines_dir):
    """Engine folder of llama-tiny with the paged step graph (``--dtype fp16 --paged on``, seed 0)."""
    return _compiled(engines_dir, "llama-tiny", "llama-tiny-paged", dtype="fp16", paged="on")
