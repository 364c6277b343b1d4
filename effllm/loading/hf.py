"""transformers' Llama format: tensor names, config.json, sharded safetensors, and the reference model.

Reads only safetensors (never pickles) and never runs remote code.
"""

from pathlib import Path

import torch

from effllm.checks import ConfigError, InputError, finite_tensors, integer, number, read_json
from effllm.model import Llama, ModelArgs

# (transformers, ours) name prefixes and infixes; a bijection, so adapters can be written back.
HF_PREFIXES = [("model.embed_tokens.", "embed."), ("model.layers.", "layers."), ("model.norm.", "norm.")]
HF_INFIXES = [
    (".self_attn.", ".attn."),
    (".input_layernorm.", ".attn_norm."),
    (".post_attention_layernorm.", ".mlp_norm."),
]


def _rename(name: str, src: int) -> str:
    dst = 1 - src
    for pair in HF_PREFIXES:
        if name.startswith(pair[src]):
            name = pair[dst] + name[len(pair[src]) :]
            break
    for pair in HF_INFIXES:
        name = name.replace(pair[src], pair[dst])
    return name


def hf_to_ours(name: str) -> str:
    """transformers name -> ours: model.layers.0.self_attn.q_proj.weight -> layers.0.attn.q_proj.weight."""
    return _rename(name, 0)


def ours_to_hf(name: str) -> str:
    """Our tensor name -> transformers'."""
    return _rename(name, 1)


ROPE_TYPES = ("default", "llama3")  # what effllm.model.rope_frequencies implements
LLAMA3_ROPE_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _checked(where: str, check, name: str, value, **kw):
    """check(name, value, **kw), its InputError re-raised as a ConfigError naming the file."""
    try:
        return check(name, value, **kw)
    except InputError as e:
        raise ConfigError(f"{where}: {e}") from None


def _optional(cfg: dict, key: str, default):
    """cfg[key], or default when the key is absent or null (as transformers reads it)."""
    return default if cfg.get(key) is None else cfg[key]


def _required(cfg: dict, key: str, where: str):
    if cfg.get(key) is None:
        raise ConfigError(f"{where}: config is missing the required field {key!r}")
    return cfg[key]


def _rope_scaling(cfg: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from rope_scaling / rope_parameters, refusing what we cannot run."""
    key = "rope_scaling" if cfg.get("rope_scaling") is not None else "rope_parameters"
    rope = cfg.get(key) or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{where}: {key} must be a JSON object, got {rope!r}")
    theta = _optional(cfg, "rope_theta", _optional(rope, "rope_theta", 10000.0))
    theta = _checked(where, number, "rope_theta", theta, positive=True)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(
            f"{where}: {key}.rope_type {kind!r} is not supported; "
            f"supported: {', '.join(map(repr, ROPE_TYPES))}"
        )
    if kind == "default":
        return theta, None
    for field in LLAMA3_ROPE_FIELDS:
        if rope.get(field) is None:
            raise ConfigError(f"{where}: {key} of rope_type {kind!r} is missing the field {field!r}")
        _checked(where, number, f"{key}.{field}", rope[field], positive=True)
    if rope["high_freq_factor"] <= rope["low_freq_factor"]:
        raise ConfigError(
            f"{where}: {key}.high_freq_factor ({rope['high_freq_factor']}) must exceed "
            f"low_freq_factor ({rope['low_freq_factor']})"
        )
    return theta, {k: v for k, v in rope.items() if k != "rope_theta"}


def args_from_hf_config(cfg: dict, where: str) -> ModelArgs:
    """ModelArgs from a transformers Llama config.json; a ConfigError names `where`, the field, its value."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: config must be a JSON object, got a {type(cfg).__name__}")
    if cfg.get("model_type") != "llama":
        raise ConfigError(f"{where}: model_type is {cfg.get('model_type')!r}, not 'llama'")
    sizes = {
        key: _checked(where, integer, key, _required(cfg, key, where), minimum=1)
        for key in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        )
    }
    n_heads, dim = sizes["num_attention_heads"], sizes["hidden_size"]
    kv = cfg.get("num_key_value_heads")
    n_kv_heads = n_heads if kv is None else _checked(where, integer, "num_key_value_heads", kv, minimum=1)
    if n_heads % n_kv_heads:
        raise ConfigError(
            f"{where}: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv_heads}"
        )
    if cfg.get("head_dim") is not None:
        head_dim = _checked(where, integer, "head_dim", cfg["head_dim"], minimum=2)
    elif dim % n_heads:
        raise ConfigError(
            f"{where}: hidden_size={dim} is not divisible by num_attention_heads={n_heads} (and no head_dim)"
        )
    else:
        head_dim = dim // n_heads
    if head_dim % 2:
        raise ConfigError(f"{where}: head_dim={head_dim} is odd; rotary embeddings need an even head_dim")
    theta, scaling = _rope_scaling(cfg, where)
    tie = _optional(cfg, "tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ConfigError(f"{where}: tie_word_embeddings must be true or false, got {tie!r}")
    return ModelArgs(
        vocab_size=sizes["vocab_size"],
        dim=dim,
        n_layers=sizes["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        hidden_dim=sizes["intermediate_size"],
        head_dim=head_dim,
        norm_eps=_checked(where, number, "rms_norm_eps", _optional(cfg, "rms_norm_eps", 1e-6), positive=True),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=_checked(
            where,
            integer,
            "max_position_embeddings",
            _optional(cfg, "max_position_embeddings", 2048),
            minimum=1,
        ),
        tie_embeddings=tie,
        extra={k: cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    )


def _weight_files(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(p.name for p in path.glob("*.safetensors"))
    weight_map = read_json(index, "the safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConfigError(f"{index}: weight_map must be an object of tensor name -> file name")
    files = sorted(set(weight_map.values()))
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ConfigError(f"{index}: weight_map names the file {name!r} outside the directory")
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: listed in {index.name} but missing")
    return files


def read(path: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """ModelArgs and our-named tensors from a Hugging Face Llama directory (finite values checked)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face Llama directory")
    args = args_from_hf_config(read_json(cfg_path, "the model config"), str(cfg_path))
    files = _weight_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (pickled .bin files are not loaded)")
    tensors = {}
    for name in files:
        try:
            shard = load_file(path / name)
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{path / name}: corrupt or truncated safetensors file ({e})") from e
        finite_tensors(str(path / name), shard)
        tensors.update(shard)
    return args, {hf_to_ours(k): v for k, v in tensors.items()}


def hf_config(args: ModelArgs) -> dict:
    """A transformers LlamaConfig dict equivalent to args."""
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "intermediate_size": args.hidden_dim,
        "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": args.rope_scaling,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        **{k: v for k, v in args.extra.items() if v is not None},
    }


def to_transformers(model: Llama):
    """transformers' LlamaForCausalLM with our model's weights (the reference in tests and benchmarks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = hf_config(model.args)
    scaling = cfg.pop("rope_scaling")
    cfg["rope_parameters"] = {"rope_theta": cfg.pop("rope_theta"), **(scaling or {"rope_type": "default"})}
    p = next(model.parameters())
    ref = LlamaForCausalLM(LlamaConfig(**cfg))
    missing, unexpected = ref.load_state_dict(
        {ours_to_hf(k): v for k, v in model.state_dict().items()}, strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return ref.to(device=p.device, dtype=p.dtype).eval()
