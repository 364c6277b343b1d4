"""Fine-tuning step benchmark: our Llama + LoRA against transformers' LlamaForCausalLM + PEFT.

Both stacks run the same loop (`effllm.train`) on the same fixed batch, each in a fresh process
(`measure.isolated`), so only the model code differs; warm-up steps are excluded. Memory is the training
phase's own peak (`measure.peak_window`: CUDA peak allocated/reserved, or on CPU the peak RSS from once
the model is built). `mfu` relates fp32 full fine-tuning to the measured matmul rate (PaLM, App. B).
`python -m effllm.bench.finetune --model smollm2-135m-instruct` prints the table.
"""

import argparse
import gc

import torch
from torch import nn

import effllm
from effllm.bench import hardware, measure
from effllm.bench.rows import failure_status, result_rows, row
from effllm.device import resolve_device
from effllm.loading import to_transformers
from effllm.lora import apply_lora
from effllm.model import ModelArgs
from effllm.precision import AUTOCAST
from effllm.training import train

LORA = dict(r=16, alpha=32, dropout=0.05, targets=("q_proj", "v_proj"))  # the same adapters on both stacks
STACKS = ("ours", "hf")


class HFLogits(nn.Module):
    """transformers' causal LM behind our model's interface: input_ids (B, T) -> logits (B, T, V)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits


def fixed_batch(vocab_size: int, *, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    """Random token ids, every position a target: a step's cost depends on the shape, not the tokens."""
    ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}  # (B, T) each


def build(model: str, stack: str, *, lora: bool, checkpointing: int, device: torch.device) -> nn.Module:
    """One stack's trainable model: ours + effllm.lora, or transformers + PEFT with the same LoRA."""
    net = effllm.load_model(model, device=device)
    if stack == "ours":
        return apply_lora(net, **LORA) if lora else net
    if stack != "hf":
        raise ValueError(f"stack must be 'ours' or 'hf', got {stack!r}")
    hf = to_transformers(net)
    del net  # only one copy of the weights lives on
    gc.collect()
    if checkpointing:  # non-reentrant, so frozen inputs would need no enable_input_require_grads()
        kw = {"use_reentrant": False}
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.2x: every n-th block, as ours
            hf.activation_checkpointing_enable(
                activation_checkpointing_kwargs=kw, every_n_layers=checkpointing
            )
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)  # every block
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=list(LORA["targets"]),
        )
        hf = get_peft_model(hf, config)
    return HFLogits(hf)


def step_metrics(
    *,
    model: str = "tiny",
    stack: str = "ours",
    precision: str = "fp32",
    lora: bool = True,
    checkpointing: int = 1,
    batch_size: int = 4,
    seq_len: int = 128,
    steps: int = 4,
    warmup: int = 1,
    optimizer: str = "sgd",
    lr: float = 1e-5,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """Time warmup + steps optimizer steps of one stack (meant for `measure.isolated`): step time, memory."""
    device = resolve_device(device)
    torch.manual_seed(seed)
    net = build(model, stack, lora=lora, checkpointing=checkpointing, device=device)
    batch = fixed_batch(
        net.hf.config.vocab_size if stack == "hf" else net.args.vocab_size,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=seed,
    )
    with measure.peak_window(device) as peak:  # the training phase only, the model already built
        result = train(
            net,
            [batch],
            steps=warmup + steps,
            optimizer=optimizer,
            lr=lr,
            precision=precision,
            checkpointing=checkpointing if stack == "ours" else 0,
            seed=seed,
            progress=False,
        )
    if result.status != "ok":
        return {"status": result.status, "reason": result.reason}
    times = measure.step_times(result.records, warmup_steps=warmup)
    out = {
        "step_s": times["step_s"],
        "tokens_per_s": times["total_tokens_per_s"],  # every position is computed and (but one) a target
        "final_loss": result.final_loss,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "flops_per_token": flops_per_token(net.args, seq_len) if stack == "ours" else None,
        **peak,
    }
    if (
        "peak_rss_bytes" in peak
    ):  # what training adds to the loaded model: fair between stacks of unequal code
        out["added_rss_bytes"] = peak["peak_rss_bytes"] - peak["baseline_rss_bytes"]
    return out


def compare(
    *,
    model: str = "tiny",
    precision: str = "fp32",
    lora: bool = True,
    checkpointing: int = 1,
    batch_size: int = 4,
    seq_len: int = 128,
    steps: int = 4,
    warmup: int = 1,
    optimizer: str = "sgd",
    device: str = "cpu",
    timeout: float | None = None,
) -> list[dict]:
    """Tidy rows for both stacks, each measured in its own fresh process, plus ours/hf ratios."""
    params = dict(
        model=model,
        precision=precision,
        lora=lora,
        checkpointing=checkpointing,
        batch_size=batch_size,
        seq_len=seq_len,
        device=device,
        optimizer=optimizer,
    )
    memory = "peak_allocated_bytes" if resolve_device(device).type == "cuda" else "added_rss_bytes"
    rows, results = [], {}
    for stack in STACKS:
        kwargs = dict(params, stack=stack, steps=steps, warmup=warmup)
        res = results[stack] = measure.isolated("effllm.bench.finetune:step_metrics", kwargs, timeout=timeout)
        rows += result_rows(res, dict(stack=stack, **params), metric="step_s")
    for metric in ("step_s", memory):
        failed = [s for s in STACKS if results[s].get("status") != "ok" or metric not in results[s]]
        if failed:
            res = results[failed[0]]
            reason = res.get("reason") or f"{metric} not measured for {failed[0]}"
            status = failure_status(res.get("status", "error"))
            rows.append(row(f"{metric}_ratio", None, status=status, reason=reason, stack="ours/hf", **params))
        else:
            ratio = results["ours"][metric] / results["hf"][metric]
            rows.append(row(f"{metric}_ratio", ratio, stack="ours/hf", **params))
    return rows


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul weights (lm_head in, embedding out) + 12 L H hd T attention."""
    attn = args.n_heads * args.head_dim
    per_layer = args.dim * (2 * attn + 2 * args.n_kv_heads * args.head_dim) + 3 * args.dim * args.hidden_dim
    n_matmul = args.n_layers * per_layer + args.dim * args.vocab_size
    return 6 * n_matmul + 12 * args.n_layers * attn * seq_len  # PaLM (Chowdhery et al., 2022), App. B


def mfu(
    *,
    model: str = "tiny",
    batch_size: int = 4,
    seq_len: int = 128,
    steps: int = 4,
    warmup: int = 1,
    device: str = "cpu",
) -> dict:
    """fp32 full fine-tuning throughput as a fraction of the measured fp32 matmul rate (fresh process)."""
    kw = dict(
        model=model,
        stack="ours",
        precision="fp32",
        lora=False,
        checkpointing=0,
        batch_size=batch_size,
        seq_len=seq_len,
        steps=steps,
        warmup=warmup,
        device=device,
    )
    res = measure.isolated("effllm.bench.finetune:step_metrics", kw)
    if res.get("status") != "ok":
        return {"mfu": float("nan"), "status": res["status"], "reason": res.get("reason", "")}
    flops = res["flops_per_token"]
    rate = hardware.matmul_rate(device=str(resolve_device(device)))
    achieved = flops * res["tokens_per_s"]
    return {
        "mfu": achieved / rate,
        "achieved_flop_s": achieved,
        "matmul_flop_s": rate,
        "flops_per_token": flops,
        "tokens_per_s": res["tokens_per_s"],
        "status": "ok",
        "reason": "",
    }


def main(argv: list[str] | None = None) -> None:
    """Print the ours-vs-HF table and the fp32 MFU for one model."""
    import pandas as pd

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", default="fp32", choices=list(AUTOCAST))
    ap.add_argument("--no-lora", action="store_true", help="full fine-tuning instead of LoRA on q, v")
    ap.add_argument("--checkpointing", type=int, default=1, help="0 off, n every n-th block")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps, after --warmup untimed ones")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mfu", action="store_true", help="also measure fp32 full fine-tuning MFU")
    a = ap.parse_args(argv)
    shape = dict(model=a.model, batch_size=a.batch_size, seq_len=a.seq_len, steps=a.steps, warmup=a.warmup)
    rows = compare(
        **shape, precision=a.precision, lora=not a.no_lora, checkpointing=a.checkpointing, device=a.device
    )
    table = pd.DataFrame(rows)[["stack", "metric", "value", "unit", "status", "reason"]]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if a.mfu:
        print(mfu(**shape, device=a.device))


if __name__ == "__main__":
    main()
