"""Hardware ceilings measured on the run's own machine, for roofline fractions: the memory read bandwidth,
the rate at which batch-1 linear layers read their weights, the dense matmul rate per dtype, and what the
device offers for 16-bit arithmetic (gpt-fast reports achieved GB/s against the same kind of limit).
"""

import torch
import torch.nn.functional as F

from effllm.bench.cpu import half_precision_flags
from effllm.bench.measure import time_fn
from effllm.bench.rows import row
from effllm.precision import DTYPES


def half_precision_support(device: torch.device | str) -> dict[str, str]:
    """What the device offers for 16-bit arithmetic: CPU feature flags or the GPU's name and capability."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {
            "GPU": torch.cuda.get_device_name(device),
            "compute capability": f"{major}.{minor}",
            "tensor cores (fp16)": "yes" if major >= 7 else "no",
            "bf16": "yes" if torch.cuda.is_bf16_supported() else "no",
        }
    flags = {name: "yes" if present else "no" for name, present in half_precision_flags().items()}
    return {"torch CPU kernels": torch.backends.cpu.get_cpu_capability(), **flags}


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
        run = lambda: [F.linear(x, w) for w in weights]
        best = min(time_fn(run, device=device, repeats=repeats)["times"])
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


def matmul_rows(device: str, n: int) -> list[dict]:
    """Measured (n, n) matmul rate per dtype; a dtype the device cannot multiply is a row with its reason."""
    rows = []
    for name, dtype in DTYPES.items():
        try:
            rate, status, reason = matmul_rate(n=n, dtype=dtype, device=device), "ok", ""
        except RuntimeError as e:
            rate, status, reason = None, "unsupported", f"{type(e).__name__}: {e}"[:200]
        rows.append(row("matmul_flop_s", rate, status=status, reason=reason, dtype=name, n=n))
    return rows


def roofline_rows(
    *, weights_bytes: int, tokens_per_s: float, in_features: int, out_features: int, device: str
) -> list[dict]:
    """Batch-1 decoding against two ceilings: the read bandwidth and the batch-1 linear layers' read rate.

    Each token reads every weight once, so tokens/s <= bandwidth / weight bytes. The linear layers' rate
    is measured with one thread and with all of torch's threads (CPU), to show whether the kernel uses them.
    """
    bandwidth = read_bandwidth(device=device)
    threads = sorted({1, torch.get_num_threads()}) if device == "cpu" else [None]
    linear = {
        t: linear_read_bandwidth(in_features=in_features, out_features=out_features, threads=t, device=device)
        for t in threads
    }
    best = max(linear.values())
    return [
        row("read_bandwidth", bandwidth),
        row("bandwidth_limit_tokens_per_s", bandwidth / weights_bytes),
        row("fraction_of_limit", tokens_per_s * weights_bytes / bandwidth),
        *[row("linear_read_bandwidth", v, threads=t) for t, v in linear.items()],
        row("linear_limit_tokens_per_s", best / weights_bytes),
        row("fraction_of_linear_limit", tokens_per_s * weights_bytes / best),
        row("weights_bytes", weights_bytes),
    ]
