"""Named parameter profiles (smoke / cpu / gpu) for the report notebooks, and command-line overrides.

A profile is `{"common": {...}, "<notebook stem>": {...}}` of overrides of the notebooks' own defaults
(their `parameters` cells, which are the `cpu` profile). The parameters a notebook gets are its defaults,
then common, then its own entry, then `--set key=value` (all notebooks), then `--set stem.key=value`; the
runner passes on only the names the notebook's `parameters` cell declares.
"""

from __future__ import annotations

import ast
import copy
import json
from collections.abc import Iterable
from typing import Any

DEFAULT_PROFILE = "cpu"
ALL = "*"  # key of the overrides that apply to every notebook

# The notebooks' parameter cells are the one source of defaults, and they are the `cpu` profile: SmolLM2-135M
# on a laptop CPU, the whole report in well under an hour. Other profiles only override.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {"common": {}},
    "smoke": {  # minutes: checks that every notebook runs end to end on the random-weight toy model
        "common": {"model": "tiny"},
        "01_kv_cache": {
            "batch_sizes": [1, 2],
            "prompt_len": 8,
            "new_tokens": 8,
            "sweep_batch_sizes": [1, 2],
            "sweep_lengths": [4, 8],
            "repeats": 1,
            "check_new_tokens": 8,
        },
        "02_lora": {
            "train_examples": 4,
            "max_len": 512,
            "accum_steps": 1,
            "steps": 2,
            "ranks": [4, 16],
            "compare_steps": 1,
            "learn_epochs": 1,
            "learn_examples": 8,
            "learn_batch": 2,
            "learn_max_len": 512,
            "eval_examples": 2,
            "eval_every": 2,
            "n_prompts": 2,
            "gen_tokens": 8,
        },
        "03_amp": {"train_examples": 4, "max_len": 512, "steps": 2},
        "04_checkpointing": {
            "max_len": 512,
            "checkpointing": [0, 1],
            "lengths": [128, 256, 512],
            "peak_lengths": [],
        },
        "05_accumulation": {"max_len": 512, "micro_batches": [4, 1], "steps": 2},
        "07_quantization": {  # what the toy model and any CPU with AVX2 can run: no GGUF, no llama.cpp
            "paths": ["fp32", "fp32 compiled", "int8", "int4 g32"],
            "anchors": ["transformers fp32"],
            "batch_sizes": [1, 2],
            "prompt_len": 8,
            "new_tokens": 8,
            "repeats": 1,
            "eval_examples": 4,
            "agree_tokens": 8,
            "attention_kernels": ["sdpa math", "sdpa flash", "model.py math"],
            "attention_batch_sizes": [1],
            "attention_lengths": [64, 128],
        },
        "08_qlora": {
            "train_examples": 4,
            "max_len": 512,
            "micro_batch": 2,
            "steps": 2,
            "eval_examples": 2,
            "eval_every": 2,
            "qat_group_sizes": [32],
            "dequant_tokens": 16,
            "budget_models": ["llama-3.2-1b"],
        },
    },
    "gpu": {  # one CUDA GPU and the reference settings; the model must be given with --model PATH_OR_HUB_ID
        "common": {"model": None, "device": "cuda"},
        "01_kv_cache": {
            "prompt_len": 64,
            "new_tokens": 64,
            "repeats": 5,
            "uncached_repeats": 5,
            "sweep_batch_sizes": [1, 8, 16],
            "sweep_lengths": [16, 32, 64, 128, 256],
            "check_new_tokens": 64,
        },
        "02_lora": {
            "train_examples": 200,
            "max_len": 256,
            "micro_batch": 2,
            "accum_steps": 8,
            "steps": 25,
            "mixed_precision": "fp16",
            "compare_steps": 5,
            "learn_epochs": 3,
            "learn_batch": 16,
            "eval_every": 5,
            "gen_tokens": 64,
        },
        "03_amp": {"train_examples": 200, "max_len": 256, "micro_batch": 2, "accum_steps": 8, "steps": 25},
        "04_checkpointing": {
            "train_examples": 200,
            "max_len": 256,
            "micro_batch": 4,
            "steps": 3,
            "lengths": [128, 256, 512, 1024],
            "peak_lengths": [512],
            "time_rounds": 5,
        },
        "05_accumulation": {
            "train_examples": 200,
            "max_len": 256,
            "steps": 12,
            "effective_batch": 16,
            "micro_batches": [16, 8, 4, 2, 1],
        },
        "07_quantization": {  # Q4_1 needs a GGUF file and llama.cpp the CPU: those rows say so
            "repeats": 5,
            "new_tokens": 128,
            "attention_lengths": [128, 256, 512, 1024, 2048, 4096, 8192],
            "max_scores_gb": 64.0,
        },
        "08_qlora": {  # one epoch of the 200 examples, the reference's length; fp16 runs on any CUDA GPU
            "train_examples": 200,
            "max_len": 256,
            "micro_batch": 8,
            "steps": 25,
            "eval_examples": 100,
            "eval_every": 5,
            "mixed_precision": "fp16",
            "dequant_tokens": 2048,
        },
    },
}


def parse_value(text: str) -> Any:
    """Parse a command-line value as a Python or JSON literal, else keep it as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_overrides(items: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Parse `key=value` / `stem.key=value` strings into `{"*": {...}, "<stem>": {...}}`."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, value = item.partition("=")
        if not sep or not target.strip():
            raise ValueError(
                f"--set {item!r}: expected key=value or notebook.key=value, e.g. --set repeats=5"
            )
        stem, _, key = target.strip().rpartition(".")
        if not key.isidentifier():
            raise ValueError(f"--set {item!r}: {key!r} is not a valid parameter name")
        overrides.setdefault(stem or ALL, {})[key] = parse_value(value.strip())
    return overrides


def check_profile(profile: str, overrides: dict[str, dict[str, Any]] | None = None) -> None:
    """Raise ValueError if `profile` is unknown or leaves a required common value (the model) unset."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    common = {**PROFILES[profile]["common"], **(overrides or {}).get(ALL, {})}
    if "model" in common and common["model"] is None:
        raise ValueError(
            f"profile {profile!r} has no default model: pass --model PATH_OR_HUB_ID "
            "(a local model directory or .gguf file, or a Hugging Face hub id already in the cache)"
        )


def merged(profile: str, stem: str, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """All parameters for notebook `stem`: common, then its profile entry, then the overrides."""
    overrides = overrides or {}
    entry = PROFILES[profile]
    params = {**entry["common"], **entry.get(stem, {}), **overrides.get(ALL, {}), **overrides.get(stem, {})}
    return copy.deepcopy(params)


def for_notebook(
    profile: str, stem: str, declared: Iterable[str], overrides: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The merged parameters of notebook `stem`, restricted to the names it `declared`."""
    declared = set(declared)
    return {k: v for k, v in merged(profile, stem, overrides).items() if k in declared}


def check_overrides(overrides: dict[str, dict[str, Any]], declared: dict[str, dict[str, dict]]) -> None:
    """Raise ValueError for an override no notebook being run declares (listing the valid names), or whose
    value does not have the parameter's declared type. `declared`: stem -> papermill's parameter info."""
    problems = []
    for stem, values in overrides.items():
        targets = declared if stem == ALL else {stem: declared.get(stem)}
        if targets.get(stem) is None and stem != ALL:
            problems.append(
                f"--set {stem}.*: notebook {stem!r} is not being run (running: {', '.join(declared)})"
            )
            continue
        for key, value in values.items():
            where = key if stem == ALL else f"{stem}.{key}"
            infos = [params[key] for params in targets.values() if key in params]
            if not infos:
                valid = sorted(set().union(*(targets.values())))
                problems.append(f"--set {where}: no such parameter; valid names: {', '.join(valid)}")
            elif problem := _type_problem(value, infos[0].get("inferred_type_name", "None")):
                problems.append(f"--set {where}={value!r}: {problem}")
    if problems:
        raise ValueError("\n  ".join(["bad --set overrides:", *problems]))


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "list": (list, tuple)}


def _type_problem(value: Any, declared: str) -> str:
    """Why `value` does not fit a declared type such as "int", "list" or "str | None" ("" when it fits)."""
    names = [t.strip() for t in declared.split("|")]
    if value is None and "None" in names:
        return ""
    types = [_TYPES[n] for n in names if n in _TYPES]
    if not types:
        return ""  # an unannotated or exotic type: nothing to check against
    ok = any(isinstance(value, t) and not (isinstance(value, bool) and bool not in t) for t in types)
    return "" if ok else f'expected {declared}, got {type(value).__name__} (quote strings, e.g. key="text")'
