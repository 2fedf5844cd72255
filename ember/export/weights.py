"""Weight files of a Hugging Face folder: tensor names and shapes first, the data after the config is checked.

``read_weight_index`` reads the shapes without loading tensor data (safetensors headers;
``.bin`` checkpoints are memory-mapped through torch's weights-only unpickler), so
``check_sizes_against_weights`` can reject a config.json whose sizes disagree with the
weights (``n_layer: 1000000``) before any torch model is allocated. Every unreadable file
fails with a ConfigError naming it.
"""
from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ember.errors import ConfigError
from ember.models.description import DecoderConfig
from ember.models.registry import family

@dataclass
class WeightIndex:
    """The tensors of a folder's weight files: name -> shape, plus the files they came from."""

    files: list[Path]
    shapes: dict[str, tuple[int, ...]]
    _loaded: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # .bin: memory-mapped tensors

    @property
    def num_values(self) -> int:
        total = 0
        for shape in self.shapes.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def load(self) -> dict[str, torch.Tensor]:
        """All tensors as float32 (call after the config has been checked against ``shapes``)."""
        if self._loaded:
            return {k: v.float() for k, v in self._loaded.items()}
        from safetensors.torch import load_file

        sd: dict[str, torch.Tensor] = {}
        for f in self.files:
            try:
                sd.update(load_file(str(f)))
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise ConfigError(f"{f} could not be read ({one_line(e)}); re-download or re-save the weights") from e
        return {k: v.float() for k, v in sd.items()}


def one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_weight_index(folder: Path) -> WeightIndex:
    """Names and shapes of the tensors in *.safetensors (preferred) or *pytorch_model*.bin."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return WeightIndex(files, _safetensors_shapes(files))
    bins = sorted(folder.glob("*pytorch_model*.bin"))  # transformers' pytorch_model*.bin, diffusers' diffusion_*
    if not bins:
        raise ConfigError(f"{folder} has no weights: expected *.safetensors or pytorch_model*.bin beside config.json")
    tensors: dict[str, torch.Tensor] = {}
    for f in bins:
        tensors.update(_load_bin(f))
    return WeightIndex(bins, {k: tuple(v.shape) for k, v in tensors.items()}, tensors)


def _safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:  # reads the header only; it fails if the header does not cover the file (truncation)
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    shapes[name] = tuple(st.get_slice(name).get_shape())
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ConfigError(f"{f} is not a readable safetensors file ({one_line(e)}); "
                              "re-download or re-save the weights") from e
    return shapes


def _load_bin(f: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model*.bin state dict through torch's weights-only unpickler (memory-mapped when zip-format)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
    except pickle.UnpicklingError as e:  # its text suggests weights_only=False, which would run the file's code
        raise ConfigError(
            f"{f} holds pickled objects that are not plain tensors (code that would run when loaded) or corrupt "
            "bytes, so torch's safe loader refuses it and Ember does not load it: convert the checkpoint to "
            "safetensors from a trusted copy of the model"
        ) from e
    except Exception as e:  # noqa: BLE001 - truncated zip, garbage bytes, ...
        raise ConfigError(f"{f} could not be read as a PyTorch checkpoint ({one_line(e)}); "
                          "re-download the weights or convert them to safetensors") from e
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ConfigError(f"{f} does not hold a state dict (a mapping of names to tensors); "
                          "save the model with save_pretrained or convert it to safetensors")
    return sd


def check_sizes_against_weights(cfg: DecoderConfig, index: WeightIndex, where: str) -> None:
    """Fail, naming the config.json field, when a size in ``cfg`` disagrees with the weights' shapes."""
    fam = family(cfg.family)
    names = fam.hf_field_names
    shapes = {k.removeprefix(fam.weight_prefix): v for k, v in index.shapes.items()}
    layer_name = fam.layer_prefix
    pattern = re.compile(rf"{layer_name}\.(\d+)\.")
    layers = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    if not layers:
        raise ConfigError(f"{where}: the weight files hold no {layer_name}.N.* layer tensors, so they are not a "
                          f"{cfg.model_type or cfg.family} checkpoint: use the weights that belong to this config")
    if len(layers) != max(layers) + 1:  # the first gap is at most len(layers): no range over a hostile index
        gap = next(i for i in range(len(layers) + 1) if i not in layers)
        raise ConfigError(f"{where}: the weights hold {layer_name}.{max(layers)} but no {layer_name}.{gap}; "
                          "the weight files are incomplete: re-download all of them")
    if cfg.num_layers != max(layers) + 1:
        raise ConfigError(f"{where}: {names['num_layers']}={cfg.num_layers} but the weights hold {max(layers) + 1} layers "
                          f"({layer_name}.0 to {layer_name}.{max(layers)}); set {names['num_layers']} to {max(layers) + 1} "
                          "or use the weights that belong to this config")
    for fieldname, tensor, dim, divisor in fam.size_tensors:
        shape = shapes.get(tensor)
        if shape is None or len(shape) <= dim:
            continue  # absent: the parameter count below and the load itself still catch it
        _expect(where, names[fieldname], getattr(cfg, fieldname), shape[dim] // divisor, f"{tensor} has shape {list(shape)}")
    kv = shapes.get(fam.kv_proj) if fam.kv_proj else None
    if kv and len(kv) == 2 and kv[0] % cfg.head_dim == 0:
        _expect(where, names["num_kv_heads"], cfg.num_kv_heads, kv[0] // cfg.head_dim,
                f"{fam.kv_proj} has {kv[0]} rows = {kv[0] // cfg.head_dim} heads of {cfg.head_dim}")


def _expect(where: str, key: str, value: int, actual: int, evidence: str) -> None:
    if value != actual:
        raise ConfigError(f"{where}: {key}={value} but the weights say {actual} ({evidence}); "
                          f"set {key} to {actual} or use the weights that belong to this config")


def check_parameter_count(n_params: int, index: WeightIndex, where: str) -> None:
    """A backstop for sizes no tensor pinned down: the model the config implies must fit in the weights."""
    if n_params > index.num_values:
        raise ConfigError(f"{where}: the config implies {n_params:,} parameters but the weight files hold only "
                          f"{index.num_values:,} values; set the config's sizes to the model's or use its full weights")
