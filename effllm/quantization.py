"""Weight-only quantization of the blocks' linears onto PyTorch's own CPU kernels, as gpt-fast does.

int8: symmetric per output channel, w = q * s with q in [-128, 127], on `aten._weight_int8pack_mm`.
int4: asymmetric per group of `group_size` inputs, w = (q - 8) * s + z with q in [0, 15] (the kernel's
form; z = min + 8 s), on `aten._weight_int4pack_mm_for_cpu`. Activations keep the model's dtype: load the
model in bf16, for which the CPU kernels are vectorised (in fp32 they are slower than fp32 weights). Only the
attention and MLP linears of the blocks are quantized; the embedding and the output head stay as they are.
The quantized weights are buffers, not parameters: a quantized model decodes, it does not train (adapters
on a frozen 4-bit base are QLoRA's).
"""

import torch
from torch import Tensor, nn

from effllm.checks import InputError, choice, integer
from effllm.lora import lora_layers

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8: (q (N, K) int8, scales (N,)) with w ~ q * scales[:, None]."""
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: Tensor, scales: Tensor) -> Tensor:
    return q.float() * scales.float()[:, None]


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group-wise asymmetric int4: (q (N, K) int32 in [0, 15], scales (K/g, N), zeros (K/g, N)) with
    w ~ (q - 8) * scale + zero in each group of `group_size` consecutive inputs."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (N, K/g)
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    return q, scales.T.contiguous(), (lo + 8 * scales).T.contiguous()


def dequantize_int4(q: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    s = scales.float().T.repeat_interleave(group_size, dim=1)
    z = zeros.float().T.repeat_interleave(group_size, dim=1)
    return (q.float() - 8) * s + z


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 and one scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scales = quantize_int8(linear.weight.detach().float())
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.to(linear.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales.to(x.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """y = x W^T with W stored as packed int4 and a scale and zero per group of `group_size` inputs."""

    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = (
            linear.in_features,
            linear.out_features,
            group_size,
        )
        q, scales, zeros = quantize_int4(linear.weight.detach(), group_size)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        dtype = linear.weight.dtype
        self.register_buffer("scales_and_zeros", torch.stack([scales, zeros], dim=-1).to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        sz = self.scales_and_zeros.to(x.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, self.group_size, sz)
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize(model: nn.Module, scheme: str, *, group_size: int | None = None) -> nn.Module:
    """Replace the blocks' linears of `model` in place by int8 or int4 (group-wise) ones; return it.

    Refused, each with the reason: an unknown scheme or group size, a group size that does not divide a
    layer's inputs (the layer is named), a model already quantized or carrying LoRA adapters, a device
    other than the CPU (the CUDA kernels are not wired yet).
    """
    choice("scheme", scheme, SCHEMES)
    if scheme == "int4":
        choice("group_size", integer("group_size", group_size, minimum=1), GROUP_SIZES)
    elif group_size is not None:
        raise InputError("group_size applies to int4 only; int8 has one scale per output channel")
    if any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules()):
        raise InputError("the model is already quantized: load it again to quantize with another scheme")
    if lora_layers(model):
        raise InputError("the model carries LoRA adapters: quantize the base before adding adapters")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise InputError(f"weight-only quantization runs on the CPU kernels; the model is on {device}")
    targets = [
        (name, module, child)
        for name, module in model.named_modules()
        for child in LINEARS
        if isinstance(getattr(module, child, None), nn.Linear) and name.startswith("layers.")
    ]
    if scheme == "int4":
        for name, module, child in targets:
            k = getattr(module, child).in_features
            if k % group_size:
                raise InputError(f"{name}.{child} has {k} inputs, not a multiple of group_size {group_size}")
    for _name, module, child in targets:
        linear = getattr(module, child)
        setattr(module, child, Int8Linear(linear) if scheme == "int8" else Int4Linear(linear, group_size))
    model.requires_grad_(False)
    return model
