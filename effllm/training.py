"""Supervised fine-tuning: one loop whose keyword switches turn each memory/speed technique on.

Follows nanoGPT's `train.py`: autocast + GradScaler mixed precision (Micikevicius et al., 2018), gradient
accumulation, activation checkpointing (Chen et al., 2016), LoRA (`effllm.lora`) on a full-precision or
a 4-bit NF4 base (QLoRA, `effllm.nf4`), int4 quantization-aware training (`effllm.quantization`), warm-up +
cosine schedule and clipping. One step's forward and backward live in `effllm.step`, precision names in
`effllm.precision`. Every optimizer step leaves one record; `effllm.bench.measure.step_times` times them.
"""

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm  # plain text bars: executed notebooks keep them as stream output

from effllm import checks
from effllm.checks import InputError
from effllm.device import is_oom, sync
from effllm.lora import apply_lora, lora_layers, trainable_parameters
from effllm.model import quantized_base, training_mode
from effllm.nf4 import SCHEMES as BASE_SCHEMES
from effllm.nf4 import quantize_base as to_4bit
from effllm.precision import AUTOCAST, precision_problem
from effllm.quantization import GROUP_SIZES, QAT_SCHEMES, prepare_qat
from effllm.step import backward_step, evaluate

CHOICES = {
    "optimizer": ("sgd", "adamw"),
    "schedule": ("constant", "cosine"),
    "accum_normalisation": ("tokens", "mean"),
}


@dataclass
class TrainResult:
    records: list[dict] = field(default_factory=list)  # one per optimizer step
    status: str = "ok"  # ok | diverged | oom | unsupported
    reason: str = ""
    steps: int = 0
    final_loss: float = math.nan
    final_eval_loss: float = math.nan
    nan_count: int = 0
    skipped_steps: int = 0  # fp16 steps the GradScaler skipped (inf/NaN gradients)
    trainable_params: int = 0
    total_params: int = 0


def lr_factor(step: int, *, warmup_steps: int, steps: int, schedule: str) -> float:
    """Multiplier of the base lr at a 0-based step: linear warm-up, then constant or cosine to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _broken(records: list[dict], params: list[Tensor], model: nn.Module) -> str:
    """Why a run that did not stop is still not "ok": non-finite last loss or weights, or a collapse
    to chance level (the loss at ln(vocabulary) with a zero gradient: the model predicts nothing)."""
    if not records:
        return ""
    last = records[-1]
    if not math.isfinite(last["loss"]):
        return f"the last step's loss is {last['loss']} (non-finite losses stayed within divergence_patience)"
    bad = next((i for i, p in enumerate(params) if not bool(torch.isfinite(p).all())), None)
    if bad is not None:
        return f"trainable tensor {bad} of {len(params)} holds NaN or inf after training: lower lr"
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    if vocab and last["grad_norm"] == 0.0 and abs(last["loss"] - math.log(vocab)) < 0.01 * math.log(vocab):
        return (
            f"collapsed: loss {last['loss']:.3f} = ln(vocabulary {vocab}) with a zero gradient, the output "
            "no longer depends on the input: lower lr"
        )
    return ""


def _cycle(batches: Iterable[dict]) -> Iterator[dict]:
    while True:
        n = 0
        for n, batch in enumerate(batches, start=1):  # noqa: B007
            yield batch
        if n == 0:
            raise ValueError(
                "train_batches yielded nothing: pass a list (a generator is used up after one pass)"
            )


def _optimizer_step(opt, sched, scaler, params: list[Tensor], *, max_grad_norm: float | None) -> dict:
    """Unscale, clip (or just measure) the gradient norm, step, update the loss scale and the lr."""
    scaler.unscale_(opt)  # clip and report the true gradient norm, not the scaled one
    grads = [p.grad for p in params if p.grad is not None]
    if max_grad_norm is not None:
        norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    lr = sched.get_last_lr()[0]
    sched.step()
    skipped = scale is not None and scaler.get_scale() < scale  # the scaler backs off on inf/NaN grads
    return {"lr": lr, "grad_norm": float(norm), "loss_scale": scale, "skipped": skipped}


def _check_arguments(a: dict) -> None:
    """The switches of `train`, each checked for its type and range (NaN and inf are refused)."""
    for name in CHOICES:
        checks.choice(name, a[name], CHOICES[name])
    checks.choice("precision", a["precision"], AUTOCAST)
    for name, minimum in (("steps", 1), ("accum_steps", 1), ("checkpointing", 0), ("warmup_steps", 0)):
        checks.integer(name, a[name], minimum=minimum)
    for name in ("eval_every", "log_every", "divergence_patience", "seed"):
        checks.integer(name, a[name], minimum=0 if name != "log_every" else 1)
    checks.number("lr", a["lr"], minimum=0)
    checks.number("weight_decay", a["weight_decay"], minimum=0)
    if a["max_grad_norm"] is not None:
        checks.number("max_grad_norm", a["max_grad_norm"], positive=True)
    if a["quantize_base"] is not None:
        checks.choice("quantize_base", a["quantize_base"], BASE_SCHEMES)
        if a["lora"] is None and not lora_layers(a["model"]):
            raise InputError(
                f"quantize_base={a['quantize_base']!r} freezes a 4-bit base: pass lora= to train adapters "
                "on it (full fine-tuning of a 4-bit base is not supported)"
            )
    if a["qat"] is not None:
        checks.choice("qat", a["qat"], QAT_SCHEMES)
        if a["group_size"] is not None:
            checks.choice("group_size", checks.integer("group_size", a["group_size"], minimum=1), GROUP_SIZES)
        if a["quantize_base"] is not None:
            raise InputError(
                "qat fake-quantizes a full-precision base; quantize_base makes it 4-bit: pick one"
            )
    elif a["group_size"] is not None:
        raise InputError("group_size is QAT's int4 group: pass qat='int4' with it")
    if a["eval_batches"] is not None and len(a["eval_batches"]) == 0:
        raise InputError("eval_batches is empty: pass None for no evaluation, or at least one batch")


def train(
    model: nn.Module,
    train_batches: Iterable[dict],
    *,
    steps: int,
    optimizer: str = "sgd",
    lr: float = 1e-5,
    weight_decay: float = 0.0,
    precision: str = "fp32",
    accum_steps: int = 1,
    accum_normalisation: str = "tokens",
    checkpointing: int = 0,
    lora: dict | None = None,
    quantize_base: str | None = None,
    qat: str | None = None,
    group_size: int | None = None,
    warmup_steps: int = 0,
    schedule: str = "constant",
    max_grad_norm: float | None = None,
    eval_batches: list[dict] | None = None,
    eval_every: int = 0,
    log_every: int = 1,
    seed: int = 0,
    progress: bool = True,
    divergence_patience: int = 3,
) -> TrainResult:
    """Fine-tune model in place for `steps` optimizer steps of `accum_steps` micro-batches each.

    lora (apply_lora kwargs) is applied unless the model already has adapters; quantize_base="nf4" first
    puts the frozen block linears on NF4 (QLoRA; a base already quantized stays); qat="int4" with
    group_size (32 default) trains the adapters through the int4 grid (`quantization.prepare_qat`; convert
    with `quantization.convert_qat`). bf16-pure casts the model (adapters too) to bf16. A non-finite loss
    for more than divergence_patience consecutive steps stops with status "diverged"; fp16 steps the
    scaler skips with a finite loss are its back-off, not divergence.
    """
    _check_arguments(locals())
    device = next(model.parameters()).device
    if reason := precision_problem(precision, device):
        return TrainResult(status="unsupported", reason=reason)
    torch.manual_seed(seed)
    if quantize_base is not None and quantized_base(model) is None:
        to_4bit(model, quantize_base)
    if lora is not None and not lora_layers(model):
        apply_lora(model, **{"seed": seed, **lora})
    if qat is not None and getattr(model, "qat", None) is None:
        prepare_qat(model, qat, group_size=32 if group_size is None else group_size)
    if precision == "bf16-pure":
        model.to(torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
    opt = opt_cls(params, lr=lr, weight_decay=weight_decay)
    factor = lambda i: lr_factor(i, warmup_steps=warmup_steps, steps=steps, schedule=schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    trainable, total, _ = trainable_parameters(model)
    result = TrainResult(trainable_params=trainable, total_params=total)
    data, bad = _cycle(train_batches), 0
    bar = tqdm(range(1, steps + 1), desc="train", disable=not progress)
    try:
        with training_mode(model, checkpointing=checkpointing):
            for step in bar:
                sync(device)
                t0 = time.perf_counter()
                micro = [next(data) for _ in range(accum_steps)]
                out = backward_step(
                    model, micro, precision=precision, normalisation=accum_normalisation, scaler=scaler
                )
                stepped = _optimizer_step(opt, sched, scaler, params, max_grad_norm=max_grad_norm)
                sync(device)
                record = {"step": step, **out, **stepped, "step_s": time.perf_counter() - t0}
                result.nan_count += not math.isfinite(out["loss"])
                result.skipped_steps += stepped["skipped"]
                bad = 0 if math.isfinite(out["loss"]) else bad + 1
                do_eval = (
                    eval_batches is not None and eval_every > 0 and (step % eval_every == 0 or step == steps)
                )
                record["eval_loss"] = (
                    evaluate(model, eval_batches, precision=precision) if do_eval else math.nan
                )
                result.records.append({**record, "nan_count": result.nan_count})
                if step % log_every == 0:
                    bar.set_postfix(loss=f"{out['loss']:.4f}")
                if bad > divergence_patience:
                    result.status = "diverged"
                    result.reason = (
                        f"loss non-finite for {bad} consecutive steps (to step {step}, patience "
                        f"{divergence_patience}) at lr={stepped['lr']:g}: lower lr or set max_grad_norm"
                    )
                    break
    except Exception as e:
        if not is_oom(e):
            raise
        result.status = "oom"
        result.reason = f"out of memory at step {len(result.records) + 1}: {type(e).__name__}: {e}"[:500]
        opt.zero_grad(set_to_none=True)
    finally:
        bar.close()
    result.steps = len(result.records)
    if result.status == "ok" and (problem := _broken(result.records, params, model)):
        result.status, result.reason = "diverged", problem
    if result.records:
        result.final_loss = result.records[-1]["loss"]
        evals = [r["eval_loss"] for r in result.records if not math.isnan(r["eval_loss"])]
        result.final_eval_loss = evals[-1] if evals else math.nan
    return result
