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
