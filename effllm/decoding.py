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

from effllm import checks
from effllm.checks import InputError
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
    checks.token_ids("input_ids", input_ids, model.args.vocab_size)
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InputError(
            f"input_ids must be a non-empty (batch, length) tensor, got {tuple(input_ids.shape)}"
        )
    if attention_mask is not None:
        _check_mask(attention_mask, input_ids)
    checks.integer("max_new_tokens", max_new_tokens, minimum=0)
    total = input_ids.shape[1] + max_new_tokens
    if total > model.args.max_seq_len:
        raise InputError(
            f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} "
            f"exceeds the model's context of {model.args.max_seq_len} tokens"
        )
    checks.number("temperature", temperature, minimum=0)
    if top_k is not None:
        checks.integer("top_k", top_k, minimum=1)
    if top_p is not None and not 0 < checks.number("top_p", top_p) <= 1:
        raise InputError(f"top_p must lie in (0, 1], got {top_p}")


def _check_mask(mask: Tensor, input_ids: Tensor) -> None:
    """A left-padded attention mask: 0/1, the prompt's shape, every row ending in at least one token."""
    if not isinstance(mask, Tensor) or mask.shape != input_ids.shape:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise InputError(
            f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {shape}"
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("attention_mask must hold only 0 (padding) and 1 (token)")
    m = mask.bool()
    empty = (~m.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"attention_mask rows {empty} hold no token: each prompt needs at least one")
    holes = (m[:, :-1] & ~m[:, 1:]).any(dim=1).nonzero().flatten().tolist()
    if holes:
        raise InputError(
            f"attention_mask rows {holes} have padding after a token (right padding): generation continues "
            "from each row's last position, so pad prompts on the left (tokenizer.padding_side = 'left')"
        )


def prefill(model: Llama, ids: Tensor, positions: Tensor, key_mask: Tensor | None) -> Tensor:
    """Logits (B, vocab) after the prompt ids (B, T), written into cache slots 0..T-1."""
    slots = torch.arange(ids.shape[1], device=ids.device)
    return model(ids, position_ids=positions, input_pos=slots, key_mask=key_mask, last_only=True)[:, -1]


def decode_step(model: Llama, token: Tensor, position: Tensor, slot: int, key_mask: Tensor | None) -> Tensor:
    """Logits (B, vocab) after one new token (B, 1) at rotary position (B, 1), written into cache `slot`."""
    slots = torch.tensor([slot], device=token.device)
    return model(token, position_ids=position, input_pos=slots, key_mask=key_mask, last_only=True)[:, -1]


def compiled_decode_step(model: Llama):
    """`decode_step` compiled once per model with torch.compile (fullgraph, static shapes): with a static
    cache every step has the same shapes, so it never recompiles. The inductor cache lives on disk."""
    if getattr(model, "_compiled_decode", None) is None:

        def step(token: Tensor, position: Tensor, slots: Tensor, key_mask: Tensor | None) -> Tensor:
            return model(token, position_ids=position, input_pos=slots, key_mask=key_mask, last_only=True)[
                :, -1
            ]

        model._compiled_decode = torch.compile(step, fullgraph=True, dynamic=False)
    return model._compiled_decode


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
    compile: bool = False,
) -> Iterator[Tensor]:
    """Yield each step's new tokens (B,), up to max_new_tokens; finished rows get EOS until all are done.

    compile: decode with a static cache and a torch.compile'd step (the first call compiles: seconds to
    minutes); the tokens are those of the eager path."""
    _check(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p)
    if compile and not use_cache:
        raise InputError("compile=True needs use_cache=True: the compiled step decodes from a static cache")
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
        model.setup_cache(B, T + max_new_tokens, static=compile)
    step_fn = compiled_decode_step(model) if compile else None
    try:
        for step in range(max_new_tokens):
            if not use_cache:
                keys = None if key_mask is None else key_mask[:, : tokens.shape[1]]
                logits = recompute_step(model, tokens, positions, keys)
            elif step == 0:
                logits = prefill(model, input_ids, positions, key_mask)
            elif compile:
                slots = torch.tensor([T + step - 1], device=device)
                fixed = lambda t: t.clone(
                    memory_format=torch.contiguous_format
                )  # the same strides every step
                logits = step_fn(fixed(tokens[:, -1:]), fixed(positions[:, -1:]), slots, key_mask)
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
    compile: bool = False,
) -> Tensor:
    """Prompt plus up to max_new_tokens new tokens, (B, T + new); finished rows are padded with EOS.

    compile: a torch.compile'd static-cache decode step (see `stream`)."""
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
        compile=compile,
    )
    return torch.cat([input_ids, *(t[:, None] for t in steps)], dim=1)
