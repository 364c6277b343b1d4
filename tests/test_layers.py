"""The package's layers: the core imports nothing heavy, and the top-level API is what tools see."""

import subprocess
import sys

import pytest

import effllm


@pytest.mark.parametrize("module", ["effllm.model", "effllm.training", "effllm.decoding", "effllm.loading"])
def test_the_core_loads_neither_pandas_nor_papermill(module):
    heavy = {"pandas", "papermill", "nbformat", "matplotlib"}
    code = f"import sys, {module}; print(sorted({heavy!r} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_public_api_is_listed_for_tools_and_imports_lazily():
    assert effllm.__all__ == sorted(effllm._API)
    assert set(effllm.__all__) <= set(dir(effllm))
    assert callable(effllm.train) and callable(effllm.stream) and callable(effllm.generate)
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        effllm.nosuch  # noqa: B018


def test_bench_experiments_run_takes_fields_and_switches_from_notebook_parameters():
    from effllm.bench.experiments import Run

    params = dict(
        model="tiny",
        data_dir="data",
        train_examples=4,
        max_len=64,
        micro_batch=2,
        steps=3,
        lr=0.1,
        optimizer="adamw",
        checkpointing=[0, 1],
        unrelated="x",
    )
    run = Run.from_parameters(params, switches=("lr", "optimizer"), device="cpu")
    assert run.switches == {"lr": 0.1, "optimizer": "adamw"} and run.micro_batch == 2
    assert run.switch("precision") == "fp32"  # train()'s own default
    assert run.but(precision="bf16", max_len=32).columns()["precision"] == "bf16"
    assert run.but(max_len=32).max_len == 32 and run.but(lr=None).switch("lr") == 1e-5
    with pytest.raises(ValueError, match="not train"):
        run.but(steps_per_epoch=3)
