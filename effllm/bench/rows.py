"""The tidy-row vocabulary every measurement speaks: one row per measured value.

A row holds the swept parameters as columns (real dimensions such as `step` among them), then `metric`,
`value` (a float, NaN when the measurement failed), `unit`, `status` (ok | oom | unsupported | error |
skipped) and `reason` (empty when ok). A failed configuration is one row whose status and reason say why,
never a crash. Every metric's unit is defined once, here.
"""

import math

STATUSES = ("ok", "oom", "unsupported", "error", "skipped")
COLUMNS = ("metric", "value", "unit", "status", "reason")
LEDGER_TERMS = ("parameters", "gradients", "optimizer_state", "activations", "weight_copies", "logits")

_UNITS = {
    "s": "runtime_s runtime_min_s runtime_max_s prefill_s decode_s step_s micro_step_s backward_s "
    "first_call_s compile_s self_s_per_token dequantize_s matmul_s",
    "B": "weights_bytes kv_cache_bytes peak_rss_bytes baseline_rss_bytes added_rss_bytes "
    "peak_allocated_bytes "
    "peak_reserved_bytes peak_bytes peak_live_bytes predicted_total_bytes read_bytes_per_token",
    "tokens/s": "tokens_per_s decode_tokens_per_s bandwidth_limit_tokens_per_s linear_limit_tokens_per_s",
    "B/s": "read_bandwidth linear_read_bandwidth",
    "FLOP/s": "matmul_flop_s achieved_flop_s",
    "FLOP": "flops_per_token",
    "fraction": "fraction_of_limit fraction_of_linear_limit lost_update_share mfu top1_agreement "
    "gap_recovered",
    "nats": "loss eval_loss final_loss",
    "count": "trainable_params total_params truncated_examples",
    "%": "trainable_pct",
    "steps": "skipped_steps",
    "scale": "loss_scale",
    "x": "step_s_ratio added_rss_bytes_ratio peak_allocated_bytes_ratio",
    "grad": "max_abs_error max_abs_grad",
    "ratio": "relative_error",
    "perplexity": "perplexity",
    "abs diff": "max_abs_diff",
    "bool": "tokens_identical",
    "step": "first_divergence_step",
    "logit": "max_logit_diff peft_max_abs_diff round_trip_max_abs_diff logit_abs_max adapter_effect_max_abs",
}
UNITS = {metric: unit for unit, names in _UNITS.items() for metric in names.split()}
UNITS |= {f"predicted_{term}_bytes": "B" for term in LEDGER_TERMS}
WEIGHT_FORMATS = ("float32", "bfloat16", "float16", "nf4", "int8", "int4")  # the ledger's parameters_<format>
UNITS |= {f"predicted_parameters_{fmt}_bytes": "B" for fmt in WEIGHT_FORMATS}


def row(metric: str, value: float | None, *, status: str = "ok", reason: str = "", **params) -> dict:
    """One tidy measurement: the swept `params` as columns, then metric, value, unit, status and reason."""
    if metric not in UNITS:
        raise ValueError(f"metric {metric!r} has no unit: add it to effllm.bench.rows.UNITS")
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    value = math.nan if value is None else float(value)
    return {
        **params,
        "metric": metric,
        "value": value,
        "unit": UNITS[metric],
        "status": status,
        "reason": reason,
    }


def failure_status(status: str) -> str:
    """A failed run's status as a row status: a run that diverged (or any other failure) is an error row."""
    return status if status in STATUSES and status != "ok" else "error"


def result_rows(result: dict, params: dict, *, metric: str) -> list[dict]:
    """A result dict (from `measure.isolated`) as rows of the metrics it measured.

    A failed result is one row of `metric` (the headline it would have measured) with its status and reason.
    """
    if result.get("status", "ok") != "ok":
        status, reason = failure_status(result.get("status", "error")), result.get("reason", "")
        return [row(metric, None, status=status, reason=reason, **params)]
    return [row(k, v, **params) for k, v in result.items() if k in UNITS and v is not None]
