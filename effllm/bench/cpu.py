"""What the CPU is and which arithmetic it has, read once from /proc/cpuinfo (no torch import)."""

import platform
from functools import lru_cache
from pathlib import Path

# The flags that decide whether 16-bit arithmetic can be fast on a CPU.
HALF_FLAGS = {
    "avx512f": "AVX-512",
    "avx512_bf16": "AVX-512 BF16 dot products",
    "amx_bf16": "AMX BF16 tiles",
    "avx512_fp16": "AVX-512 FP16 arithmetic",
    "amx_fp16": "AMX FP16 tiles",
    "f16c": "F16C fp16<->fp32 conversion",
}


def cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor's fields of a /proc/cpuinfo text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


@lru_cache(maxsize=1)
def _fields() -> dict[str, str]:
    try:
        return cpuinfo_fields(Path("/proc/cpuinfo").read_text())
    except OSError:
        return {}


def cpu_name(fields: dict[str, str] | None = None) -> str:
    """The CPU's model name, with its family and model numbers (VMs often report a bare 'AMD EPYC')."""
    fields = _fields() if fields is None else fields
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    ids = [f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields]
    return fields["model name"] + (f" ({', '.join(ids)})" if ids else "")


def cpu_flags(fields: dict[str, str] | None = None) -> set[str]:
    """The feature flags Linux reports for the CPU (empty where /proc/cpuinfo is missing)."""
    fields = _fields() if fields is None else fields
    return set(fields.get("flags", "").split())


def half_precision_flags(fields: dict[str, str] | None = None) -> dict[str, bool]:
    """Each 16-bit arithmetic feature of HALF_FLAGS, by its readable name: present or not."""
    flags = cpu_flags(fields)
    return {name: flag in flags for flag, name in HALF_FLAGS.items()}
