"""Weight-only quantization of the blocks' linears onto PyTorch's own kernels, as gpt-fast does.

int8: symmetric per output channel, w = q * s with q in [-128, 127], on `aten._weight_int8pack_mm` (CPU;
on CUDA a cast-and-scale that torch.compile fuses). int4: asymmetric per group of `group_size` inputs,
w = (q - 8) * s + z with q in [0, 15] (the kernels' form; z = min + 8 s), on
`aten._weight_int4pack_mm_for_cpu` or CUDA's `aten._weight_int4pack_mm`. q4_1: the int4 kernel fed with
a GGUF file's own Q4_1 blocks (ggml's w = q d + m is the kernel's form with s = d, z = m + 8 d, groups of
32): no re-quantization, the weights llama.cpp uses.

Activations keep the model's dtype: load the model in bf16, for which the CPU kernels are vectorised (in
fp32 they are slower than fp32 weights) and which the CUDA int4 kernel requires. The attention and MLP
linears of the blocks are quantized; `head="int8"` also gives the output head an int8 copy (the embedding
lookup keeps its table: it reads a few rows per token). The quantized weights are buffers packed for the
device they were made on: a quantized model decodes, it does not train (adapters on a frozen 4-bit base
are QLoRA's). `save` / `load` keep a quantized model in one safetensors file (no pickle).

QAT (quantization-aware training, int4): `prepare_qat` rounds the frozen block linears onto their int4
grid once and makes each LoRA-adapted one run through the int4 grid of its merged weight W + B A s on every
forward, the gradient passing straight through the rounding (Bengio et al., 2013); `convert_qat` merges
the adapters and quantizes, giving exactly the weights training saw, on the int4 kernel.
"""

import json
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from effllm.checks import ConfigError, InputError, choice, integer
from effllm.lora import lora_layers, remove_lora
from effllm.model import BLOCK_LINEARS, FrozenLinear, Llama, ModelArgs, block_linears, quantized_base

SCHEMES = ("int8", "int4", "q4_1")
GROUP_SIZES = (32, 64, 128, 256)
Q4_1_GROUP = 32  # ggml's Q4_1 block
FORMAT = "effllm-quantized-1"  # the safetensors metadata of a saved quantized model


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8: (q (N, K) int8, scales (N,)) with w ~ q * scales[:, None]."""
    scales = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w.float() / scales[:, None]).clamp(-128, 127).to(torch.int8)
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


def q4_1_to_int4(q: Tensor, d: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ggml Q4_1 (q (N, K) in [0, 15], d and m (N, K/32)) as the kernel's (q, scales, zeros (K/32, N))."""
    d, m = d.float(), m.float()
    return q.to(torch.int32), d.T.contiguous(), (m + 8 * d).T.contiguous()


def fake_quantize_int4(w: Tensor, group_size: int) -> Tensor:
    """w rounded onto its int4 grid (quantize_int4, then back), the gradient passing straight through."""
    q, scales, zeros = quantize_int4(w.detach(), group_size)
    grid = dequantize_int4(q, scales, zeros, group_size).to(w.dtype)
    return grid + (w - w.detach())  # exactly the grid's values; the gradient of w passes unchanged


def pack_nibbles(q: Tensor) -> Tensor:
    """(N, K) values in [0, 15] as (N, K/2) uint8, input 2i in the low nibble: a portable file layout."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


class QuantizedLinear(FrozenLinear):
    """A frozen, quantized stand-in for nn.Linear (no bias): what every quantized layer shares."""

    def __init__(self, name: str, in_features: int, out_features: int):
        super().__init__()
        self.name, self.in_features, self.out_features = name, in_features, out_features

    @property
    def device(self) -> torch.device:
        return self.weight.device  # every quantized layer stores its packed weight as `weight`

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise InputError(
                f"{self.name} is quantized and has no gradients: a quantized model decodes, it does not "
                "train (fine-tune adapters on a 4-bit base with QLoRA, or train the unquantized model)"
            )
        if x.device != self.device:
            raise InputError(
                f"{self.name} was quantized for {self.device}, the input is on {x.device}: move the model "
                "before quantizing (the packed layout is the device's)"
            )
        y = self.matmul(x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8Linear(QuantizedLinear):
    """y = x W^T with W stored as int8 and one scale per output channel."""

    storage = "int8"

    def __init__(self, name: str, q: Tensor, scales: Tensor, dtype: torch.dtype):
        super().__init__(name, q.shape[1], q.shape[0])
        self.register_buffer("weight", q.to(torch.int8))
        self.register_buffer("scales", scales.to(dtype))

    @classmethod
    def from_linear(cls, name: str, linear: nn.Linear) -> "Int8Linear":
        return cls(name, *quantize_int8(linear.weight.detach()), linear.weight.dtype)

    def matmul(self, x: Tensor) -> Tensor:
        scales = self.scales.to(x.dtype)
        if x.device.type == "cpu":
            return torch.ops.aten._weight_int8pack_mm(x, self.weight, scales)
        return nn.functional.linear(x, self.weight.to(x.dtype)) * scales  # fused by torch.compile

    def unpack(self) -> dict[str, Tensor]:
        return {"qweight": self.weight, "scales": self.scales}


class Int4Linear(QuantizedLinear):
    """y = x W^T with W as packed int4 and a scale and zero per group of `group_size` inputs."""

    storage = "int4"

    def __init__(self, name: str, q: Tensor, scales: Tensor, zeros: Tensor, group_size: int, dtype):
        super().__init__(name, q.shape[1], q.shape[0])
        self.group_size, self.packed_on = group_size, q.device
        self.register_buffer("weight", _pack_for_kernel(name, q))
        self.register_buffer("scales_and_zeros", torch.stack([scales, zeros], dim=-1).to(dtype))

    @classmethod
    def from_linear(cls, name: str, linear: nn.Linear, group_size: int) -> "Int4Linear":
        w = linear.weight.detach()
        return cls(name, *quantize_int4(w, group_size), group_size, w.dtype)

    def matmul(self, x: Tensor) -> Tensor:
        sz = self.scales_and_zeros.to(x.dtype)
        if x.device.type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, sz)
        return torch.ops.aten._weight_int4pack_mm(x, self.weight, self.group_size, sz)

    def unpack(self) -> dict[str, Tensor]:
        """q (nibble-packed, `pack_nibbles`), scales and zeros: the portable form `save` writes."""
        if self.weight.device.type != "cpu":
            raise InputError(
                f"{self.name}: save a quantized model from the CPU (its int4 layout is portable)"
            )
        nibbles = torch.stack([self.weight & 15, self.weight >> 4], dim=-1).flatten()
        q = torch.empty(self.out_features * self.in_features, dtype=torch.uint8)
        q[_cpu_layout(self.out_features, self.in_features)] = nibbles
        scales, zeros = self.scales_and_zeros.unbind(-1)
        return {
            "qweight": pack_nibbles(q.reshape(self.out_features, self.in_features)),
            "scales": scales,
            "zeros": zeros,
        }


def _cpu_layout(n: int, k: int) -> Tensor:
    """Where the CPU kernel's packing puts each weight: for nibble j of the packed (N, K/2) buffer, the index
    into q.flatten() it came from. Found by packing the indices themselves, four bits at a time (the packing
    moves nibbles, it does not change them), and checked to be a permutation."""
    index, source = torch.arange(n * k), torch.zeros(n * k, dtype=torch.int64)
    for shift in range(0, max(1, (n * k - 1).bit_length()), 4):
        digit = ((index >> shift) & 15).reshape(n, k).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 1)
        source |= torch.stack([packed & 15, packed >> 4], dim=-1).flatten().long() << shift
    if not torch.equal(source.sort().values, index):
        raise RuntimeError(f"the CPU int4 packing of ({n}, {k}) is not a permutation of its inputs")
    return source


def _pack_for_kernel(name: str, q: Tensor) -> Tensor:
    n, k = q.shape
    if q.device.type == "cpu":
        if n % 16:
            raise InputError(f"{name} has {n} outputs: the CPU int4 kernel needs a multiple of 16")
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    tiles = next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)
    if tiles is None or n % 8:
        raise InputError(f"{name} is ({n}, {k}): the CUDA int4 kernel needs outputs % 8 and inputs % 32")
    packed = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8)  # the CUDA kernel's input order
    return torch.ops.aten._convert_weight_to_int4pack(packed, tiles)


def _check(model: Llama, scheme: str, group_size, head, blocks) -> torch.device:
    choice("scheme", scheme, SCHEMES)
    choice("head", head, (None, "int8"))
    if scheme == "int4":
        choice("group_size", integer("group_size", group_size, minimum=1), GROUP_SIZES)
    elif group_size is not None:
        fixed = f"Q4_1 has groups of {Q4_1_GROUP}" if scheme == "q4_1" else "int8 has one scale per channel"
        raise InputError(f"group_size applies to int4 only; {fixed}")
    if scheme == "q4_1" and blocks is None:
        raise InputError(
            "scheme 'q4_1' takes the GGUF file's blocks: effllm.load_model(gguf, quantize='q4_1')"
        )
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise InputError("the model is already quantized: load it again to quantize with another scheme")
    if lora_layers(model):
        raise InputError("the model carries LoRA adapters: quantize the base before adding adapters")
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    if device.type == "cpu" and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        raise InputError(
            "this CPU has neither AVX2 nor AVX-512 (torch reports capability DEFAULT): the int8/int4 "
            "kernels would run unvectorised, slower than the unquantized model"
        )
    if device.type == "cuda" and scheme != "int8" and dtype != torch.bfloat16:
        raise InputError(
            f"the CUDA int4 kernel takes bf16 activations; the model is {dtype}: load it in bf16"
        )
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"weight-only quantization has CPU and CUDA kernels; the model is on {device}")
    return device


def _check_shapes(layers, scheme: str, group_size: int | None, blocks) -> None:
    """Refuse, naming the layer, a linear whose size the chosen kernel cannot take."""
    for name, module, child in layers:
        k, n = getattr(module, child).in_features, getattr(module, child).out_features
        if scheme == "int4" and k % group_size:
            raise InputError(f"{name} has {k} inputs, not a multiple of group_size {group_size}")
        if scheme == "q4_1" and f"{name}.weight" not in blocks:
            raise InputError(f"{name}.weight is not stored as Q4_1 in the GGUF file")
        if scheme != "int8" and n % 16:
            raise InputError(f"{name} has {n} outputs: the int4 kernels need a multiple of 16")


def quantize(
    model: Llama,
    scheme: str,
    *,
    group_size: int | None = None,
    head: str | None = None,
    blocks: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None,
) -> Llama:
    """Replace the blocks' linears of `model` in place by quantized ones; return it.

    scheme: "int8", "int4" (with group_size 32, 64, 128 or 256) or "q4_1" (`blocks`: a GGUF file's Q4_1
    blocks by our tensor name, from `effllm.loading.gguf.q4_1_blocks`; `load_model(..., quantize="q4_1")`
    passes them). head="int8" gives the output head an int8 copy too. Refused, each with the reason: an
    unknown scheme or group size, a layer whose size the kernel cannot take (the layer is named), a model
    already quantized or carrying LoRA adapters, a CPU without AVX2, a device without the kernels.
    """
    _check(model, scheme, group_size, head, blocks)
    layers = block_linears(model)
    _check_shapes(layers, scheme, group_size, blocks)
    dtype = model.embed.weight.dtype
    for name, module, child in layers:
        linear = getattr(module, child)
        if scheme == "int8":
            layer = Int8Linear.from_linear(name, linear)
        elif scheme == "int4":
            layer = Int4Linear.from_linear(name, linear, group_size)
        else:
            q, d, m = (t.to(linear.weight.device) for t in blocks[f"{name}.weight"])
            layer = Int4Linear(name, *q4_1_to_int4(q, d, m), Q4_1_GROUP, dtype)
        setattr(module, child, layer)
    if head == "int8":
        model.lm_head = Int8Linear.from_linear("lm_head", model.lm_head)
    model.requires_grad_(False)
    group = {"int8": None, "int4": group_size, "q4_1": Q4_1_GROUP}[scheme]
    model.quantization = {"scheme": scheme, "group_size": group, "head": head}
    return model


QAT_SCHEMES = ("int4",)


@torch.no_grad()
def round_to_int4(model: Llama, group_size: int) -> Llama:
    """Round the weights of the model's plain block linears onto their int4 grid, in place: the int4
    model's numbers, kept in the model's dtype (the LoRA-wrapped linears are left alone)."""
    for _, module, child in block_linears(model):
        weight = getattr(module, child).weight
        weight.copy_(fake_quantize_int4(weight, group_size))
    return model


def prepare_qat(model: Llama, scheme: str = "int4", *, group_size: int = 32) -> Llama:
    """Make `model` (with LoRA adapters, before training) see the int4 weights it will be converted to.

    The frozen block linears are rounded onto their int4 grid in place (they never change, so once is
    the same as every forward); each adapted one runs through the grid of its merged weight. Refused with
    the reason: an unknown scheme or group size, no adapters (QAT here trains LoRA), a quantized model."""
    choice("qat", scheme, QAT_SCHEMES)
    choice("group_size", integer("group_size", group_size, minimum=1), GROUP_SIZES)
    adapted = {n: m for n, m in lora_layers(model).items() if n.rsplit(".", 1)[-1] in BLOCK_LINEARS}
    if not adapted:
        raise InputError(
            "QAT here trains LoRA adapters on a frozen base: pass lora= (QAT of a full fine-tune is not "
            "supported)"
        )
    if quantized_base(model) is not None:
        raise InputError("QAT fake-quantizes a full-precision base; this model's base is already quantized")
    plain = block_linears(model)
    bases = [(f"{n}.base", m, "base") for n, m in adapted.items()]
    _check_shapes(plain + bases, scheme, group_size, None)
    round_to_int4(model, group_size)
    for m in adapted.values():
        m.weight_transform = partial(fake_quantize_int4, group_size=group_size)
    model.qat = {"scheme": scheme, "group_size": group_size}
    return model


def convert_qat(model: Llama) -> Llama:
    """Merge the adapters of a QAT-trained model and quantize it to int4: the weights training saw."""
    if getattr(model, "qat", None) is None:
        raise InputError("the model was not prepared for QAT (prepare_qat, or train(..., qat='int4'))")
    for m in lora_layers(model).values():
        m.weight_transform = None
    remove_lora(model, merge=True)
    quantize(model, model.qat["scheme"], group_size=model.qat["group_size"])
    model.qat = None
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def save(model: Llama, path: str | Path, *, source: str | None = None) -> Path:
    """Write a quantized model to one safetensors file (tensors plus the config as metadata), atomically.

    source: where the tokenizer comes from (recorded, so `load_tokenizer(path)` finds it)."""
    from safetensors.torch import save

    from effllm.files import atomic_write_bytes

    if not is_quantized(model):
        raise InputError(
            "save() writes quantized models; save an unquantized one as a Hugging Face directory"
        )
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            tensors |= {f"{name}.{k}": v.contiguous() for k, v in module.unpack().items()}
    skip = {
        f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, QuantizedLinear) for p in ("weight",)
    }
    for name, p in model.named_parameters():  # the embedding and the norms (a tied head is listed once)
        if name not in skip:
            tensors[name] = p.detach().contiguous()
    meta = {
        "format": FORMAT,
        "args": json.dumps(asdict(model.args)),
        "quantization": json.dumps(model.quantization),
        "source": source or "",
    }
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ConfigError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a quantized effllm model (metadata format {meta.get('format')!r})")
    return meta


def load(path: str | Path, *, device: str | torch.device = "cpu") -> Llama:
    """A quantized model written by `save`, rebuilt for `device` (its dtype is the one it was saved in)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    try:
        args = ModelArgs(**json.loads(meta["args"]))
        setting = json.loads(meta["quantization"])
        # Copies: the file's tensors are only 8-byte aligned, and the int8 kernel faults on unaligned rows.
        tensors = {k: v.clone() for k, v in load_file(str(path), device=str(device)).items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: bad quantized-model metadata ({type(e).__name__}: {e})") from e
    with torch.device("meta"):
        model = Llama(args)
    dtype = tensors["embed.weight"].dtype
    try:
        for name, module, child in block_linears(model):
            t = {
                k: tensors.pop(f"{name}.{k}")
                for k in ("qweight", "scales", "zeros")
                if f"{name}.{k}" in tensors
            }
            setattr(module, child, _rebuilt(name, t, setting, dtype))
        if setting.get("head") == "int8":
            t = {k: tensors.pop(f"lm_head.{k}") for k in ("qweight", "scales")}
            model.lm_head = _rebuilt("lm_head", t, {"scheme": "int8"}, dtype)
    except KeyError as e:
        raise ConfigError(f"{path}: tensor {e} is missing") from None
    model.load_state_dict(tensors, strict=False, assign=True)
    if args.tie_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.embed.weight
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if left:
        raise ConfigError(f"{path}: tensors missing for {left[:5]}")
    model.quantization = setting
    return model.requires_grad_(False).eval()


def _rebuilt(name: str, t: dict[str, Tensor], setting: dict, dtype) -> QuantizedLinear:
    if setting["scheme"] == "int8":
        return Int8Linear(name, t["qweight"], t["scales"], dtype)
    q = unpack_nibbles(t["qweight"])
    return Int4Linear(name, q, t["scales"], t["zeros"], setting["group_size"], dtype)
