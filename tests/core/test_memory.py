import pytest
import torch

from effllm.lora import apply_lora
from effllm.memory import GiB, fits, ledger, predict, saved_activation_bytes, saved_bytes
from effllm.model import PRESETS, param_bytes
from effllm.step import backward_step

LORA = dict(r=4, alpha=8, dropout=0.05)


def batch(B: int = 2, T: int = 32, vocab: int = 259) -> dict:
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone()}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("lora", [None, LORA])
def test_ledger_static_bytes_are_exact_for_tiny(tiny, lora):
    if lora:
        apply_lora(tiny, **lora)
    predicted = ledger(tiny, optimizer="adamw")
    tiny.train()
    params = [p for p in tiny.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    backward_step(tiny, [batch()])
    assert predicted["parameters"] == param_bytes(tiny) == predicted["parameters_float32"]
    assert predicted["gradients"] == nbytes(p.grad for p in params)
    opt.step()
    assert predicted["optimizer_state"] == nbytes(t for s in opt.state.values() for t in s.values())
    assert ledger(tiny, optimizer="sgd")["optimizer_state"] == 0


def test_ledger_applies_lora_and_bf16_pure_to_a_twin_only(tiny):
    b = batch()
    pure = ledger(tiny, precision="bf16-pure", batch=b)
    assert pure["parameters"] == pure["parameters_bfloat16"] == param_bytes(tiny) // 2
    twin = ledger(tiny, optimizer="adamw", lora=LORA, batch=b, checkpointing=1)
    assert {p.dtype for p in tiny.parameters()} == {torch.float32}  # the model itself is untouched
    assert all(p.requires_grad for p in tiny.parameters())
    applied = ledger(apply_lora(tiny, **LORA), optimizer="adamw", batch=b, checkpointing=1)
    assert twin == applied


def test_saved_activations_shrink_with_checkpointing(tiny):
    b = batch()
    plain, every_second, every = (saved_activation_bytes(tiny, b, checkpointing=n) for n in (0, 2, 1))
    assert every < every_second < plain
    assert not tiny.training and tiny.checkpoint_every == 0  # restored


def test_saved_activations_do_not_count_weights(tiny):
    one, two, three = (saved_activation_bytes(tiny, batch(B=B)) for B in (1, 2, 3))
    assert abs((three - two) - (two - one)) < 64  # linear in the batch size (to a few bytes of scalars)...
    assert abs(2 * one - two) < 64  # ...with no weight bytes (370 KB here) in the constant


def test_autocast_weight_copies_are_counted_apart(tiny):
    fp32, bf16 = (saved_bytes(tiny, batch(), precision=p) for p in ("fp32", "bf16"))
    assert fp32["weight_copies"] == 0
    linears = param_bytes(tiny) - sum(p.numel() * 4 for n, p in tiny.named_parameters() if "norm" in n)
    assert bf16["weight_copies"] == linears // 2  # every matmul weight once, in bf16 (the tied one once)
    assert bf16["activations"] < fp32["activations"]


@pytest.mark.parametrize(
    ("precision", "lora", "checkpointing"), [("fp32", None, 0), ("bf16", None, 1), ("fp16", LORA, 2)]
)
def test_predict_matches_the_ledger_of_the_real_model(tiny, precision, lora, checkpointing):
    kw = dict(optimizer="adamw", precision=precision, lora=lora, checkpointing=checkpointing)
    real = ledger(tiny, batch=batch(B=2, T=24), **kw)
    assert predict(PRESETS["tiny"], batch_size=2, seq_len=24, **kw) == real


def test_predict_llama_3_2_1b_without_allocating_it():
    args = PRESETS["llama-3.2-1b"]
    full = predict(args, batch_size=1, seq_len=256, optimizer="adamw", precision="bf16", checkpointing=1)
    lora = predict(
        args, batch_size=1, seq_len=256, optimizer="adamw", precision="bf16", checkpointing=1, lora=dict(r=16)
    )
    assert full["parameters"] == 1_235_814_400 * 4  # 1.24 B parameters (embedding tied), fp32
    assert full["optimizer_state"] > full["parameters"] * 2
    assert not fits(full, 16) and fits(lora, 8)
    assert lora["gradients"] < GiB / 100
