"""llama.cpp's GGUF format: metadata to ModelArgs, tensors dequantised to fp32 under our names."""

from pathlib import Path

import torch

from effllm.checks import ConfigError, InputError, finite_tensors, integer, number
from effllm.model import ModelArgs

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


REQUIRED_KEYS = (
    "llama.block_count",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.layer_norm_rms_epsilon",
    "llama.context_length",
)


def _key(meta: dict, key: str, where: Path, default=None):
    if meta.get(key) is None:
        if default is not None:
            return default
        raise ConfigError(f"{where}: GGUF metadata is missing the required key {key!r}")
    return meta[key]


def _int(meta: dict, key: str, where: Path, default=None) -> int:
    value = _key(meta, key, where, default)
    try:
        return integer(key, value, minimum=1)
    except InputError as e:
        raise ConfigError(f"{where}: {e}") from None


def _float(meta: dict, key: str, where: Path, default=None) -> float:
    value = _key(meta, key, where, default)
    try:
        return number(key, value, positive=True)
    except InputError as e:
        raise ConfigError(f"{where}: {e}") from None


def args_from_gguf(meta: dict, vocab_size: int | None, tensor_names: set[str], where: Path) -> ModelArgs:
    """ModelArgs from GGUF metadata; ConfigError naming the file and the missing or bad key."""
    if meta.get("general.architecture") != "llama":
        raise ConfigError(f"{where}: architecture is {meta.get('general.architecture')!r}, not 'llama'")
    if "rope_freqs.weight" in tensor_names:
        raise ConfigError(
            f"{where}: GGUF with Llama 3.x rope scaling factors is not supported; "
            "load the Hugging Face directory instead"
        )
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ConfigError(
            f"{where}: llama.rope.scaling.type {scaling!r} is not supported; supported: none (unscaled rope)"
        )
    for key in REQUIRED_KEYS:
        _key(meta, key, where)
    n_heads, dim = (
        _int(meta, "llama.attention.head_count", where),
        _int(meta, "llama.embedding_length", where),
    )
    n_kv_heads = _int(meta, "llama.attention.head_count_kv", where, default=n_heads)
    if n_heads % n_kv_heads:
        raise ConfigError(
            f"{where}: llama.attention.head_count={n_heads} is not a multiple of "
            f"llama.attention.head_count_kv={n_kv_heads}"
        )
    if "llama.rope.dimension_count" not in meta and dim % n_heads:
        raise ConfigError(
            f"{where}: llama.embedding_length={dim} is not divisible by llama.attention.head_count={n_heads}"
        )
    head_dim = _int(meta, "llama.rope.dimension_count", where, default=dim // n_heads)
    if head_dim % 2:
        raise ConfigError(
            f"{where}: head size {head_dim} (llama.rope.dimension_count, else embedding_length / head_count) "
            "is odd; rotary embeddings need an even head size"
        )
    if vocab_size is None:
        if meta.get("llama.vocab_size") is None:
            raise ConfigError(
                f"{where}: GGUF metadata is missing the required key 'tokenizer.ggml.tokens' "
                "(or 'llama.vocab_size')"
            )
        vocab_size = _int(meta, "llama.vocab_size", where)
    return ModelArgs(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=_int(meta, "llama.block_count", where),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        hidden_dim=_int(meta, "llama.feed_forward_length", where),
        head_dim=head_dim,
        norm_eps=_float(meta, "llama.attention.layer_norm_rms_epsilon", where),
        rope_theta=_float(meta, "llama.rope.freq_base", where, default=10000.0),
        max_seq_len=_int(meta, "llama.context_length", where),
        tie_embeddings="output.weight" not in tensor_names,
    )


def _our_name(gguf_name: str, where: Path) -> str:
    parts = gguf_name.split(".")  # blk.{i}.attn_q.weight | token_embd.weight
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in GGUF_NAMES:
        return f"layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GGUF_NAMES:
        return f"{GGUF_NAMES[parts[0]]}.{parts[1]}"
    raise ConfigError(f"{where}: tensor {gguf_name!r} is not a Llama tensor this loader knows")


def read(path: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """ModelArgs and our-named fp32 tensors from a GGUF file (q and k un-permuted, finite values checked)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    except Exception as e:
        raise ConfigError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from e
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    args = args_from_gguf(meta, len(tokens.data) if tokens else None, names, path)
    field = reader.fields.get("tokenizer.ggml.eos_token_id")
    args.extra = {"eos_token_id": field.contents() if field else None}
    tensors = {}
    for t in reader.tensors:
        name = _our_name(t.name, path)
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        finite_tensors(str(path), {t.name: w})
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else None
        heads = {"attn_q": args.n_heads, "attn_k": args.n_kv_heads}.get(kind)
        if heads:  # llama.cpp interleaves the rotary halves of q and k; undo it
            if w.numel() % (heads * args.head_dim):
                shape = tuple(w.shape)
                raise ConfigError(f"{path}: tensor {t.name!r} of shape {shape} does not fit {heads} heads")
            w = w.reshape(heads, args.head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)
        tensors[name] = w
    return args, tensors


Q4_1_BLOCK_BYTES = 20  # ggml's block_q4_1: fp16 d, fp16 m, 16 bytes of nibbles for 32 weights


def q4_1_blocks(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The block linears stored as Q4_1, as they are: our name -> (q (N, K) uint8 in [0, 15], d, m (N, K/32)),
    each weight q * d + m. Rows of q and k are un-permuted as in `read` (whole rows move: groups stay)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    heads = {}
    for key, kv in (("attn_q", "llama.attention.head_count"), ("attn_k", "llama.attention.head_count_kv")):
        field = reader.fields.get(kv) or reader.fields.get("llama.attention.head_count")
        heads[key] = int(field.contents())
    out = {}
    for t in reader.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_1 or not t.name.startswith("blk."):
            continue
        raw = np.asarray(t.data, dtype=np.uint8)
        n = raw.shape[0]
        blocks = raw.reshape(n, -1, Q4_1_BLOCK_BYTES)  # (N, K/32, 20)
        d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0])
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0])
        nibbles = torch.from_numpy(blocks[..., 4:].copy())  # (N, K/32, 16): weights j and j + 16
        q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).reshape(n, -1)
        kind = t.name.split(".")[2]
        if kind in heads:  # undo llama.cpp's rotary interleave, on whole rows
            head_dim = n // heads[kind]
            undo = lambda x: x.reshape(heads[kind], head_dim // 2, 2, -1).transpose(1, 2).reshape(x.shape)  # noqa: B023
            q, d, m = undo(q), undo(d), undo(m)
        out[_our_name(t.name, path)] = (q, d, m)
    return out


def storage_types(path: Path) -> dict[str, int]:
    """How a GGUF file stores its weights: ggml type name (Q4_1, Q8_0, F32, ...) -> number of weights."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    return counts


def tensor_bytes(path: Path) -> int:
    """Bytes of all the tensors a GGUF file stores, as stored (quantized blocks and their constants)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
