"""Attention kernels at prefill: `scaled_dot_product_attention` by backend against the plain-math attention
of `effllm.model`, over sequence lengths, in the model's head layout (grouped-query, causal).

Each backend is forced with `torch.nn.attention.sdpa_kernel`; one this device has no kernel for (the
memory-efficient and cuDNN kernels are CUDA-only) is a row saying so. Peak memory is the peak of the live
tensors the call adds (CUDA: max allocated after a reset; CPU: the profiler's allocation events), and every
backend's output is checked against the math backend's.
"""

import time

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from effllm import checks
from effllm.bench import measure
from effllm.bench.rows import row
from effllm.device import is_oom, resolve_device
from effllm.model import math_attention
from effllm.precision import dtype as torch_dtype

BACKENDS = {
    "sdpa math": SDPBackend.MATH,
    "sdpa flash": SDPBackend.FLASH_ATTENTION,
    "sdpa memory-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa cuDNN": SDPBackend.CUDNN_ATTENTION,
}
PLAIN = "model.py math"  # effllm.model.math_attention: GQA expanded, the (T, T) scores materialised
MATERIALISING = ("sdpa math", PLAIN)
CUDA_ONLY = ("sdpa memory-efficient", "sdpa cuDNN")


def attention_fn(kernel: str):
    """q, k, v (B, H|n_kv, T, hd) -> causal attention (B, H, T, hd), with the chosen kernel."""
    if kernel == PLAIN:
        return lambda q, k, v: math_attention(q, k, v, None)
    backend = BACKENDS[kernel]

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]
            )

    return run


def peak_added_bytes(fn, device: torch.device) -> tuple[int, object]:
    """Peak bytes of tensors fn() allocates beyond those alive before it, and fn()'s result."""
    out = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out.append(fn())
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, out[0]
    return measure.peak_live_tensor_bytes(lambda: out.append(fn())), out[0]


def scores_bytes(batch: int, n_heads: int, length: int) -> int:
    """The fp32 (B, H, T, T) attention scores a materialising kernel holds (before its softmax copy)."""
    return batch * n_heads * length * length * 4


def attention_rows(
    *,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    batch_sizes: list[int],
    lengths: list[int],
    kernels: list[str],
    dtype_name: str = "fp32",
    repeats: int = 3,
    max_scores_gb: float = 4.0,
    device: str = "cpu",
    progress=iter,
) -> list[dict]:
    """Prefill attention time, added peak memory and largest difference from sdpa math, per kernel x batch
    x length; a kernel the device lacks (or that runs out of memory) is a row with its status and reason.

    The materialising kernels (sdpa math and model.py's) are skipped, with the reason, where their scores
    alone would exceed max_scores_gb; the max_abs_diff rows need sdpa math first in kernels."""
    unknown = [k for k in kernels if k not in (*BACKENDS, PLAIN)]
    if unknown:
        raise checks.InputError(
            f"unknown attention kernel {unknown}; choose from {', '.join([*BACKENDS, PLAIN])}"
        )
    for name, values in (("batch_sizes", batch_sizes), ("lengths", lengths)):
        for v in values:
            checks.integer(f"a value of {name}", v, minimum=1)
    device, dt = resolve_device(device), torch_dtype(dtype_name)
    gen = torch.Generator(device).manual_seed(0)
    rows = []
    for b, t in progress([(b, t) for b in batch_sizes for t in lengths]):
        shape = lambda h: (b, h, t, head_dim)  # noqa: B023
        q = torch.randn(shape(n_heads), generator=gen, device=device, dtype=dt)
        k, v = (torch.randn(shape(n_kv_heads), generator=gen, device=device, dtype=dt) for _ in "kv")
        params = dict(batch=b, length=t, dtype=dtype_name, device=str(device))
        reference = None
        for kernel in kernels:
            measured, out = _kernel_rows(kernel, q, k, v, reference, params, repeats, max_scores_gb)
            rows += measured
            if kernel == "sdpa math" and out is not None:
                reference = out  # what the kernels after it are checked against
    return rows


def _kernel_rows(
    kernel, q, k, v, reference, params, repeats, max_scores_gb
) -> tuple[list[dict], Tensor | None]:
    """One kernel's rows at one shape, and its output (None when it did not run)."""
    fn, device = attention_fn(kernel), q.device
    if kernel in CUDA_ONLY and device.type != "cuda":
        reason = f"{kernel} has no {device.type} kernel: PyTorch ships it for CUDA only"
        return [row("runtime_s", None, status="unsupported", reason=reason, kernel=kernel, **params)], None
    need = scores_bytes(q.shape[0], q.shape[1], q.shape[2])
    if kernel in MATERIALISING and need > max_scores_gb * 1e9:
        reason = f"its (B, H, T, T) scores need {need / 1e9:.1f} GB, over max_scores_gb={max_scores_gb}"
        return [row("runtime_s", None, status="skipped", reason=reason, kernel=kernel, **params)], None
    try:
        t0 = time.perf_counter()
        peak, out = peak_added_bytes(lambda: fn(q, k, v), device)  # also the warm-up
        slow = time.perf_counter() - t0 > 2  # a long call is its own warm-up: time it once more
        warmup, n = (0, 1) if slow else (1, repeats)
        timing = measure.time_fn(lambda: fn(q, k, v), device=device, warmup=warmup, repeats=n)
    except RuntimeError as e:
        status = "oom" if is_oom(e) else "unsupported"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}"[:300]
        return [row("runtime_s", None, status=status, reason=reason, kernel=kernel, **params)], None
    rows = [
        row("runtime_s", timing["median_s"], kernel=kernel, **params),
        row("peak_bytes", peak, kernel=kernel, **params),
    ]
    if reference is not None:
        diff = (out.float() - reference.float()).abs().max().item()
        rows.append(row("max_abs_diff", diff, kernel=kernel, **params))
    return rows, out
