"""A training-memory ledger read off the model itself: parameters, gradients, optimizer state, activations.

Static terms count the model's own parameters. Activations are what autograd really saves during a
forward + loss, caught with `torch.autograd.graph.saved_tensors_hooks` (unique storages; parameters and
autocast's low-precision weight copies are counted apart). `predict` runs that same measurement on a
shape-only model (`FakeTensorMode`): nothing is allocated, so a 1B model's ledger costs seconds and no RAM.
A 4-bit base (QLoRA's NF4) is counted as what it stores: codes and constants, under `parameters_nf4`.
"""

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from effllm.lora import apply_lora, lora_layers
from effllm.model import FrozenLinear, Llama, ModelArgs, quantized_base, training_mode
from effllm.nf4 import quantize_base as to_4bit
from effllm.precision import autocast
from effllm.step import loss_fn

GiB = 2**30
# total sums them all: the peak once .grad is held across micro-batches (with accum_steps = 1 gradients
# are freed between steps, so the loss's logits and the gradients need not coexist)
TERMS = ("parameters", "gradients", "optimizer_state", "activations", "weight_copies", "logits")


def _key(t: Tensor) -> int:
    return t.untyped_storage()._cdata  # the storage's identity (also for fake tensors, whose data_ptr is 0)


class _WeightCopies(TorchDispatchMode):
    """Records the storages that autocast creates by casting a parameter (aten._to_copy of a weight)."""

    def __init__(self, param_keys: set[int]):
        super().__init__()
        self.param_keys, self.copies = param_keys, {}  # storage key -> the copy, held so no key is reused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and _key(args[0]) in self.param_keys:
            self.copies[_key(out)] = out
        return out


def saved_bytes(model: nn.Module, batch: dict, *, precision: str = "fp32", checkpointing: int = 0) -> dict:
    """Bytes saved for backward in a training forward + loss (activations, weight copies) and logits bytes."""
    device, params = next(model.parameters()).device, list(model.parameters())
    param_keys, saved = {_key(p) for p in params}, {}

    def pack(t: Tensor) -> Tensor:
        saved.setdefault(_key(t), t)  # a tensor saved twice (or two views of one storage) counts once
        return t

    copies = _WeightCopies(param_keys)
    with training_mode(model, checkpointing=checkpointing):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), copies:
            with autocast(device, precision):
                logits = model(batch["input_ids"].to(device))  # (B, T, V)
            loss_fn(logits, batch["labels"].to(device))
    # The loss's transient peak: the logits and their fp32 shifted copy, freed before backward.
    out = {"activations": 0, "weight_copies": 0, "logits": logits.nbytes + logits[:, :-1].numel() * 4}
    for key, t in saved.items():
        if key not in param_keys:  # weights saved for backward are parameters, not activations
            out["weight_copies" if key in copies.copies else "activations"] += t.untyped_storage().nbytes()
    return out


def saved_activation_bytes(
    model: nn.Module, batch: dict, *, precision: str = "fp32", checkpointing: int = 0
) -> int:
    """Activation bytes autograd saves for backward (weights and their autocast copies excluded)."""
    return saved_bytes(model, batch, precision=precision, checkpointing=checkpointing)["activations"]


def _twin(
    args: ModelArgs, dtype: torch.dtype, lora: dict | None, precision: str, quantize_base: str | None = None
) -> Llama:
    """A shape-only Llama as train() holds it (in fake mode): the base quantized, LoRA applied, then all
    cast for bf16-pure."""
    model = _cast(Llama(args), dtype)
    if quantize_base is not None:
        to_4bit(model, quantize_base)
    if lora is not None:
        apply_lora(model, **{**lora, "seed": None})
    return _cast(model, torch.bfloat16) if precision == "bf16-pure" else model


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    for p in model.parameters():  # not model.to(): fake parameters cannot be swapped in place
        p.data = p.data.to(dtype)
    return model


def ledger(
    model: nn.Module,
    *,
    optimizer: str = "sgd",
    precision: str = "fp32",
    lora: dict | None = None,
    batch: dict | None = None,
    checkpointing: int = 0,
    quantize_base: str | None = None,
) -> dict:
    """Predicted training bytes by kind (activations measured on batch when given); see the module doc.

    lora (apply_lora kwargs), quantize_base ("nf4") and bf16-pure are applied to a shape-only twin when
    the model lacks them, so the model itself is never changed. AdamW keeps exp_avg and exp_avg_sq in
    the parameter's dtype plus a 4-byte step per tensor; plain SGD (no momentum) keeps nothing.
    """
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    dtype = next(model.parameters()).dtype
    needs_lora = lora is not None and not lora_layers(model)
    held = quantized_base(model)
    needs_4bit = quantize_base is not None and held is None
    if needs_4bit and lora_layers(model):
        raise ValueError("the model has adapters on a full-precision base: quantize_base cannot apply")
    if needs_lora or needs_4bit or (precision == "bf16-pure" and dtype != torch.bfloat16):
        with FakeTensorMode():
            base = quantize_base if needs_4bit else held  # the twin's base is stored as the model's
            twin = _twin(model.args, dtype, lora if needs_lora else None, precision, base)
            fake = (
                None if batch is None else {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in batch.items()}
            )
            return ledger(
                twin, optimizer=optimizer, precision=precision, batch=fake, checkpointing=checkpointing
            )
    params = list(model.parameters())  # tied weights listed once
    trainable = [p for p in params if p.requires_grad]
    by_dtype: dict[str, int] = {}
    for p in params:
        name = str(p.dtype).removeprefix("torch.")
        by_dtype[name] = by_dtype.get(name, 0) + p.numel() * p.element_size()
    for m in model.modules():  # a quantized base: its codes and constants, by format
        if isinstance(m, FrozenLinear):
            stored = sum(b.numel() * b.element_size() for b in m.buffers())
            by_dtype[m.storage] = by_dtype.get(m.storage, 0) + stored
    grads = sum(p.numel() * p.element_size() for p in trainable)
    adam = sum(2 * p.numel() * p.element_size() + 4 for p in trainable)
    out = {
        "parameters": sum(by_dtype.values()),
        **{f"parameters_{k}": v for k, v in by_dtype.items()},
        "gradients": grads,
        "optimizer_state": adam if optimizer == "adamw" else 0,
        "activations": 0,
        "weight_copies": 0,
        "logits": 0,
    }
    if batch is not None:
        out.update(saved_bytes(model, batch, precision=precision, checkpointing=checkpointing))
    out["total"] = sum(out[k] for k in TERMS)
    return out


def predict(
    args: ModelArgs,
    *,
    batch_size: int,
    seq_len: int,
    optimizer: str = "sgd",
    precision: str = "fp32",
    lora: dict | None = None,
    checkpointing: int = 0,
    dtype: torch.dtype = torch.float32,
    quantize_base: str | None = None,
) -> dict:
    """The ledger of a model too large to instantiate: the same measurement run on shapes only."""
    # Running our own forward on fake tensors, rather than a closed formula, keeps what a formula misses:
    # autocast's weight copies, the fp32 RMSNorm and loss tensors, LoRA's frozen base saving less.
    with FakeTensorMode():
        model = _twin(args, dtype, lora, precision, quantize_base)
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long)  # (B, T): values do not change the bytes
        batch = {"input_ids": ids, "labels": ids}
        return ledger(
            model, optimizer=optimizer, precision=precision, batch=batch, checkpointing=checkpointing
        )


def fits(ledger_bytes: dict, budget_gib: float) -> bool:
    """Whether a ledger's total fits a memory budget given in GiB."""
    return ledger_bytes["total"] <= budget_gib * GiB
