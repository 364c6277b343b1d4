"""Decoding benchmark: our Llama with and without the KV cache against transformers' `generate`.

Each configuration runs in a fresh process (`measure.isolated`) so its peak memory is its own; times are
medians of repeats after a short warm-up, with prefill (first token) and decode separated.
Run as `python -m effllm.decode_bench` for the issue's table (SmolLM2, fp32, CPU).
"""

import argparse
import contextlib
import time

import torch

import effllm
from effllm import measure
from effllm.loading import resolve_device, to_transformers
from effllm.model import kv_cache_bytes, param_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def prompts(vocab_size: int, batch_size: int, prompt_len: int, seed: int = 0) -> torch.Tensor:
    """Random token ids (B, T): decoding cost does not depend on which tokens, only on how many."""
    return torch.randint(
        3, vocab_size, (batch_size, prompt_len), generator=torch.Generator().manual_seed(seed)
    )


def run_generate(model, ids: torch.Tensor, *, impl: str, new_tokens: int, use_cache: bool) -> dict:
    """One generation of exactly new_tokens tokens; returns prefill_s and decode_s."""
    if impl == "ours":
        stats: dict = {}
        effllm.generate(model, ids, max_new_tokens=new_tokens, use_cache=use_cache, stats=stats)
        return stats
    kw = dict(do_sample=False, use_cache=use_cache, eos_token_id=None, pad_token_id=0)
    measure.sync(ids.device)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, **kw)  # transformers reports no split: time the first token alone
    measure.sync(ids.device)
    t1 = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    measure.sync(ids.device)
    return {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1 - (t1 - t0)}


def decode_metrics(
    *,
    model: str,
    impl: str = "ours",
    batch_size: int = 1,
    prompt_len: int = 64,
    new_tokens: int = 64,
    use_cache: bool = True,
    repeats: int = 3,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """Time one configuration (meant for `measure.isolated`): tokens/s, runtime spread, prefill/decode."""
    device = resolve_device(device)
    net = effllm.load_model(model, device=device, dtype=DTYPES[dtype])
    cache_bytes = (
        kv_cache_bytes(net.args, batch_size, prompt_len + new_tokens, DTYPES[dtype]) if use_cache else 0
    )
    if impl == "transformers":
        net = to_transformers(net)
    elif impl != "ours":
        raise ValueError(f"impl must be 'ours' or 'transformers', got {impl!r}")
    ids = prompts(
        net.config.vocab_size if impl == "transformers" else net.args.vocab_size, batch_size, prompt_len, seed
    )
    ids = ids.to(device)
    peak = measure.cuda_peak(device) if device.type == "cuda" else None
    loaded = measure.reset_peak_rss()  # the peak window starts with the weights resident
    run_generate(net, ids, impl=impl, new_tokens=2, use_cache=use_cache)  # warm-up, excluded
    splits: list[dict] = []
    with peak or contextlib.nullcontext() as cuda:
        timing = measure.time_fn(
            lambda: splits.append(
                run_generate(net, ids, impl=impl, new_tokens=new_tokens, use_cache=use_cache)
            ),
            device=device,
            warmup=0,
            repeats=repeats,
        )
    out = {
        "runtime_s": timing["median_s"],
        "runtime_min_s": timing["min_s"],
        "runtime_max_s": timing["max_s"],
        "tokens_per_s": batch_size * new_tokens / timing["median_s"],
        "prefill_s": _median([s["prefill_s"] for s in splits]),
        "decode_s": _median([s["decode_s"] for s in splits]),
        "weights_bytes": param_bytes(net),
        "kv_cache_bytes": cache_bytes,
        "baseline_rss_bytes": loaded,
    }
    return {**out, **(cuda or {})}


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def decode_table(
    *,
    model: str,
    batch_sizes: list[int],
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    uncached_repeats: int | None = None,
    impls: tuple[str, ...] = ("ours", "transformers"),
    caches: tuple[bool, ...] = (True, False),
    dtype: str = "float32",
    device: str = "cpu",
    progress=None,
) -> list[dict]:
    """Tidy rows for every impl x batch x cache, each measured in a fresh process.

    uncached_repeats (default: repeats) lets the slow no-cache runs repeat fewer times on small machines.
    """
    rows = []
    configs = [(s, b, c) for b in batch_sizes for c in caches for s in impls]
    for impl, batch, cache in configs if progress is None else progress(configs):
        kw = dict(
            model=model,
            impl=impl,
            batch_size=batch,
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            use_cache=cache,
            repeats=repeats if cache or uncached_repeats is None else uncached_repeats,
            dtype=dtype,
            device=device,
        )
        res = measure.isolated("effllm.decode_bench:decode_metrics", kw)
        params = dict(
            impl=impl,
            batch=batch,
            cache="on" if cache else "off",
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            dtype=dtype,
            device=device,
        )
        rows += _rows(res, params)
    return rows


UNITS = {
    "runtime_s": "s",
    "runtime_min_s": "s",
    "runtime_max_s": "s",
    "tokens_per_s": "tokens/s",
    "prefill_s": "s",
    "decode_s": "s",
    "weights_bytes": "B",
    "kv_cache_bytes": "B",
    "peak_rss_bytes": "B",
    "baseline_rss_bytes": "B",
    "peak_allocated_bytes": "B",
    "peak_reserved_bytes": "B",
}


def _rows(res: dict, params: dict) -> list[dict]:
    """A result dict from `isolated` as tidy rows; a failed configuration is one row with its reason."""
    if res.get("status", "ok") != "ok":
        return [
            dict(
                params,
                metric="runtime_s",
                value=float("nan"),
                unit="s",
                status=res["status"],
                reason=res.get("reason", ""),
            )
        ]
    return [
        dict(params, metric=k, value=float(v), unit=UNITS[k], status="ok", reason="")
        for k, v in res.items()
        if k in UNITS
    ]


def length_sweep(
    model, *, batch_sizes: list[int], lengths: list[int], prompt_len: int, repeats: int = 1, progress=None
) -> list[dict]:
    """Runtime of our generate by batch x new tokens x cache, in this process (times only, no memory)."""
    rows, device = [], next(model.parameters()).device
    configs = [(b, n, c) for b in batch_sizes for n in lengths for c in (True, False)]
    for b, n, cache in configs if progress is None else progress(configs):
        ids = prompts(model.args.vocab_size, b, prompt_len).to(device)
        run_generate(model, ids, impl="ours", new_tokens=2, use_cache=cache)  # warm-up
        t = measure.time_fn(
            lambda: run_generate(model, ids, impl="ours", new_tokens=n, use_cache=cache),  # noqa: B023
            device=device,
            warmup=0,
            repeats=repeats,
        )
        rows.append(
            dict(
                batch=b,
                new_tokens=n,
                cache="on" if cache else "off",
                prompt_len=prompt_len,
                metric="runtime_s",
                value=t["median_s"],
                unit="s",
                status="ok",
                reason="",
            )
        )
    return rows


def cache_agreement(model, ids: torch.Tensor, *, new_tokens: int) -> dict:
    """Cached vs uncached greedy decoding: first step where tokens differ and the largest logit gap.

    Logits are compared on the same inputs (the uncached run's tokens, teacher-forced through the cache).
    """
    cached = effllm.generate(model, ids, max_new_tokens=new_tokens)
    plain = effllm.generate(model, ids, max_new_tokens=new_tokens, use_cache=False)
    differ = (cached != plain).any(0)[ids.shape[1] :].nonzero()
    T, seq = ids.shape[1], plain[:, :-1]
    with torch.no_grad():
        full = model(seq)[:, T - 1 :].float()  # (B, new, V): every step's logits, recomputed
        model.setup_cache(*seq.shape)
        try:
            steps = [model(seq[:, :T], input_pos=torch.arange(T, device=seq.device))[:, -1:]]
            for t in range(T, seq.shape[1]):
                steps.append(model(seq[:, t : t + 1], input_pos=torch.tensor([t], device=seq.device)))
        finally:
            model.clear_cache()
    gap = (torch.cat(steps, 1).float() - full).abs().max().item()
    return {
        "tokens_identical": bool(len(differ) == 0),
        "first_divergence_step": int(differ[0]) if len(differ) else -1,
        "max_logit_diff": gap,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--uncached-repeats", type=int, default=None, help="repeats without the cache (default: --repeats)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--caches", nargs="+", choices=["on", "off"], default=["on", "off"], help="cache settings to run"
    )
    a = p.parse_args()
    import pandas as pd
    from tqdm import tqdm

    from effllm.tables import inference_table

    rows = decode_table(
        model=a.model,
        batch_sizes=a.batch_sizes,
        prompt_len=a.prompt_len,
        new_tokens=a.new_tokens,
        repeats=a.repeats,
        uncached_repeats=a.uncached_repeats,
        caches=tuple(c == "on" for c in a.caches),
        device=a.device,
        progress=tqdm,
    )
    table = inference_table(pd.DataFrame(rows))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.round(3))
    weights = pd.DataFrame(rows).query("metric == 'weights_bytes'").value.iloc[0]
    b1 = table.loc[(min(a.batch_sizes), "on"), "tokens_per_s"]
    for name, bw in [("read bandwidth", measure.read_bandwidth()),
                     ("batch-1 linear layers read at", measure.linear_read_bandwidth())]:  # fmt: skip
        print(
            f"{name} {bw / 1e9:.1f} GB/s: batch-{min(a.batch_sizes)} limit {bw / weights:.1f} tokens/s; "
            f"ours {b1:.1f} tokens/s = {b1 * weights / bw:.0%} of it"
        )


if __name__ == "__main__":
    main()
