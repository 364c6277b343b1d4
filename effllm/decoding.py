"""Greedy and sampled decoding of a batch of left-padded prompts, with or without the KV cache.

As in gpt-fast, `prefill` runs the prompt into a pre-allocated cache and `decode_step` one new token;
`stream` yields every step's tokens and `generate` collects them. Without the cache each step recomputes
the whole sequence (`recompute_step`): the baseline the report compares against. Positions follow
transformers' convention (each sequence counts from its first real token), so the tokens match
`LlamaForCausalLM.generate`. Timing lives with the callers (`effllm.bench.decode` times the first token,
the prefill, apart from the rest).
"""

from collections.abc import Iterator

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


def prefill(model: Llama, ids: Tensor, positions: Tensor, key_mask: Tensor | None) -> Tensor:
    """Logits (B, vocab) after the prompt ids (B, T), written into cache slots 0..T-1."""
    slots = torch.arange(ids.shape[1], device=ids.device)
    return model(ids, position_ids=positions, input_pos=slots, key_mask=key_mask, last_only=True)[:, -1]


def decode_step(model: Llama, token: Tensor, position: Tensor, slot: int, key_mask: Tensor | None) -> Tensor:
    """Logits (B, vocab) after one new token (B, 1) at rotary position (B, 1), written into cache `slot`."""
    slots = torch.tensor([slot], device=token.device)
    return model(token, position_ids=position, input_pos=slots, key_mask=key_mask, last_only=True)[:, -1]


def recompute_step(model: Llama, tokens: Tensor, positions: Tensor, key_mask: Tensor | None) -> Tensor:
    """Logits (B, vocab) after the whole sequence (B, S), recomputed without a cache."""
    return model(tokens, position_ids=positions, key_mask=key_mask, last_only=True)[:, -1]


@torch.no_grad()
def stream(
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
) -> Iterator[Tensor]:
    """Yield each step's new tokens (B,), up to max_new_tokens; finished rows get EOS until all are done."""
    _check(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p)
    device = input_ids.device
    B, T = input_ids.shape
    gen = torch.Generator(device).manual_seed(seed) if seed is not None else None
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [], device=device)
    pad = int(eos[0]) if len(eos) else 0

    prompt_mask = (
        torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    )
    key_mask = None  # (B, T + new): which key slots are real tokens, only needed with padding
    if not bool(prompt_mask.all()):
        key_mask = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=device)
        key_mask[:, :T] = prompt_mask
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T), then one more per step
    tokens, done = input_ids, torch.zeros(B, dtype=torch.bool, device=device)
    if use_cache:
        model.setup_cache(B, T + max_new_tokens)
    try:
        for step in range(max_new_tokens):
            if not use_cache:
                keys = None if key_mask is None else key_mask[:, : tokens.shape[1]]
                logits = recompute_step(model, tokens, positions, keys)
            elif step == 0:
                logits = prefill(model, input_ids, positions, key_mask)
            else:
                logits = decode_step(model, tokens[:, -1:], positions[:, -1:], T + step - 1, key_mask)
            nxt = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
            nxt = torch.where(done, pad, nxt)  # (B,)
            done = done | torch.isin(nxt, eos)
            yield nxt
            if len(eos) and bool(done.all()):
                return
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    finally:
        model.clear_cache()


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
) -> Tensor:
    """Prompt plus up to max_new_tokens new tokens, (B, T + new); finished rows are padded with EOS."""
    steps = stream(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        use_cache=use_cache,
        eos_token_id=eos_token_id,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )
    return torch.cat([input_ids, *(t[:, None] for t in steps)], dim=1)
