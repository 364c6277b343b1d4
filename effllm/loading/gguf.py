"""llama.cpp's GGUF format: metadata to ModelArgs, tensors dequantised to fp32 under our names."""

from pathlib import Path

import torch

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


def read(path: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """ModelArgs and our-named fp32 tensors from a GGUF file (q and k un-permuted)."""
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
