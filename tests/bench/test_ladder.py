"""The decoding ladder, the llama.cpp anchor and the attention kernels: rows, refusals and equivalence."""

import importlib.util

import pytest
import torch

import effllm
from effllm.bench import attention, decode, ladder
from effllm.checks import InputError
from effllm.data import load_examples
from effllm.files import repo_path
from effllm.model import kv_cache_bytes, param_bytes, weight_read_bytes
from effllm.quantization import QuantizedLinear


def test_weight_read_bytes_counts_what_a_decode_step_reads(tiny):
    assert weight_read_bytes(tiny) == param_bytes(tiny)  # fp32, tied: the embedding is the head
    tiny.setup_cache(2, 16)
    assert weight_read_bytes(tiny) == param_bytes(tiny)  # the KV cache is not a weight
    tiny.clear_cache()
    effllm.quantize(tiny, "int8", head="int8")
    codes = sum(
        b.numel() * b.element_size()
        for m in tiny.modules()
        if isinstance(m, QuantizedLinear)
        for b in m.buffers()
    )
    norms = sum(p.numel() * p.element_size() for n, p in tiny.named_parameters() if "norm" in n)
    assert weight_read_bytes(tiny) == codes + norms  # the embedding is a lookup now: one row per token


def test_compiled_quantized_decode_reports_compile_time_and_bytes_per_token():
    res = decode.decode_metrics(
        model="tiny",
        batch_size=2,
        prompt_len=4,
        new_tokens=4,
        repeats=1,
        dtype_name="bf16",
        compile=True,
        quantize="int4",
        group_size=32,
        head="int8",
    )
    net = effllm.load_model("tiny", dtype="bf16", quantize="int4", group_size=32, head="int8")
    kv = kv_cache_bytes(net.args, 2, 8, torch.bfloat16)  # the static cache: every step attends over all of it
    assert res["weights_bytes"] == weight_read_bytes(net)
    assert res["read_bytes_per_token"] == (weight_read_bytes(net) + kv) / 2
    assert res["compile_s"] > 0 and res["first_call_s"] > res["runtime_s"]
    assert len(res["tokens"]) == 4 and res["decode_tokens_per_s"] > 0


def test_decode_metrics_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="quantize applies to our Llama"):
        decode.decode_metrics(model="tiny", impl="transformers", quantize="int8")
    with pytest.raises(ValueError, match="compile needs use_cache"):
        decode.decode_metrics(model="tiny", compile=True, use_cache=False)


def fake_isolated(target, kwargs, timeout=None):
    """What a child would report: the compiled fp32 path gives the eager tokens, compiled bf16 does not."""
    if kwargs.get("quantize") == "q4_1":
        return {"status": "unsupported", "reason": "InputError: tiny is not a .gguf file"}
    tokens = [1, 2, 3] if kwargs["dtype_name"] == "fp32" or not kwargs.get("compile") else [1, 2, 4]
    speed = 10.0 * (2 if kwargs.get("compile") else 1)
    return {"status": "ok", "decode_tokens_per_s": speed, "read_bytes_per_token": 1e6, "tokens": tokens}


def test_ladder_rows_say_which_paths_ran_and_which_kept_the_eager_tokens(monkeypatch):
    monkeypatch.setattr(ladder.measure, "isolated", fake_isolated)
    monkeypatch.setattr(ladder.importlib.util, "find_spec", lambda name: None)  # llama.cpp not installed
    rows = ladder.ladder_table(
        model="tiny",
        paths=list(ladder.PATHS),
        anchors=["transformers fp32", "llama.cpp"],
        batch_sizes=[1, 16],
        prompt_len=4,
        new_tokens=3,
        repeats=1,
    )
    got = {(r["path"], r["batch"], r["metric"]): r for r in rows}
    assert got["fp32 compiled", 1, "tokens_identical"]["value"] == 1.0
    assert got["bf16 compiled", 16, "tokens_identical"]["value"] == 0.0
    assert got["int4 from Q4_1", 1, "decode_tokens_per_s"]["status"] == "unsupported"
    cpp = got["llama.cpp", 1, "decode_tokens_per_s"]
    assert cpp["status"] == "skipped" and "make bench-deps" in cpp["reason"]
    assert got["int8", 16, "decode_tokens_per_s"]["impl"] == "ours"
    assert got["transformers fp32", 1, "decode_tokens_per_s"]["impl"] == "transformers"
    with pytest.raises(InputError, match="unknown decoding path"):
        ladder.ladder_table(
            model="tiny", paths=["int3"], anchors=[], batch_sizes=[1], prompt_len=4, new_tokens=3, repeats=1
        )


def test_llama_cpp_row_says_why_it_did_not_run():
    params = dict(path="llama.cpp", batch=16, prompt_len=4, new_tokens=3)
    (row,) = ladder.llama_cpp_rows("smollm2-135m-instruct", params, repeats=1, device="cpu", timeout=None)
    assert row["status"] == "skipped" and ("batch 1 only" in row["reason"] or "bench-deps" in row["reason"])
    (row,) = ladder.llama_cpp_rows("tiny", {**params, "batch": 1}, repeats=1, device="cpu", timeout=None)
    assert row["status"] == "skipped" and ("not one" in row["reason"] or "bench-deps" in row["reason"])


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_llama_cpp_decodes_the_embedded_gguf():
    path = str(effllm.loading.embedded_path())
    res = ladder.llama_cpp_metrics(gguf=path, prompt_len=8, new_tokens=4, repeats=1, threads=1)
    assert res["decode_tokens_per_s"] > 0 and res["prefill_s"] > 0


def test_quality_is_measured_against_fp32_and_a_path_that_cannot_load_says_why():
    tokenizer = effllm.load_tokenizer("tiny")
    items = ladder.eval_items(tokenizer, load_examples(repo_path("data/alpaca_eval.json"))[:4], max_len=256)
    rows = ladder.quality_rows(
        model="tiny",
        paths=["fp32", "fp32 compiled", "int8", "int4 from Q4_1"],
        items=items,
        pad_id=tokenizer.eos_token_id,
        agree_tokens=8,
    )
    got = {(r["path"], r["metric"]): r for r in rows}
    assert got["fp32", "top1_agreement"]["value"] == 1.0 and got["fp32", "max_logit_diff"]["value"] == 0.0
    assert not any(r["path"] == "fp32 compiled" for r in rows)  # the eager fp32 weights, measured once
    ppl = got["fp32", "perplexity"]["value"]
    assert abs(got["int8", "perplexity"]["value"] / ppl - 1) < 0.01
    assert got["int4 from Q4_1", "perplexity"]["status"] == "unsupported"


def test_every_attention_kernel_matches_sdpa_math_or_says_why_not():
    rows = attention.attention_rows(
        n_heads=6,
        n_kv_heads=2,
        head_dim=16,
        batch_sizes=[2],
        lengths=[16, 64],
        kernels=[*attention.BACKENDS, attention.PLAIN],
        repeats=1,
        max_scores_gb=6 * 2 * 16 * 16 * 4 / 1e9,
    )
    diffs = [r for r in rows if r["metric"] == "max_abs_diff"]
    assert {r["kernel"] for r in diffs if r["length"] == 16} >= {"sdpa flash", attention.PLAIN}
    assert all(r["value"] < 1e-5 for r in diffs)
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert {r["kernel"] for r in skipped} == {"sdpa math", attention.PLAIN}  # scores over the limit
    assert all(r["length"] == 64 and "max_scores_gb" in r["reason"] for r in skipped)
    if not torch.cuda.is_available():
        cuda_only = {r["kernel"]: r["reason"] for r in rows if r["status"] == "unsupported"}
        assert set(cuda_only) == {"sdpa memory-efficient", "sdpa cuDNN"}
        assert all("CUDA only" in reason for reason in cuda_only.values())
    with pytest.raises(InputError, match="unknown attention kernel"):
        attention.attention_rows(
            n_heads=2, n_kv_heads=2, head_dim=8, batch_sizes=[1], lengths=[8], kernels=["xformers"]
        )
