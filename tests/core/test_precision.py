import pytest
import torch

from effllm.precision import DTYPES, dtype, dtype_name


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_dtype_names_round_trip(name):
    assert dtype(name) is DTYPES[name]
    assert dtype_name(dtype(name)) == name


def test_the_three_names_are_the_whole_vocabulary():
    assert DTYPES == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("name", ["float32", "bfloat16", "fp64", "bf16-pure", ""])
def test_an_unknown_dtype_name_is_refused(name):
    with pytest.raises(ValueError, match="dtype must be one of fp32, bf16, fp16"):
        dtype(name)


@pytest.mark.parametrize("unnamed", [torch.float64, torch.int64, torch.float8_e4m3fn])
def test_a_dtype_without_a_name_is_refused(unnamed):
    with pytest.raises(ValueError, match="has no name here"):
        dtype_name(unnamed)
