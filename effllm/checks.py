"""Validation at effllm's public boundary: one small set of checks, each error naming what was wrong.

Every check raises `InputError` (a ValueError) or `ConfigError` (a bad file: an InputError that names
the path) with the offending name, value and, where it helps, what to do. Loading, generation, training,
data and the report's command line call these instead of scattered `if`s.
"""

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


class InputError(ValueError):
    """A value given to effllm is not usable: the message names it, its value and what to do."""


class ConfigError(InputError):
    """A file given to effllm (config, index, adapter, GGUF) is malformed: the message names the path."""


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`, or ConfigError naming the file, the position of the error and `what`."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: {what} is not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {what} must be a JSON object, got a {type(value).__name__}")
    return value


def integer(name: str, value: Any, *, minimum: int | None = None) -> int:
    """`value` as an int (a bool or a float is refused), at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be at least {minimum}, got {value}")
    return value


def number(name: str, value: Any, *, minimum: float | None = None, positive: bool = False) -> float:
    """`value` as a finite float, at least `minimum` (or above zero when `positive`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise InputError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise InputError(f"{name} must be above 0, got {value}")
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be at least {minimum}, got {value}")
    return float(value)


def choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """`value` if it is one of `choices`."""
    choices = list(choices)
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def token_ids(name: str, ids: Any, vocab_size: int, *, dims: int = 2) -> torch.Tensor:
    """`ids` as an integer tensor of `dims` dimensions whose values lie in [0, vocab_size)."""
    if not isinstance(ids, torch.Tensor):
        raise InputError(
            f"{name} must be a torch tensor of token ids, got a {type(ids).__name__} "
            "(e.g. torch.tensor([[1, 2, 3]]) or tokenizer(..., return_tensors='pt').input_ids)"
        )
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InputError(f"{name} must hold integer token ids, got dtype {ids.dtype}; use .long()")
    if ids.dim() != dims:
        raise InputError(f"{name} must have {dims} dimensions (batch, tokens), got shape {tuple(ids.shape)}")
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    return ids


def finite_tensors(where: str, tensors: dict[str, torch.Tensor]) -> None:
    """ConfigError naming the first tensor that holds NaN or inf (weights or adapters read from a file)."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ConfigError(f"{where}: tensor {key!r} holds NaN or inf values; the file is corrupt")
