"""Measure the same way everywhere: synchronise, discard warm-up, repeat, report median and spread.

Peak memory: on CUDA, max allocated and reserved after a reset; on CPU, the peak resident set of a fresh
process per configuration (`isolated`), so one configuration's peak cannot bleed into the next. Machine
ceilings (read bandwidth, matmul rate) are measured here too, for roofline fractions.
"""

import contextlib
import ctypes
import gc
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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


@contextlib.contextmanager
def cuda_peak(device: torch.device | str):
    """Yields a dict that receives peak_allocated_bytes and peak_reserved_bytes of the block (CUDA only)."""
    out: dict = {}
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    yield out
    torch.cuda.synchronize(device)
    out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)


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
    """Start a new peak-RSS window (Linux clear_refs 5) so loading is not counted; returns the RSS now.

    Freed heap pages are handed back first, so the window's growth is measured from live memory.
    """
    gc.collect()
    trim_heap()
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    return _status_bytes("VmRSS") or 0


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


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(exc).lower()


def isolated(target: str, kwargs: dict, *, timeout: float | None = None) -> dict:
    """Run `module:function(**kwargs)` in a fresh Python process; its result dict plus status and peak RSS.

    A crash or an out-of-memory kill becomes {"status": "oom" | "error", "reason": ...}, never an exception.
    """
    cmd = [sys.executable, "-m", "effllm.measure", target, json.dumps(kwargs)]
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
    base = reset_peak_rss()  # the function may reset again once its model is loaded
    try:
        result = {"status": "ok", "reason": "", **fn(**json.loads(kwargs_json))}
    except Exception as exc:  # a failed configuration is a result row, not a crash
        result = {"status": "oom" if is_oom(exc) else "error", "reason": f"{type(exc).__name__}: {exc}"[:500]}
    result.setdefault("baseline_rss_bytes", base)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result), flush=True)


def read_bandwidth(*, size_mb: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Memory read bandwidth in bytes/s: the best of several sums over a buffer larger than the caches."""
    x = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32, device=device)
    best = min(time_fn(lambda: x.sum(), device=device, repeats=repeats)["times"])
    return x.numel() * 4 / best


def linear_read_bandwidth(
    *,
    in_features: int = 576,
    out_features: int = 1536,
    total_mb: int = 256,
    threads: int | None = None,
    repeats: int = 3,
    device: str = "cpu",
) -> float:
    """Bytes/s at which batch-1 linear layers (x @ W^T, x of one row) read their weights, as in decoding.

    The layers together exceed the caches, so every weight comes from memory; on CPU `threads` sets
    torch's intra-op threads for the measurement (restored after).
    """
    n = max(1, total_mb * 2**20 // (4 * in_features * out_features))
    weights = [torch.randn(out_features, in_features, device=device) for _ in range(n)]
    x = torch.randn(1, in_features, device=device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        best = min(
            time_fn(lambda: [F.linear(x, w) for w in weights], device=device, repeats=repeats)["times"]
        )
    finally:
        torch.set_num_threads(before)
    return n * out_features * in_features * 4 / best


def matmul_rate(
    *, n: int = 1024, dtype: torch.dtype = torch.float32, repeats: int = 5, device: str = "cpu"
) -> float:
    """Measured dense matmul rate in FLOP/s for (n, n) @ (n, n)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = min(time_fn(lambda: a @ b, device=device, repeats=repeats)["times"])
    return 2 * n**3 / best


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
