"""Fine-tuning experiments for the report: one configuration = one fresh process fine-tuning on Alpaca.

A `Run` names the model, the data and `effllm.train`'s keyword switches (whose defaults stay train's own).
Measured, as tidy rows: the loss curve (one row per step), time per optimizer step and micro-step (warm-up
excluded), tokens/s, the training phase's own peak memory (`measure.peak_window`; on the CPU also the peak
of live tensors in one more, profiled step) and the memory ledger's prediction for the same configuration.
"""

import dataclasses
import inspect
import math
from collections.abc import Callable
from pathlib import Path

import torch

import effllm
from effllm import data
from effllm.bench import measure
from effllm.bench.rows import LEDGER_TERMS, failure_status, row
from effllm.decoding import generate
from effllm.device import resolve_device
from effllm.files import repo_path
from effllm.memory import ledger
from effllm.model import Llama
from effllm.nf4 import quantize_base
from effllm.step import evaluate
from effllm.training import train

LEDGER_KNOBS = ("optimizer", "precision", "lora", "checkpointing", "quantize_base")  # what the ledger takes
TRAIN_DEFAULTS = {
    k: p.default
    for k, p in inspect.signature(train).parameters.items()
    if p.default is not inspect.Parameter.empty
}


@dataclasses.dataclass(frozen=True)
class Run:
    """One configuration: model, data, batch shape and steps, and train()'s switches (precision, lora...)."""

    model: str
    data_dir: str
    train_examples: int
    max_len: int
    micro_batch: int
    steps: int
    device: str = "cpu"
    eval_examples: int = 0
    template: str = "alpaca"  # data.format_prompt's template
    warmup: int = 1  # optimizer steps left out of the timings
    seed: int = 0
    switches: dict = dataclasses.field(default_factory=dict)  # train() keyword arguments

    def __post_init__(self):
        # relative to the repository, not the working directory: the same in a notebook and a child process
        object.__setattr__(self, "data_dir", str(repo_path(self.data_dir)))
        unknown = set(self.switches) - set(TRAIN_DEFAULTS) | {"steps", "seed"} & set(self.switches)
        if unknown:
            raise ValueError(f"not train() switches (or set by the Run itself): {sorted(unknown)}")

    @classmethod
    def from_parameters(cls, params: dict, *, switches: tuple[str, ...] = (), **changes) -> "Run":
        """A Run from a notebook's parameters: its fields by name, the named train() switches, changes."""
        names = {f.name for f in dataclasses.fields(cls)} - {"switches"}
        fields = {k: v for k, v in params.items() if k in names}
        return cls(**{**fields, **changes}, switches={k: params[k] for k in switches})

    def but(self, **changes) -> "Run":
        """A copy with fields and train() switches changed (a switch set to None takes train's default)."""
        fields = {k: v for k, v in changes.items() if k in {f.name for f in dataclasses.fields(self)}}
        switches = {**self.switches, **{k: v for k, v in changes.items() if k not in fields}}
        return dataclasses.replace(
            self, **fields, switches={k: v for k, v in switches.items() if v is not None}
        )

    def switch(self, name: str):
        """A train() switch as this run sets it, else train's default."""
        return self.switches.get(name, TRAIN_DEFAULTS[name])

    def columns(self) -> dict:
        """The settings a result row carries as columns."""
        lora = self.switch("lora")
        names = ("precision", "checkpointing", "accum_steps", "optimizer", "lr", "quantize_base")
        cols = {k: self.switch(k) for k in names}
        return dict(
            cols,
            micro_batch=self.micro_batch,
            max_len=self.max_len,
            lora=lora is not None,
            lora_r=(lora or {}).get("r"),
            lora_targets=_targets_label((lora or {}).get("targets", ("q_proj", "v_proj")) if lora else None),
        )


def _targets_label(targets) -> str | None:
    """LoRA targets as one string: ("q_proj", "v_proj") -> "q_proj,v_proj"; "all-linear" stays."""
    return targets if targets is None or isinstance(targets, str) else ",".join(targets)


def alpaca_batches(tokenizer, run: Run, split: str, n: int) -> tuple[list[dict], int]:
    """Micro-batches of the first n examples of split ('subset' or 'eval') and how many were truncated."""
    examples = data.load_examples(Path(run.data_dir) / f"alpaca_{split}.json")[:n]
    items, truncated = data.tokenize(examples, tokenizer, max_len=run.max_len, template=run.template)
    if not items:
        raise ValueError(f"no {split} example keeps a response token within max_len={run.max_len}; raise it")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return list(data.batches(items, batch_size=run.micro_batch, pad_id=pad, seed=run.seed)), truncated


def finetune(**fields) -> dict:
    """Fine-tune one Run (its fields as keywords) in this process; meant for `measure.isolated`."""
    run = Run(**fields)
    device = resolve_device(run.device)
    model, tok = effllm.load(run.model, device=device)
    if run.switch("quantize_base") is not None:  # before the peak window: it measures training, not loading
        quantize_base(model, run.switch("quantize_base"))
    train_b, truncated = alpaca_batches(tok, run, "subset", run.train_examples)
    eval_b = alpaca_batches(tok, run, "eval", run.eval_examples)[0] if run.eval_examples else None
    fit = lambda **kw: train(model, train_b, seed=run.seed, progress=False, **{**run.switches, **kw})
    with measure.peak_window(device) as peak:
        result = fit(steps=run.steps, eval_batches=eval_b)
    out = {
        "status": result.status,
        "reason": result.reason,
        "records": result.records,
        **peak,
        "truncated_examples": truncated,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
    }
    if device.type == "cpu" and result.status == "ok":  # one more step, profiled: the tensors' own peak
        out["peak_live_bytes"] = effllm.param_bytes(model) + measure.peak_live_tensor_bytes(
            lambda: fit(steps=1)
        )
    # the ledger runs a real forward: after training, so that its memory is not counted as the runtime's
    widest = max(train_b, key=lambda b: b["input_ids"].numel())
    knobs = {k: run.switch(k) for k in LEDGER_KNOBS}
    predicted = ledger(model, batch=widest, **knobs)
    out["ledger"] = {  # the terms, and the parameters by how they are stored (fp32, bf16, nf4...)
        k: v for k, v in predicted.items() if k in (*LEDGER_TERMS, "total") or k.startswith("parameters_")
    }
    if result.status == "ok":
        out["times"] = measure.step_times(result.records, warmup_steps=min(run.warmup, run.steps - 1))
    return out


def measure_run(label: str, run: Run) -> list[dict]:
    """Tidy rows of one configuration, fine-tuned in a fresh process; a failure is a row with its reason."""
    res = measure.isolated("effllm.bench.experiments:finetune", dataclasses.asdict(run))
    params = {"config": label, **run.columns()}
    rows = [row(metric, value, **params, **dims) for metric, value, dims in _metrics(res)]
    if res.get("status") != "ok":
        status = failure_status(res.get("status", "error"))
        rows.append(row("step_s", None, status=status, reason=res.get("reason", ""), **params))
    return rows


def sweep(base: Run, configs: dict[str, dict], *, progress: Callable = iter) -> list[dict]:
    """measure_run of every labelled configuration: base with the configuration's changes (Run.but)."""
    return [r for label in progress(list(configs)) for r in measure_run(label, base.but(**configs[label]))]


def stack_configs(mixed_precision: str, lora: dict, labels: list[str]) -> dict[str, dict]:
    """The stacked table's cumulative configurations under its labels, as Run.but changes: fp32, then
    mixed precision, then checkpointing every block, then LoRA (the reference's four), then the base in
    4-bit NF4 (QLoRA); fewer labels take the first configurations."""
    mp = dict(precision=mixed_precision)
    changes = [
        dict(precision="fp32"),
        mp,
        {**mp, "checkpointing": 1},
        {**mp, "checkpointing": 1, "lora": lora},
        {**mp, "checkpointing": 1, "lora": lora, "quantize_base": "nf4"},
    ]
    if len(labels) > len(changes):
        raise ValueError(f"{len(labels)} labels for {len(changes)} stacked configurations")
    return dict(zip(labels, changes, strict=False))


def _metrics(res: dict):
    """(metric, value, extra columns) of a run result, skipping what it did not measure."""
    for rec in res.get("records", []):
        yield "loss", rec["loss"], {"step": rec["step"]}
        if not math.isnan(rec["eval_loss"]):
            yield "eval_loss", rec["eval_loss"], {"step": rec["step"]}
        if rec.get("loss_scale") is not None:
            yield "loss_scale", rec["loss_scale"], {"step": rec["step"]}
    if res.get("status") != "ok":
        return
    times, none = res["times"], {}
    for metric in ("step_s", "micro_step_s", "tokens_per_s"):
        yield metric, times[metric], none
    yield "final_loss", res["records"][-1]["loss"], none
    yield "trainable_params", res["trainable_params"], none
    yield "trainable_pct", 100 * res["trainable_params"] / res["total_params"], none
    yield "skipped_steps", sum(bool(r.get("skipped")) for r in res["records"]), none
    yield "truncated_examples", res["truncated_examples"], none
    for term, v in res["ledger"].items():
        yield f"predicted_{term}_bytes", v, none
    if "peak_allocated_bytes" in res:
        yield "peak_bytes", res["peak_allocated_bytes"], none
        yield "peak_reserved_bytes", res["peak_reserved_bytes"], none
    else:  # CPU: the process's peak, less what the runtime held before the weights (not in the ledger)
        runtime = res["baseline_rss_bytes"] - res["ledger"]["parameters"]
        yield "peak_bytes", res["peak_rss_bytes"] - runtime, none
        yield "peak_rss_bytes", res["peak_rss_bytes"], none
        if "peak_live_bytes" in res:  # parameters + the peak of a profiled extra step
            yield "peak_live_bytes", res["peak_live_bytes"], none


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


def held_out_prompts(run: Run, n: int) -> list[dict]:
    """The first n held-out examples without an input field (short prompts for sample generations)."""
    return [e for e in data.load_examples(Path(run.data_dir) / "alpaca_eval.json") if not e["input"]][:n]


def learn_in_process(
    model: Llama, tokenizer, run: Run, *, epochs: int, prompts: list[dict], max_new_tokens: int
) -> dict:
    """Fine-tune model in place for `epochs` passes over the run's training examples (a new order each
    pass), with the held-out loss before, every `eval_every` steps and at the end.

    Returns rows (eval_loss at step 0, then the loss and eval_loss of each step), the greedy replies to
    prompts before and after, the number of optimizer steps and held-out examples, and the run's status.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    train_b = [
        b
        for epoch in range(epochs)
        for b in alpaca_batches(tokenizer, run.but(seed=run.seed + epoch), "subset", run.train_examples)[0]
    ]
    steps = max(1, len(train_b) // run.switch("accum_steps"))
    eval_b, _ = alpaca_batches(tokenizer, run, "eval", run.eval_examples)
    reply = lambda: replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens, template=run.template)
    before, eval_before = reply(), evaluate(model, eval_b)
    result = train(model, train_b, steps=steps, eval_batches=eval_b, seed=run.seed, **run.switches)
    rows = [row("eval_loss", eval_before, step=0)]
    rows += [
        row(k, r[k], step=r["step"])
        for r in result.records
        for k in ("loss", "eval_loss")
        if not math.isnan(r[k])
    ]
    n_eval = sum(b["input_ids"].shape[0] for b in eval_b)
    return {
        "rows": rows,
        "before": before,
        "after": reply(),
        "status": result.status,
        "steps": steps,
        "n_eval": n_eval,
    }


def checkpointing_label(n: int) -> str:
    """A checkpointing setting by name: 0 -> "none", 1 -> "every block", 2 -> "every 2nd block"..."""
    ordinal = {1: "", 2: "2nd ", 3: "3rd "}
    return f"every {ordinal.get(n, f'{n}th ')}block" if n else "none"


def longest_micro_batch(tokenizer, run: Run) -> int:
    """The longest micro-batch (tokens) a run draws from its training examples."""
    return max(
        b["input_ids"].shape[1] for b in alpaca_batches(tokenizer, run, "subset", run.train_examples)[0]
    )
