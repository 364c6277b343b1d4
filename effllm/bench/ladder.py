"""The decoding ladder: one model decoded ever faster (bf16, a compiled static-cache step, int8 and int4
weights) against transformers' `generate` and llama.cpp on the same prompts, and what each step costs in
quality against fp32.

Every timed configuration runs in a fresh process (`measure.isolated`), so its peak memory and its compile
are its own. Quality is measured in this process on the eager forward of each path's weights: held-out
perplexity on the Alpaca eval responses, and top-1 agreement and the largest logit difference with fp32 on
fp32's own greedy continuation (teacher-forced, so one early split does not decide the rest).
`python -m effllm.bench.ladder` prints the ladder for SmolLM2 on this machine.
"""

import argparse
import importlib.util
import math
import time

import torch

import effllm
from effllm import checks
from effllm.bench import measure
from effllm.bench.decode import prompts
from effllm.bench.rows import result_rows, row
from effllm.loading import gguf, resolve

# path name -> how it loads and decodes (the keyword arguments of `decode.decode_metrics`)
PATHS: dict[str, dict] = {
    "fp32": {"dtype_name": "fp32"},
    "bf16": {"dtype_name": "bf16"},
    "fp32 compiled": {"dtype_name": "fp32", "compile": True},
    "bf16 compiled": {"dtype_name": "bf16", "compile": True},
    "int8": {"dtype_name": "bf16", "compile": True, "quantize": "int8"},
    "int4 g64": {"dtype_name": "bf16", "compile": True, "quantize": "int4", "group_size": 64},
    "int4 g32": {"dtype_name": "bf16", "compile": True, "quantize": "int4", "group_size": 32},
    "int4 from Q4_1": {"dtype_name": "bf16", "compile": True, "quantize": "q4_1"},
}
ANCHORS: dict[str, dict] = {  # transformers' generate on the same weights
    "transformers fp32": {"dtype_name": "fp32"},
    "transformers bf16": {"dtype_name": "bf16"},
    "transformers bf16 static+compile": {"dtype_name": "bf16", "compile": True},
}
LLAMA_CPP = "llama.cpp"
BENCH_DEPS = "`make bench-deps` builds llama-cpp-python for this machine (about 5 minutes)"


def check_paths(names: list[str], known: dict) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise checks.InputError(f"unknown decoding path {unknown}; choose from {', '.join(known)}")


def settings(path: str, head: str | None) -> dict:
    """decode_metrics' keyword arguments for a path; head ("int8" or None) applies to quantized paths."""
    spec = {**PATHS, **ANCHORS}[path]
    impl = "transformers" if path in ANCHORS else "ours"
    return {"impl": impl, **spec, **({"head": head} if "quantize" in spec else {})}


def ladder_table(
    *,
    model: str,
    paths: list[str],
    anchors: list[str],
    batch_sizes: list[int],
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    head: str | None = "int8",
    device: str = "cpu",
    timeout: float | None = None,
    progress=iter,
) -> list[dict]:
    """Tidy rows for every path (ours, then transformers' anchors, then llama.cpp) x batch, each in a fresh
    process. Compiled paths also get tokens_identical: the same tokens as the eager path in their dtype."""
    check_paths(paths, PATHS)
    check_paths(anchors, {**ANCHORS, LLAMA_CPP: None})
    for b in batch_sizes:
        checks.integer("batch size (in batch_sizes)", b, minimum=1)
    for name, value in (("prompt_len", prompt_len), ("new_tokens", new_tokens), ("repeats", repeats)):
        checks.integer(name, value, minimum=2 if name == "new_tokens" else 1)
    rows, tokens = [], {}
    configs = [(p, b) for p in [*paths, *anchors] for b in batch_sizes]
    for path, batch in progress(configs):
        params = dict(path=path, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens)
        if path == LLAMA_CPP:
            rows += llama_cpp_rows(model, params, repeats=repeats, device=device, timeout=timeout)
            continue
        kw = settings(path, head)
        params |= dict(impl=kw["impl"], dtype=kw["dtype_name"], device=device)
        args = dict(
            model=model, batch_size=batch, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats
        )
        res = measure.isolated(
            "effllm.bench.decode:decode_metrics", {**args, **kw, "device": device}, timeout=timeout
        )
        tokens[path, batch] = res.pop("tokens", None)
        rows += result_rows(res, params, metric="decode_tokens_per_s")
        eager = path.removesuffix(" compiled")
        if eager != path and tokens.get((eager, batch)) and tokens[path, batch]:
            rows.append(row("tokens_identical", tokens[eager, batch] == tokens[path, batch], **params))
    return rows


def llama_cpp_metrics(
    *, gguf: str, prompt_len: int, new_tokens: int, repeats: int, threads: int, seed: int = 0
) -> dict:
    """llama.cpp (llama-cpp-python) greedy decoding of random prompts: meant for `measure.isolated`."""
    from llama_cpp import Llama as LlamaCpp

    llm = LlamaCpp(model_path=gguf, n_ctx=prompt_len + new_tokens + 8, n_threads=threads, verbose=False)
    ids = prompts(llm.n_vocab(), 1, prompt_len, seed)[0].tolist()

    def run(n: int) -> dict:
        llm.reset()
        t0 = time.perf_counter()
        steps = llm.generate(ids, temp=0.0, reset=True)
        next(steps)
        t1 = time.perf_counter()
        for _, _ in zip(range(n - 1), steps, strict=False):
            pass
        return {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1}

    with measure.peak_window("cpu") as peak:
        run(2)  # warm-up, excluded
        splits = [run(new_tokens) for _ in range(repeats)]
    median = lambda key: measure.run_median(splits, key)
    runtime = median("prefill_s") + median("decode_s")
    return {
        "runtime_s": runtime,
        "tokens_per_s": new_tokens / runtime,
        "decode_tokens_per_s": (new_tokens - 1) / median("decode_s"),
        "prefill_s": median("prefill_s"),
        "decode_s": median("decode_s"),
        **peak,
    }


def llama_cpp_rows(model: str, params: dict, *, repeats: int, device, timeout: float | None) -> list[dict]:
    """llama.cpp on the same GGUF file at batch 1; a row saying why where it cannot run."""
    params = {**params, "impl": "llama.cpp", "dtype": "gguf", "device": str(device)}
    kind, path = resolve(model)
    reason = ""
    if importlib.util.find_spec("llama_cpp") is None:
        reason = f"llama-cpp-python is not installed: {BENCH_DEPS}"
    elif params["device"] != "cpu":
        reason = "llama-cpp-python is built here for the CPU: it is no anchor for a GPU run"
    elif kind != "gguf":
        reason = f"llama.cpp runs GGUF files; {model} is not one"
    elif params["batch"] != 1:
        reason = "llama-cpp-python's Llama decodes one sequence at a time (batch 1 only)"
    if reason:
        return [row("decode_tokens_per_s", None, status="skipped", reason=reason, **params)]
    kw = dict(
        gguf=str(path),
        prompt_len=params["prompt_len"],
        new_tokens=params["new_tokens"],
        repeats=repeats,
        threads=torch.get_num_threads(),
    )
    res = measure.isolated("effllm.bench.ladder:llama_cpp_metrics", kw, timeout=timeout)
    if res.get("status", "ok") == "ok":  # each token reads every stored tensor once (the head is tied)
        res["read_bytes_per_token"] = gguf.tensor_bytes(path)
    return result_rows(res, {**params, "threads": kw["threads"]}, metric="decode_tokens_per_s")


def eval_items(tokenizer, examples: list[dict], *, max_len: int) -> list[dict]:
    from effllm.data import tokenize

    items, _ = tokenize(examples, tokenizer, max_len=max_len)
    return items


@torch.no_grad()
def quality_rows(
    *,
    model: str,
    paths: list[str],
    items: list[dict],
    pad_id: int,
    agree_tokens: int,
    head: str | None = "int8",
    device: str = "cpu",
    batch_size: int = 8,
) -> list[dict]:
    """Perplexity on items (tokenised eval examples), and top-1 agreement and the largest logit difference
    with fp32 over fp32's greedy continuation of the first item's prompt, for each path's weights (eager:
    compiling changes the speed, the ladder's tokens_identical checks it). A path that cannot load is a row
    saying why."""
    from effllm.data import batches
    from effllm.step import evaluate

    check_paths(paths, PATHS)
    checks.integer("agree_tokens", agree_tokens, minimum=1)
    if not items:
        raise checks.InputError("no eval example to score: every prompt reached max_len (raise it)")
    weights = {}  # the distinct weights: compiled paths share their eager path's
    for p in paths:
        kw = {
            k: v
            for k, v in settings(p, head).items()
            if k in ("dtype_name", "quantize", "group_size", "head")
        }
        weights.setdefault(tuple(sorted(kw.items())), p.removesuffix(" compiled"))
    reference = effllm.load_model(model, device=device, dtype="fp32")
    prompt_ids = [
        t for t, label in zip(items[0]["input_ids"], items[0]["labels"], strict=True) if label == -100
    ]
    prompt = torch.tensor([prompt_ids], device=device)
    seq = effllm.generate(reference, prompt, max_new_tokens=agree_tokens)[:, :-1]  # (1, T + n - 1)
    ref_logits = reference(seq)[:, prompt.shape[1] - 1 :].float()  # (1, n, V): logits at each new token
    del reference
    rows = []
    for key, name in weights.items():
        kw = dict(key)
        params = dict(path=name, dtype=kw["dtype_name"], agree_tokens=agree_tokens, examples=len(items))
        try:
            net = effllm.load_model(
                model,
                device=device,
                dtype=kw["dtype_name"],
                **{k: kw[k] for k in ("quantize", "group_size", "head") if k in kw},
            )
        except (checks.InputError, RuntimeError) as e:
            reason = f"{type(e).__name__}: {e}"[:300]
            rows.append(row("perplexity", None, status="unsupported", reason=reason, **params))
            continue
        grouped = batches(items, batch_size=batch_size, pad_id=pad_id, shuffle=False, length_grouped=True)
        loss = evaluate(net, grouped)  # sorted by length: little padding
        logits = net(seq)[:, prompt.shape[1] - 1 :].float()
        rows += [
            row("perplexity", math.exp(loss), **params),
            row(
                "top1_agreement", (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(), **params
            ),
            row("max_logit_diff", (logits - ref_logits).abs().max().item(), **params),
        ]
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--anchors", nargs="*", default=[*ANCHORS, LLAMA_CPP], choices=[*ANCHORS, LLAMA_CPP])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--head", default="int8", help="the quantized paths' output head: int8 or none")
    a = p.parse_args(argv)
    import pandas as pd
    from tqdm import tqdm

    rows = ladder_table(
        model=a.model,
        paths=a.paths,
        anchors=a.anchors,
        batch_sizes=a.batch_sizes,
        prompt_len=a.prompt_len,
        new_tokens=a.new_tokens,
        repeats=a.repeats,
        head=None if a.head == "none" else a.head,
        progress=lambda xs: tqdm(xs, desc="paths x batch"),
    )
    df = pd.DataFrame(rows)
    table = df[df["metric"] == "decode_tokens_per_s"].pivot_table(
        index="path", columns="batch", values="value", sort=False, dropna=False
    )
    print(table.round(1).to_string())
    for _, r in df[df["status"] != "ok"].iterrows():
        print(f"{r['path']} batch {r['batch']}: {r['status']}: {r['reason']}")


if __name__ == "__main__":
    main()


def step_profile(
    *,
    model: str,
    path: str,
    head: str | None,
    prompt_len: int,
    new_tokens: int,
    device: str = "cpu",
    top: int = 8,
) -> list[dict]:
    """Where one path's decode time goes: the profiler's self time per generated token of its `top` ops
    (the compiled graph's own fused kernels: "inductor's generated kernels"), the rest summed as "other".
    The profiler adds overhead of its own, so read the shares rather than the totals."""
    from torch.profiler import ProfilerActivity, profile

    from effllm.bench.decode import timed_generate

    kw = {k: v for k, v in settings(path, head).items() if k != "impl"}
    compile = kw.pop("compile", False)
    net = effllm.load_model(model, device=device, dtype=kw.pop("dtype_name"), **kw)
    ids = prompts(net.args.vocab_size, 1, prompt_len).to(device)
    run = lambda: timed_generate(
        net, ids, impl="ours", new_tokens=new_tokens, use_cache=True, compile=compile
    )
    run()  # warm-up (compiles)
    cuda = torch.device(device).type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        run()
    events = prof.key_averages()
    times = sorted(
        ((e.key, e.self_device_time_total if cuda else e.self_cpu_time_total) for e in events),
        key=lambda kv: -kv[1],
    )
    total = sum(t for _, t in times)
    named = [(_op_name(k), t) for k, t in times[:top]]
    named.append(("other", total - sum(t for _, t in named)))
    return [row("self_s_per_token", t / 1e6 / new_tokens, op=name, path=path) for name, t in named]


def _op_name(key: str) -> str:
    if key.startswith("## Call CompiledFxGraph"):
        return "inductor's generated kernels"
    return {"TorchDynamo Cache Lookup": "dynamo guard checks"}.get(key, key)
