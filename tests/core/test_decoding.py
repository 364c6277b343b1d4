import pytest
import torch
from torch.testing import assert_close

import effllm
from effllm import decoding
from effllm.decoding import sample
from effllm.loading import to_transformers
from tests.conftest import ragged_batch


def step_logits(model, ids, mask, new, use_cache):
    """Per-step logits of greedy decoding, by recording what sample() sees."""
    seen = []

    def record(logits, **kw):
        seen.append(logits.clone())
        return sample(logits, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decoding, "sample", record)
        out = effllm.generate(model, ids, mask, max_new_tokens=new, use_cache=use_cache)
    return out, torch.stack(seen, 1)  # (B, new, vocab)


def test_cached_uncached_and_transformers_agree_per_step_on_ragged_batch(llama32_like):
    ids, mask = ragged_batch(llama32_like.args.vocab_size, [9, 4, 12])
    out, cached = step_logits(llama32_like, ids, mask, 10, True)
    _, uncached = step_logits(llama32_like, ids, mask, 10, False)
    ref = to_transformers(llama32_like).generate(
        ids,
        attention_mask=mask,
        max_new_tokens=10,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert_close(cached, uncached, atol=1e-4, rtol=0)
    # transformers decodes its own greedy tokens: compare the steps before any near-tie could split them.
    agree = int((ref.sequences == out).all(0).long().cumprod(0).sum()) - ids.shape[1]
    assert agree >= 1
    assert_close(cached[:, :agree], torch.stack(ref.logits, 1)[:, :agree], atol=1e-4, rtol=0)


def test_unpadded_batch_gives_same_tokens_as_one_by_one(tiny):
    ids = torch.randint(1, 259, (3, 7))
    batched = effllm.generate(tiny, ids, max_new_tokens=6)
    single = torch.cat([effllm.generate(tiny, ids[i : i + 1], max_new_tokens=6) for i in range(3)])
    assert torch.equal(batched, single)


def test_left_padding_does_not_change_a_sequence(llama32_like):
    ids, mask = ragged_batch(llama32_like.args.vocab_size, [5, 11])
    batched = effllm.generate(llama32_like, ids, mask, max_new_tokens=8)
    alone = effllm.generate(llama32_like, ids[:1, -5:], max_new_tokens=8)
    assert torch.equal(batched[0, -13:], alone[0])


def test_eos_stops_each_sequence_and_pads_with_eos(tiny):
    ids = torch.randint(1, 259, (2, 5))
    free = effllm.generate(tiny, ids, max_new_tokens=12)
    eos = int(free[0, 7])  # the third token row 0 generates
    out = effllm.generate(tiny, ids, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(out[0, :8], free[0, :8])
    assert (out[0, 8:] == eos).all()
    assert out.shape[1] <= free.shape[1]


def test_without_eos_generation_never_stops_early(tiny):
    out = effllm.generate(tiny, torch.ones(2, 3, dtype=torch.long), max_new_tokens=20)
    assert out.shape == (2, 23)


def test_sampling_is_reproducible_with_a_seed(tiny):
    ids = torch.randint(1, 259, (2, 4))
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9)
    a = effllm.generate(tiny, ids, seed=3, **kw)
    assert torch.equal(a, effllm.generate(tiny, ids, seed=3, **kw))
    assert not torch.equal(a, effllm.generate(tiny, ids, seed=4, **kw))


def test_top_k_one_is_greedy_and_top_p_keeps_the_head():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert sample(logits, temperature=1.0, top_k=1).item() == 1
    gen = torch.Generator().manual_seed(0)
    draws = {sample(logits, temperature=1.0, top_p=0.5, generator=gen).item() for _ in range(50)}
    assert draws == {1}


@pytest.mark.parametrize("use_cache", [True, False])
def test_stream_yields_exactly_the_tokens_of_generate(tiny, use_cache):
    ids, mask = ragged_batch(tiny.args.vocab_size, [5, 3])
    kw = dict(max_new_tokens=6, use_cache=use_cache, eos_token_id=7)
    steps = list(effllm.stream(tiny, ids, mask, **kw))
    assert all(t.shape == (2,) for t in steps)
    assert torch.equal(torch.cat([ids, torch.stack(steps, 1)], 1), effllm.generate(tiny, ids, mask, **kw))
    assert not tiny.has_cache  # the cache is cleared once the stream ends


def test_an_abandoned_stream_clears_the_cache(tiny):
    steps = effllm.stream(tiny, torch.ones(1, 4, dtype=torch.long), max_new_tokens=5)
    next(steps)
    assert tiny.has_cache
    steps.close()
    assert not tiny.has_cache


def test_timed_generation_separates_prefill_and_decode(tiny):
    from effllm.bench.decode import timed_generate

    t = timed_generate(tiny, torch.ones(1, 4, dtype=torch.long), impl="ours", new_tokens=5, use_cache=True)
    assert t["prefill_s"] > 0 and t["decode_s"] > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(input_ids=torch.ones(1, 500, dtype=torch.long), max_new_tokens=20),
            "exceeds the model's context",
        ),
        (dict(input_ids=torch.ones(0, 4, dtype=torch.long), max_new_tokens=2), "non-empty"),
        (
            dict(
                input_ids=torch.ones(2, 4, dtype=torch.long),
                attention_mask=torch.ones(2, 5),
                max_new_tokens=2,
            ),
            "attention_mask must be a tensor of input_ids. shape",
        ),
        (
            dict(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=2, temperature=-1.0),
            "temperature",
        ),
    ],
)
def test_bad_input_is_refused_with_its_reason(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        effllm.generate(tiny, **kwargs)


@pytest.mark.slow
def test_smollm2_greedy_tokens_match_transformers_on_ragged_batch(smollm2):
    model, tok = smollm2
    questions = ["What is the capital of France?", "Give three tips for staying healthy, please.", "Say hi."]
    chats = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    tok.padding_side = "left"
    enc = tok(chats, return_tensors="pt", padding=True)
    assert len(set(enc.attention_mask.sum(1).tolist())) == 3  # ragged
    kw = dict(max_new_tokens=24, eos_token_id=tok.eos_token_id)
    cached = effllm.generate(model, enc.input_ids, enc.attention_mask, **kw)
    uncached = effllm.generate(model, enc.input_ids, enc.attention_mask, use_cache=False, **kw)
    ref = to_transformers(model).generate(**enc, do_sample=False, pad_token_id=tok.eos_token_id, **kw)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, ref)
    assert "Paris" in tok.decode(cached[0])


def test_compiled_decoding_gives_the_eager_tokens_without_recompiling(tiny):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(0, tiny.args.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    single = effllm.generate(tiny, ids[:1], max_new_tokens=4)  # batch 1: strides of size-1 dims too
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    eager = effllm.generate(tiny, ids, mask, max_new_tokens=6)
    for _ in range(2):  # a second call reuses the static cache and the graph
        assert torch.equal(effllm.generate(tiny, ids, mask, max_new_tokens=6, compile=True), eager)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert torch.equal(effllm.generate(tiny, ids[:1], max_new_tokens=4, compile=True), single)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # one more shape, one graph
    with pytest.raises(ValueError, match="compile=True needs use_cache=True"):
        effllm.generate(tiny, ids, max_new_tokens=2, use_cache=False, compile=True)
