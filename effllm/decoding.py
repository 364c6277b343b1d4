"""Greedy and sampled decoding for a batch of left-padded prompts, with or without the KV cache.

Without the cache every step recomputes the whole sequence: the baseline the report compares against.
Positions follow transformers' convention (each sequence counts from its first real token), so the
tokens match `LlamaForCausalLM.generate`.
"""

import time

import torch
from torch import Tensor

from effllm.model import Llama


def sample(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next tokens (B,) from logits (B, vocab): argmax at temperature 0, else temperature, top-k, top-p."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check(
    model: Llama,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> None:
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(input_ids.shape)}"
        )
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    total = input_ids.shape[1] + max_new_tokens
    if total > model.args.max_seq_len:
        raise ValueError(
            f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} "
            f"exceeds the model's context of {model.args.max_seq_len} tokens"
        )
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(
            f"need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}"
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(
    model: Llama,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    use_cache: bool = True,
    eos_token_id: int | list[int] | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stats: dict | None = None,
) -> Tensor:
    """Prompt plus up to max_new_tokens new tokens, (B, T + new); finished rows are padded with EOS.

    stats, if given, receives prefill_s, decode_s (wall seconds, device synchronised) and new_tokens.
    """
    _check(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p)
    device = input_ids.device
    B, T = input_ids.shape
    gen = torch.Generator(device).manual_seed(seed) if seed is not None else None
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [], device=device)
    pad = int(eos[0]) if len(eos) else 0

    prompt_mask = (
        torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    )
    key_mask = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=device)
    key_mask[:, :T] = prompt_mask
    padded = not bool(prompt_mask.all())
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    next_pos = positions[:, -1:] + 1  # (B, 1)
    tokens, done = input_ids, torch.zeros(B, dtype=torch.bool, device=device)

    _sync(device)
    t0 = time.perf_counter()
    if use_cache:
        model.setup_cache(B, T + max_new_tokens)
    try:
        ids, pos, slots = input_ids, positions, torch.arange(T, device=device)
        for step in range(max_new_tokens):
            if use_cache:
                logits = model(
                    ids,
                    position_ids=pos,
                    input_pos=slots,
                    key_mask=key_mask if padded else None,
                    last_only=True,
                )
            else:
                logits = model(
                    tokens,
                    position_ids=positions,
                    key_mask=key_mask[:, : tokens.shape[1]] if padded else None,
                    last_only=True,
                )
            nxt = sample(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
            nxt = torch.where(done, pad, nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done = done | torch.isin(nxt, eos)
            if step == 0:
                _sync(device)
                t1 = time.perf_counter()
            if len(eos) and bool(done.all()):
                break
            ids, pos, slots = nxt[:, None], next_pos, torch.tensor([T + step], device=device)
            positions = torch.cat([positions, next_pos], dim=1)
            next_pos = next_pos + 1
    finally:
        model.clear_cache()
    _sync(device)
    if stats is not None and max_new_tokens:
        stats.update(prefill_s=t1 - t0, decode_s=time.perf_counter() - t1, new_tokens=tokens.shape[1] - T)
    return tokens
