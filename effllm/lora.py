"""Low-rank adaptation (LoRA, Hu et al. 2021): a frozen linear plus a trainable update B A scaled by alpha/r.

Follows litgpt's `lora.py` (a wrapper of the frozen linear, A Kaiming, B zeros, merge safe to call twice) and
PEFT's numerics (adapters in fp32, dropout on the input of the A path). Adapters are saved and loaded in
PEFT's format (`adapter_config.json`, `adapter_model.safetensors`), so PEFT and effllm read each other's.
"""

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from effllm.loading import ours_to_hf

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> LlamaForCausalLM
# The keys PEFT 0.21 writes for a LoraConfig, at their defaults; save_adapter fills in the rest.
PEFT_DEFAULTS = {
    **dict.fromkeys(
        "alora_invocation_tokens arrow_config auto_mapping corda_config eva_config exclude_modules "
        "kasa_config layer_replication layers_pattern layers_to_transform lora_ga_config megatron_config "
        "modules_to_save monteclora_config revision target_parameters trainable_token_indices use_bdlora "
        "velora_config".split()
    ),
    **dict.fromkeys(
        "ensure_weight_tying fan_in_fan_out lora_bias use_dora use_qalora use_rslora".split(), False
    ),
    **{"alpha_pattern": {}, "rank_pattern": {}, "loftq_config": {}, "megatron_core": "megatron.core"},
    **{"bias": "none", "inference_mode": True, "init_lora_weights": True, "qalora_group_size": 16},
    **{"peft_type": "LORA", "peft_version": "0.21.2", "task_type": "CAUSAL_LM"},  # the format copied
}
# Config keys load_adapter reads or that do not change the math; any other key must be falsy (its default).
BENIGN_KEYS = {"r", "lora_alpha", "lora_dropout", "target_modules", "bias", "init_lora_weights", "peft_type"}
BENIGN_KEYS |= {"base_model_name_or_path", "revision", "task_type", "peft_version", "inference_mode"}
BENIGN_KEYS |= {"auto_mapping", "megatron_core", "qalora_group_size", "layers_pattern"}
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")  # the others (PiSSA, OLoRA...) change the base


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: base(x) + dropout(x) A^T B^T * alpha / r."""

    def __init__(self, base: nn.Linear, *, r: int, alpha: float, dropout: float = 0.0, generator=None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base, self.r, self.alpha, self.scaling = base.requires_grad_(False), r, alpha, alpha / r
        # fp32 whatever the base dtype, as PEFT does: tiny, and bf16 adapters lose small updates to rounding
        a = nn.init.kaiming_uniform_(torch.empty(r, base.in_features), a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(base.weight.device))  # (r, in), as nn.Linear(in, r) initialises
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.train(base.training)  # a fresh module is in train mode; follow the model's mode instead

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # (..., out) in the base dtype
        if self.merged:
            return y
        x = self.dropout(x.to(self.lora_A.dtype))  # the adapter path in fp32, as PEFT casts it
        update = x @ self.lora_A.T @ self.lora_B.T  # (..., in) -> (..., r) -> (..., out)
        return (y + update * self.scaling).to(y.dtype)

    def delta_weight(self) -> Tensor:
        """The update B A * scaling, (out, in) in the adapters' dtype."""
        return self.lora_B @ self.lora_A * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into base.weight (in its dtype); a no-op when already merged."""
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


def hf_path(name: str) -> str:
    """Our module name -> transformers': layers.0.attn.q_proj -> model.layers.0.self_attn.q_proj."""
    return ours_to_hf(f"{name}.weight").removesuffix(".weight")


def _refuse_twice(model: nn.Module) -> None:
    if found := lora_layers(model):
        raise ValueError(f"the model already has LoRA on {len(found)} linears; call remove_lora(model) first")


def _targets(model: nn.Module, targets: str | Sequence[str]) -> dict[str, nn.Linear]:
    # PEFT's rule for a list: a target is a module's transformers path or a dotted suffix of it ("q_proj")
    linears = {
        hf_path(n): (n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"
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
    _refuse_twice(model)
    chosen = _targets(model, targets)
    model.requires_grad_(False)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    for name, linear in chosen.items():
        parent, _, attr = name.rpartition(".")
        wrapped = LoRALinear(linear, r=r, alpha=alpha, dropout=dropout, generator=generator)
        setattr(model.get_submodule(parent), attr, wrapped)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, percent trainable); tied weights count once, as model.parameters() dedups."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
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


def peft_name(name: str) -> str:
    """Our adapter name -> PEFT's: layers.0.attn.q_proj.lora_A -> base_model.model.model...lora_A.weight."""
    return PEFT_PREFIX + ours_to_hf(f"{name}.weight")


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors under PEFT's names (what adapter_model.safetensors holds)."""
    out = {}
    for name, m in lora_layers(model).items():
        out[peft_name(f"{name}.lora_A")] = m.lora_A.detach()
        out[peft_name(f"{name}.lora_B")] = m.lora_B.detach()
    return out


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)  # readers see the old file or the whole new one, never a partial one


def _target_names(model: nn.Module, layers: dict[str, LoRALinear]) -> list[str]:
    # attribute names ("q_proj") when they pick exactly the wrapped linears, else transformers' paths
    short = {n.rsplit(".", 1)[-1] for n in layers}
    named = {n for n, m in model.named_modules() if n != "lm_head" and n.rsplit(".", 1)[-1] in short}
    return sorted(short) if named == set(layers) else sorted(hf_path(n) for n in layers)


def save_adapter(model: nn.Module, path: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters as PEFT does: adapter_config.json and adapter_model.safetensors in path."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters: call apply_lora(model) first")
    m = next(iter(layers.values()))
    config = {
        **PEFT_DEFAULTS,
        "r": m.r,
        "lora_alpha": m.alpha,
        "lora_dropout": m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0,
        "target_modules": _target_names(model, layers),
        "base_model_name_or_path": base_model_name_or_path,
    }
    tensors = {k: v.cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_atomic(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True)  # as PEFT writes it
    _write_atomic(path / CONFIG_FILE, lambda tmp: tmp.write_text(text))
    return path


def _check_config(cfg: dict, where: Path) -> None:
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters load")
    bad = {k: v for k, v in cfg.items() if v and k not in BENIGN_KEYS}
    if cfg.get("bias", "none") != "none":
        bad["bias"] = cfg["bias"]
    if cfg.get("init_lora_weights", True) not in PLAIN_INITS:
        bad["init_lora_weights"] = cfg["init_lora_weights"]
    if bad:
        raise ValueError(f"{where}: unsupported LoRA options {bad}; only plain LoRA on whole linears loads")
    if isinstance(cfg.get("target_modules"), str) and cfg["target_modules"] != "all-linear":
        raise ValueError(f"{where}: target_modules {cfg['target_modules']!r} is a regex; list names instead")


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply LoRA as a PEFT adapter directory's config says and load its tensors (safetensors only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: not found; expected a PEFT adapter directory")
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file}: not found (a pickled adapter_model.bin is never loaded)")
    _refuse_twice(model)
    cfg = json.loads(cfg_file.read_text())
    _check_config(cfg, cfg_file)
    r = cfg["r"]
    try:
        chosen = _targets(model, cfg["target_modules"])
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from e
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_file}: corrupt or truncated safetensors file ({e})") from e
    shapes = {}  # PEFT name -> (our parameter name, shape); all checked before the model is touched
    for name, lin in chosen.items():
        shapes[peft_name(f"{name}.lora_A")] = (f"{name}.lora_A", (r, lin.in_features))
        shapes[peft_name(f"{name}.lora_B")] = (f"{name}.lora_B", (lin.out_features, r))
    problems = [f"missing {k}" for k in shapes if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in shapes]
    problems += [
        f"{k} is {tuple(v.shape)}, not {shapes[k][1]}"
        for k, v in tensors.items()
        if k in shapes and tuple(v.shape) != shapes[k][1]
    ]
    if problems:
        raise ValueError(f"{weights_file}: tensors do not fit {CONFIG_FILE} and the model: {problems[:5]}")
    dropout = cfg.get("lora_dropout", 0.0)
    apply_lora(model, r=r, alpha=cfg["lora_alpha"], dropout=dropout, targets=cfg["target_modules"])
    with torch.no_grad():
        for key, (ours, _) in shapes.items():
            model.get_parameter(ours).copy_(tensors[key])
    return model
