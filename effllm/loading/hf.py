"""transformers' Llama format: tensor names, config.json, sharded safetensors, and the reference model.

Reads only safetensors (never pickles) and never runs remote code.
"""

import json
from pathlib import Path

import torch

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


def args_from_hf_config(cfg: dict, where: str) -> ModelArgs:
    """ModelArgs from a transformers Llama config.json."""
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{where}: model_type is {cfg.get('model_type')!r}, not 'llama'")
    try:
        n_heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        return ModelArgs(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads", n_heads),
            hidden_dim=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            extra={k: cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        )
    except KeyError as e:
        raise ValueError(f"{where}: config is missing the field {e.args[0]!r}") from e


def read(path: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """ModelArgs and our-named tensors from a Hugging Face Llama directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face Llama directory")
    args = args_from_hf_config(json.loads(cfg_path.read_text()), str(cfg_path))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (pickled .bin files are not loaded)")
    tensors = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: listed in {index.name} but missing")
        try:
            tensors.update(load_file(path / name))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path / name}: corrupt or truncated safetensors file ({e})") from e
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
