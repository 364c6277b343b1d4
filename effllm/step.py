"""One optimizer step's forward and backward: the loss, token-normalised gradient accumulation, evaluation.

Accumulated micro-batches are normalised by the step's target tokens, so k of them give the gradient of one
batch holding them all (the naive per-micro-batch mean over-weights short micro-batches).
"""

import statistics
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effllm import checks
from effllm.checks import InputError
from effllm.data import IGNORE_INDEX, count_target_tokens
from effllm.device import sync
from effllm.precision import autocast


def check_batch(model: nn.Module, batch: dict, where: str) -> None:
    """A training batch: input_ids and labels of one shape, ids in the vocabulary, within the context."""
    missing = [k for k in ("input_ids", "labels") if k not in batch]
    if missing:
        raise InputError(f"{where} lacks {', '.join(missing)}: build batches with effllm.data.batches")
    args = getattr(model, "args", None)
    ids = checks.token_ids(f"{where}: input_ids", batch["input_ids"], args.vocab_size if args else 2**62)
    if batch["labels"].shape != ids.shape:
        raise InputError(f"{where}: labels {tuple(batch['labels'].shape)} != input_ids {tuple(ids.shape)}")
    if args is not None and ids.shape[1] > args.max_seq_len:
        raise InputError(
            f"{where} is {ids.shape[1]} tokens long, beyond the model's context of {args.max_seq_len}: "
            "lower max_len"
        )


def loss_fn(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy summed over targets in fp32, and the target count (a tensor: no host sync)."""
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t + 1; labels are not shifted
    flat = logits[:, :-1].flatten(0, 1).float()  # (B * (T-1), V)
    total = F.cross_entropy(flat, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets != IGNORE_INDEX).sum()


def backward_step(
    model: nn.Module,
    micro_batches: list[dict],
    *,
    precision: str = "fp32",
    normalisation: str = "tokens",
    scaler: torch.amp.GradScaler | None = None,
) -> dict:
    """Forward + backward of one optimizer step's micro-batches, accumulating into .grad.

    tokens: each micro-batch's summed loss / the step's total targets (exact large-batch gradient);
    mean: each micro-batch's mean loss / k, the common shortcut that over-weights short micro-batches.
    """
    device = next(model.parameters()).device
    for i, batch in enumerate(micro_batches):
        check_batch(model, batch, f"micro-batch {i}")
    total = sum(count_target_tokens(b) for b in micro_batches)  # counted on the host before any forward
    if total == 0:
        raise InputError(
            f"the {len(micro_batches)} micro-batch(es) of this step hold no target token (every label is "
            f"{IGNORE_INDEX}), so there is no loss: raise max_len or check the prompt masking"
        )
    summed, times = torch.zeros((), device=device), []
    for batch in micro_batches:
        sync(device)
        t0 = time.perf_counter()
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)  # (B, T) each
        with autocast(device, precision):
            logits = model(ids)  # (B, T, V)
        loss_sum, n = loss_fn(logits, labels)
        del logits  # only the fp32 log-probs are kept for backward
        denom = max(total, 1) if normalisation == "tokens" else n.clamp(min=1) * len(micro_batches)
        loss = loss_sum / denom
        (scaler.scale(loss) if scaler is not None else loss).backward()
        summed += loss_sum.detach()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {
        "loss": summed.item() / max(total, 1),  # token-mean over the whole step
        "tokens": total,
        "total_tokens": sum(b["input_ids"].numel() for b in micro_batches),  # positions computed, padding too
        "micro_step_s": statistics.mean(times),
    }


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict], *, precision: str = "fp32") -> float:
    """Token-mean loss over batches in eval mode (the model's mode is restored)."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    summed, n = torch.zeros((), device=device), 0
    for i, batch in enumerate(batches):
        check_batch(model, batch, f"eval batch {i}")
        with autocast(device, precision):
            logits = model(batch["input_ids"].to(device))
        loss_sum, count = loss_fn(logits, batch["labels"].to(device))
        summed, n = summed + loss_sum, n + int(count)
    model.train(was_training)
    if n == 0:
        raise InputError(f"the eval batches hold no target token (every label is {IGNORE_INDEX}): no loss")
    return summed.item() / n
