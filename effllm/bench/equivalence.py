"""Gradient equivalence of the memory savers: they may change memory and time, not the gradient.

Activation checkpointing (Chen et al., 2016) recomputes each checkpointed block's activations in backward,
so its gradients must equal the plain run's up to float rounding. Accumulating k micro-batches with each
summed loss divided by the step's target tokens gives the gradient of one batch holding them all; the
common shortcut, the mean of per-micro-batch mean losses, over-weights micro-batches with few targets.
A setting is a dict of `split` (micro-batches), `normalisation` and `checkpointing`; errors are reported
as the largest absolute difference and the relative L2 error over all trainable gradients. Two more checks
against a reference: our LoRA against PEFT's (logits, both ways), and what pure bf16 rounds away.
"""

import itertools
import math
import statistics
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

import effllm
from effllm.bench.rows import row
from effllm.data import count_target_tokens
from effllm.device import is_oom
from effllm.loading import to_transformers
from effllm.loading.peft import load_adapter, save_adapter
from effllm.lora import lora_layers
from effllm.model import Llama, training_mode
from effllm.step import backward_step, loss_fn

SETTING = dict(split=1, normalisation="tokens", checkpointing=0)  # one batch, exact loss, no recompute


def split(batch: dict, k: int) -> list[dict]:
    """k micro-batches of a right-padded batch's rows, each cut to its own longest row (as collate pads)."""
    rows = batch["input_ids"].shape[0]
    if not 1 <= k <= rows or rows % k:
        raise ValueError(f"cannot split a batch of {rows} rows into {k} equal micro-batches")
    size, out = rows // k, []
    for s in range(0, rows, size):
        part = {name: t[s : s + size] for name, t in batch.items()}  # (B/k, T) each
        width = int(part["attention_mask"].sum(1).max())  # the longest real row of this micro-batch
        out.append({name: t[:, :width] for name, t in part.items()})
    return out


def gradients(model: nn.Module, batch: dict, *, seed: int = 0, **setting) -> dict[str, Tensor]:
    """Trainable parameters' gradients after one optimizer step's backward under a setting, on the CPU."""
    return _backward(model, batch, seed=seed, **setting)[0]


def _backward(model: nn.Module, batch: dict, *, seed: int = 0, **setting) -> tuple[dict[str, Tensor], float]:
    """The gradients of one setting and the seconds its forwards and backwards took."""
    cfg = {**SETTING, **setting}
    unknown = set(cfg) - set(SETTING)
    if unknown:
        raise ValueError(f"unknown setting {', '.join(sorted(unknown))}; use {', '.join(SETTING)}")
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in every setting; checkpointing replays the RNG
    try:
        with training_mode(model, checkpointing=cfg["checkpointing"]):
            micro = split(batch, cfg["split"])
            out = backward_step(model, micro, normalisation=cfg["normalisation"])
        # Copied to the host: a reference set beside a candidate's .grad would double accelerator memory.
        grads = {
            n: p.grad.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.grad is not None
        }
        return grads, out["micro_step_s"] * len(micro)
    finally:
        model.zero_grad(set_to_none=True)


def difference(reference: dict[str, Tensor], candidate: dict[str, Tensor]) -> dict:
    """Largest absolute error, relative L2 error and the reference's largest gradient, over all tensors."""
    if reference.keys() != candidate.keys():
        raise ValueError(f"gradients of different parameters: {sorted(reference.keys() ^ candidate.keys())}")
    sq_err, sq_ref, max_err, max_ref = 0.0, 0.0, 0.0, 0.0
    for name, ref in reference.items():
        err = candidate[name] - ref
        norms = [float(torch.linalg.vector_norm(t, o)) for t in (err, ref) for o in (2, math.inf)]
        sq_err, sq_ref = sq_err + norms[0] ** 2, sq_ref + norms[2] ** 2
        max_err, max_ref = max(max_err, norms[1]), max(max_ref, norms[3])
    rel = math.sqrt(sq_err / sq_ref) if sq_ref else math.nan
    return {"max_abs_error": max_err, "relative_error": rel, "max_abs_grad": max_ref}


def grad_difference(
    model: nn.Module, batch: dict, *, reference: dict, candidate: dict, seed: int = 0
) -> dict:
    """Errors of a candidate setting's gradients against a reference setting's, on the same examples."""
    ref = gradients(model, batch, seed=seed, **reference)
    return difference(ref, gradients(model, batch, seed=seed, **candidate))


def compare(
    model: nn.Module,
    batch: dict,
    *,
    reference: dict,
    candidates: dict[str, dict],
    rounds: int = 1,
    reference_label: str = "reference",
    seed: int = 0,
    **params,
) -> list[dict]:
    """Tidy rows: each candidate's gradient errors against the reference; out of memory is a row.

    With rounds > 1 every setting also runs once per later round, interleaved so that a drift in machine
    load hits all alike, and its median forward + backward time is a row (the first round is a warm-up).
    """
    settings = {reference_label: reference, **candidates}
    times, rows, ref = {label: [] for label in settings}, [], None
    for r in range(rounds):
        for label, setting in settings.items():
            cfg = dict(params, config=label, **{**SETTING, **setting})
            try:
                grads, seconds = _backward(model, batch, seed=seed, **setting)
            except Exception as e:
                if not is_oom(e):
                    raise
                if r == 0:
                    reason = f"{type(e).__name__}: {e}"[:300]
                    rows.append(row("relative_error", None, status="oom", reason=reason, **cfg))
                continue
            times[label] += [seconds] if r else []
            if r == 0 and label == reference_label:
                ref = grads
            elif r == 0 and ref is not None:
                rows += [row(m, v, **cfg) for m, v in difference(ref, grads).items()]
            del grads
        ref = None  # only the first round compares
    for label, t in times.items():
        if t:
            cfg = dict(params, config=label, **{**SETTING, **settings[label]})
            rows.append(row("backward_s", statistics.median(t), **cfg))
    return rows


def targets_per_micro_batch(batch: dict, k: int) -> list[int]:
    """Loss-bearing tokens of each of the k micro-batches a batch splits into."""
    return [count_target_tokens(b) for b in split(batch, k)]


@torch.no_grad()
def nudge_adapters(model: nn.Module, *, std: float = 1e-3, seed: int = 0) -> nn.Module:
    """Give LoRA's B (zero at init) small random values, as after training, so A's gradient is not zero."""
    gen = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        b = layer.lora_B
        b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype).to(b.device) * std)
    return model


def step_examples(micro_batches: list[dict], *, accum_steps: int, steps: int) -> list[list[tuple]]:
    """The examples (sorted token tuples) each optimizer step sees, cycling micro-batches as train() does."""
    lengths = [b["attention_mask"].sum(1).tolist() for b in micro_batches]  # real tokens per row
    rows = [
        [tuple(ids[:n].tolist()) for ids, n in zip(b["input_ids"], ns, strict=True)]
        for b, ns in zip(micro_batches, lengths, strict=True)
    ]
    cycle = itertools.cycle(rows)
    return [sorted(x for _ in range(accum_steps) for x in next(cycle)) for _ in range(steps)]


@torch.no_grad()
def peft_check(model: Llama, source: str, ids: Tensor) -> list[dict]:
    """Max |logit| gaps of ours vs: PEFT loading our adapter, ours loading PEFT's re-save, no adapter."""
    from peft import PeftModel

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
        again = load_adapter(cpu(), Path(tmp) / "peft").to(device).eval()(ids)
    model.train(was_training)
    gaps = {
        "peft_max_abs_diff": (ours - theirs).abs().max().item(),
        "round_trip_max_abs_diff": (ours - again).abs().max().item(),
        "logit_abs_max": ours.abs().max().item(),
        "adapter_effect_max_abs": (ours - plain).abs().max().item(),
    }
    return [row(k, v) for k, v in gaps.items()]


def lost_updates(model: nn.Module, batch: dict, *, lr: float) -> list[dict]:
    """Share of weight elements whose SGD update w - lr * g rounds back to w in bf16 (one fp32 gradient)."""
    device = next(model.parameters()).device
    with training_mode(model):
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
    return [row("lost_update_share", lost / max(kept, 1), lr=lr, optimizer="sgd")]
