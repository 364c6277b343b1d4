"""Helpers of the LoRA and mixed-precision notebooks (02_lora, 03_amp): loops, tables and checks.

Configurations are measured by `experiments.run` (a fresh process each); this module names them, tables
their rows, counts LoRA's trainable parameters on a meta-device model and checks our adapters with PEFT.
"""

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd
import torch
from torch import nn

import effllm
from effllm import data, experiments, measure, memory, tables
from effllm.decoding import generate
from effllm.lora import apply_lora, trainable_parameters
from effllm.model import Llama, ModelArgs
from effllm.peft_io import load_adapter, save_adapter
from effllm.results import row


def stack_configs(mixed_precision: str) -> dict[str, dict]:
    """The four cumulative configurations of the reference fine-tuning table, as experiments overrides."""
    mp = dict(precision=mixed_precision)
    steps = [dict(precision="fp32"), mp, {**mp, "checkpointing": 1}, {**mp, "checkpointing": 1, "lora": True}]
    return dict(zip(tables.STACK, steps, strict=True))


def run_configs(
    configs: dict[str, dict], *, section: str, progress: Callable = iter, **common
) -> pd.DataFrame:
    """Tidy rows of each labelled configuration, each fine-tuned in a fresh process by experiments.run."""
    rows = [
        r for label in progress(list(configs)) for r in experiments.run(label, **common, **configs[label])
    ]
    return pd.DataFrame(rows).assign(section=section)


def trainable_rows(args: ModelArgs, ranks: Iterable[int], target_sets: Iterable) -> list[dict]:
    """Trainable parameters (count and %) of LoRA per rank and target set, counted on a meta-device model."""
    rows = []
    for targets in target_sets:
        for r in ranks:
            with torch.device("meta"):  # shapes only: no memory, no time
                model = apply_lora(Llama(args), r=r, targets=targets)
            trainable, total, pct = trainable_parameters(model)
            label = (
                targets if isinstance(targets, str) else ",".join(t.removesuffix("_proj") for t in targets)
            )
            params = dict(section="params", targets=label, r=r, total_params=total)
            rows += [
                row("trainable_params", trainable, "count", **params),
                row("trainable_pct", pct, "%", **params),
            ]
    return rows


def config_table(df: pd.DataFrame) -> pd.DataFrame:
    """One line per configuration, in run order: peak memory measured and predicted, step time, loss."""
    ok = df[df["status"] == "ok"].pivot_table(index="config", columns="metric", values="value", sort=False)
    out = pd.DataFrame(index=pd.Index(df["config"].unique(), name="config"))
    names = {"peak_bytes": "peak_memory_mb", "peak_live_bytes": "live_tensors_mb",
             "predicted_total_bytes": "predicted_memory_mb",
             "step_s": "runtime_per_step_s", "trainable_pct": "trainable_pct", "final_loss": "final_loss",
             "skipped_steps": "skipped_steps"}  # fmt: skip
    for metric, name in names.items():
        if metric in ok:
            out[name] = ok[metric] / (1e6 if metric.endswith("bytes") else 1)
    bad = df[df["status"] != "ok"].drop_duplicates("config").set_index("config")
    out["status"] = [f"{bad.status[c]}: {bad.reason[c]}"[:120] if c in bad.index else "ok" for c in out.index]
    return out


def budget_rows(
    models: dict[str, ModelArgs], configs: dict[str, dict], *, batch_size: int, seq_len: int, common: dict
) -> list[dict]:
    """The ledger's prediction of every configuration (over common knobs) for every model, on shapes only."""
    rows = []
    for name, args in models.items():
        for label, overrides in configs.items():
            cfg = {**experiments.CONFIG, **common, **overrides}
            knobs = {k: cfg[k] for k in ("precision", "checkpointing")}
            lora = experiments.lora_kwargs(cfg)
            pred = memory.predict(
                args, batch_size=batch_size, seq_len=seq_len, optimizer=cfg["optimizer"], lora=lora, **knobs
            )
            params = dict(section="budget", model=name, config=label, batch_size=batch_size, seq_len=seq_len)
            params.update(knobs, lora=cfg["lora"], optimizer=cfg["optimizer"])
            rows += [row(f"predicted_{t}_bytes", pred[t], "B", **params) for t in (*memory.TERMS, "total")]
    return rows


def replies(
    model: Llama, tokenizer, examples: list[dict], *, max_new_tokens: int, template: str
) -> list[str]:
    """Greedy replies (KV cache on) to each example's prompt, decoded without special tokens."""
    device, out = next(model.parameters()).device, []
    for example in examples:
        text = data.format_prompt(example, template=template, tokenizer=tokenizer)
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=template != "chat")], device=device)
        tokens = generate(model, ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(tokens[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return out


def replies_markdown(examples: list[dict], before: list[str], after: list[str]) -> str:
    """The sample generations before and after fine-tuning as Markdown, one block per instruction."""
    quote = lambda s: " ".join(s.split()) or "(empty)"
    return "\n\n".join(
        f"**{quote(e['instruction'])}**\n\n- before: {quote(b)}\n- after: {quote(a)}"
        for e, b, a in zip(examples, before, after, strict=True)
    )


@torch.no_grad()
def peft_check(model: Llama, source: str, ids: torch.Tensor) -> dict:
    """Max |logit| gaps of ours vs: PEFT loading our adapter, ours loading PEFT's re-save, no adapter."""
    from peft import PeftModel

    from effllm.loading import to_transformers

    device, was_training = ids.device, model.training
    model.eval()
    ours = model(ids)  # (B, T, V)
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, Path(tmp) / "ours", base_model_name_or_path=str(source))
        cpu = lambda: effllm.load_model(source, device="cpu")  # built on the CPU: one more copy on the device
        peft = PeftModel.from_pretrained(to_transformers(cpu()), Path(tmp) / "ours").to(device)
        theirs = peft(input_ids=ids).logits
        with peft.disable_adapter():  # the base alone: how far the adapter moves the logits
            plain = peft(input_ids=ids).logits
        peft.save_pretrained(Path(tmp) / "peft", save_embedding_layers=False)  # no hub look-up
        del peft
        back = load_adapter(cpu(), Path(tmp) / "peft").to(device).eval()
        again = back(ids)
    model.train(was_training)
    return {
        "peft_max_abs_diff": (ours - theirs).abs().max().item(),
        "round_trip_max_abs_diff": (ours - again).abs().max().item(),
        "logit_abs_max": ours.abs().max().item(),
        "adapter_effect_max_abs": (ours - plain).abs().max().item(),
    }


HALF_FLAGS = {"avx512f": "AVX-512", "avx512_bf16": "AVX-512 BF16 dot products", "amx_bf16": "AMX BF16 tiles",
              "avx512_fp16": "AVX-512 FP16 arithmetic", "amx_fp16": "AMX FP16 tiles",
              "f16c": "F16C fp16<->fp32 conversion"}  # fmt: skip


def half_precision_support(device: torch.device) -> dict[str, str]:
    """What the device offers for 16-bit arithmetic: CPU feature flags or the GPU's name and capability."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {
            "GPU": torch.cuda.get_device_name(device),
            "compute capability": f"{major}.{minor}",
            "tensor cores (fp16)": "yes" if major >= 7 else "no",
            "bf16": str(torch.cuda.is_bf16_supported()),
        }
    try:  # the feature flags Linux reports in /proc/cpuinfo
        with open("/proc/cpuinfo") as f:
            flags = set(next(ln for ln in f if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    out = {"torch CPU kernels": torch.backends.cpu.get_cpu_capability()}
    return out | {name: "yes" if flag in flags else "no" for flag, name in HALF_FLAGS.items()}


def matmul_rows(device: str, n: int) -> list[dict]:
    """Measured (n, n) matmul rate per dtype; a dtype the device cannot multiply is a row with its reason."""
    rows = []
    for name, dtype in {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.items():
        try:
            rate, status, reason = measure.matmul_rate(n=n, dtype=dtype, device=device), "ok", ""
        except RuntimeError as e:
            rate, status, reason = None, "unsupported", f"{type(e).__name__}: {e}"[:200]
        rows.append(row("matmul_flop_s", rate, "FLOP/s", status, reason, section="matmul", dtype=name, n=n))
    return rows


def lost_updates(model: nn.Module, batch: dict, *, lr: float) -> float:
    """Share of weight elements whose SGD update w - lr * g rounds back to w in bf16 (one fp32 gradient)."""
    from effllm.step import loss_fn

    device = next(model.parameters()).device
    model.train()
    total, n = loss_fn(model(batch["input_ids"].to(device)), batch["labels"].to(device))
    (total / n).backward()
    lost = kept = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                w = p.to(torch.bfloat16)  # the weight as pure bf16 training holds it
                same = (w.float() - lr * p.grad).to(torch.bfloat16) == w
                lost, kept = lost + int(same[p.grad != 0].sum()), kept + int((p.grad != 0).sum())
    model.zero_grad(set_to_none=True)
    return lost / max(kept, 1)
