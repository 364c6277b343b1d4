"""Low-rank adaptation (LoRA, Hu et al. 2021): a frozen linear plus a trainable update B A scaled by alpha/r.

Follows litgpt's `lora.py` (a wrapper of the frozen linear, A Kaiming, B zeros, merge safe to call twice) and
PEFT's numerics (adapters in fp32, dropout on the input of the A path). `effllm.loading.peft` saves and
loads adapters in PEFT's format, so PEFT and effllm read each other's. The frozen base may also be a
4-bit layer (`effllm.model.FrozenLinear`, e.g. NF4 for QLoRA); such adapters train and save the same way,
but merge only into a full-precision base (load the saved adapter onto it).
"""

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effllm.checks import InputError
from effllm.model import FrozenLinear


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable low-rank update: base(x) + dropout(x) A^T B^T * alpha / r."""

    def __init__(
        self, base: nn.Linear | FrozenLinear, *, r: int, alpha: float, dropout: float = 0.0, generator=None
    ):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base, self.r, self.alpha, self.scaling = base.requires_grad_(False), r, alpha, alpha / r
        device = next(iter((*base.parameters(), *base.buffers()))).device
        # fp32 whatever the base dtype, as PEFT does: tiny, and bf16 adapters lose small updates to rounding
        a = nn.init.kaiming_uniform_(torch.empty(r, base.in_features), a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(device))  # (r, in), as nn.Linear(in, r) initialises
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # QAT: a map of the merged weight W + B A s (a fake quantizer) that the forward then runs through
        self.weight_transform: Callable[[Tensor], Tensor] | None = None
        self.train(base.training)  # a fresh module is in train mode; follow the model's mode instead

    def forward(self, x: Tensor) -> Tensor:
        if self.weight_transform is not None:
            return self._transformed_forward(x)
        y = self.base(x)  # (..., out) in the base dtype
        if self.merged:
            return y
        x = self.dropout(x.to(self.lora_A.dtype))  # the adapter path in fp32, as PEFT casts it
        update = x @ self.lora_A.T @ self.lora_B.T  # (..., in) -> (..., r) -> (..., out)
        return (y + update * self.scaling).to(y.dtype)

    def _transformed_forward(self, x: Tensor) -> Tensor:
        """x through weight_transform(W + B A s), the weight merging then quantizing gives; in training,
        the dropped-out adapter input adds B A s (dropout(x) - x), so the update sees dropout as in LoRA."""
        if self.merged or isinstance(self.base, FrozenLinear):
            raise InputError("weight_transform (QAT) needs an unmerged adapter on a full-precision base")
        w = self.weight_transform(self.base.weight + self.delta_weight().to(self.base.weight.dtype))
        y = F.linear(x, w)
        if self.training and isinstance(self.dropout, nn.Dropout):
            xa = x.to(self.lora_A.dtype)
            y = y + ((self.dropout(xa) - xa) @ self.lora_A.T @ self.lora_B.T * self.scaling).to(y.dtype)
        return y

    def delta_weight(self) -> Tensor:
        """The update B A * scaling, (out, in) in the adapters' dtype."""
        return self.lora_B @ self.lora_A * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into base.weight (in its dtype); a no-op when already merged."""
        if isinstance(self.base, FrozenLinear):
            raise InputError(
                f"{self.base.name} is a quantized base ({type(self.base).__name__}): adapters merge into a "
                "full-precision weight; save the adapter and load it onto the full-precision model"
            )
        if not self.merged:
            self.base.weight += self.delta_weight()  # computed in fp32, rounded once to the base dtype
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from base.weight (restores it up to rounding); a no-op when not merged."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA-wrapped linears by module name (layers.0.attn.q_proj -> LoRALinear)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def check_no_lora(model: nn.Module) -> None:
    """Refuse to add adapters to a model that has some (stacked adapters would train silently wrong)."""
    if found := lora_layers(model):
        raise ValueError(f"the model already has LoRA on {len(found)} linears; call remove_lora(model) first")


def target_linears(
    model: nn.Module, targets: str | Sequence[str], *, path: Callable[[str], str] = str
) -> dict[str, nn.Linear]:
    """The linears to adapt, by module name, chosen by PEFT's target_modules rule.

    A target is a linear's path or a dotted suffix of it ("q_proj", "attn.q_proj"), or "all-linear" (every
    linear but the output head). `path` maps our module names to the names targets are written in
    (the PEFT loader passes transformers' names).
    """
    linears = {
        path(n): (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, FrozenLinear)) and n != "lm_head"
    }
    available = sorted({n.rsplit(".", 1)[-1] for n in linears})
    if isinstance(targets, str):
        targets = available if targets == "all-linear" else [targets]
    hits = {t: [k for k in linears if k == t or k.endswith(f".{t}")] for t in targets}
    unknown = sorted(t for t, found in hits.items() if not found)
    if unknown or not targets:
        raise ValueError(f"unknown LoRA targets {unknown}; available: {available} or 'all-linear'")
    return dict(linears[k] for found in hits.values() for k in found)


def apply_lora(
    model: nn.Module,
    *,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    targets: str | Sequence[str] = ("q_proj", "v_proj"),
    seed: int | None = None,
) -> nn.Module:
    """Wrap the target linears in LoRALinear, in place; freeze everything but the adapters."""
    check_no_lora(model)
    chosen = target_linears(model, targets)
    model.requires_grad_(False)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    for name, linear in chosen.items():
        parent, _, attr = name.rpartition(".")
        wrapped = LoRALinear(linear, r=r, alpha=alpha, dropout=dropout, generator=generator)
        setattr(model.get_submodule(parent), attr, wrapped)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, percent trainable); tied weights count once, as model.parameters() dedups, and a
    quantized base's weights count as the parameters they stand for."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, FrozenLinear))
    total = sum(p.numel() for p in params) + frozen
    return trainable, total, 100.0 * trainable / total


def merge_lora(model: nn.Module) -> None:
    """Merge every adapter into its base weight (for inference; gradients no longer reach the adapters)."""
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora."""
    for m in lora_layers(model).values():
        m.unmerge()


def remove_lora(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """Back to plain nn.Linear, with the update merged in (merge=True) or dropped; parameters stay frozen."""
    for name, m in lora_layers(model).items():
        m.merge() if merge else m.unmerge()
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, m.base)
    return model
