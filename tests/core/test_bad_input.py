"""Bad input at the core's public boundary (generate, train, evaluate): a clear error, never a silent answer.

One table per boundary; every case must raise effllm's own InputError (a ValueError) whose message names
the offending argument and value.
"""

import math

import pytest
import torch

import effllm
from effllm.checks import InputError
from effllm.data import IGNORE_INDEX, collate
from effllm.step import evaluate
from effllm.training import train

IDS = torch.ones(2, 4, dtype=torch.long)
GENERATE = [
    (dict(input_ids=[[1, 2, 3]]), "must be a torch tensor of token ids, got a list"),
    (dict(input_ids=torch.ones(1, 3)), "integer token ids, got dtype torch.float32"),
    (dict(input_ids=torch.tensor([[1, 999]])), "token id 999, outside the vocabulary"),
    (dict(input_ids=torch.tensor([[-1, 2]])), "token id -1"),
    (
        dict(input_ids=IDS, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])),
        r"rows \[1\] hold no token",
    ),
    (
        dict(input_ids=IDS, attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])),
        r"rows \[1\].*right padding",
    ),
    (dict(input_ids=IDS, attention_mask=torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])), r"rows \[0\]"),
    (dict(input_ids=IDS, attention_mask=torch.full((2, 4), 2)), "only 0 .padding. and 1"),
    (dict(input_ids=IDS, max_new_tokens=2.5), "max_new_tokens must be an integer, got 2.5"),
    (dict(input_ids=IDS, max_new_tokens="3"), "max_new_tokens must be an integer"),
    (dict(input_ids=IDS, temperature=math.nan), "temperature must be finite, got nan"),
    (dict(input_ids=IDS, top_p=0.0), "top_p must lie in"),
    (dict(input_ids=IDS, top_k=0), "top_k must be at least 1"),
]


@pytest.mark.parametrize(("kwargs", "message"), GENERATE, ids=[m for _, m in GENERATE])
def test_generate_refuses_bad_input_and_says_why(tiny, kwargs, message):
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(InputError, match=message):
        effllm.generate(tiny, **kwargs)


def test_a_left_padded_prompt_still_generates(tiny):
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    out = effllm.generate(tiny, IDS, mask, max_new_tokens=2)
    assert out.shape == (2, 6)


TRAIN = [
    (dict(lr=math.nan), "lr must be finite, got nan"),
    (dict(lr=-1.0), "lr must be at least 0"),
    (dict(max_grad_norm=math.nan), "max_grad_norm must be finite"),
    (dict(max_grad_norm=0.0), "max_grad_norm must be above 0"),
    (dict(steps=2.0), "steps must be an integer, got 2.0"),
    (dict(steps=0), "steps must be at least 1"),
    (dict(accum_steps=True), "accum_steps must be an integer"),
    (dict(precision="float16"), "precision must be one of"),
    (dict(optimizer="lion"), "optimizer must be one of"),
    (dict(eval_batches=[]), "eval_batches is empty"),
]


@pytest.mark.parametrize(("kwargs", "message"), TRAIN, ids=[m for _, m in TRAIN])
def test_train_refuses_bad_switches_and_says_why(tiny, items, pad_id, kwargs, message):
    with pytest.raises(InputError, match=message):
        train(tiny, [collate(items[:1], pad_id=pad_id)], **{"steps": 1, "progress": False, **kwargs})


def test_a_step_without_targets_has_no_loss_not_a_zero_one(tiny, items, pad_id):
    batch = collate(items[:1], pad_id=pad_id)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    with pytest.raises(InputError, match="hold no target token"):
        train(tiny, [batch], steps=1, progress=False)
    with pytest.raises(InputError, match="eval batches hold no target token"):
        evaluate(tiny, [batch])


BATCHES = [
    (lambda b: {"input_ids": b["input_ids"]}, "lacks labels"),
    (lambda b: {**b, "input_ids": b["input_ids"].float()}, "integer token ids"),
    (lambda b: {**b, "input_ids": b["input_ids"] + 10_000}, "outside the vocabulary"),
    (lambda b: {**b, "labels": b["labels"][:, :-1]}, "labels .* != input_ids"),
]


@pytest.mark.parametrize(("change", "message"), BATCHES, ids=[m for _, m in BATCHES])
def test_train_refuses_malformed_batches(tiny, items, pad_id, change, message):
    with pytest.raises(InputError, match=f"micro-batch 0.*{message}|micro-batch 0 {message}"):
        train(tiny, [change(collate(items[:1], pad_id=pad_id))], steps=1, progress=False)


def test_a_batch_longer_than_the_context_is_refused(tiny, items, pad_id):
    batch = collate(items[:1], pad_id=pad_id)
    n = tiny.args.max_seq_len + 1
    batch = {"input_ids": torch.ones(1, n, dtype=torch.long), "labels": torch.ones(1, n, dtype=torch.long)}
    with pytest.raises(InputError, match=f"{n} tokens long, beyond the model's context"):
        train(tiny, [batch], steps=1, progress=False)


def test_a_run_that_ends_on_a_nan_loss_is_never_ok(tiny, items, pad_id, monkeypatch):
    import effllm.step as step_mod

    real, calls = step_mod.loss_fn, []

    def nan_at_the_end(logits, labels):  # the last of 3 steps is non-finite: within divergence_patience
        calls.append(1)
        total, n = real(logits, labels)
        return (total * math.nan if len(calls) == 3 else total), n

    monkeypatch.setattr(step_mod, "loss_fn", nan_at_the_end)
    result = train(tiny, [collate(items[:1], pad_id=pad_id)], steps=3, progress=False)
    assert result.status == "diverged" and "last step's loss is nan" in result.reason


def test_a_collapse_to_chance_level_is_flagged(tiny, items, pad_id):
    result = train(
        tiny, [collate(items[:2], pad_id=pad_id)], steps=6, optimizer="adamw", lr=1e6, progress=False
    )
    assert result.status == "diverged", (result.status, [r["loss"] for r in result.records])
    assert "collapsed" in result.reason or "NaN or inf" in result.reason, result.reason


def test_tokenize_names_the_record_and_field_that_is_missing():
    from effllm.data import DataError, tokenize
    from effllm.loading import load_tokenizer

    tok = load_tokenizer("tiny")
    with pytest.raises(DataError, match="example 1: field 'output' is missing"):
        tokenize([{"instruction": "a", "output": "b"}, {"instruction": "c"}], tok, max_len=64)
    with pytest.raises(InputError, match="max_len must be an integer, got 64.0"):
        tokenize([{"instruction": "a", "output": "b"}], tok, max_len=64.0)
