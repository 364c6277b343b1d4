"""Our NF4 against bitsandbytes' (codes, double-quantized constants, dequantized weights), and the frozen
NF4 linear layer's forward and input gradient against a plain linear on the dequantized weight."""

import pytest
import torch
import torch.nn.functional as F

from effllm import nf4
from effllm.checks import InputError

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the NF4 reference (requirements.txt)")


def weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("shape", [(192, 576), (576, 576), (1536, 576), (48, 40)])
def test_codes_and_double_quantized_constants_equal_bitsandbytes(shape):
    """(192, 576) is SmolLM2's k/v projection: 1,728 absmax blocks, so the last second-level block of 256
    is partial; (48, 40) has a partial block of 64 too."""
    w = weight(*shape)
    ours = nf4.quantize_nf4(w)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(ours.packed, packed.flatten())
    assert torch.equal(ours.absmax_scale, state.state2.absmax.flatten())
    assert torch.equal(ours.absmax_offset, state.offset)
    # bitsandbytes' C kernel breaks near-ties of the 8-bit map its own way: codes agree or are neighbours
    step = (ours.absmax_codes.int() - state.absmax.flatten().int()).abs()
    assert int(step.max()) <= 1 and float((step == 0).float().mean()) >= 0.9, step.tolist()
    theirs = bnb.functional.dequantize_4bit(packed, state)
    torch.testing.assert_close(nf4.dequantize_nf4(ours), theirs, atol=0.01 * float(w.abs().max()), rtol=0)


def test_the_codebook_and_the_map_are_those_of_bitsandbytes():
    from bitsandbytes.functional import create_dynamic_map, get_4bit_type

    assert torch.equal(nf4.dynamic_map(), create_dynamic_map(signed=True))
    assert torch.equal(torch.tensor(nf4.NF4_LEVELS), get_4bit_type("nf4", device="cpu"))


def test_nf4_holds_under_an_eighth_of_the_fp32_bytes_and_bounds_its_error():
    w = weight(576, 576)
    q = nf4.quantize_nf4(w)
    assert q.nbytes() <= 0.13 * w.numel() * 4
    blocks = w.reshape(-1, 64)
    err = (nf4.dequantize_nf4(q) - w).reshape(-1, 64).abs().amax(dim=1)
    widest_gap = max(b - a for a, b in zip(nf4.NF4_LEVELS, nf4.NF4_LEVELS[1:], strict=False))
    assert bool((err <= blocks.abs().amax(dim=1) * (widest_gap / 2 + 0.01)).all())  # + the 8-bit absmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_matches_a_linear_on_its_dequantized_weight_forward_and_backward(dtype):
    linear = torch.nn.Linear(576, 192, bias=False)
    layer = nf4.NF4Linear.from_linear("layers.0.attn.k_proj", linear)
    x = torch.randn(2, 5, 576, dtype=dtype, requires_grad=True)
    y = layer(x)
    w = layer.dequantize(dtype)
    x_ref = x.detach().clone().requires_grad_()
    torch.testing.assert_close(y, F.linear(x_ref, w))
    g = torch.randn_like(y)
    y.backward(g)
    F.linear(x_ref, w).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert not any(b.requires_grad for b in layer.buffers())


def test_nf4_linear_keeps_no_full_precision_weight_for_backward():
    layer = nf4.NF4Linear.from_linear("mlp.up_proj", torch.nn.Linear(576, 1536, bias=False))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        layer(torch.randn(1, 576, requires_grad=True)).sum().backward()
    assert sum(saved) < 576 * 1536 / 4, saved


def test_bad_input_names_the_layer_or_the_limit():
    with pytest.raises(InputError, match="odd size"):
        nf4.quantize_nf4(torch.randn(3, 3))
    with pytest.raises(InputError, match="has a bias"):
        nf4.NF4Linear.from_linear("lm_head", torch.nn.Linear(4, 4))
    layer = nf4.NF4Linear.from_linear("layers.0.attn.q_proj", torch.nn.Linear(8, 4, bias=False))
    with pytest.raises(InputError, match="layers.0.attn.q_proj takes 8 input features, got 6"):
        layer(torch.randn(1, 6))
