"""Decoding benchmark: our Llama with and without the KV cache against transformers' `generate`.

Each configuration runs in a fresh process (`measure.isolated`) so its peak memory is its own; times are
medians of repeats after a short warm-up, with the prefill (first token) timed apart from the decode.
`python -m effllm.bench.decode` prints the table for SmolLM2 in fp32 on the CPU.
"""

import argparse
import time

import torch

import effllm
from effllm import checks
from effllm.bench import measure
from effllm.bench.rows import result_rows, row
from effllm.decoding import decode_step, prefill, stream
from effllm.device import resolve_device, sync
from effllm.loading import to_transformers
from effllm.model import Llama, kv_cache_bytes, weight_read_bytes
from effllm.precision import DTYPES, dtype


def prompts(vocab_size: int, batch_size: int, prompt_len: int, seed: int = 0) -> torch.Tensor:
    """Random token ids (B, T): decoding cost does not depend on which tokens, only on how many."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch_size, prompt_len), generator=gen)


def timed_generate(
    model, ids: torch.Tensor, *, impl: str, new_tokens: int, use_cache: bool, compile: bool = False
) -> dict:
    """One generation of exactly new_tokens tokens: prefill_s (to the first token), decode_s (the rest) and
    the first sequence's new tokens."""
    sync(ids.device)
    t0 = time.perf_counter()
    if impl == "ours":
        steps = stream(model, ids, max_new_tokens=new_tokens, use_cache=use_cache, compile=compile)
        tokens = [next(steps)]
        sync(ids.device)
        t1 = time.perf_counter()
        tokens += list(steps)
        sync(ids.device)
        first = [int(t[0]) for t in tokens]
        return {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1, "tokens": first}
    kw = dict(do_sample=False, use_cache=use_cache, eos_token_id=None, pad_token_id=0)
    model.generate(ids, max_new_tokens=1, **kw)  # transformers reports no split: time the first token alone
    sync(ids.device)
    t1 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    sync(ids.device)
    first = out[0, ids.shape[1] :].tolist()
    return {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1 - (t1 - t0), "tokens": first}


def _compiled_transformers(net):
    """transformers' recipe for fast decoding: a static cache and a torch.compile'd forward."""
    net.generation_config.cache_implementation = "static"
    net.forward = torch.compile(net.forward, fullgraph=True)
    return net


def decode_metrics(
    *,
    model: str,
    impl: str = "ours",
    batch_size: int = 1,
    prompt_len: int = 64,
    new_tokens: int = 64,
    use_cache: bool = True,
    repeats: int = 3,
    dtype_name: str = "fp32",
    device: str = "cpu",
    seed: int = 0,
    compile: bool = False,
    quantize: str | None = None,
    group_size: int | None = None,
    head: str | None = None,
) -> dict:
    """Time one configuration (meant for `measure.isolated`): tokens/s, runtime spread, prefill/decode.

    compile: our static-cache compiled decode step, or transformers' static cache and compiled forward;
    the warm-up then generates the full length (it compiles), timed as first_call_s, and compile_s is
    what it took beyond a timed run. quantize, group_size, head: as `effllm.load_model` (ours only).
    decode_tokens_per_s counts the tokens after the first; read_bytes_per_token is what one decode step
    reads (weights and the KV cache it attends over) divided by the batch."""
    if impl not in ("ours", "transformers"):
        raise ValueError(f"impl must be 'ours' or 'transformers', got {impl!r}")
    if impl == "transformers" and quantize is not None:
        raise ValueError("quantize applies to our Llama: transformers' path runs the unquantized weights")
    if compile and not use_cache:
        raise ValueError("compile needs use_cache: the compiled step decodes from a static cache")
    device, weights = resolve_device(device), dtype(dtype_name)
    net = effllm.load_model(
        model, device=device, dtype=weights, quantize=quantize, group_size=group_size, head=head
    )
    read_bytes = weight_read_bytes(net)
    cache_bytes = kv_cache_bytes(net.args, batch_size, prompt_len + new_tokens, weights) if use_cache else 0
    attended = (
        cache_bytes
        if compile
        else kv_cache_bytes(net.args, batch_size, prompt_len + new_tokens // 2, weights)
    )
    ids = prompts(net.args.vocab_size, batch_size, prompt_len, seed).to(device)
    if impl == "transformers":
        net = to_transformers(net)
        if compile:
            net = _compiled_transformers(net)
    run = lambda n: timed_generate(net, ids, impl=impl, new_tokens=n, use_cache=use_cache, compile=compile)
    splits: list[dict] = []
    with measure.peak_window(device) as peak:  # the window starts with the weights resident
        t0 = time.perf_counter()
        run(new_tokens if compile else 2)  # warm-up, excluded; compiled: the shapes of the timed runs
        first_call_s = time.perf_counter() - t0
        timing = measure.time_fn(
            lambda: splits.append(run(new_tokens)), device=device, warmup=0, repeats=repeats
        )
    median = lambda key: measure.run_median(splits, key)
    decode_s = median("decode_s")
    return {
        "runtime_s": timing["median_s"],
        "runtime_min_s": timing["min_s"],
        "runtime_max_s": timing["max_s"],
        "tokens_per_s": batch_size * new_tokens / timing["median_s"],
        "decode_tokens_per_s": batch_size * (new_tokens - 1) / decode_s if new_tokens > 1 else None,
        "prefill_s": median("prefill_s"),
        "decode_s": decode_s,
        "first_call_s": first_call_s,
        "compile_s": first_call_s - timing["median_s"] if compile else None,
        "weights_bytes": read_bytes,
        "read_bytes_per_token": (read_bytes + (attended if use_cache else 0)) / batch_size,
        "kv_cache_bytes": cache_bytes,
        "tokens": splits[-1]["tokens"],
        **peak,
    }


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
    dtype_name: str = "fp32",
    device: str = "cpu",
    progress=iter,
) -> list[dict]:
    """Tidy rows for every impl x batch x cache, each measured in a fresh process.

    uncached_repeats (default: repeats) lets the slow no-cache runs repeat fewer times on small machines.
    """
    for b in batch_sizes:
        checks.integer("batch size (in batch_sizes)", b, minimum=1)
    for name, value in (("prompt_len", prompt_len), ("new_tokens", new_tokens), ("repeats", repeats)):
        checks.integer(name, value, minimum=1)
    if uncached_repeats is not None:
        checks.integer("uncached_repeats", uncached_repeats, minimum=1)
    rows = []
    configs = [(impl, b, cache) for b in batch_sizes for cache in caches for impl in impls]
    for impl, batch, cache in progress(configs):
        times = repeats if cache or uncached_repeats is None else uncached_repeats
        kw = dict(
            model=model,
            impl=impl,
            batch_size=batch,
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            use_cache=cache,
            repeats=times,
            dtype_name=dtype_name,
            device=device,
        )
        res = measure.isolated("effllm.bench.decode:decode_metrics", kw)
        params = dict(
            impl=impl,
            batch=batch,
            cache="on" if cache else "off",
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            dtype=dtype_name,
            device=device,
        )
        rows += result_rows(res, params, metric="runtime_s")
    return rows


def length_sweep(
    model: Llama,
    *,
    batch_sizes: list[int],
    lengths: list[int],
    prompt_len: int,
    repeats: int = 1,
    progress=iter,
) -> list[dict]:
    """Runtime of our generate by batch x new tokens x cache, in this process (times only, no memory)."""
    rows, device = [], next(model.parameters()).device
    for b, n, cache in progress([(b, n, c) for b in batch_sizes for n in lengths for c in (True, False)]):
        ids = prompts(model.args.vocab_size, b, prompt_len).to(device)
        run = lambda n: timed_generate(model, ids, impl="ours", new_tokens=n, use_cache=cache)  # noqa: B023
        run(2)  # warm-up
        t = measure.time_fn(lambda: run(n), device=device, warmup=0, repeats=repeats)  # noqa: B023
        rows.append(
            row(
                "runtime_s",
                t["median_s"],
                batch=b,
                new_tokens=n,
                cache="on" if cache else "off",
                prompt_len=prompt_len,
            )
        )
    return rows


def cache_agreement(model: Llama, ids: torch.Tensor, *, new_tokens: int) -> dict:
    """Cached vs uncached greedy decoding: first step where tokens differ and the largest logit gap.

    Logits are compared on the same inputs (the uncached run's tokens, teacher-forced through the cache).
    """
    cached = effllm.generate(model, ids, max_new_tokens=new_tokens)
    plain = effllm.generate(model, ids, max_new_tokens=new_tokens, use_cache=False)
    differ = (cached != plain).any(0)[ids.shape[1] :].nonzero()
    T, seq = ids.shape[1], plain[:, :-1]
    positions = torch.arange(seq.shape[1], device=seq.device).expand_as(seq)  # (B, S)
    with torch.no_grad():
        full = model(seq)[:, T - 1 :].float()  # (B, new, V): every step's logits, recomputed
        model.setup_cache(*seq.shape)
        try:
            steps = [prefill(model, seq[:, :T], positions[:, :T], None)]
            steps += [
                decode_step(model, seq[:, t : t + 1], positions[:, t : t + 1], t, None)
                for t in range(T, seq.shape[1])
            ]
        finally:
            model.clear_cache()
    gap = (torch.stack(steps, 1).float() - full).abs().max().item()
    return {
        "tokens_identical": bool(len(differ) == 0),
        "first_divergence_step": int(differ[0]) if len(differ) else -1,
        "max_logit_diff": gap,
    }


def cache_agreement_rows(
    model: Llama, ids: torch.Tensor, *, dtypes: list[str], new_tokens: int
) -> list[dict]:
    """cache_agreement in each dtype (the model is cast back after); a failing dtype is a row saying why."""
    rows, before = [], next(model.parameters()).dtype
    params = dict(batch=ids.shape[0], prompt_len=ids.shape[1], new_tokens=new_tokens)
    for name in dtypes:
        try:
            agreement = cache_agreement(model.to(dtype(name)), ids, new_tokens=new_tokens)
            rows += [row(k, v, dtype=name, **params) for k, v in agreement.items()]
        except (RuntimeError, TypeError) as e:  # a dtype this device cannot run
            reason = f"{type(e).__name__}: {e}"[:200]
            rows.append(
                row("tokens_identical", None, status="unsupported", reason=reason, dtype=name, **params)
            )
    model.to(before)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--uncached-repeats", type=int, help="repeats without the cache (default: --repeats)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--caches", nargs="+", choices=["on", "off"], default=["on", "off"], help="cache settings")
    a = p.parse_args(argv)
    import pandas as pd
    from tqdm import tqdm

    from effllm.bench import hardware

    rows = decode_table(
        model=a.model,
        batch_sizes=a.batch_sizes,
        prompt_len=a.prompt_len,
        new_tokens=a.new_tokens,
        repeats=a.repeats,
        uncached_repeats=a.uncached_repeats,
        caches=tuple(c == "on" for c in a.caches),
        dtype_name=a.dtype,
        device=a.device,
        progress=tqdm,
    )
    df = pd.DataFrame(rows)
    tokens = df[df.metric == "tokens_per_s"].pivot_table(
        index=["batch", "cache"], columns="impl", values="value", sort=False
    )
    if "transformers" in tokens:
        tokens["ours / transformers"] = tokens["ours"] / tokens["transformers"]
    print("tokens/s\n" + tokens.round(2).to_string())
    failed = df[df.status != "ok"]
    if len(failed):
        print(failed[["impl", "batch", "cache", "status", "reason"]].to_string(index=False))
    ok = df[(df.status == "ok") & (df.impl == "ours")]
    weights = ok[ok.metric == "weights_bytes"].value.iloc[0]
    b1 = (
        tokens.loc[(min(a.batch_sizes), "on"), "ours"] if (min(a.batch_sizes), "on") in tokens.index else None
    )
    if b1 is not None:
        net = effllm.load_model(a.model, device="cpu")
        roof = hardware.roofline_rows(
            weights_bytes=weights,
            tokens_per_s=b1,
            in_features=net.args.dim,
            out_features=net.args.hidden_dim,
            device=a.device,
        )
        print(pd.DataFrame(roof)[["metric", "threads", "value", "unit"]].to_string(index=False))


if __name__ == "__main__":
    main()
