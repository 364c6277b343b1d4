import math

import pytest
import torch
from torch.testing import assert_close

import effllm
from effllm import step as step_mod
from effllm.data import collate, count_target_tokens
from effllm.lora import apply_lora, lora_layers
from effllm.precision import precision_problem
from effllm.step import backward_step, evaluate
from effllm.training import lr_factor, train

CPU = torch.device("cpu")


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_accumulated_gradients_equal_one_large_batch(tiny, items, pad_id):
    tiny.train()
    big = collate(items, pad_id=pad_id)
    micro = [collate(items[:2], pad_id=pad_id), collate(items[2:], pad_id=pad_id)]
    assert micro[0]["input_ids"].shape[1] != micro[1]["input_ids"].shape[1]  # unequal lengths and padding
    assert count_target_tokens(micro[0]) != count_target_tokens(micro[1])
    backward_step(tiny, [big])
    one = grads(tiny)
    out = backward_step(tiny, micro, normalisation="tokens")
    accumulated = grads(tiny)
    assert out["tokens"] == count_target_tokens(big)
    for name in one:
        assert_close(accumulated[name], one[name], atol=1e-6, rtol=1e-4)
    backward_step(tiny, micro, normalisation="mean")  # mean of micro-batch means over-weights the short one
    mean = grads(tiny)
    assert not torch.allclose(
        mean["layers.0.attn.q_proj.weight"], one["layers.0.attn.q_proj.weight"], rtol=1e-2
    )


@pytest.mark.parametrize("lora", [False, True])
def test_checkpointed_gradients_equal_plain(tiny, items, pad_id, lora):
    if lora:
        apply_lora(tiny, r=4, alpha=8, dropout=0.05, seed=0)
        with torch.no_grad():
            for m in lora_layers(tiny).values():  # B starts at zero, which would leave A's gradient zero
                m.lora_B.normal_(0, 0.1)
    batch = collate(items[:2], pad_id=pad_id)
    tiny.train()
    results = []
    for every in (0, 1, 2):
        tiny.checkpoint_every = every
        torch.manual_seed(0)  # the same dropout masks; non-reentrant checkpointing replays the RNG state
        backward_step(tiny, [batch])
        results.append(grads(tiny))
    plain = results[0]
    if lora:
        assert set(plain) == {f"{n}.lora_{ab}" for n in lora_layers(tiny) for ab in "AB"}
        assert all(g.abs().sum() > 0 for g in plain.values())
    for checkpointed in results[1:]:
        assert checkpointed.keys() == plain.keys()
        for name in plain:
            assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


# Tolerances on the token-mean loss of the random tiny model (about 5.6 nats) against fp32.
AUTOCAST_ATOL = {"fp16": 1e-3, "bf16": 1e-2}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_autocast_loss_is_close_to_fp32(tiny, items, pad_id, precision):
    if reason := precision_problem(precision, CPU):
        pytest.skip(reason)
    batch = collate(items, pad_id=pad_id)
    fp32 = evaluate(tiny, [batch])
    low = evaluate(tiny, [batch], precision=precision)
    assert low != fp32  # autocast really ran in low precision
    assert abs(low - fp32) < AUTOCAST_ATOL[precision]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_training_on_gpu_matches_fp32(items, pad_id):
    batch = collate(items, pad_id=pad_id)
    losses = {}
    for precision in ("fp32", "fp16"):
        model = effllm.load_model("tiny", device="cuda")
        result = train(model, [batch], steps=3, precision=precision, lr=1e-3, progress=False)
        assert result.status == "ok", result.reason
        losses[precision] = [r["loss"] for r in result.records]
    assert result.records[0]["loss_scale"] == 65536.0
    assert_close(
        torch.tensor(losses["fp16"]), torch.tensor(losses["fp32"]), atol=AUTOCAST_ATOL["fp16"], rtol=0
    )


def test_fp16_records_loss_scale_and_skips(tiny, items, pad_id):
    result = train(tiny, [collate(items[:2], pad_id=pad_id)], steps=2, precision="fp16", progress=False)
    if result.status == "unsupported":
        pytest.skip(result.reason)
    assert [r["loss_scale"] for r in result.records] == [65536.0, 65536.0]
    assert result.skipped_steps == sum(r["skipped"] for r in result.records) == 0


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.5), ("adamw", 1e-2)])
def test_a_few_steps_on_a_fixed_batch_lower_the_loss(tiny, items, pad_id, optimizer, lr):
    batch = collate(items[:2], pad_id=pad_id)
    result = train(tiny, [batch], steps=6, optimizer=optimizer, lr=lr, progress=False)
    losses = [r["loss"] for r in result.records]
    assert result.status == "ok" and result.steps == 6
    assert losses[-1] < losses[0] - 0.1


def test_lora_training_moves_only_the_adapters(tiny, items, pad_id):
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    lora = dict(r=4, alpha=8, dropout=0.05)
    result = train(
        tiny,
        [collate(items[:2], pad_id=pad_id)],
        steps=3,
        optimizer="adamw",
        lr=1e-2,
        lora=lora,
        checkpointing=1,
        progress=False,
    )
    assert result.trainable_params == sum(
        p.numel() for m in lora_layers(tiny).values() for p in (m.lora_A, m.lora_B)
    )
    for name, p in tiny.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, before[name.replace(".base", "")])
    assert tiny.checkpoint_every == 0 and not tiny.training  # switches restored after training


def test_the_same_seed_gives_the_same_losses(items, pad_id):
    batches = [collate(items[:2], pad_id=pad_id), collate(items[2:], pad_id=pad_id)]

    def run(seed):
        model = effllm.load_model("tiny", device="cpu")
        lora = dict(r=4, dropout=0.1)
        result = train(
            model, batches, steps=4, optimizer="adamw", lr=1e-2, lora=lora, seed=seed, progress=False
        )
        return [r["loss"] for r in result.records]

    assert run(0) == run(0)
    assert run(0) != run(1)  # the seed reaches LoRA's init and dropout


def test_accumulated_training_equals_large_batch_training(items, pad_id):
    micro = [collate(items[:2], pad_id=pad_id), collate(items[2:], pad_id=pad_id)]
    one = effllm.load_model("tiny", device="cpu")
    two = effllm.load_model("tiny", device="cpu")
    a = train(one, [collate(items, pad_id=pad_id)], steps=2, lr=0.5, progress=False)
    b = train(two, micro, steps=2, accum_steps=2, lr=0.5, progress=False)
    assert_close(torch.tensor([r["loss"] for r in b.records]), torch.tensor([r["loss"] for r in a.records]))
    for p, q in zip(one.parameters(), two.parameters(), strict=True):
        assert_close(q, p, atol=1e-6, rtol=1e-5)


def test_a_nan_loss_stops_with_diverged(tiny, items, pad_id):
    tiny.register_forward_hook(lambda module, args, out: out * float("nan"))
    result = train(tiny, [collate(items[:2], pad_id=pad_id)], steps=10, divergence_patience=2, progress=False)
    assert result.status == "diverged"
    assert "non-finite for 3 consecutive steps" in result.reason
    assert result.steps == 3 and result.nan_count == 3 and result.records[-1]["nan_count"] == 3


def test_a_huge_learning_rate_diverges(tiny, items, pad_id):
    result = train(
        tiny, [collate(items[:2], pad_id=pad_id)], steps=12, lr=1e30, divergence_patience=2, progress=False
    )
    assert result.status == "diverged" and result.steps < 12
    assert math.isfinite(result.records[0]["loss"]) and not math.isfinite(result.records[-1]["loss"])


def test_out_of_memory_becomes_status_oom(tiny, items, pad_id, monkeypatch):
    calls, real = [], step_mod.loss_fn

    def loss_fn(logits, labels):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(logits, labels)

    monkeypatch.setattr(step_mod, "loss_fn", loss_fn)
    result = train(tiny, [collate(items[:2], pad_id=pad_id)], steps=5, progress=False)
    assert result.status == "oom" and "out of memory at step 3" in result.reason
    assert result.steps == 2 and all(p.grad is None for p in tiny.parameters())


def test_unsupported_names_raise(tiny, items, pad_id):
    batch = [collate(items[:1], pad_id=pad_id)]
    with pytest.raises(ValueError, match="precision must be one of 'fp32', 'fp16', 'bf16', 'bf16-pure'"):
        train(tiny, batch, steps=1, precision="fp8", progress=False)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train(tiny, batch, steps=1, optimizer="lion", progress=False)


def test_an_unsupported_precision_is_a_status_not_a_crash(tiny, items, pad_id, monkeypatch):
    def no_scaler(*args, **kwargs):
        raise RuntimeError("GradScaler is not available for this device")

    monkeypatch.setattr(torch.amp, "GradScaler", no_scaler)
    result = train(tiny, [collate(items[:1], pad_id=pad_id)], steps=1, precision="fp16", progress=False)
    assert result.status == "unsupported" and "GradScaler is not available" in result.reason


def test_bf16_pure_trains_in_bf16(tiny, items, pad_id):
    result = train(tiny, [collate(items[:2], pad_id=pad_id)], steps=2, precision="bf16-pure", progress=False)
    assert result.status == "ok" and math.isfinite(result.final_loss)
    assert {p.dtype for p in tiny.parameters()} == {torch.bfloat16}


def test_records_schedule_clipping_and_eval(tiny, items, pad_id):
    batch = collate(items[:2], pad_id=pad_id)
    result = train(
        tiny,
        [batch],
        steps=5,
        lr=0.1,
        warmup_steps=2,
        schedule="cosine",
        max_grad_norm=1e-3,
        eval_batches=[batch],
        eval_every=2,
        progress=False,
    )
    rec = result.records
    assert set(rec[0]) == {
        "step",
        "loss",
        "eval_loss",
        "lr",
        "grad_norm",
        "tokens",
        "total_tokens",
        "micro_step_s",
        "step_s",
        "loss_scale",
        "skipped",
        "nan_count",
    }
    assert [r["lr"] for r in rec] == pytest.approx(
        [0.1 * lr_factor(i, warmup_steps=2, steps=5, schedule="cosine") for i in range(5)]
    )
    assert [r["lr"] for r in rec][:3] == pytest.approx([0.05, 0.1, 0.1])
    assert [math.isnan(r["eval_loss"]) for r in rec] == [True, False, True, False, False]
    assert rec[0]["grad_norm"] > 1e-3  # the norm before clipping is recorded
    assert (
        rec[0]["tokens"] == count_target_tokens(batch)
        and rec[0]["total_tokens"] == batch["input_ids"].numel()
    )
    assert result.final_eval_loss == rec[-1]["eval_loss"]


def test_clipping_bounds_the_sgd_update(tiny, items, pad_id):
    before = [p.detach().clone() for p in tiny.parameters()]
    train(tiny, [collate(items[:2], pad_id=pad_id)], steps=1, lr=0.1, max_grad_norm=1e-3, progress=False)
    update = torch.cat([(p - b).flatten() for p, b in zip(tiny.parameters(), before, strict=True)])
    assert update.norm() <= 0.1 * 1e-3 * (1 + 1e-4)
