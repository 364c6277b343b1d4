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
    layer = qz.Int8Linear.from_linear("x", linear)
    x = torch.randn(3, 5, 128)
    ref = x @ qz.dequantize_int8(layer.weight, layer.scales).T
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group_size", [32, 64])
def test_the_int4_kernel_equals_the_dequantized_matmul(weight, group_size):
    linear = nn.Linear(128, 48, bias=False)
    linear.weight.data.copy_(weight)
    layer = qz.Int4Linear.from_linear("x", linear, group_size)
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
        (dict(scheme="q4_1"), "takes the GGUF file's blocks"),
        (dict(scheme="int8", head="int4"), "head must be one of None, 'int8'"),
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


def test_int4_matches_torchao_for_the_same_scheme(weight):
    utils = pytest.importorskip("torchao.quantization.utils", reason="torchao: make bench-deps")
    scales, zeros = utils.get_groupwise_affine_qparams(weight, 4, 32, dtype=torch.float32)
    q = utils.groupwise_affine_quantize_tensor_from_qparams(weight, scales, zeros, 4, 32)
    ours = qz.quantize_int4(weight, 32)
    assert torch.equal(ours[0], q.int())
    torch.testing.assert_close(ours[1].T, scales.reshape(48, -1))
    torch.testing.assert_close(ours[2].T, zeros.reshape(48, -1))


def test_nibbles_and_the_cpu_layout_round_trip(weight):
    q = qz.quantize_int4(weight, 32)[0]
    assert torch.equal(qz.unpack_nibbles(qz.pack_nibbles(q)), q)
    layer = qz.Int4Linear.from_linear("x", nn.Linear(128, 48, bias=False).requires_grad_(False), 32)
    layer.weight.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
    assert torch.equal(qz.unpack_nibbles(layer.unpack()["qweight"]), q)


def test_q4_1_blocks_become_the_kernels_form_exactly():
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (32, 64), generator=gen)
    d, m = torch.rand(32, 2, generator=gen).half(), torch.randn(32, 2, generator=gen).half()
    ggml = q.float() * d.float().repeat_interleave(32, 1) + m.float().repeat_interleave(32, 1)
    assert torch.equal(qz.dequantize_int4(*qz.q4_1_to_int4(q, d, m), 32), ggml)
    layer = qz.Int4Linear("x", *qz.q4_1_to_int4(q, d, m), 32, torch.float32)
    x = torch.randn(4, 64, generator=gen)
    torch.testing.assert_close(layer(x), x @ ggml.T, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_the_embedded_gguf_decodes_on_its_own_q4_1_blocks():
    """q4_1 feeds the file's blocks to the kernel: the layer computes with exactly the dequantized weights."""
    from effllm.loading import embedded_path, gguf

    blocks = gguf.q4_1_blocks(embedded_path())
    assert len(blocks) == 7 * 30
    fp32 = effllm.load_model("smollm2-135m-instruct", device="cpu")
    model = effllm.load_model("smollm2-135m-instruct", device="cpu", quantize="q4_1")
    ref, layer = fp32.layers[4].attn.k_proj, model.layers[4].attn.k_proj
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-4, atol=1e-4)
    ids = torch.randint(3, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).argmax(-1), fp32(ids).argmax(-1))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(quantize="int8"),
        dict(quantize="int4", group_size=32, head="int8"),
        dict(quantize="int4", group_size=64),
    ],
)
def test_a_quantized_model_saves_and_loads_without_pickle(tmp_path, kwargs):
    model = effllm.load_model("tiny", dtype="bf16", **kwargs)
    path = qz.save(model, tmp_path / "tiny-q.safetensors", source="tiny")
    again = effllm.load_model(path)
    ids = torch.randint(0, 259, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    assert again.quantization == model.quantization
    assert effllm.load_tokenizer(path).decode([104, 105]) == effllm.load_tokenizer("tiny").decode([104, 105])
    with pytest.raises(InputError, match="already quantized"):
        effllm.load_model(path, quantize="int8")


def test_bad_quantized_files_name_the_problem(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, plain)
    with pytest.raises(InputError, match="not a quantized effllm model"):
        effllm.load_model(plain)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        effllm.load_model(broken)
    with pytest.raises(InputError, match="writes quantized models"):
        qz.save(effllm.load_model("tiny"), tmp_path / "x.safetensors")


def test_gradients_through_quantized_weights_are_refused():
    model = effllm.quantize(effllm.load_model("tiny"), "int8")
    model.embed.weight.requires_grad_(True)
    with pytest.raises(InputError, match=r"layers\.0\.attn\.q_proj is quantized and has no gradients"):
        model(torch.tensor([[1, 2, 3]])).sum().backward()


def test_q4_1_needs_a_gguf_and_a_cpu_without_avx2_is_refused(monkeypatch):
    with pytest.raises(InputError, match="not a .gguf file"):
        effllm.load_model("tiny", quantize="q4_1")
    with pytest.raises(InputError, match="pass quantize="):
        effllm.load_model("tiny", group_size=32)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    with pytest.raises(InputError, match="neither AVX2 nor AVX-512"):
        effllm.quantize(effllm.load_model("tiny"), "int8")


@pytest.mark.cuda
def test_the_cuda_int4_kernel_equals_the_dequantized_matmul(weight):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    linear = nn.Linear(128, 48, bias=False).to("cuda", torch.bfloat16)
    linear.weight.data.copy_(weight)
    layer = qz.Int4Linear.from_linear("x", linear, 32)
    q, scales, zeros = qz.quantize_int4(linear.weight.data, 32)
    x = torch.randn(5, 128, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ qz.dequantize_int4(q, scales, zeros, 32).T
    torch.testing.assert_close(layer(x).float(), ref, rtol=2e-2, atol=2e-2)
