"""Measure the same way everywhere: synchronise, discard warm-up, repeat, report median and spread.

Peak memory comes from one helper, `peak_window`: on CUDA, max allocated and reserved after a reset; on
the CPU, the peak resident set after resetting the high-water mark. `isolated` runs a configuration in a
fresh process, so one configuration's peak cannot bleed into the next (as optimum-benchmark does).
"""

import contextlib
import ctypes
import gc
import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import torch

from effllm.checks import InputError
from effllm.device import is_oom, sync


def time_fn(
    fn: Callable[[], object], *, device: torch.device | str = "cpu", warmup: int = 1, repeats: int = 3
) -> dict:
    """Wall times of fn() after warm-up runs: median, min, max (seconds) and every repeat."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times": times}


def run_median(runs: list[dict], key: str) -> float:
    """The median run's value of `key`, a value one run measured (of an even count, the upper: the slower
    of two timings)."""
    return sorted(r[key] for r in runs)[len(runs) // 2]


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def peak_rss_bytes() -> int:
    """Peak resident set of this process since start or the last `reset_peak_rss`."""
    hwm = _status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc `malloc_trim`), so the resident set counts live memory.

    Without it, memory freed while loading (e.g. a model copy converted and dropped) stays resident and is
    silently reused later, hiding that much of the next phase's growth.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> int:
    """Start a new peak-RSS window (Linux clear_refs 5) from live memory; returns the resident set now."""
    gc.collect()
    trim_heap()
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    return _status_bytes("VmRSS") or 0


@contextlib.contextmanager
def peak_window(device: torch.device | str) -> Iterator[dict]:
    """Yields a dict that receives the block's memory peak once it ends.

    CUDA: peak_allocated_bytes and peak_reserved_bytes after a reset. CPU: baseline_rss_bytes (the resident
    set at the start, weights included when loaded before) and peak_rss_bytes (the block's high-water mark).
    """
    device, out = torch.device(device), {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    else:
        out["baseline_rss_bytes"] = reset_peak_rss()
        yield out
        out["peak_rss_bytes"] = peak_rss_bytes()


def peak_live_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensors alive during fn() beyond those alive when it starts (profiler events).

    The counterpart on CPU of CUDA's max_memory_allocated: what the tensors need, without the allocator's
    slack (freed memory glibc keeps for reuse), which the resident set includes.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type().name == "CPU":  # allocations positive, frees negative
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def step_times(records: list[dict], *, warmup_steps: int = 1) -> dict:
    """Median step and micro-step times and tokens/s of train() records after the first warmup_steps."""
    kept = [r for r in records if r["step"] > warmup_steps]
    if not kept:
        return dict(
            step_s=math.nan, micro_step_s=math.nan, tokens_per_s=math.nan, total_tokens_per_s=math.nan
        )
    step_s = statistics.median(r["step_s"] for r in kept)
    return {
        "step_s": step_s,
        "micro_step_s": statistics.median(r["micro_step_s"] for r in kept),
        "tokens_per_s": statistics.median(r["tokens"] for r in kept) / step_s,  # target tokens
        "total_tokens_per_s": statistics.median(r["total_tokens"] for r in kept) / step_s,  # all positions
    }


def isolated(target: str, kwargs: dict, *, timeout: float | None = None) -> dict:
    """Run `module:function(**kwargs)` in a fresh Python process; its result dict plus status and peak RSS.

    A crash or an out-of-memory kill becomes {"status": "oom" | "error", "reason": ...}, never an exception;
    a configuration refused as bad input (`checks.InputError`: a scheme this CPU lacks the kernels for, a
    GGUF-only path on another model) is "unsupported".
    """
    cmd = [sys.executable, "-m", "effllm.bench.measure", target, json.dumps(kwargs)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ})
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    if proc.returncode in (-9, 137):
        return {"status": "oom", "reason": "killed by the kernel (out of memory)"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "error", "reason": f"exit {proc.returncode}: {tail}"}


def _child(target: str, kwargs_json: str) -> None:
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    base = reset_peak_rss()  # the function opens its own peak_window once its model is loaded
    try:
        result = {"status": "ok", "reason": "", **fn(**json.loads(kwargs_json))}
    except Exception as exc:  # a failed configuration is a result row, not a crash
        status = "oom" if is_oom(exc) else "unsupported" if isinstance(exc, InputError) else "error"
        result = {"status": status, "reason": f"{type(exc).__name__}: {exc}"[:500]}
    result.setdefault("baseline_rss_bytes", base)
    result.setdefault("peak_rss_bytes", peak_rss_bytes())
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
