"""Weight-only int8 / int4 quantization: bounded rounding error, kernels equal to the dequantized matmul,
a quantized model that still decodes, and clear refusals."""

import pytest
import torch
from torch import nn

import effllm
from effllm import quantization as qz
from effllm.checks import InputError
from effllm.lora import apply_lora


@pytest.fixture
def weight() -> torch.Tensor:
    return torch.randn(48, 128, generator=torch.Generator().manual_seed(0))


def test_int8_rounds_each_weight_to_within_half_a_step(weight):
    q, scales = qz.quantize_int8(weight)
    assert q.dtype == torch.int8 and scales.shape == (48,)
    assert ((weight - qz.dequantize_int8(q, scales)).abs() <= scales[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_rounds_each_weight_to_within_half_a_step_of_its_group(weight, group_size):
    q, scales, zeros = qz.quantize_int4(weight, group_size)
    assert int(q.min()) >= 0 and int(q.max()) <= 15 and scales.shape == (128 // group_size, 48)
    step = scales.T.repeat_interleave(group_size, dim=1)
    assert ((weight - qz.dequantize_int4(q, scales, zeros, group_size)).abs() <= step / 2 + 1e-5).all()


def test_the_int8_kernel_equals_the_dequantized_matmul(weight):
    linear = nn.Linear(128, 48, bias=False)
    linear.weight.data.copy_(weight)
    layer = qz.Int8Linear(linear)
    x = torch.randn(3, 5, 128)
    ref = x @ qz.dequantize_int8(layer.weight, layer.scales).T
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group_size", [32, 64])
def test_the_int4_kernel_equals_the_dequantized_matmul(weight, group_size):
    linear = nn.Linear(128, 48, bias=False)
    linear.weight.data.copy_(weight)
    layer = qz.Int4Linear(linear, group_size)
    x = torch.randn(3, 5, 128)
    q, scales, zeros = qz.quantize_int4(weight, group_size)
    ref = x @ qz.dequantize_int4(q, scales, zeros, group_size).T
    torch.testing.assert_close(layer(x), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("scheme", "group_size", "tolerance"), [("int8", None, 0.02), ("int4", 32, 0.2)])
def test_a_quantized_model_keeps_its_logits_close_and_decodes(scheme, group_size, tolerance):
    model = effllm.load_model("tiny")
    ids = torch.randint(0, model.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
        effllm.quantize(model, scheme, group_size=group_size)
        out = model(ids)
    assert (out - ref).abs().max() <= tolerance * ref.abs().max()
    assert not any(p.requires_grad for p in model.parameters())
    assert (
        sum(isinstance(m, (qz.Int8Linear, qz.Int4Linear)) for m in model.modules()) == 7 * model.args.n_layers
    )
    assert effllm.generate(model, ids, max_new_tokens=3).shape == (2, 15)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(scheme="int3"), "scheme must be one of 'int8', 'int4'"),
        (dict(scheme="int4"), "group_size must be an integer"),
        (dict(scheme="int4", group_size=48), "group_size must be one of 32, 64, 128, 256"),
        (dict(scheme="int4", group_size=128), r"layers\.0\.attn\.q_proj has 64 inputs, not a multiple of"),
        (dict(scheme="int8", group_size=32), "group_size applies to int4 only"),
    ],
)
def test_bad_quantization_requests_say_why(kwargs, message):
    with pytest.raises(InputError, match=message):
        qz.quantize(effllm.load_model("tiny"), **kwargs)


def test_quantizing_twice_or_under_adapters_is_refused():
    model = qz.quantize(effllm.load_model("tiny"), "int8")
    with pytest.raises(InputError, match="already quantized"):
        qz.quantize(model, "int4", group_size=32)
    adapted = effllm.load_model("tiny")
    apply_lora(adapted)
    with pytest.raises(InputError, match="LoRA adapters"):
        qz.quantize(adapted, "int8")


def test_a_quantized_model_compiles_to_the_same_tokens():
    model = effllm.quantize(effllm.load_model("tiny"), "int4", group_size=32)
    ids = torch.randint(0, model.args.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    eager = effllm.generate(model, ids, max_new_tokens=4)
    assert torch.equal(effllm.generate(model, ids, max_new_tokens=4, compile=True), eager)
