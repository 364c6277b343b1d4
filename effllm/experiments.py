"""Fine-tuning experiments for the report: one configuration = one fresh process fine-tuning on Alpaca.

A run returns, as tidy rows: the per-step loss curve, time per optimizer step and micro-step (warm-up
excluded), tokens/s, the training phase's own peak memory (CUDA: allocated and reserved after a reset;
CPU: peak RSS from after the model is loaded, and the peak of live tensors in one more, profiled step)
and the memory ledger's prediction for the same configuration, so predicted and measured memory can be
set side by side.
"""

import contextlib
from pathlib import Path

import pandas as pd

import effllm
from effllm import data, measure
from effllm.loading import resolve_device
from effllm.memory import TERMS, ledger
from effllm.train import summarise, train

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
CONFIG = dict(  # the defaults of every knob; notebooks override what their question varies
    model="smollm2-135m-instruct", device="cpu", train_examples=200, eval_examples=0, max_len=256,
    template="alpaca", micro_batch=4, accum_steps=1, steps=10, warmup=1, precision="fp32", lora=False,
    lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_targets=("q_proj", "v_proj"), checkpointing=0,
    optimizer="sgd", lr=1e-5, accum_normalisation="tokens", eval_every=0, seed=0, data_dir=str(DATA_DIR),
)  # fmt: skip
PARAMS = (
    "precision",
    "lora",
    "lora_r",
    "checkpointing",
    "micro_batch",
    "accum_steps",
    "optimizer",
    "max_len",
)


def lora_kwargs(cfg: dict) -> dict | None:
    """apply_lora keyword arguments for a configuration, or None for full fine-tuning."""
    if not cfg["lora"]:
        return None
    targets = cfg["lora_targets"]
    targets = targets if targets == "all-linear" else tuple(targets)
    return dict(r=cfg["lora_r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"], targets=targets)


def alpaca_batches(tokenizer, cfg: dict, split: str, n: int) -> tuple[list[dict], int]:
    """Micro-batches of the first n examples of split ('subset' or 'eval') and how many were truncated."""
    examples = data.load_examples(Path(cfg["data_dir"]) / f"alpaca_{split}.json")[:n]
    items, truncated = data.tokenize(examples, tokenizer, max_len=cfg["max_len"], template=cfg["template"])
    if not items:
        raise ValueError(
            f"no {split} example keeps a response token within max_len={cfg['max_len']}; raise it"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return list(data.batches(items, batch_size=cfg["micro_batch"], pad_id=pad, seed=cfg["seed"])), truncated


def finetune(**overrides) -> dict:
    """Fine-tune one configuration in this process; meant for `measure.isolated` (a fresh process)."""
    cfg = {**CONFIG, **overrides}
    device = resolve_device(cfg["device"])
    model, tok = effllm.load(cfg["model"], device=device)
    train_b, truncated = alpaca_batches(tok, cfg, "subset", cfg["train_examples"])
    eval_b = alpaca_batches(tok, cfg, "eval", cfg["eval_examples"])[0] if cfg["eval_examples"] else None
    loaded = measure.reset_peak_rss()
    cuda = measure.cuda_peak(device) if device.type == "cuda" else None
    with cuda or contextlib.nullcontext() as peak:
        knobs = ("steps", "optimizer", "lr", "precision", "accum_steps", "checkpointing",
                 "accum_normalisation", "eval_every", "seed")  # fmt: skip
        result = train(model, train_b, lora=lora_kwargs(cfg), eval_batches=eval_b, progress=False,
                       **{k: cfg[k] for k in knobs})  # fmt: skip
    trained_peak = measure.peak_rss_bytes()  # before the ledger's own forward below
    live = None
    if device.type == "cpu" and result.status == "ok":  # one more step, profiled: the tensors' own peak
        one_step = {k: cfg[k] for k in knobs if k != "steps"}
        step = lambda: train(model, train_b, steps=1, progress=False, **one_step)  # noqa: E731
        live = effllm.param_bytes(model) + measure.peak_live_tensor_bytes(step)
    # the ledger runs a real forward: after training, so that its memory is not counted as the runtime's
    widest = max(train_b, key=lambda b: b["input_ids"].numel())
    predicted = ledger(model, optimizer=cfg["optimizer"], precision=cfg["precision"], lora=lora_kwargs(cfg),
                       batch=widest, checkpointing=cfg["checkpointing"])  # fmt: skip
    out = {"status": result.status, "reason": result.reason, "records": result.records,
           "ledger": {k: predicted[k] for k in (*TERMS, "total")}, "loaded_rss_bytes": loaded,
           "train_peak_rss_bytes": trained_peak, "live_tensor_bytes": live,
           "truncated_examples": truncated, "trainable_params": result.trainable_params,
           "total_params": result.total_params, **(peak or {})}  # fmt: skip
    if result.status == "ok":
        out["summary"] = summarise(result, warmup_steps=min(cfg["warmup"], cfg["steps"] - 1))
    return out


def run(label: str, **overrides) -> list[dict]:
    """Tidy rows of one configuration, fine-tuned in a fresh process; a failure is one row with its reason."""
    cfg = {**CONFIG, **overrides}
    res = measure.isolated("effllm.experiments:finetune", {k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in overrides.items()})  # fmt: skip
    params = {"config": label, **{k: cfg[k] for k in PARAMS}}
    rows = [
        dict(params, metric=m, value=float(v), unit=u, status="ok", reason="") for m, v, u in _metrics(res)
    ]
    if res.get("status") != "ok":
        rows.append(dict(params, metric="step_s", value=float("nan"), unit="s", status=_status(res["status"]),
                         reason=res.get("reason", "")))  # fmt: skip
    return rows


def _status(status: str) -> str:
    return (
        status if status in ("oom", "unsupported", "error", "skipped") else "error"
    )  # diverged: an error row


def _metrics(res: dict):
    """(metric, value, unit) triples of a run result, skipping what it did not measure."""
    for rec in res.get("records", []):
        yield f"loss@{rec['step']}", rec["loss"], "nats"
        if rec.get("eval_loss") is not None and rec["eval_loss"] == rec["eval_loss"]:
            yield f"eval_loss@{rec['step']}", rec["eval_loss"], "nats"
        if rec.get("loss_scale") is not None:
            yield f"loss_scale@{rec['step']}", rec["loss_scale"], "scale"
    if res.get("status") != "ok":
        return
    s = res["summary"]
    yield from [("step_s", s["step_s"], "s"), ("micro_step_s", s["micro_step_s"], "s"),
                ("tokens_per_s", s["tokens_per_s"], "tokens/s"), ("final_loss", s["final_loss"], "nats"),
                ("trainable_params", res["trainable_params"], "count"),
                ("trainable_pct", 100 * res["trainable_params"] / res["total_params"], "%"),
                ("skipped_steps", sum(bool(r.get("skipped")) for r in res["records"]), "steps"),
                ("truncated_examples", res["truncated_examples"], "count")]  # fmt: skip
    for term, v in res["ledger"].items():
        yield f"predicted_{term}_bytes", v, "B"
    if "peak_allocated_bytes" in res:
        yield "peak_bytes", res["peak_allocated_bytes"], "B"
        yield "peak_reserved_bytes", res["peak_reserved_bytes"], "B"
    else:  # CPU: the process's peak, less what the runtime held before the weights (not in the ledger)
        runtime = res["loaded_rss_bytes"] - res["ledger"]["parameters"]
        yield "peak_bytes", res["train_peak_rss_bytes"] - runtime, "B"
        yield "peak_rss_bytes", res["train_peak_rss_bytes"], "B"
        if res.get("live_tensor_bytes") is not None:  # parameters + the peak of a profiled extra step
            yield "peak_live_bytes", res["live_tensor_bytes"], "B"


def curves(rows, metric: str = "loss") -> pd.DataFrame:
    """Loss-curve rows (metric `loss@<step>`) of tidy rows or a DataFrame, as columns config, step, value."""
    df = pd.DataFrame(rows)
    sel = df[df["metric"].str.startswith(metric + "@")].copy()
    sel["step"] = sel["metric"].str.split("@").str[1].astype(int)
    return sel[["config", "step", "value"]]
