"""4-bit NormalFloat (NF4) weights with double quantization, as in QLoRA (Dettmers et al., 2023).

A weight is cut into blocks of 64 values; each block is scaled by its absolute maximum and every value is
stored as the index (4 bits, two per byte, the first in the high nibble) of the nearest of the 16 NF4 levels,
the quantiles of a standard normal scaled to [-1, 1]. Double quantization stores the blocks' absmax
constants themselves in 8 bits: their mean is subtracted and the rest quantized block-wise (blocks of 256,
the last one partial) on bitsandbytes' dynamic 8-bit map. The 4-bit codes, the offset and the
second-level constants equal bitsandbytes' `quantize_4bit(quant_type="nf4", blocksize=64,
compress_statistics=True)` on the same tensor; an 8-bit absmax code may be its neighbour at a near-tie
(bitsandbytes' CPU kernel rounds ties its own way).

`NF4Linear` is a frozen linear layer on such a weight: its forward dequantizes to the compute dtype (the
autocast dtype, else the input's) and its backward gives the input gradient (re-dequantizing, so no
full-precision copy is kept for backward), which is what LoRA adapters on a 4-bit base need.
`quantize_base(model, "nf4")` puts every block linear on it; the embedding, head and norms stay as they are.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effllm.checks import InputError, choice
from effllm.lora import lora_layers
from effllm.model import FrozenLinear, block_linears, quantized_base

NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
BLOCK = 64  # weights per absmax constant
STATS_BLOCK = 256  # absmax constants per second-level constant (double quantization)
SCHEMES = ("nf4",)
# a byte's two levels (high nibble first), so that dequantizing looks up two values per byte at once
NF4_PAIRS = tuple((NF4_LEVELS[b >> 4], NF4_LEVELS[b & 15]) for b in range(256))


def dynamic_map(*, max_exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    """bitsandbytes' signed dynamic 8-bit map (Dettmers, 2016): 256 sorted levels in [-1, 1], dense near 0."""
    data: list[float] = []
    non_sign = total_bits - 1
    for i in range(max_exponent_bits):
        boundaries = torch.linspace(0.1, 1, 2 ** (i + non_sign - max_exponent_bits) + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist() + (-scale * means).tolist()  # float32 products, as bitsandbytes
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_MAP = tuple(dynamic_map().tolist())  # a constant: computed once, looked up in fake mode too


def quantize_blockwise(x: Tensor, levels: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Indices (uint8, x's numel) of the nearest level after scaling each block of `block` values by its
    absmax, and the absmax per block (fp32; a last partial block gets its own)."""
    flat = x.reshape(-1).float()
    full = flat.numel() - flat.numel() % block
    blocks = flat[:full].view(-1, block)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < flat.numel():  # the last, partial block (bitsandbytes divides there, and so do we)
        rest = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, rest[None]])
        scaled = torch.cat([scaled, (flat[full:] / rest).clamp(-1, 1)])
    bounds = (levels[:-1] + levels[1:]) / 2
    return torch.bucketize(scaled, bounds.to(x.device)).to(torch.uint8), absmax


def scale_blocks(values: Tensor, absmax: Tensor, block: int) -> Tensor:
    """Flat values times their block's absmax (a last, partial block padded for the product)."""
    n = values.numel()
    padded = values if n == absmax.numel() * block else F.pad(values, (0, absmax.numel() * block - n))
    return (padded.view(-1, block) * absmax[:, None]).reshape(-1)[:n]


def dequantize_blockwise(q: Tensor, absmax: Tensor, levels: Tensor, block: int) -> Tensor:
    return scale_blocks(levels.to(q.device)[q.long()], absmax, block)


@dataclass
class NF4Weight:
    """An NF4 weight: packed codes (uint8, numel/2), the double-quantized absmax (uint8 codes, their fp32
    second-level absmax and offset) and the weight's shape."""

    packed: Tensor
    absmax_codes: Tensor
    absmax_scale: Tensor
    absmax_offset: Tensor
    shape: tuple[int, ...]

    def absmax(self) -> Tensor:
        levels = torch.tensor(DYNAMIC_MAP, device=self.absmax_codes.device)
        stats = dequantize_blockwise(self.absmax_codes, self.absmax_scale, levels, STATS_BLOCK)
        return stats + self.absmax_offset

    def nbytes(self) -> int:
        tensors = (self.packed, self.absmax_codes, self.absmax_scale, self.absmax_offset)
        return sum(t.numel() * t.element_size() for t in tensors)


def quantize_nf4(w: Tensor) -> NF4Weight:
    """NF4 codes of w in blocks of 64 with double-quantized absmax; w's numel must be even."""
    if w.numel() % 2:
        raise InputError(f"NF4 packs two codes per byte: a weight of shape {tuple(w.shape)} has an odd size")
    codes, absmax = quantize_blockwise(w, torch.tensor(NF4_LEVELS, device=w.device), BLOCK)
    offset = absmax.mean()
    levels = torch.tensor(DYNAMIC_MAP, device=w.device)
    absmax_codes, absmax_scale = quantize_blockwise(absmax - offset, levels, STATS_BLOCK)
    packed = (codes[0::2] << 4) | codes[1::2]
    return NF4Weight(packed, absmax_codes, absmax_scale, offset, tuple(w.shape))


def dequantize_nf4(weight: NF4Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight in dtype: both levels of each byte looked up at once, times the block's absmax in fp32."""
    pairs = torch.tensor(NF4_PAIRS, device=weight.packed.device)  # (256, 2)
    values = pairs.index_select(0, weight.packed.int()).view(-1)  # (numel,) fp32; 4x faster than []
    return scale_blocks(values, weight.absmax(), BLOCK).view(weight.shape).to(dtype)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's where it is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _NF4Matmul(torch.autograd.Function):
    """x @ W^T with W dequantized on the fly, forward and backward: only the 4-bit weight is kept."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: "NF4Linear") -> Tensor:
        dtype = compute_dtype(x)
        ctx.layer, ctx.input_dtype = layer, x.dtype
        return F.linear(x.to(dtype), layer.dequantize(dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad @ ctx.layer.dequantize(grad.dtype)).to(ctx.input_dtype), None


class NF4Linear(FrozenLinear):
    """A frozen linear layer (no bias) on an NF4 weight; gradients flow to its input only."""

    storage = "nf4"

    def __init__(self, name: str, weight: NF4Weight):
        super().__init__()
        self.name, self.shape = name, weight.shape
        self.out_features, self.in_features = weight.shape
        for field in ("packed", "absmax_codes", "absmax_scale", "absmax_offset"):
            self.register_buffer(field, getattr(weight, field))

    @staticmethod
    def check(name: str, linear: nn.Linear) -> None:
        """Refuse, naming the layer, a linear NF4Linear cannot hold."""
        if linear.bias is not None:
            raise InputError(f"{name} has a bias: NF4Linear quantizes bias-free Llama linears")
        if linear.weight.numel() % 2:
            raise InputError(f"{name} has {linear.weight.numel()} weights: NF4 packs two per byte (even)")

    @classmethod
    def from_linear(cls, name: str, linear: nn.Linear) -> "NF4Linear":
        cls.check(name, linear)
        return cls(name, quantize_nf4(linear.weight.detach()))

    def weight_state(self) -> NF4Weight:
        return NF4Weight(self.packed, self.absmax_codes, self.absmax_scale, self.absmax_offset, self.shape)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        return dequantize_nf4(self.weight_state(), dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise InputError(f"{self.name} takes {self.in_features} input features, got {x.shape[-1]}")
        return _NF4Matmul.apply(x, self)

    def _apply(self, fn, recurse=True):
        # Moves reach the buffers; a dtype cast (model.to(torch.bfloat16)) must not round the fp32
        # constants, which bitsandbytes likewise keeps apart from the module's dtype.
        device = fn(torch.zeros((), device=self.packed.device)).device
        for name, buffer in self._buffers.items():
            self._buffers[name] = buffer.to(device)
        return self

    def extra_repr(self) -> str:
        return f"{self.name}: in_features={self.in_features}, out_features={self.out_features}, nf4"


def quantize_base(model: nn.Module, scheme: str = "nf4") -> nn.Module:
    """Put every block linear of `model` on a frozen NF4 weight, in place (QLoRA's base); return it.

    The embedding, head and norms stay as they are. Refused, each with the reason: an unknown scheme, a
    model already quantized or already carrying adapters (quantize first, then add LoRA), a layer whose
    shape NF4 cannot pack (named)."""
    choice("quantize_base", scheme, SCHEMES)
    if quantized_base(model) is not None:
        raise InputError("the model's base is already quantized: load it again to quantize it another way")
    if lora_layers(model):
        raise InputError("the model carries LoRA adapters: quantize the base first, then add adapters")
    layers = block_linears(model)
    if not layers:
        raise InputError(f"{type(model).__name__} has no block linears to quantize")
    for name, module, child in layers:  # every layer checked before any is replaced
        NF4Linear.check(name, getattr(module, child))
    for name, module, child in layers:  # the full-precision weight is freed as each layer is replaced
        setattr(module, child, NF4Linear.from_linear(name, getattr(module, child)))
    model.quantization = {"scheme": scheme, "block": BLOCK, "stats_block": STATS_BLOCK}
    return model
