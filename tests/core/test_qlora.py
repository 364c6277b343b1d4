"""QLoRA (LoRA on a frozen NF4 base) and int4 QAT: against bitsandbytes + PEFT, against LoRA on the
dequantized weights, through every train() switch, in the memory ledger and in PEFT's file format."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from effllm import nf4, quantization
from effllm.checks import InputError
from effllm.loading import to_transformers
from effllm.loading.peft import load_adapter, peft_name, save_adapter
from effllm.lora import apply_lora, lora_layers, merge_lora
from effllm.memory import ledger, predict
from effllm.model import PRESETS, Llama, block_linears, param_bytes, with_overrides
from effllm.training import train
from tests.core.test_lora import randomise_B, tokens

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the NF4 reference (requirements.txt)")
LORA = dict(r=16, alpha=32, dropout=0.0)


def batches(model, n: int = 2, seed: int = 0) -> list[dict]:
    ids = [tokens(model, seed=seed + i) for i in range(n)]
    return [{"input_ids": t, "labels": t.clone()} for t in ids]


def bnb_peft_twin(ours):
    """transformers' Llama with our fp32 weights, every block linear on bitsandbytes' NF4 Linear4bit (blocks
    of 64, double quantization), PEFT's LoRA on q/v carrying our adapters."""
    hf = to_transformers(ours)
    for _, module, child in block_linears(hf.model):
        lin = getattr(module, child)
        layer = bnb.nn.Linear4bit(
            lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4"
        )
        layer.weight = bnb.nn.Params4bit(
            lin.weight.data.clone(),
            requires_grad=False,
            quant_type="nf4",
            blocksize=64,
            compress_statistics=True,
        )
        setattr(module, child, layer.to("cpu"))  # bitsandbytes quantizes on the move to a device
    config = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
    )
    return get_peft_model(hf, config)


def peft_param(pm, name: str):
    """PEFT's adapter tensor for our adapter tensor name (layers.0.attn.q_proj.lora_A)."""
    key = peft_name(name).removesuffix(".weight") + ".default.weight"
    return dict(pm.named_parameters())[key]


def test_qlora_logits_and_adapter_gradients_match_bitsandbytes_and_peft(tiny):
    """Tolerance: bitsandbytes' CPU kernel rounds some near-tied 8-bit absmax codes to the neighbouring
    level (see test_nf4), which moves those blocks' weights by under 1%; logits agree to 1e-4 of their
    largest magnitude, adapter gradients to 1e-3 of theirs."""
    pm = bnb_peft_twin(tiny)
    nf4.quantize_base(tiny)
    apply_lora(tiny, **LORA, seed=0)
    randomise_B(tiny)
    with torch.no_grad():
        for name, m in lora_layers(tiny).items():
            peft_param(pm, f"{name}.lora_A").copy_(m.lora_A)
            peft_param(pm, f"{name}.lora_B").copy_(m.lora_B)
    ids = tokens(tiny)
    ours, theirs = tiny(ids), pm(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4 * float(theirs.detach().abs().max()), rtol=0)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    for name, m in lora_layers(tiny).items():
        for part in ("lora_A", "lora_B"):
            ref = peft_param(pm, f"{name}.{part}").grad
            torch.testing.assert_close(getattr(m, part).grad, ref, atol=1e-3 * float(ref.abs().max()), rtol=0)


def dequantized_twin(model):
    """A copy of model whose block linears hold the dequantized NF4 weights, as plain fp32 linears."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, module, child in block_linears(twin):
            w = getattr(module, child).weight
            w.copy_(nf4.NF4Linear.from_linear(name, getattr(module, child)).dequantize(w.dtype))
    return twin


@pytest.mark.parametrize("checkpointing", [0, 1])
def test_training_on_nf4_equals_lora_on_the_dequantized_weights(tiny, checkpointing):
    reference = dequantized_twin(tiny)
    kw = dict(steps=3, lr=1e-2, lora=LORA, checkpointing=checkpointing, progress=False, seed=0)
    ours = train(tiny, batches(tiny), quantize_base="nf4", **kw)
    theirs = train(reference, batches(tiny), **kw)
    assert ours.status == theirs.status == "ok"
    for a, b in zip(ours.records, theirs.records, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for name, m in lora_layers(tiny).items():
        torch.testing.assert_close(m.lora_B, lora_layers(reference)[name].lora_B, atol=1e-5, rtol=1e-4)
    assert sum(isinstance(m, nf4.NF4Linear) for m in tiny.modules()) == 14


@pytest.mark.parametrize(
    "switches",
    [
        dict(precision="bf16"),
        dict(precision="bf16-pure"),
        dict(precision="fp16", accum_steps=2),
        dict(optimizer="adamw", checkpointing=2, max_grad_norm=1.0),
    ],
)
def test_qlora_trains_with_every_other_switch(tiny, switches):
    result = train(
        tiny, batches(tiny), steps=2, lr=1e-3, lora=LORA, quantize_base="nf4", progress=False, **switches
    )
    assert result.status in ("ok", "unsupported"), result.reason
    if result.status == "ok":
        assert result.trainable_params == sum(
            m.lora_A.numel() + m.lora_B.numel() for m in lora_layers(tiny).values()
        )
        layer = tiny.layers[0].mlp.up_proj
        assert layer.absmax_scale.dtype == layer.absmax_offset.dtype == torch.float32  # casts spare them
        assert all(torch.isfinite(m.lora_B).all() for m in lora_layers(tiny).values())


def test_a_qlora_adapter_loads_onto_the_full_precision_base_and_into_peft(tiny, tmp_path):
    base = copy.deepcopy(tiny)
    train(tiny, batches(tiny), steps=2, lr=1e-2, lora=LORA, quantize_base="nf4", progress=False)
    with pytest.raises(InputError, match="layers.0.attn.q_proj is a quantized base"):
        merge_lora(tiny)
    save_adapter(tiny, tmp_path)
    full = load_adapter(copy.deepcopy(base), tmp_path)
    for name, m in lora_layers(full).items():
        assert torch.equal(m.lora_B, lora_layers(tiny)[name].lora_B)
    ids = tokens(tiny)
    pm = PeftModel.from_pretrained(to_transformers(base), tmp_path)
    torch.testing.assert_close(pm(input_ids=ids).logits, full(ids), atol=1e-5, rtol=0)
    wider = Llama(with_overrides(PRESETS["tiny"], dim=128, head_dim=32))
    with pytest.raises(
        ValueError, match=r"layers.0.self_attn.q_proj.lora_A.weight is \(16, 64\), not \(16, 128\)"
    ):
        load_adapter(nf4.quantize_base(wider), tmp_path)


def test_the_ledger_counts_the_4bit_base_and_predicts_the_real_model(tiny):
    fp32_linears = sum(getattr(m, c).weight.nbytes for _, m, c in block_linears(tiny))
    kw = dict(optimizer="adamw", precision="bf16", lora=LORA, checkpointing=1)
    predicted = predict(PRESETS["tiny"], batch_size=2, seq_len=12, quantize_base="nf4", **kw)
    full = predict(PRESETS["tiny"], batch_size=2, seq_len=12, **kw)
    assert predicted["parameters_nf4"] <= 0.13 * fp32_linears
    assert full["parameters"] - predicted["parameters"] == fp32_linears - predicted["parameters_nf4"]
    nf4.quantize_base(tiny)
    real = ledger(tiny, batch=batches(tiny)[0], **kw)
    assert real == predicted
    assert param_bytes(tiny) == predicted["parameters"] - sum(
        m.lora_A.nbytes + m.lora_B.nbytes
        for m in lora_layers(apply_lora(copy.deepcopy(tiny), **LORA)).values()
    )


def test_llama_3_2_1b_qlora_fits_4_gib_at_the_gpu_profile_shape():
    lora = dict(r=16, alpha=32, dropout=0.05)
    pred = predict(
        PRESETS["llama-3.2-1b"], batch_size=2, seq_len=256, precision="fp16", lora=lora, quantize_base="nf4"
    )
    assert pred["total"] < 4 * 2**30, pred


def test_fake_quantizer_equals_torchao_and_passes_gradients_straight_through():
    pytest.importorskip("torchao", reason="torchao is the int4 reference")
    from torchao.quantization.qat import fake_quantize_config, fake_quantizer

    w = (torch.randn(192, 576, generator=torch.Generator().manual_seed(0)) * 0.05).requires_grad_()
    for group in (32, 64):
        ref = fake_quantizer.Int4WeightFakeQuantizer(
            fake_quantize_config.Int4WeightFakeQuantizeConfig(
                group_size=group, activation_dtype=torch.bfloat16
            )
        )
        ours = quantization.fake_quantize_int4(w, group)
        torch.testing.assert_close(ours, ref(w.detach()), atol=1e-7, rtol=0)
    g = torch.randn_like(w)
    ours.backward(g)
    assert torch.equal(w.grad, g)


def test_qat_trains_through_the_int4_grid_and_converts_to_exactly_what_it_saw(tiny):
    result = train(
        tiny,
        batches(tiny),
        steps=3,
        lr=1e-2,
        lora={**LORA, "dropout": 0.05},
        qat="int4",
        group_size=32,
        progress=False,
    )
    assert result.status == "ok" and result.trainable_params < result.total_params
    ids = tokens(tiny)
    tiny.eval()
    with torch.no_grad():
        seen = tiny(ids)
        converted = quantization.convert_qat(tiny)(ids)
    assert not lora_layers(tiny) and quantization.is_quantized(tiny)
    torch.testing.assert_close(converted, seen, atol=1e-4 * float(seen.abs().max()), rtol=0)


def test_bad_4bit_switches_are_refused_with_the_reason(tiny):
    with pytest.raises(InputError, match="quantize_base must be one of"):
        train(tiny, batches(tiny), steps=1, lora=LORA, quantize_base="nf3", progress=False)
    with pytest.raises(InputError, match="full fine-tuning of a 4-bit base is not supported"):
        train(tiny, batches(tiny), steps=1, quantize_base="nf4", progress=False)
    with pytest.raises(InputError, match="pick one"):
        train(tiny, batches(tiny), steps=1, lora=LORA, quantize_base="nf4", qat="int4", progress=False)
    with pytest.raises(InputError, match="pass qat='int4' with it"):
        train(tiny, batches(tiny), steps=1, lora=LORA, group_size=32, progress=False)
    with pytest.raises(InputError, match="pass lora="):
        train(tiny, batches(tiny), steps=1, qat="int4", progress=False)
    with pytest.raises(InputError, match="group_size must be one of"):
        train(tiny, batches(tiny), steps=1, lora=LORA, qat="int4", group_size=48, progress=False)
    apply_lora(tiny, **LORA)
    with pytest.raises(InputError, match="quantize the base first"):
        nf4.quantize_base(tiny)
    with pytest.raises(InputError, match="not prepared for QAT"):
        quantization.convert_qat(tiny)
    odd = Llama(PRESETS["tiny"])
    odd.layers[1].mlp.gate_proj = torch.nn.Linear(63, 33, bias=False)
    with pytest.raises(InputError, match=r"layers.1.mlp.gate_proj has 2079 weights"):
        nf4.quantize_base(odd)
    assert not any(isinstance(m, nf4.NF4Linear) for m in odd.modules())  # nothing half-quantized


def test_the_larger_presets_have_their_published_sizes():
    for name, billions in (("llama-3.2-3b", 3.21), ("llama-3.1-8b", 8.03)):
        with torch.device("meta"):
            n = sum(p.numel() for p in Llama(PRESETS[name]).parameters())
        assert round(n / 1e9, 2) == billions, (name, n)
