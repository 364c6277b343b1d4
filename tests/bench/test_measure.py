import ctypes
import math
import sys

import pytest
import torch

from effllm.bench import hardware, measure


def ok_config(n: int) -> dict:
    """A configuration that allocates n MiB and reports it."""
    x = torch.ones(n * 2**18)  # n MiB of fp32
    return {"allocated_bytes": x.numel() * 4}


def oom_config() -> dict:
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def crash_config() -> dict:
    raise ValueError("unsupported dtype: float8")


def refused_config() -> dict:
    from effllm.checks import InputError

    raise InputError("this CPU has neither AVX2 nor AVX-512")


def test_time_fn_excludes_warmup_and_reports_spread():
    calls = []
    t = measure.time_fn(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and len(t["times"]) == 3
    assert t["min_s"] <= t["median_s"] <= t["max_s"]


def test_isolated_process_reports_its_own_peak_memory():
    small = measure.isolated("tests.bench.test_measure:ok_config", {"n": 8})
    big = measure.isolated("tests.bench.test_measure:ok_config", {"n": 200})
    assert small["status"] == "ok" and big["status"] == "ok"
    grown = big["peak_rss_bytes"] - small["peak_rss_bytes"]
    assert 150 * 2**20 < grown < 260 * 2**20  # 192 MiB more, not the sum of both runs


def freed_then_reset() -> dict:
    """Free 200 MiB kept resident by glibc's heap (as after converting a model), then start a peak window."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: these tensors go on the heap, not in their own mmap
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: free() keeps the pages, as a fragmented heap would
    rss = lambda: measure._status_bytes("VmRSS")  # noqa: E731
    before = rss()
    weights = [torch.ones(576, 1536) for _ in range(60)]  # 3.4 MiB each, like SmolLM2's projections
    del weights
    return {"freed_resident_bytes": rss() - before, "after_reset_bytes": measure.reset_peak_rss() - before}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_peak_window_starts_from_live_memory_not_freed_heap():
    res = measure.isolated("tests.bench.test_measure:freed_then_reset", {})
    assert res["freed_resident_bytes"] > 150 * 2**20  # the situation: freed memory still counted
    assert res["after_reset_bytes"] < 30 * 2**20  # the window starts from live memory


def test_out_of_memory_becomes_a_result_not_a_crash():
    res = measure.isolated("tests.bench.test_measure:oom_config", {})
    assert res["status"] == "oom" and "20.00 GiB" in res["reason"]


def test_other_failures_keep_their_reason():
    res = measure.isolated("tests.bench.test_measure:crash_config", {})
    assert res["status"] == "error" and "float8" in res["reason"]
    refused = measure.isolated("tests.bench.test_measure:refused_config", {})
    assert refused["status"] == "unsupported" and "AVX2" in refused["reason"]


def test_machine_ceilings_are_positive_and_plausible():
    assert 1e8 < hardware.read_bandwidth(size_mb=64, repeats=2) < 1e13
    assert 1e8 < hardware.matmul_rate(n=256, repeats=2) < 1e16
    assert 1e8 < hardware.linear_read_bandwidth(total_mb=16, threads=1, repeats=2) < 1e13


def two_buffers_then_one() -> None:
    a, b = torch.ones(2**20), torch.ones(2**20)  # 4 MiB each, alive together
    del a, b
    torch.ones(2**20)


def test_live_tensor_peak_counts_what_is_alive_together_not_what_was_ever_allocated():
    kept = torch.ones(2**20)  # alive before the measurement: not counted  # noqa: F841
    assert measure.peak_live_tensor_bytes(two_buffers_then_one) == 2 * 2**22


def test_linear_read_bandwidth_restores_the_thread_count():
    before = torch.get_num_threads()
    hardware.linear_read_bandwidth(in_features=64, out_features=64, total_mb=1, threads=1, repeats=1)
    assert torch.get_num_threads() == before


def test_peak_window_on_the_cpu_sees_the_block_grow_the_resident_set():
    with measure.peak_window("cpu") as peak:
        x = torch.ones(64 * 2**18)  # 64 MiB, touched
        del x
    assert peak["peak_rss_bytes"] - peak["baseline_rss_bytes"] >= 60 * 2**20


def test_peak_window_on_the_cpu_fills_a_baseline_no_higher_than_the_peak():
    with measure.peak_window("cpu") as peak:
        assert set(peak) == {"baseline_rss_bytes"}  # the baseline is read when the window opens
    assert set(peak) == {"baseline_rss_bytes", "peak_rss_bytes"}
    assert 0 < peak["baseline_rss_bytes"] <= peak["peak_rss_bytes"]


def test_step_times_leave_out_the_warm_up_steps():
    records = [
        dict(step=i, step_s=s, micro_step_s=s / 2, tokens=10, total_tokens=20)
        for i, s in [(1, 9.0), (2, 1.0)]
    ]
    times = measure.step_times(records, warmup_steps=1)
    assert times["step_s"] == 1.0 and times["tokens_per_s"] == 10.0 and times["total_tokens_per_s"] == 20.0
    assert math.isnan(measure.step_times(records, warmup_steps=2)["step_s"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_window_sees_an_allocation():
    with measure.peak_window("cuda") as peak:
        x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
        del x
    assert peak["peak_allocated_bytes"] >= 64 * 2**20
    assert not math.isnan(peak["peak_reserved_bytes"])


def test_run_median_is_a_value_one_run_measured():
    runs = [{"s": 3.0}, {"s": 1.0}, {"s": 2.0}, {"s": 4.0}]
    assert measure.run_median(runs, "s") == 3.0  # of an even count, the upper: the slower of the middle two
    assert measure.run_median(runs[:3], "s") == 2.0
