"""What LoRA trains and what fits a memory budget, computed on shapes alone (nothing is allocated).

Trainable parameters are counted on a meta-device model; the memory of a configuration is the ledger's
prediction (`effllm.memory.predict`), so a 1B or 8B model costs seconds and no RAM.
"""

from collections.abc import Iterable

import torch

from effllm.bench.experiments import LEDGER_KNOBS, Run, checkpointing_label
from effllm.bench.rows import LEDGER_TERMS, row
from effllm.lora import apply_lora, trainable_parameters
from effllm.memory import predict
from effllm.model import Llama, ModelArgs


def target_label(targets) -> str:
    """A short name of a LoRA target set: ("q_proj", "v_proj") -> "q,v"; "all-linear" stays."""
    return targets if isinstance(targets, str) else ",".join(t.removesuffix("_proj") for t in targets)


def trainable_rows(args: ModelArgs, ranks: Iterable[int], target_sets: Iterable) -> list[dict]:
    """Trainable parameters (count and %) of LoRA per rank and target set, counted on a meta-device model."""
    rows = []
    for targets in target_sets:
        for r in ranks:
            with torch.device("meta"):  # shapes only: no memory, no time
                model = apply_lora(Llama(args), r=r, targets=targets)
            trainable, total, pct = trainable_parameters(model)
            params = dict(targets=target_label(targets), r=r, total_params=total)
            rows += [row("trainable_params", trainable, **params), row("trainable_pct", pct, **params)]
    return rows


def budget_rows(
    models: dict[str, ModelArgs], configs: dict[str, dict], base: Run, *, batch_size: int, seq_len: int
) -> list[dict]:
    """The ledger's prediction of every configuration (base changed as Run.but) for every model."""
    rows = []
    for name, args in models.items():
        for label, changes in configs.items():
            run = base.but(**changes)
            knobs = {k: run.switch(k) for k in LEDGER_KNOBS}
            pred = predict(args, batch_size=batch_size, seq_len=seq_len, **knobs)
            params = dict(model=name, config=label, batch_size=batch_size, seq_len=seq_len, **run.columns())
            rows += [row(f"predicted_{t}_bytes", pred[t], **params) for t in (*LEDGER_TERMS, "total")]
    return rows


def activation_rows(
    args: ModelArgs, *, micro_batch: int, lengths: list[int], checkpointing: list[int]
) -> list[dict]:
    """Predicted saved activations per checkpointing setting and length (micro-batches of full length)."""
    return [
        row(
            "predicted_activations_bytes",
            predict(args, batch_size=micro_batch, seq_len=t, checkpointing=n)["activations"],
            config=checkpointing_label(n),
            checkpointing=n,
            seq_len=t,
            micro_batch=micro_batch,
        )
        for n in checkpointing
        for t in lengths
    ]
