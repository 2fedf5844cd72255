"""Typed reading of Hugging Face ``config.json`` fields, shared by every family file.

Each helper checks one field's type and range and names the field (and the fix) when it is
wrong, so a malformed config fails at compile time instead of deep inside the model build.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ember.errors import ConfigError

_REQUIRED = object()


def show(v: Any) -> str:
    """A value as JSON, cut short: error messages stay one readable line."""
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def json_kind(v: Any) -> str:
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def int_field(cfg: dict[str, Any], key: str, where: str, minimum: int = 1, default: Any = _REQUIRED) -> Any:
    """``cfg[key]`` as a whole number >= ``minimum``; null/absent gives ``default`` (or an error if required)."""
    v = cfg.get(key)
    if v is None:
        if default is _REQUIRED:
            raise ConfigError(f"{where}: required field {key!r} is missing; add it with the model's value "
                              f"(a whole number >= {minimum})")
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{where}: field {key}={show(v)} is not a whole number; "
                          f"write the model's value as a JSON integer >= {minimum}")
    if v < minimum:
        raise ConfigError(f"{where}: field {key}={v} must be >= {minimum}; set it to the model's value")
    return v


def float_field(cfg: dict[str, Any], key: str, where: str, default: float | None,
                 positive: bool = False) -> float | None:
    """``cfg[key]`` as a finite number (> 0 if ``positive``, else >= 0); null/absent gives ``default``."""
    v = cfg.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where}: field {key}={show(v)} is {json_kind(v)}, not a number; "
                          "write the model's value as a JSON number")
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ConfigError(f"{where}: field {key}={v} must be a finite number {'>' if positive else '>='} 0; "
                          "set it to the model's value")
    return float(v)


def bool_field(cfg: dict[str, Any], key: str, where: str, default: bool) -> bool:
    v = cfg.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: field {key}={show(v)} is {json_kind(v)}, not a boolean; write true or false")
    return v


def token_id_field(cfg: dict[str, Any], key: str, where: str) -> int | None:
    """A token id, or the first of a list of ids (generation configs list several EOS ids)."""
    v = cfg.get(key)
    if isinstance(v, list):
        v = {key: v[0]} if v else {}
        return int_field(v, key, where, minimum=0, default=None)
    return int_field(cfg, key, where, minimum=0, default=None)


def reject(cfg: dict[str, Any], key: str, ok, where: str, why: str) -> None:
    """Fail naming ``key`` when it is present and ``ok(value)`` is false (an unsupported feature)."""
    if key in cfg and not ok(cfg[key]):
        raise ConfigError(f"{where}: field {key}={cfg[key]!r} is not supported ({why})")


def float_list_field(cfg: dict[str, Any], key: str, where: str, length: int) -> tuple[float, ...]:
    """A list of ``length`` finite positive numbers (LongRoPE's per-frequency factors)."""
    v = cfg.get(key)
    if not isinstance(v, list) or len(v) != length or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in v):
        raise ConfigError(f"{where}: field {key} must be a list of {length} positive numbers (one per rotary "
                          f"frequency); got {show(v)}: set it to the model's value")
    return tuple(float(x) for x in v)


def read_json_object(path: Path, what: str = "file") -> dict[str, Any]:
    """A JSON object from ``path``; not UTF-8, not JSON, or not an object -> ConfigError naming the file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}); restore the model's original {what}") from e
    except OSError as e:
        raise ConfigError(f"{path} cannot be read ({e.strerror}); check the file and its permissions") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                          f"restore the model's original {what}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds {json_kind(data)}, not a JSON object; restore the model's original {what}")
    return data


