"""LoRA adapters in PEFT's file format (`adapter_config.json`, `adapter_model.safetensors`).

PEFT and effllm read each other's adapters: names map through `effllm.loading.hf`, the config carries PEFT's
keys at their defaults, and options that would change the math (DoRA, PiSSA, regex targets...) are refused.
Safetensors only: a pickled `adapter_model.bin` is never loaded.
"""

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from effllm.checks import ConfigError, InputError, finite_tensors, integer, number, read_json
from effllm.files import atomic_write_bytes, atomic_write_text
from effllm.loading.hf import ours_to_hf
from effllm.lora import LoRALinear, apply_lora, check_no_lora, lora_layers, target_linears

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


def hf_path(name: str) -> str:
    """Our module name -> transformers': layers.0.attn.q_proj -> model.layers.0.self_attn.q_proj."""
    return ours_to_hf(f"{name}.weight").removesuffix(".weight")


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


def _target_names(model: nn.Module, layers: dict[str, LoRALinear]) -> list[str]:
    # attribute names ("q_proj") when they pick exactly the wrapped linears, else transformers' paths
    short = {n.rsplit(".", 1)[-1] for n in layers}
    named = {n for n, m in model.named_modules() if n != "lm_head" and n.rsplit(".", 1)[-1] in short}
    return sorted(short) if named == set(layers) else sorted(hf_path(n) for n in layers)


def save_adapter(model: nn.Module, path: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters as PEFT does: adapter_config.json and adapter_model.safetensors in path."""
    from safetensors.torch import save

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
    # each file is replaced whole: a reader sees the old adapter or the new one, never a partial file
    atomic_write_bytes(path / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    atomic_write_text(path / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True))  # as PEFT writes it
    return path


def _check_config(cfg: dict, where: Path) -> None:
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{where}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters load")
    for key in ("r", "lora_alpha", "target_modules"):
        if cfg.get(key) is None:
            raise ConfigError(f"{where}: adapter config is missing the required field {key!r}")
    try:
        integer("r", cfg["r"], minimum=1)
        number("lora_alpha", cfg["lora_alpha"], positive=True)
        dropout = number("lora_dropout", cfg.get("lora_dropout") or 0.0, minimum=0.0)
    except InputError as e:
        raise ConfigError(f"{where}: {e}") from None
    if dropout >= 1:
        raise ConfigError(f"{where}: lora_dropout must be below 1, got {dropout}")
    targets = cfg["target_modules"]
    if not isinstance(targets, str) and not (
        isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    ):
        raise ConfigError(
            f"{where}: target_modules must be a list of module names or a string, got {targets!r}"
        )
    bad = {k: v for k, v in cfg.items() if v and k not in BENIGN_KEYS}
    if cfg.get("bias", "none") != "none":
        bad["bias"] = cfg["bias"]
    if cfg.get("init_lora_weights", True) not in PLAIN_INITS:
        bad["init_lora_weights"] = cfg["init_lora_weights"]
    if bad:
        raise ConfigError(f"{where}: unsupported LoRA options {bad}; only plain LoRA on whole linears loads")
    if isinstance(cfg.get("target_modules"), str) and cfg["target_modules"] != "all-linear":
        raise ConfigError(f"{where}: target_modules {cfg['target_modules']!r} is a regex; list names instead")


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
    check_no_lora(model)
    cfg = read_json(cfg_file, "the adapter config")
    _check_config(cfg, cfg_file)
    r = cfg["r"]
    try:
        chosen = target_linears(model, cfg["target_modules"], path=hf_path)  # PEFT names transformers' paths
    except ValueError as e:
        raise ConfigError(f"{cfg_file}: {e}") from e
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{weights_file}: corrupt or truncated safetensors file ({e})") from e
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
        raise ConfigError(f"{weights_file}: tensors do not fit {CONFIG_FILE} and the model: {problems[:5]}")
    finite_tensors(str(weights_file), tensors)
    dropout = cfg.get("lora_dropout") or 0.0
    apply_lora(model, r=r, alpha=cfg["lora_alpha"], dropout=dropout, targets=list(chosen))
    with torch.no_grad():
        for key, (ours, _) in shapes.items():
            model.get_parameter(ours).copy_(tensors[key])
    return model
