import pytest
import torch
from torch.testing import assert_close

import effllm
from effllm.loading import to_transformers
from effllm.model import PRESETS, ModelArgs, kv_cache_bytes, param_bytes, rope_frequencies, training_mode


def test_tiny_logits_match_transformers(tiny):
    ids = torch.randint(0, tiny.args.vocab_size, (2, 33))
    with torch.no_grad():
        assert_close(tiny(ids), to_transformers(tiny)(ids).logits, atol=1e-4, rtol=0)


def test_llama32_features_match_transformers(llama32_like):
    ids = torch.randint(0, llama32_like.args.vocab_size, (2, 70))  # past the original context of 32
    with torch.no_grad():
        assert_close(llama32_like(ids), to_transformers(llama32_like)(ids).logits, atol=1e-4, rtol=0)


def test_math_attention_path_matches_sdpa(llama32_like):
    ids = torch.randint(0, llama32_like.args.vocab_size, (2, 20))
    with torch.no_grad():
        fast = llama32_like(ids)
        for layer in llama32_like.layers:
            layer.attn.use_sdpa = False
        assert_close(llama32_like(ids), fast, atol=1e-5, rtol=0)


def test_llama3_rope_scaling_slows_only_low_frequencies():
    args = ModelArgs(head_dim=64, rope_theta=500000.0, rope_scaling=PRESETS["llama-3.2-1b"].rope_scaling)
    plain = rope_frequencies(ModelArgs(head_dim=64, rope_theta=500000.0))
    scaled = rope_frequencies(args)
    assert_close(scaled[:4], plain[:4])  # high frequencies untouched
    assert_close(scaled[-1], plain[-1] / 32.0)  # the lowest scaled by the factor
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        rope_frequencies(ModelArgs(rope_scaling={"rope_type": "yarn"}))


def test_cached_prefill_then_steps_match_full_forward(llama32_like):
    ids = torch.randint(0, llama32_like.args.vocab_size, (3, 12))
    with torch.no_grad():
        full = llama32_like(ids)
        llama32_like.setup_cache(3, 16)
        parts = [llama32_like(ids[:, :8], input_pos=torch.arange(8))]
        for t in range(8, 12):
            parts.append(llama32_like(ids[:, t : t + 1], input_pos=torch.tensor([t])))
        llama32_like.clear_cache()
    assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_cache_longer_than_context_is_refused(tiny):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        tiny.setup_cache(1, tiny.args.max_seq_len + 1)


def test_kv_cache_bytes_equals_allocated_cache(tiny):
    tiny.setup_cache(4, 32)
    allocated = sum(b.numel() * b.element_size() for b in tiny.buffers())
    tiny.clear_cache()
    assert allocated == kv_cache_bytes(tiny.args, 4, 32, torch.float32)
    assert kv_cache_bytes(tiny.args, 4, 32, torch.bfloat16) == allocated // 2


def test_param_bytes_counts_tied_weights_once(tiny):
    unique = {p.data_ptr(): p.numel() for p in tiny.state_dict().values()}
    assert param_bytes(tiny) == 4 * sum(unique.values())
    assert tiny.lm_head.weight is tiny.embed.weight


def test_llama_3_2_1b_preset_has_the_published_size():
    from effllm.model import Llama

    with torch.device("meta"):
        model = Llama(PRESETS["llama-3.2-1b"])
    assert param_bytes(model) // 4 == 1_235_814_400  # Llama 3.2 1B, tied embeddings


def test_training_mode_restores_the_mode_and_checkpointing_even_on_an_exception(tiny):
    tiny.eval()
    tiny.checkpoint_every = 3
    with training_mode(tiny, checkpointing=1) as model:
        assert model is tiny and tiny.training and tiny.checkpoint_every == 1
    assert not tiny.training and tiny.checkpoint_every == 3
    tiny.train()
    tiny.checkpoint_every = 0
    with pytest.raises(RuntimeError, match="boom"), training_mode(tiny, checkpointing=2):
        assert tiny.training and tiny.checkpoint_every == 2
        raise RuntimeError("boom")
    assert tiny.training and tiny.checkpoint_every == 0
    tiny.eval()
    with pytest.raises(RuntimeError, match="boom"), training_mode(tiny, checkpointing=2):
        raise RuntimeError("boom")
    assert not tiny.training and tiny.checkpoint_every == 0


def test_a_static_cache_attends_over_every_slot_and_gives_the_same_logits():
    from effllm.decoding import decode_step, prefill

    model = effllm.load_model("tiny")
    ids = torch.randint(0, model.args.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(6).expand(2, 6)
    runs = []
    for static in (False, True):
        model.setup_cache(2, 10, static=static)
        logits = [prefill(model, ids, positions, None)]
        for i in range(3):
            token = logits[-1].argmax(-1)[:, None]
            logits.append(decode_step(model, token, torch.full((2, 1), 6 + i), 6 + i, None))
        runs.append(torch.stack(logits))
        model.clear_cache()
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-5)
    assert not model.static_cache
