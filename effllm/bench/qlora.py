"""4-bit fine-tuning measurements: what NF4 stores and what dequantizing it costs, on the model's own
weights, and quantization-aware training (QAT) against post-training int4 on held-out perplexity.

`qat_rows` runs in a fresh process (`measure.isolated`): one LoRA fine-tune in fp32, merged, then for
each group size the same model quantized to int4 after training (PTQ) and a QAT fine-tune of the same
base on the same data and steps, converted to int4. The share of the PTQ perplexity gap that QAT closes
is (PTQ - QAT) / (PTQ - fp32).
"""

import copy
import dataclasses
import math
import time

import torch
import torch.nn.functional as F

import effllm
from effllm.bench import measure
from effllm.bench.experiments import Run, alpaca_batches
from effllm.bench.rows import failure_status, row
from effllm.device import resolve_device
from effllm.lora import remove_lora
from effllm.model import BLOCK_LINEARS, Llama, block_linears
from effllm.nf4 import NF4Linear, dequantize_nf4, quantize_base, quantize_nf4
from effllm.precision import dtype as torch_dtype
from effllm.quantization import convert_qat, quantize, round_to_int4
from effllm.step import evaluate
from effllm.training import train


@torch.no_grad()
def storage_rows(model: Llama) -> list[dict]:
    """Per kind of block linear: its bytes in fp32 and as NF4 (codes and double-quantized constants), and
    the mean absolute dequantization error relative to the mean absolute weight."""
    rows = []
    for kind in BLOCK_LINEARS:
        layers = [getattr(m, c) for _, m, c in block_linears(model) if c == kind]
        full = sum(lin.weight.numel() * 4 for lin in layers)
        packed = [quantize_nf4(lin.weight.detach().float()) for lin in layers]
        err = sum(
            float((dequantize_nf4(q) - lin.weight.float()).abs().sum())
            for q, lin in zip(packed, layers, strict=True)
        )
        size = sum(lin.weight.abs().sum().item() for lin in layers)
        params = dict(kind=kind, layers=len(layers), shape=str(tuple(layers[0].weight.shape)))
        rows += [
            row("weights_bytes", full, format="fp32", **params),
            row("weights_bytes", sum(q.nbytes() for q in packed), format="nf4", **params),
            row("relative_error", err / size, format="nf4", **params),
        ]
    return rows


def base_loss_rows(model: Llama, tokenizer, run: Run) -> list[dict]:
    """Held-out loss of the model before any training, in full precision and with its base on NF4."""
    eval_b, _ = alpaca_batches(tokenizer, run, "eval", run.eval_examples)
    four_bit = quantize_base(copy.deepcopy(model))
    return [
        row("eval_loss", evaluate(model, eval_b), base="full precision"),
        row("eval_loss", evaluate(four_bit, eval_b), base="nf4"),
    ]


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.no_grad()
def dequantize_rows(model: Llama, *, tokens: int, dtypes=("fp32", "bf16"), repeats: int = 5) -> list[dict]:
    """Time to dequantize each kind of block linear against its matmul on `tokens` rows, per dtype: what a
    QLoRA forward pays (it dequantizes once per forward and once more in backward) on top of LoRA's."""
    rows = []
    for kind in BLOCK_LINEARS:
        name, module, child = next(t for t in block_linears(model) if t[2] == kind)
        layer = NF4Linear.from_linear(name, getattr(module, child))
        for dtype_name in dtypes:
            dtype = torch_dtype(dtype_name)
            x = torch.randn(tokens, layer.in_features, dtype=dtype)
            w = layer.dequantize(dtype)
            params = dict(kind=kind, dtype=dtype_name, tokens=tokens, shape=str(tuple(w.shape)))
            rows += [
                row("dequantize_s", _best_time(lambda: layer.dequantize(dtype), repeats), **params),  # noqa: B023
                row("matmul_s", _best_time(lambda: F.linear(x, w), repeats), **params),  # noqa: B023
            ]
    return rows


def int4_weights(model: Llama, group_size: int) -> Llama:
    """A copy of model whose block linears hold their int4 weights in fp32: the int4 model's numbers in
    fp32 arithmetic (the CPU int4 kernel is vectorised for bf16 activations only)."""
    return round_to_int4(copy.deepcopy(model), group_size)


def qat(*, run: dict, group_sizes: list[int]) -> dict:
    """LoRA in fp32, then per group size post-training int4 and QAT int4 (meant for `measure.isolated`).

    Perplexities in fp32 arithmetic on the int4 weights, and on the int4 kernel itself in bf16 (the
    converted model, as `effllm.quantize` runs it on this device)."""
    run = Run(**run)
    device = resolve_device(run.device)
    model, tok = effllm.load(run.model, device=device)
    train_b, _ = alpaca_batches(tok, run, "subset", run.train_examples)
    eval_b, _ = alpaca_batches(tok, run, "eval", run.eval_examples)
    ppl = lambda m: math.exp(evaluate(m, eval_b))
    fit = lambda m, **kw: train(
        m, train_b, steps=run.steps, seed=run.seed, progress=False, **run.switches, **kw
    )
    on_kernel = lambda m, g=None: ppl((quantize(m, "int4", group_size=g) if g else m).to(torch.bfloat16))
    base, out = copy.deepcopy(model), {"fp32": {}, "bf16": {}, "curves": {}, "failed": {}}
    out["fp32"]["fp32 before fine-tuning"] = ppl(model)
    result = fit(model)
    out["curves"]["LoRA fp32"] = [r["loss"] for r in result.records]
    if result.status != "ok":
        return {**out, "failed": {"LoRA fp32": f"{result.status}: {result.reason}"}}
    out["fp32"]["LoRA fp32"] = ppl(remove_lora(model, merge=True))
    out["bf16"]["LoRA fp32"] = on_kernel(copy.deepcopy(model))
    for g in group_sizes:
        out["fp32"][f"LoRA, then int4 g{g} (PTQ)"] = ppl(int4_weights(model, g))
        out["bf16"][f"LoRA, then int4 g{g} (PTQ)"] = on_kernel(copy.deepcopy(model), g)
        trained = copy.deepcopy(base)
        result = fit(trained, qat="int4", group_size=g)
        out["curves"][f"QAT int4 g{g}"] = [r["loss"] for r in result.records]
        if result.status != "ok":
            out["failed"][f"QAT int4 g{g}"] = f"{result.status}: {result.reason}"
            continue
        out["fp32"][f"QAT int4 g{g}"] = ppl(trained)  # eval mode: through the int4 grid it trained on
        out["bf16"][f"QAT int4 g{g}"] = on_kernel(convert_qat(trained))
    out["eval_tokens"] = sum(int((b["labels"] != -100).sum()) for b in eval_b)
    return out


def qat_rows(run: Run, group_sizes: list[int]) -> list[dict]:
    """Tidy rows of `qat` run in a fresh process: perplexity per model, the gap QAT recovers, loss curves."""
    res = measure.isolated(
        "effllm.bench.qlora:qat", {"run": dataclasses.asdict(run), "group_sizes": group_sizes}
    )
    if res.get("status") != "ok":
        return [row("perplexity", None, status=failure_status(res["status"]), reason=res.get("reason", ""))]
    rows = [
        row("perplexity", v, model=k, arithmetic=arith)
        for arith in ("fp32", "bf16")
        for k, v in res[arith].items()
    ]
    rows += [row("perplexity", None, status="error", reason=why, model=k) for k, why in res["failed"].items()]
    rows += [
        row("loss", v, model=k, step=i + 1)
        for k, losses in res["curves"].items()
        for i, v in enumerate(losses)
    ]
    for arith in ("fp32", "bf16"):
        ppl = res[arith]
        for g in group_sizes:
            ptq, done = ppl.get(f"LoRA, then int4 g{g} (PTQ)"), ppl.get(f"QAT int4 g{g}")
            if ptq is None or done is None or "LoRA fp32" not in ppl:
                continue
            gap = ptq - ppl["LoRA fp32"]
            recovered = (ptq - done) / gap if gap > 0 else math.nan
            why = "" if gap > 0 else f"int4 g{g} after training is no worse than fp32: no gap to recover"
            status = "ok" if gap > 0 else "skipped"
            rows.append(
                row("gap_recovered", recovered, status=status, reason=why, group_size=g, arithmetic=arith)
            )
    return rows
