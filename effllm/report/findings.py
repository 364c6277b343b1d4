"""Findings prose: what a table's numbers say, as Markdown formatted from the numbers themselves.

Every number quoted in the report's prose comes from here, never typed by hand; where an effect goes the
other way than in the reference, the reason is given (`WHY`).
"""

import math

import pandas as pd

from effllm.bench.experiments import checkpointing_label
from effllm.bench.ladder import PATHS
from effllm.report import reference, tables

# Why a technique can move step time or peak memory the other way here than in the reference.
WHY = {
    "+ Mixed precision": {
        "step time": "half-precision matmuls run faster only on units built for them (GPU tensor cores; on a "
        "CPU, AVX-512 BF16 or AMX: 03_amp lists what this machine has and measures its matmul rates), and a "
        "step gains only as far as those matmuls dominate it; here autocast's casts of every weight and "
        "activation on every forward cost more than the faster matmuls save",
        "peak memory": "autocast keeps fp32 weights, gradients and optimizer state and adds half-precision "
        "copies of the weights, saving only on activations, a small share for a small model at short "
        "sequences (the reference's 7.8 GB is below the 9.9 GB of fp32 weights and gradients of a 1B "
        "model, so it presumably held the weights in half precision too)",
    },
    "+ Checkpointing": {
        "step time": "re-computing each block's forward in backward costs about one more forward pass, so "
        "a faster step can only be run-to-run noise",
        "peak memory": "it saves activations only, which are small next to weights and gradients at short "
        "sequences, while the re-computation adds transient buffers of its own",
    },
    "+ LoRA": {
        "step time": "the step still runs the whole forward and nearly all of the backward (gradients flow "
        "through the frozen layers to the adapters), so its saving is small and can drown in noise",
        "peak memory": "freezing the base removes its gradients and optimizer state, which should always "
        "lower the peak; a higher one points at the measurement",
    },
}
CACHE_WHY = {
    True: (
        "a CPU's few cores are saturated by the prompt recomputed at every step, so the cache saves "
        "relatively more; a GPU absorbs much of that recomputation in otherwise idle parallel units"
    ),
    False: (
        "the saving grows with batch and length, as the recomputed work does; the model and the "
        "hardware set its size"
    ),
}


def disagreements(inference: pd.DataFrame | None, finetune: pd.DataFrame | None, device: str) -> list[str]:
    """Where this run's effects differ from the reference's, each with its reason (markdown bullets)."""
    out = []
    if inference is not None and {1, 16} <= set(inference.index.get_level_values("batch")):
        ref, ours = reference.INFERENCE.set_index(["batch", "cache"])["runtime_s"], inference["runtime_s"]
        for b in (1, 16):
            r, o = ref[(b, "off")] / ref[(b, "on")], ours[(b, "off")] / ours[(b, "on")]
            reason = CACHE_WHY[device == "cpu" and o > r]
            out.append(
                f"- KV cache at batch {b}: no-cache / cache runtime **{o:.1f}x** here, {r:.1f}x in the "
                f"reference: {reason}."
            )
    if finetune is not None:
        out += technique_changes(finetune, only_differing=True)
    return out


def technique_changes(finetune: pd.DataFrame, only_differing: bool = False) -> list[str]:
    """Each technique of the stacked table against the row above it, here and in the reference.

    Where step time or peak memory moves the other way than in the reference, the reason is given.
    """
    here, ref = finetune.reindex(reference.STACKED), reference.FINETUNE.set_index(pd.Index(reference.STACK))
    columns = {"step time": "runtime_per_step_s", "peak memory": "peak_memory_mb"}
    lines = []
    for tech in reference.STACKED[1:]:
        ours = {k: tables.step_changes(here, c)[tech] for k, c in columns.items()}
        if any(pd.isna(v) for v in ours.values()):
            continue
        if tech not in reference.STACK:  # our own row: nothing to compare with
            if not only_differing:
                lines.append(
                    f"- **{tech}**: step time x{ours['step time']:.2f}, peak memory "
                    f"x{ours['peak memory']:.2f} (beyond the reference's table)."
                )
            continue
        theirs = {k: tables.step_changes(ref, c)[tech] for k, c in columns.items()}
        differ = [k for k in columns if (ours[k] < 1) != (theirs[k] < 1)]
        if only_differing and not differ:
            continue
        why = "; ".join(f"{k} goes the other way: {WHY[tech][k]}" for k in differ)
        lines.append(
            f"- **{tech}**: step time x{ours['step time']:.2f}, peak memory x{ours['peak memory']:.2f} "
            f"(reference: x{theirs['step time']:.2f}, x{theirs['peak memory']:.2f})"
            + (f"; {why}." if differ else ", as in the reference.")
        )
    return lines


def model_line(model, source: str, device: str) -> str:
    """The model a notebook measures, its shape and where it runs."""
    a, n = model.args, sum(p.numel() for p in model.parameters())
    return (
        f"**Model** `{source}` ({a.n_layers} layers, {a.n_heads} query / {a.n_kv_heads} key-value heads, "
        f"{n / 1e6:,.1f}M parameters) on **{device}**"
    )


def decoding_model(model, source: str, device: str, dtype: str) -> str:
    """One line naming the decoding notebook's model, its shape and where it runs."""
    return f"{model_line(model, source, device)}, {dtype}. The analytic ledger:"


def kv_cache_table(inference: pd.DataFrame) -> str:
    """What the inference table says: the cache's speed-up, ours against transformers, memory."""
    on, off = inference.xs("on", level="cache"), inference.xs("off", level="cache")
    big, small = on.index.max(), on.index.min()
    speedup = off.runtime_s / on.runtime_s
    lines = [
        f"- Runtime without / with the cache: **{speedup[big]:.2f}x** at batch {big} "
        f"({off.runtime_s[big]:.2f} s "
        f"against {on.runtime_s[big]:.2f} s), {speedup[small]:.2f}x at batch {small}."
    ]
    if "speedup_vs_transformers" in inference:
        s = inference["speedup_vs_transformers"]
        lines.append(
            f"- Our Llama against transformers' `generate` (tokens/s, same inputs): {s.min():.2f}x to "
            f"{s.max():.2f}x; with the cache at batch {big}: **{s[(big, 'on')]:.2f}x**."
        )
    lines.append(
        f"- Peak memory grows from {on.peak_memory_gb.min():.2f} GB to {off.peak_memory_gb.max():.2f} GB "
        f"across the table; the KV cache itself is {on.kv_cache_mb[big]:.0f} MB at batch {big}."
    )
    return "\n".join(lines)


def cache_pays_from(pays: dict[int, int | None], lengths: list[int]) -> str:
    """From which generated length the cache is faster, per batch size."""
    parts = [
        f"**{n} generated tokens** at batch {b}" if n else f"no tested length at batch {b}"
        for b, n in pays.items()
    ]
    return f"The cache is faster from {'; '.join(parts)} (tested: {', '.join(map(str, lengths))})."


def fp32_identical(checks: pd.DataFrame) -> bool:
    """Whether cached and uncached fp32 decoding gave the same tokens (True when fp32 was not checked)."""
    fp32 = checks[(checks.dtype == "fp32") & (checks.metric == "tokens_identical")]
    return fp32.empty or bool(fp32.value.iloc[0] == 1.0)


def roofline(roof: pd.DataFrame, *, batch: int) -> str:
    """Batch-1 decoding against the read bandwidth and the batch-1 linear layers' measured read rate."""
    m = roof.groupby("metric", sort=False).value.first()
    weights, bw = m["weights_bytes"], m["read_bandwidth"]
    b1 = m["fraction_of_limit"] * bw / weights
    text = (
        f"Measured read bandwidth **{bw / 1e9:.1f} GB/s**; with {weights / 1e6:.0f} MB of weights the limit "
        f"is "
        f"**{bw / weights:.1f} tokens/s** at batch {batch}. Our cached decode reaches {b1:.1f} tokens/s "
        f"including prefill, **{m['fraction_of_limit']:.0%}** of that limit."
    )
    linear = roof[roof.metric == "linear_read_bandwidth"].dropna(subset=["threads"])
    if len(linear) == 2:
        one, many = linear.sort_values("threads").value
        threads = int(linear.threads.max())
        spread = (
            "so it does not spread one matrix-vector product over the cores"
            if many < 1.2 * one
            else "so the cores share the work"
        )
        text += (
            f"\n\nA batch-1 linear layer is a matrix-vector product. Here it reads its weights at "
            f"**{many / 1e9:.1f} GB/s** with {threads} threads and {one / 1e9:.1f} GB/s with one, {spread}. "
            f"With these kernels the reachable limit is {m['linear_limit_tokens_per_s']:.1f} tokens/s, of "
            f"which we reach **{m['fraction_of_linear_limit']:.0%}**; the gap between the two limits lies in "
            "the math library's kernel, not in the model code."
        )
    return text


def finetune_setup(model, run) -> str:
    """One paragraph naming a fine-tuning notebook's model and the settings every configuration shares."""
    a, n = model.args, sum(p.numel() for p in model.parameters())
    text = (
        f"**Model** `{run.model}` ({a.n_layers} layers, {n / 1e6:,.1f}M parameters) on **{run.device}**. "
        f"Each measured configuration: {run.steps} optimizer steps of {run.switch('accum_steps')} x "
        f"{run.micro_batch} Alpaca examples (at most {run.max_len} tokens), {run.switch('optimizer')} at "
        f"lr {run.switch('lr'):g}"
    )
    lora = run.switches.get("lora")
    if lora:
        text += (
            f"; LoRA r={lora['r']}, alpha={lora['alpha']:g}, dropout {lora['dropout']:g} on "
            f"{', '.join(lora['targets'])}"
        )
    return text + "."


def lora_share(params: pd.DataFrame, *, r: int, targets: str) -> str:
    """What LoRA trains at the notebook's rank and targets, and the range over the table."""
    pct = params[params.metric == "trainable_pct"].set_index(["targets", "r"]).value
    count = params[params.metric == "trainable_params"].set_index(["targets", "r"]).value
    lo, hi = pct.idxmin(), pct.idxmax()
    return (
        f"At r={r} on {targets}, LoRA trains **{count[(targets, r)] / 1e6:,.2f}M parameters, "
        f"{pct[(targets, r)]:.2f}%** of the model; the share grows linearly with r, from {pct.min():.3f}% "
        f"({lo[0]}, r={lo[1]}) to {pct.max():.1f}% ({hi[0]}, r={hi[1]})."
    )


def mixed_precision_here(mixed_precision: str, support: dict[str, str], device: str) -> str:
    """Which 16-bit format the stack's "+ Mixed precision" uses here, and what this device offers for it."""
    if device != "cpu":
        return f"Mixed precision here is **{mixed_precision}** autocast, as in the reference (fp16 on a GPU)."
    bf16 = [k for k in ("AVX-512 BF16 dot products", "AMX BF16 tiles") if support.get(k) == "yes"]
    fp16 = [k for k in ("AVX-512 FP16 arithmetic", "AMX FP16 tiles") if support.get(k) == "yes"]
    say = lambda units, fmt: (
        f"this CPU has {' and '.join(units)}, so {fmt} matmuls can use fast kernels"
        if units
        else f"this CPU has no {fmt} units, so {fmt} matmuls fall back to slow generic kernels"
    )
    return (
        f"Mixed precision here is **{mixed_precision}** autocast (the reference used fp16 on a GPU). For "
        f"bf16, {say(bf16, 'bf16')}; for fp16, {say(fp16, 'fp16')}. 03_amp measures what each precision "
        "actually gives on this machine."
    )


def stack_changes(stack_table: pd.DataFrame, device: str) -> str:
    """Each stacked technique against the row above it, and how well the ledger predicted the peaks."""
    lines = technique_changes(stack_table)
    ok = stack_table.dropna(subset=["peak_memory_mb"])
    gap = (ok.peak_memory_mb / ok.predicted_mb - 1).abs()
    line = (
        f"- Measured and predicted peaks differ by at most **{gap.max():.0%}** (largest gap: {gap.idxmax()})"
    )
    if device == "cpu":
        line += (
            "; on a CPU the resident set also holds freed blocks the allocator keeps for reuse, and the "
            "runtime's own growth during training."
        )
        if "live_tensors_mb" in ok:
            live = (ok.live_tensors_mb / ok.predicted_mb - 1).abs()
            line += (
                f" The peak of the live tensors (one more step, profiled) is within **{live.max():.0%}** of "
                "the prediction, so the rest is the allocator's."
            )
    else:
        line += "."
    return "Each technique against the row above it, here and in the reference:\n\n" + "\n".join(
        [*lines, line]
    )


def full_vs_lora(pair: pd.DataFrame, run) -> str:
    """Full fine-tuning against LoRA in fp32: step time, memory measured and predicted, final loss."""
    if not pair.status.eq("ok").all():
        return "One of the two configurations failed (see its status above)."
    full, low = pair.iloc[0], pair.iloc[1]
    t, f = low.runtime_per_step_s, full.runtime_per_step_s
    why = (
        "it skips the frozen weights' gradients, but still runs the whole forward and the backward through "
        "every layer"
        if t < f
        else "at this size the adapters' extra matmuls cost more than the skipped weight gradients save"
    )
    return (
        f"LoRA trains {low.trainable_pct:.2f}% of the parameters. Its step takes **{t:.2f} s** against "
        f"{f:.2f} s (x{t / f:.2f}): {why}. Peak memory: **{low.peak_memory_mb:,.0f} MB** against "
        f"{full.peak_memory_mb:,.0f} MB measured ({low.peak_memory_mb - full.peak_memory_mb:+,.0f} MB), "
        f"predicted {low.predicted_memory_mb:,.0f} against {full.predicted_memory_mb:,.0f} MB "
        f"({low.predicted_memory_mb - full.predicted_memory_mb:+,.0f} MB, the frozen weights' gradients). "
        f"Both "
        f"see the same batches in the same order; at the last step the loss is {low.final_loss:.3f} with "
        f"LoRA "
        f"and {full.final_loss:.3f} with full fine-tuning ({run.switch('optimizer')}, lr "
        f"{run.switch('lr'):g}, "
        f"{run.steps} steps): B starts at zero, so the adapter changes the model only as fast as B grows."
    )


def ours_vs_peft(table: pd.DataFrame) -> str:
    """Our LoRA stack against transformers + PEFT: step time and memory ratios."""
    v = table
    peak = "peak_allocated_mb" if "peak_allocated_mb" in v else "peak_rss_mb"
    text = (
        f"Ours / PEFT: step time **x{v.step_s['ours'] / v.step_s['hf']:.2f}**, peak memory "
        f"**x{v[peak]['ours'] / v[peak]['hf']:.2f}** ({v[peak]['ours']:,.0f} MB against "
        f"{v[peak]['hf']:,.0f} MB); "
        f"both train the same {v.trainable_params.iloc[0]:,.0f} parameters."
    )
    if "added_rss_mb" in v:
        text += (
            f" On a CPU memory is the resident set: the transformers process starts from "
            f"{v.baseline_rss_mb['hf']:,.0f} MB against our {v.baseline_rss_mb['ours']:,.0f} MB "
            f"(transformers' "
            "own code, and our model built first then converted), and training can reuse pages freed by that "
            f"conversion, so what training adds ({v.added_rss_mb['ours']:,.0f} MB ours, "
            f"{v.added_rss_mb['hf']:,.0f} MB PEFT) is a less fair comparison than the whole peak."
        )
    return text


def budget_fits(
    fits: dict[str, dict[str, float | None]],
    *,
    batch_size: int,
    seq_len: int,
    optimizer: str,
    budgets_gib: list[float],
) -> str:
    """The smallest budget each configuration fits, per model."""
    say = lambda f: ", ".join(f"{c} in {gb} GiB" if gb else f"{c} in none of them" for c, gb in f.items())
    budgets = ", ".join(f"{gb} GiB" for gb in budgets_gib)
    return (
        f"At batch {batch_size} x {seq_len} tokens with {optimizer}, the smallest of the budgets ({budgets}) "
        "each configuration fits: " + "; ".join(f"**{m}**: {say(f)}" for m, f in fits.items()) + "."
    )


def held_out(learn: pd.DataFrame, learned: dict) -> str:
    """How far the fine-tune that learns moved the held-out loss, and what its training loss did."""
    evals = learn[learn.metric == "eval_loss"].sort_values("step")
    train = learn[learn.metric == "loss"].sort_values("step").value
    a, b = evals.value.iloc[0], evals.value.iloc[-1]
    k = max(1, len(train) // 5)
    moved = (
        f"falls by **{a - b:.3f} nats ({(a - b) / a:.1%})**"
        if b < a
        else f"does not fall (**{b - a:+.3f} nats**): the adapter did not learn with these settings"
    )
    return (
        f"Held-out loss on {learned['n_eval']} examples: **{a:.3f}** before training, **{b:.3f}** after "
        f"{learned['steps']} steps: it {moved}. The training loss, averaged over the first and the last "
        f"{k} steps, goes from {train.head(k).mean():.3f} to {train.tail(k).mean():.3f}. Status: "
        f"{learned['status']}."
    )


def replies(examples: list[dict], before: list[str], after: list[str]) -> str:
    """The sample generations before and after fine-tuning as Markdown, one block per instruction."""
    quote = lambda s: " ".join(s.split()) or "(empty)"
    return "\n\n".join(
        f"**{quote(e['instruction'])}**\n\n- before: {quote(b)}\n- after: {quote(a)}"
        for e, b, a in zip(examples, before, after, strict=True)
    )


def peft_agrees(check: pd.DataFrame) -> bool:
    """Whether our logits match PEFT's with the same adapter, to 1e-3 of the logits' scale."""
    v = check.set_index("metric").value
    return bool(v["peft_max_abs_diff"] < 1e-3 * max(v["logit_abs_max"], 1))


def peft_logits(check: pd.DataFrame) -> str:
    """Our adapter against PEFT's reading of it, and after PEFT's re-save."""
    v = check.set_index("metric").value
    return (
        f"Largest logit difference, ours against PEFT with the same adapter: "
        f"**{v['peft_max_abs_diff']:.2e}**; "
        f"after the round trip through PEFT's save: **{v['round_trip_max_abs_diff']:.2e}**. For scale, the "
        f"trained adapter itself moves the logits by up to {v['adapter_effect_max_abs']:.3f}, and they reach "
        f"{v['logit_abs_max']:.1f} in magnitude."
    )


def precisions(table: pd.DataFrame, runs: pd.DataFrame) -> str:
    """Each precision's time and memory against fp32, and what autocast keeps and adds."""
    ok = table[table.status == "ok"]
    copies = lambda p: (
        f", {ok.weight_copies_mb[p]:,.0f} MB of them autocast's 16-bit weight copies"
        if ok.weight_copies_mb.get(p)
        else ""
    )
    lines = [
        f"- **{p}**: {ok.runtime_per_step_s[p]:.2f} s per step (x{ok.speedup_vs_fp32[p]:.2f} the speed of "
        f"fp32), "
        f"peak {ok.peak_memory_mb[p]:,.0f} MB measured, {ok.predicted_memory_mb[p]:,.0f} MB "
        f"predicted{copies(p)}."
        for p in ok.index
        if "fp32" in ok.index
    ]
    lines += [f"- **{p}**: {s}" for p, s in table.status.items() if s != "ok"]
    terms = tables.wide(runs) / 1e6
    if {"fp32", "bf16-pure"} <= set(terms.index) and len(terms.index) > 2:
        weights = terms.predicted_parameters_bytes + terms.predicted_gradients_bytes
        autocast = terms.predicted_activations_bytes.drop(["fp32", "bf16-pure"]).min()
        lines.append(
            f"\nAutocast keeps the fp32 weights and adds 16-bit copies of them, while the activations "
            f"saved for backward shrink (predicted: {terms.predicted_activations_bytes['fp32']:,.0f} MB in "
            f"fp32, {autocast:,.0f} MB with autocast); pure bf16 halves weights and gradients "
            f"({weights['fp32']:,.0f} to {weights['bf16-pure']:,.0f} MB)."
        )
    return "\n".join(lines)


def loss_scale(scale: pd.DataFrame, skipped: int) -> str:
    """The fp16 loss scale's trajectory and the steps the scaler skipped."""
    if scale.empty:
        return "fp16 did not run here, so there is no loss-scale trajectory (see its row above)."
    s = scale.value
    return (
        f"The scale used went from 2^{math.log2(s.iloc[0]):.0f} to 2^{math.log2(s.iloc[-1]):.0f} over "
        f"{len(s)} "
        f"steps; **{skipped}** step(s) were skipped for inf/NaN gradients"
        + (", each a batch the model did not learn from." if skipped else ": no gradient overflowed.")
    )


def lost_updates(lost: pd.DataFrame) -> str:
    """How much of one SGD step pure bf16 rounds away."""
    r = lost.iloc[0]
    return (
        f"At lr {r.lr:g}, **{r.value:.1%}** of the weight updates of one SGD step round back to the same "
        f"bf16 "
        "value, so with these settings pure bf16 training barely changes the weights (its loss curve is "
        "above). Autocast avoids this by keeping fp32 master weights; pure bf16 training needs a larger "
        "learning rate, an optimizer whose steps scale with the weights (Adam), or stochastic rounding."
    )


def why_precision(gflops: pd.Series, speed: pd.Series, support: dict[str, str], device: str) -> str:
    """Why each 16-bit format is faster or slower here, from the measured rates and the device's features."""
    r = lambda k: gflops.get(k, float("nan"))
    fast = lambda k: speed.get(k, float("nan"))
    ref = reference.FINETUNE.set_index("technique").runtime_per_step_s
    if device != "cpu":
        return (
            f"This GPU ({support.get('GPU')}, compute capability {support.get('compute capability')}) "
            f"computes "
            f"fp32 matmuls at {r('fp32'):,.0f} GFLOP/s, bf16 at {r('bf16'):,.0f} and fp16 at "
            f"{r('fp16'):,.0f} "
            f"(measured above); an fp16-autocast step ran at x{fast('fp16'):.2f} the speed of fp32."
        )
    fp16_units = support["AVX-512 FP16 arithmetic"] == "yes" or support["AMX FP16 tiles"] == "yes"
    fp16_why = (
        "this CPU has them, so the rate above is what its fp16 kernels reach"
        if fp16_units
        else "without them fp16 falls back to generic kernels that convert to fp32 as they go"
    )
    bf16 = (
        "its faster matmuls outweigh the casts autocast adds on every forward."
        if fast("bf16") > 1
        else "the casts autocast adds on every forward (each weight and activation into bf16) outweigh what "
        "its "
        "matmuls save."
    )
    return (
        f"This CPU computes fp32 matmuls at {r('fp32'):,.1f} GFLOP/s, bf16 at {r('bf16'):,.1f} and fp16 at "
        f"{r('fp16'):,.1f} (measured above). It has AVX-512 BF16 dot products: "
        f"**{support['AVX-512 BF16 dot products']}**, AMX: **{support['AMX BF16 tiles']}**, AVX-512 FP16 "
        f"arithmetic: **{support['AVX-512 FP16 arithmetic']}** (F16C, which only converts between fp16 and "
        f"fp32: "
        f"**{support['F16C fp16<->fp32 conversion']}**). So fp16 matmuls run at "
        f"x{r('fp16') / r('fp32'):.2g} the "
        f"fp32 rate: PyTorch's fast (oneDNN) fp16 matmuls need AVX-512 FP16 or AMX FP16, and {fp16_why}. An "
        f"fp16-autocast training step runs at x{fast('fp16'):.2g} the speed of fp32; bf16 autocast runs at "
        f"x{fast('bf16'):.2f}: {bf16} Pure bf16, which casts nothing, runs at x{fast('bf16-pure'):.2f}."
        "\n\n**Expected on a GPU (not measured here).** GPUs with tensor cores (compute capability 7.0 and "
        "up: "
        "V100, T4, A100, H100 and later) multiply fp16 (and, from 8.0, bf16) matrices at many times their "
        "fp32 "
        "rate, so autocast shortens the matmul-bound part of a step and shrinks the activations it keeps; "
        "the "
        "P100 of the reference has no tensor cores but runs fp16 at twice its fp32 rate, and there mixed "
        f"precision took the step from {ref.iloc[0]:.2f} s to {ref.iloc[1]:.2f} s."
    )


def checkpointing_setup(model, run, settings: list[int]) -> str:
    """The checkpointing notebook's model, settings and which blocks each configuration recomputes."""
    n = model.args.n_layers
    blocks = ", ".join(
        f"{checkpointing_label(k)} ({tables.blocks_recomputed(k, n)} of {n})" for k in settings
    )
    return (
        f"**Model** `{run.model}` ({n} blocks) on **{run.device}**, fp32, full fine-tuning with "
        f"{run.switch('optimizer')} (lr {run.switch('lr'):g}), micro-batches of {run.micro_batch} Alpaca "
        f"examples "
        f"(at most {run.max_len} tokens each). Checkpointed blocks: {blocks}."
    )


def checkpointing_memory(table: pd.DataFrame, device: str) -> str:
    """What checkpointing the most blocks saves, predicted and measured, and where the live peak falls."""
    none, full = table.iloc[0], table.loc[table["blocks recomputed"].idxmax()]
    act = "predicted activations (MB)"
    saved = none[act] - full[act]
    cpu = (
        " (on a CPU the peak is the process's resident set, so the allocator's slack and the freed memory it "
        "keeps are counted too; the live-tensor column leaves them out)."
        if device == "cpu"
        else "."
    )
    lines = [
        f"- Checkpointing {full.name} cuts the predicted saved activations from **{none[act]:,.0f} MB to "
        f"{full[act]:,.0f} MB** ({1 - full[act] / none[act]:.0%} less); the measured peak moves from "
        f"{none['measured peak (MB)']:,.0f} MB to {full['measured peak (MB)']:,.0f} MB, "
        f"{full['peak saved (MB)'] / saved:.0%} of the predicted saving{cpu}",
        f"- Activations are {none[act] / none['predicted total (MB)']:.0%} of the predicted total without "
        "checkpointing; the weights and gradients, which checkpointing does not touch, are the rest.",
    ]
    live = table.get("live tensors (MB)")
    if live is not None and live.max() - live.min() <= 0.01 * live.max():
        lines.append(
            f"- The peak of the live tensors is the same, **{live.max():,.0f} MB**, with and without "
            "checkpointing: it falls after the saved activations are freed (at the end of backward, where "
            "the gradients are complete), so at this batch and length checkpointing cannot lower it."
        )
    return "\n".join(lines)


def activations_by_length(pred: pd.DataFrame, length_table: pd.DataFrame, *, lo: str, hi: str) -> str:
    """How the predicted saving of setting hi over lo grows with length, and how measured peaks moved."""
    top, bottom = pred.index.max(), pred.index.min()
    lines = [
        f"- Predicted: at {top} tokens, {lo} holds **{pred.loc[top, lo]:,.0f} MB** of activations and {hi} "
        f"**{pred.loc[top, hi]:,.0f} MB**, a saving of {pred.loc[top, lo] - pred.loc[top, hi]:,.0f} MB "
        f"against "
        f"{pred.loc[bottom, lo] - pred.loc[bottom, hi]:,.0f} MB at {bottom} tokens."
    ]
    if len(length_table.index.get_level_values(0).unique()) > 1:
        peak = length_table["measured peak (MB)"].unstack("config")
        grow = peak.iloc[-1] - peak.iloc[0]
        lines.append(
            f"- Measured: from `max_len` {peak.index[0]} to {peak.index[-1]} the peak changes by "
            + " and by ".join(f"{grow[c]:+,.0f} MB with {c}" for c in peak.columns)
            + "."
        )
    return "\n".join(lines)


def checkpointed_gradients(errors: pd.DataFrame, timed: pd.DataFrame, batch_shape: tuple[int, int]) -> str:
    """Whether checkpointed gradients equal the plain run's, and what the recomputation costs in time."""
    worst, first = errors.relative_error.max(), timed.index[0]
    most = timed["extra time (%)"].idxmax()
    same = (
        f"- On a micro-batch of {batch_shape[0]} x {batch_shape[1]} tokens the checkpointed gradients are "
        "**identical** to the plain run's, with and without LoRA."
        if errors.max_abs_error.max() == 0
        else f"- The checkpointed gradients agree with the plain run's to a relative error of at most "
        f"**{worst:.1e}** "
        f"(largest absolute difference {errors.max_abs_error.max():.1e}): float rounding of a recomputed "
        "forward."
    )
    return "\n".join(
        [
            same,
            f"- A forward + backward takes {timed.backward_s[most]:.2f} s with {most} checkpointed "
            f"against {timed.backward_s[first]:.2f} s without: "
            f"**{timed['extra time (%)'][most]:+.0f}%**.",
        ]
    )


def checkpointing_pays(pays: pd.DataFrame) -> str:
    """Which setting saves the most memory per percent of extra time, and when checkpointing pays."""
    ratio = pays["MB per % time (predicted)"]
    if not ratio.notna().any():
        return (
            "No setting was measurably slower than no checkpointing here: the time differences are within "
            "this machine's noise, so the table has no ratio."
        )
    best = ratio.idxmax()
    noisy = not pays.sort_values("blocks recomputed")["extra time (%)"].is_monotonic_increasing
    return (
        f"Per percent of extra time, **{best}** saves the most: "
        f"{pays.loc[best, 'activations saved (MB)']:,.0f} "
        f"MB of activations for {pays.loc[best, 'extra time (%)']:.0f}% more time per forward + backward "
        f"({ratio[best]:,.1f} MB per %). Checkpointing pays when activations are what does not fit: long "
        "sequences and large micro-batches (the saving grows with both, see above) next to weights and "
        "gradients that fit; when those dominate, as for short sequences, it buys little."
        + (
            " Read the ratios with care: the extra time here does not rise with the number of recomputed "
            "blocks, as it must, so the machine's changing load drowned part of the differences (raise "
            "`time_rounds`)."
            if noisy
            else ""
        )
    )


def accumulation_setup(run, effective_batch: int, labels: list[str]) -> str:
    """The accumulation notebook's model and the splits of one effective batch."""
    return (
        f"**Model** `{run.model}` on **{run.device}**, fp32, full fine-tuning with {run.switch('optimizer')} "
        f"(lr {run.switch('lr'):g}), {run.steps} optimizer steps of **{effective_batch} Alpaca examples** "
        f"each "
        f"(at most {run.max_len} tokens), split as micro-batch x accumulation steps: "
        + ", ".join(f"**{label}**" for label in labels)
        + "."
    )


def same_examples(same: list[bool], *, kept: int, run, effective_batch: int) -> str:
    """Whether every split sees the same examples in each optimizer step, and why not if not."""
    if all(same):
        return (
            f"Every configuration sees the same {effective_batch} examples in each of its {run.steps} "
            "optimizer steps."
        )
    return (
        f"The configurations see different examples from step {same.index(False) + 1} on: {kept} examples "
        f"are "
        f"kept (of {run.train_examples}; the rest have prompts longer than {run.max_len} tokens) and "
        f"{run.steps} steps of {effective_batch} need {run.steps * effective_batch}, so the loader starts a "
        f"new "
        "epoch inside a step, where a short last micro-batch shifts the configurations against each other. "
        "Raise train_examples or lower steps for curves that can coincide."
    )


def accumulation_memory(table: pd.DataFrame, device: str) -> str:
    """What a smaller micro-batch saves and costs, predicted and measured."""
    big, small = table.iloc[0], table.iloc[-1]
    act = lambda r: r["predicted activations (MB)"] + r["predicted logits (MB)"]
    single = ", ".join(table.index[table.accumulation == 1]) or "no configuration here"
    cpu = (
        ". On a CPU the measured peak is the process's resident set, the allocator's slack included; the "
        "live-tensor column leaves it out."
        if device == "cpu"
        else "."
    )
    return "\n".join(
        [
            f"- From {big.name} to {small.name} the measured peak falls from "
            f"**{big['measured peak (MB)']:,.0f} MB to "
            f"{small['measured peak (MB)']:,.0f} MB** "
            f"({1 - small['measured peak (MB)'] / big['measured peak (MB)']:.0%} "
            f"less); predicted {big['predicted total (MB)']:,.0f} MB to "
            f"{small['predicted total (MB)']:,.0f} MB. What "
            f"shrinks is what scales with the micro-batch, the activations and the logits ({act(big):,.0f} "
            f"MB to "
            f"{act(small):,.0f} MB predicted); weights and gradients stay.",
            "- The predicted total adds every term: the peak once gradients are held across micro-batches. "
            "Without "
            f"accumulation the previous step's gradients are freed before the activations peak, so there "
            f"({single}) "
            f"the ledger overstates the peak{cpu}",
            f"- An optimizer step takes {big['optimizer step (s)']:.2f} s as {big.name} and "
            f"{small['optimizer step (s)']:.2f} s as {small.name} "
            f"(**{small['optimizer step (s)'] / big['optimizer step (s)'] - 1:+.0%}**): smaller "
            f"micro-batches keep the "
            "hardware less busy per call, but pad less (each is padded only to its own longest example).",
        ]
    )


def accumulation_curves(curves: pd.DataFrame, same: bool) -> str:
    """How far the splits' loss curves are apart."""
    by_step = curves.pivot_table(index="step", columns="config", values="value", sort=False)
    spread = (by_step.max(axis=1) - by_step.min(axis=1)).max()
    if not same:
        return (
            f"The curves differ by up to {spread:.2g} nats, as expected where the configurations see "
            f"different "
            "examples (above)."
        )
    return (
        f"Across configurations the loss of a step differs by at most **{spread:.1e} nats** (losses around "
        f"{by_step.stack().mean():.2f}): the curves coincide, as they must when the same examples give the "
        "same gradient. With a small learning rate and few steps the weights move little, so the curves "
        "alone "
        "are a weak test; the gradients are compared directly below."
    )


def accumulation_gradients(errors: pd.DataFrame, targets: dict[int, list[int]], examples: int) -> str:
    """Token-normalised accumulation against the naive mean, and why the mean is off."""
    rel = errors.relative_error.unstack("normalisation")
    k = max(targets)
    n_total = sum(targets[k])
    weights = [n_total / (k * n) for n in targets[k] if n]
    return (
        f"Normalised by the step's target tokens, accumulation gives the large-batch gradient to a relative "
        f"error of at most **{rel['tokens'].max():.1e}** (float rounding: the same sums in another order). "
        f"The "
        f"naive mean is off by up to **{rel['mean'].max():.0%}**. Split {k} ways, the micro-batches of these "
        f"{examples} examples hold {', '.join(map(str, targets[k]))} target tokens ({n_total} in all): the "
        f"naive "
        f"mean gives every token of a micro-batch with n targets the weight 1/({k}n) instead of "
        f"1/{n_total}, so "
        f"tokens count from {min(weights):.2f} to **{max(weights):.2f} times** as much as they should: short "
        "responses are over-weighted, long ones under-weighted. The error vanishes only when every "
        "micro-batch "
        "holds the same number of target tokens."
    )


def cache_agreement(checks: pd.DataFrame) -> str:
    """Cached against uncached decoding: identical tokens in fp32, and where half precision splits."""
    v = checks.set_index(["dtype", "metric"]).value
    lines = []
    for dtype in checks.dtype.unique():
        if (dtype, "tokens_identical") not in v or pd.isna(v[(dtype, "tokens_identical")]):
            continue
        if v[(dtype, "tokens_identical")] == 1.0:
            lines.append(f"In {dtype} the cached and uncached tokens are identical.")
        else:
            lines.append(
                f"In {dtype} they split at step {v[(dtype, 'first_divergence_step')]:.0f} (largest logit "
                f"difference {v[(dtype, 'max_logit_diff')]:.2f})."
            )
    return " ".join(lines)


def failed(rows: pd.DataFrame, columns: list[str]) -> str:
    """The configurations that did not run, each with its status and reason (or that all of them ran)."""
    bad = tables.failures(rows, columns)
    if bad.empty:
        return "Every configuration ran."
    lines = [
        f"- {', '.join(str(r[c]) for c in columns)}: **{r['status']}**: {r['reason'] or 'no reason recorded'}"
        for _, r in bad.iterrows()
    ]
    return "Did not run:\n\n" + "\n".join(lines)


def quantization_model(model, source: str, storage: dict[str, int] | None, device: str) -> str:
    """What the ladder decodes, and what "fp32" means when the file itself stores quantized weights."""
    text = model_line(model, source, device) + "."
    if storage:
        total = sum(storage.values())
        kinds = ", ".join(f"{k} {n / total:.0%}" for k, n in sorted(storage.items(), key=lambda kv: -kv[1]))
        text += (
            f"\n\nThe GGUF file stores its weights as {kinds} (share of the weights). Every path loads those "
            "stored values: **fp32 is the file's weights dequantised**, the reference every other path is "
            "compared with. The int4 path from Q4_1 hands the file's own 4-bit blocks to the kernel "
            "unchanged; int8 and int4 g32/g64 quantise the dequantised weights again."
        )
    return text


def _ok(table: pd.DataFrame, column: str) -> pd.Series:
    return table[column].dropna() if column in table else pd.Series(dtype=float)


def ladder(table: pd.DataFrame, ladder_rows: pd.DataFrame, bandwidth: float, linear: float) -> str:
    """The ladder's headline comparisons, from the table of `tables.ladder_table`."""
    speed = _ok(table, "decode_tokens_per_s")
    if speed.empty:
        return "No path of the ladder ran (see the failures below)."
    ours = speed[[p in PATHS for p in speed.index.get_level_values("path")]]
    lines = []
    for batch in sorted(speed.index.get_level_values("batch").unique()):
        mine = ours.xs(batch, level="batch")
        if mine.empty:
            continue
        best = mine.idxmax()
        line = f"At batch {batch} our fastest path is **{best}** at {mine.max():,.1f} tokens/s"
        anchors = speed.xs(batch, level="batch")
        for anchor in ("llama.cpp", "transformers fp32"):
            if anchor in anchors:
                line += f", **{mine.max() / anchors[anchor]:.2f}x** {anchor} ({anchors[anchor]:,.1f})"
        lines.append(line + ".")
    cpp = ladder_rows[(ladder_rows["path"] == "llama.cpp") & (ladder_rows["status"] != "ok")]
    if len(cpp) and (ladder_rows["path"] == "llama.cpp").sum() == len(cpp):
        lines.append(f"llama.cpp did not run: {cpp['reason'].iloc[0]}")
    lines.append(
        f"The roof is this machine's read bandwidth, {bandwidth / 1e9:.1f} GB/s; torch's own batch-1 fp32 "
        f"linear layer reads its weights at {linear / 1e9:.1f} GB/s here ({linear / bandwidth:.0%} of it), "
        "the practical ceiling of the unquantised paths."
    )
    share = _ok(table, "share_of_roof_pct")
    for path in ("bf16 compiled", "int4 from Q4_1", "int4 g32"):
        if (path, 1) in share.index:
            lines.append(
                f"{path} at batch 1 reads its weights at **{share[path, 1]:.0f}%** of the bandwidth roof."
            )
    same = _ok(table, "tokens_identical")
    if ("fp32 compiled", 1) in same.index:
        word = (
            "the same tokens as"
            if all(same.xs("fp32 compiled", level="path"))
            else "**different tokens** from"
        )
        lines.append(f"The compiled fp32 decode gives {word} the eager one.")
    bf16 = same[[p == "bf16 compiled" for p in same.index.get_level_values("path")]]
    if len(bf16) and not all(bf16):
        lines.append(
            "In bf16 the compiled step's fused kernels add in another order than eager mode, so at a "
            "near-tie the greedy token can split: its tokens differ from eager bf16's at batch "
            + ", ".join(str(b) for (_, b), v in bf16.items() if not v)
            + "."
        )
    compile_s = _ok(table, "compile_s")
    if len(compile_s):
        lines.append(
            f"Compiling costs {compile_s.min():.0f} to {compile_s.max():.0f} s per path and batch size, once "
            "(the inductor cache keeps it for the next run)."
        )
    return " ".join(lines)


def quality(qtable: pd.DataFrame) -> str:
    """How far each path's perplexity moves from fp32, and how often its top token agrees."""
    if "perplexity_change_pct" not in qtable:
        return "fp32 did not run, so nothing is compared with it."
    change = qtable["perplexity_change_pct"].drop("fp32", errors="ignore").dropna()
    if change.empty:
        return "Only fp32 ran."
    worst = change.abs().idxmax()
    parts = [f"{p} {v:+.2f}%" for p, v in change.items()]
    text = (
        f"Held-out perplexity against fp32 ({qtable.loc['fp32', 'perplexity']:.3f}): {', '.join(parts)}; the "
        f"largest change is **{worst}'s {change[worst]:+.2f}%**."
    )
    if "top1_agreement_pct" in qtable:
        agree = qtable["top1_agreement_pct"].drop("fp32", errors="ignore").dropna()
        text += (
            f" On fp32's own greedy continuation the top-1 token agrees with fp32's at {agree.min():.1f}% to "
            f"{agree.max():.1f}% of the positions."
        )
    return text


def attention(times: pd.DataFrame, peaks: pd.DataFrame) -> str:
    """Flash and the plain math against sdpa math at the longest length where both ran."""
    lines = []
    for batch in sorted(times.index.get_level_values("batch").unique()):
        t, p = times.xs(batch, level="batch"), peaks.xs(batch, level="batch")
        for kernel in [k for k in t.columns if k != "sdpa math"]:
            both = t[["sdpa math", kernel]].dropna() if "sdpa math" in t else pd.DataFrame()
            if both.empty:
                continue
            n = both.index.max()
            ratio = both.loc[n, "sdpa math"] / both.loc[n, kernel]
            mem = p.loc[n, kernel] / p.loc[n, "sdpa math"]
            lines.append(
                f"At batch {batch} and {n} tokens, {kernel} runs {_speed(ratio)} than sdpa math with "
                f"{mem:.2g}x its peak memory."
            )
    return " ".join(lines) if lines else "No kernel ran beside sdpa math."


def _speed(ratio: float) -> str:
    return f"**{ratio:.2f}x faster**" if ratio >= 1 else f"**{1 / ratio:.2f}x slower**"


def step_profile(profile: pd.DataFrame, table: pd.DataFrame) -> str:
    """The largest shares of one path's batch-1 step, beside llama.cpp's time per token."""
    path = profile["path"].iloc[0]
    t = profile.set_index("op")["value"]
    share = (100 * t / t.sum()).drop("other", errors="ignore").sort_values(ascending=False)
    top = ", ".join(f"{op} {v:.0f}%" for op, v in share.head(3).items())
    text = f"{path}'s batch-1 step, by the profiler: {top} of its time."
    speed = _ok(table, "decode_tokens_per_s")
    if ("llama.cpp", 1) in speed.index and (path, 1) in speed.index:
        text += (
            f" Unprofiled it takes {1e3 / speed[path, 1]:.1f} ms per token, llama.cpp "
            f"{1e3 / speed['llama.cpp', 1]:.1f} ms on the same file."
        )
    return text


def nf4_storage(storage: pd.DataFrame) -> str:
    """What NF4 stores against fp32, per weight, and the target of 0.13x."""
    ratio = storage.loc["all", "nf4 / fp32"]
    bits = 32 * ratio
    verdict = "within" if ratio <= 0.13 else "above"
    return (
        f"The block linears take **{storage.loc['all', 'nf4 (MB)']:,.1f} MB** as NF4 against "
        f"{storage.loc['all', 'fp32 (MB)']:,.1f} MB in fp32: **{ratio:.4f}x** ({bits:.3f} bits per weight: "
        f"4 for the code, the rest the double-quantized absmax of each block of 64), {verdict} the 0.13x "
        "target. "
        f"The mean dequantization error is {storage['relative error'].drop('all').mean():.1%} of the mean "
        "absolute weight."
    )


def base_loss(rows: pd.DataFrame) -> str:
    """The held-out loss the NF4 base starts from against the full-precision one."""
    loss = rows[rows.status == "ok"].set_index("base")["value"]
    full, four = loss["full precision"], loss["nf4"]
    return (
        f"Before training, the held-out loss is **{full:.3f}** with the full-precision base and "
        f"**{four:.3f}** with the NF4 base (**{four / full - 1:+.1%}**): the gap the adapters of a QLoRA "
        "fine-tune start from."
    )


def dequantize_cost(cost: pd.DataFrame) -> str:
    """What dequantizing a layer costs against its matmul, and what that makes of a QLoRA step."""
    share = cost["dequantize / matmul"]
    by_dtype = share.groupby(level="dtype").mean()
    parts = ", ".join(f"{v:.2f}x in {d}" for d, v in by_dtype.items())
    return (
        f"Dequantizing a layer costs on average **{parts}** the time of its matmul at this micro-batch "
        "(the bf16 weight is computed in fp32 and rounded once, as bitsandbytes does, so it costs what the "
        "fp32 one does while the bf16 matmul is faster). A QLoRA step dequantizes every block linear twice, "
        "in the forward and again in the backward for the input gradient, beside the matmuls LoRA runs "
        "too; the step times below show what that adds to a whole step."
    )


def qlora(table: pd.DataFrame, runs: pd.DataFrame) -> str:
    """QLoRA against LoRA: memory saved as measured and as the ledger predicts, step time, held-out loss."""
    ok, lines = table[table.status == "ok"], []
    terms = tables.wide(runs)
    setting = runs.drop_duplicates("config").set_index("config")
    for cfg, twin in tables.lora_twins(runs).items():
        if cfg not in ok.index or twin not in ok.index:
            continue
        like = "checkpointing" not in setting or setting.checkpointing[cfg] == setting.checkpointing[twin]
        target = lambda text: f" (target {text})" if like else ""  # noqa: B023
        saved_pred = terms.predicted_total_bytes[twin] - terms.predicted_total_bytes[cfg]
        saved_meas = terms.peak_bytes[twin] - terms.peak_bytes[cfg]
        live = ""
        if "peak_live_bytes" in terms:
            saved_live = terms.peak_live_bytes[twin] - terms.peak_live_bytes[cfg]
            live = f", live tensors {saved_live / 1e6:,.0f} MB ({saved_live / saved_pred:.0%})"
        held = f"**{ok.held_out_vs_lora[cfg] - 1:+.1%}**" + (", target within 2%" if like else "")
        lines.append(
            f"- **{cfg}** against {twin}{'' if like else ' (which recomputes no block)'}: step time "
            f"**x{ok.step_time_vs_lora[cfg]:.2f}**{target('<= 1.5x')}, held-out loss "
            f"{ok.held_out_loss[cfg]:.3f} against {ok.held_out_loss[twin]:.3f} ({held}); the ledger "
            f"predicts {saved_pred / 1e6:,.0f} MB saved, the measured peak fell {saved_meas / 1e6:,.0f} MB "
            f"(**{saved_meas / saved_pred:.0%}** of it{', target >= 80%' if like else ''}){live}."
        )
    lines += [f"- **{c}**: {s}" for c, s in table.status.items() if s != "ok"]
    return "\n".join(lines)


def qat(table: pd.DataFrame, rows: pd.DataFrame) -> str:
    """What QAT recovers of the post-training int4 gap, per group size."""
    gaps = rows[rows.metric == "gap_recovered"]
    lines = []
    for _, r in gaps[gaps.arithmetic == "fp32"].iterrows():
        g = int(r.group_size)
        if r.status != "ok":
            lines.append(f"- **int4 g{g}**: {r.reason}.")
            continue
        ptq, done = table.loc[f"LoRA, then int4 g{g} (PTQ)"], table.loc[f"QAT int4 g{g}"]
        lines.append(
            f"- **int4 g{g}**: perplexity {table.loc['LoRA fp32'].iloc[0]:.3f} in fp32 after LoRA, "
            f"{ptq.iloc[0]:.3f} quantized after training, {done.iloc[0]:.3f} with QAT: QAT recovers "
            f"**{r.value:.0%}** of the gap (target >= 30%; torchao reports 32-45% for LoRA + QAT on Llama 3)."
        )
    failed = rows[(rows.metric == "perplexity") & (rows.status != "ok")]
    lines += [f"- **{r.model}**: {r.status}: {r.reason}" for _, r in failed.iterrows()]
    return "\n".join(lines)
