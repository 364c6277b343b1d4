"""Key findings from saved results: a missing notebook says so, a failed configuration is listed."""

import json

from effllm.bench.rows import row
from effllm.report import headlines, results


def test_a_run_without_results_says_what_was_not_measured(tmp_path):
    text = headlines.key_findings(tmp_path / "results")
    assert text.count("Not measured in this run") == len(headlines.HEADLINES)
    assert "01_kv_cache/table missing" in text


def test_what_did_not_run_names_the_notebook_the_configuration_and_the_reason(tmp_path):
    results_dir = tmp_path / "results"
    rows = [
        row("step_s", 1.0, config="fp32"),
        row("step_s", None, config="fp16", status="unsupported", reason="fp16 needs CUDA here"),
    ]
    results.save(rows, results_dir, "03_amp", "runs")
    record = {
        "notebooks": {"04_checkpointing": {"status": "failed", "error": {"ename": "E", "evalue": "boom"}}}
    }
    (tmp_path / "run.json").write_text(json.dumps(record))
    text = headlines.not_run(results_dir)
    assert "**04_checkpointing** failed: E: boom" in text
    assert "03_amp / runs (fp16): **unsupported**: fp16 needs CUDA here" in text
    assert "fp32" not in text


def test_a_headline_formats_the_saved_numbers(tmp_path):
    results_dir = tmp_path / "results"
    rows = [row("step_s", s, config=c) for c, s in (("fp32", 2.0), ("bf16", 1.0), ("fp16", 4.0))]
    results.save(rows, results_dir, "03_amp", "runs")
    text = headlines.amp(results_dir)
    assert "**2.00x faster** with bf16" in text and "**2.00x slower** with fp16" in text
    assert "bf16-pure did not run" in text


def test_the_fast_decoding_headline_compares_the_fastest_path_with_the_anchors(tmp_path):
    results_dir = tmp_path / "results"
    rows = [
        row("decode_tokens_per_s", v, path=p, impl=i, batch=b)
        for p, i, b, v in (
            ("fp32", "ours", 1, 10.0),
            ("int4 g32", "ours", 1, 60.0),
            ("llama.cpp", "llama.cpp", 1, 120.0),
            ("transformers fp32", "transformers", 16, 50.0),
            ("fp32", "ours", 16, 100.0),
        )
    ]
    results.save(rows, results_dir, "07_quantization", "ladder")
    quality = [row("perplexity", 10.0, path="fp32"), row("perplexity", 10.2, path="int4 g32")]
    results.save(quality, results_dir, "07_quantization", "quality")
    text = headlines.quantization(results_dir)
    assert (
        "at batch 1 the fastest path, int4 g32, decodes 60.0 tokens/s, **6.00x** fp32, **0.50x** llama.cpp"
        in text
    )
    assert "at batch 16 the fastest path, fp32, decodes 100.0 tokens/s, **2.00x** transformers fp32" in text
    assert "at most +2.00% from fp32 (int4 g32)" in text
