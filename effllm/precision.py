"""Mixed precision (Micikevicius et al., 2018): the forward's autocast context per precision name, and a
probe that says why a precision cannot run on a device before a configuration is attempted.

fp16 autocast pairs with dynamic loss scaling (`torch.amp.GradScaler`, in `effllm.train`); bf16 autocast
needs none; bf16-pure casts the whole model, master weights included. `DTYPES` is the project's one
vocabulary of dtype names (fp32, bf16, fp16), used for weights, caches and results alike.
"""

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16, "bf16-pure": None}


def dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name (fp32, bf16, fp16)."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a torch dtype in the project's vocabulary (torch.float32 -> fp32)."""
    names = {v: k for k, v in DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"dtype {dtype} has no name here; use one of {', '.join(DTYPES)}")
    return names[dtype]


def autocast(device: torch.device, precision: str):
    """The forward's autocast context for a precision name (a no-op for fp32 and bf16-pure)."""
    if precision not in AUTOCAST:
        raise ValueError(f"precision must be one of {', '.join(AUTOCAST)}, got {precision!r}")
    dtype = AUTOCAST[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def precision_problem(precision: str, device: torch.device) -> str:
    """Why this precision cannot run on this device ('' when it can), found by a tiny forward + backward."""
    autocast(device, precision)  # validates the name
    if precision == "fp32":
        return ""
    try:
        dtype = torch.bfloat16 if precision == "bf16-pure" else AUTOCAST[precision]
        x = torch.ones(
            4, 4, device=device, dtype=dtype if precision == "bf16-pure" else None, requires_grad=True
        )
        with autocast(device, precision):
            y = x @ x
        if y.dtype != dtype:
            return f"{precision}: autocast on {device.type} gives {y.dtype}, not {dtype}"
        y.float().sum().backward()
        if precision == "fp16":
            torch.amp.GradScaler(device.type)
    except (RuntimeError, TypeError, AssertionError) as e:
        return f"{precision} is not supported on {device.type} by torch {torch.__version__}: {e}"
    return ""
