import copy
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from torch import nn

from effllm.loading import to_transformers
from effllm.loading.peft import adapter_state_dict, hf_path
from effllm.lora import (
    LoRALinear,
    apply_lora,
    lora_layers,
    merge_lora,
    remove_lora,
    trainable_parameters,
    unmerge_lora,
)

PEFT_CONFIG = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def tokens(model, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


def randomise_B(model, seed: int = 1) -> None:
    """Non-zero B, so that the adapters change the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.1)


def peft_twin(base, ours):
    """PEFT's LoRA on transformers' Llama with our base weights and our adapters copied in."""
    pm = get_peft_model(to_transformers(base), LoraConfig(task_type="CAUSAL_LM", **PEFT_CONFIG))
    result = set_peft_model_state_dict(pm, adapter_state_dict(ours))
    assert not result.unexpected_keys
    return pm


def peft_module(pm, name: str):
    """PEFT's LoRA layer for our module name (layers.0.attn.q_proj)."""
    return pm.base_model.model.get_submodule(hf_path(name))


@pytest.mark.parametrize("fixture", ["tiny", "llama32_like"])
def test_logits_and_adapter_gradients_match_peft(fixture, request):
    model = request.getfixturevalue(fixture)
    base = copy.deepcopy(model)
    apply_lora(model, r=16, alpha=32, dropout=0.0, seed=0)
    randomise_B(model)
    pm = peft_twin(base, model)
    ids = tokens(model)
    ours, theirs = model(ids), pm(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    targets = tokens(model, seed=2).flatten()
    F.cross_entropy(ours.flatten(0, 1), targets).backward()
    F.cross_entropy(theirs.flatten(0, 1), targets).backward()
    for name, m in lora_layers(model).items():
        twin = peft_module(pm, name)
        torch.testing.assert_close(m.lora_A.grad, twin.lora_A["default"].weight.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(m.lora_B.grad, twin.lora_B["default"].weight.grad, atol=1e-6, rtol=1e-4)


def test_fresh_adapters_leave_the_logits_exactly_unchanged(tiny):
    ids = tokens(tiny)
    before = tiny(ids)
    apply_lora(tiny, targets="all-linear")
    assert not any(m.training for m in tiny.modules())  # new adapters follow the model's eval mode
    assert torch.equal(tiny(ids), before)


def test_adapters_start_as_peft_initialises_them_seeded_and_in_fp32(tiny):
    one = apply_lora(copy.deepcopy(tiny), seed=0)
    two = apply_lora(tiny.to(torch.bfloat16), seed=0)
    for (name, a), b in zip(lora_layers(one).items(), lora_layers(two).values(), strict=True):
        bound = 1 / math.sqrt(a.base.in_features)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear's default
        assert a.lora_A.abs().max() <= bound and a.lora_A.std() > bound / 3, name
        assert torch.equal(a.lora_A, b.lora_A) and not a.lora_B.any()
        assert b.lora_A.dtype == b.lora_B.dtype == torch.float32 and b.base.weight.dtype == torch.bfloat16
    assert two(tokens(two)).dtype == torch.bfloat16


def test_only_adapters_are_trainable_and_counted_as_peft_counts(tiny):
    base = copy.deepcopy(tiny)
    apply_lora(tiny)
    trainable, total, percent = trainable_parameters(tiny)
    names = [n for n, p in tiny.named_parameters() if p.requires_grad]
    assert names and all(n.endswith((".lora_A", ".lora_B")) for n in names)
    assert trainable == 2 * (16 * (64 + 64) + 16 * (64 + 32))  # 2 layers x (q: 64->64, v: 64->32), r=16
    assert (trainable, total) == peft_twin(base, tiny).get_nb_trainable_parameters()
    assert percent == pytest.approx(100 * trainable / total)


def test_merged_logits_equal_unmerged_and_merging_twice_is_safe(tiny):
    apply_lora(tiny, targets="all-linear", seed=0)
    randomise_B(tiny)
    ids = tokens(tiny)
    unmerged = tiny(ids)
    merge_lora(tiny)
    once = {k: v.clone() for k, v in tiny.state_dict().items()}
    merge_lora(tiny)
    assert all(torch.equal(v, once[k]) for k, v in tiny.state_dict().items())
    torch.testing.assert_close(tiny(ids), unmerged, atol=1e-5, rtol=0)


def test_unmerge_restores_the_base_weights(tiny):
    base = {k: v.clone() for k, v in tiny.state_dict().items()}
    apply_lora(tiny, seed=0)
    randomise_B(tiny)
    merge_lora(tiny)
    assert not torch.equal(tiny.layers[0].attn.q_proj.base.weight, base["layers.0.attn.q_proj.weight"])
    unmerge_lora(tiny)
    unmerge_lora(tiny)  # a no-op when not merged
    for name, m in lora_layers(tiny).items():
        torch.testing.assert_close(m.base.weight, base[f"{name}.weight"], atol=1e-7, rtol=0)


def test_remove_lora_gives_plain_linears_with_or_without_the_update(tiny):
    base = copy.deepcopy(tiny)
    ids = tokens(tiny)
    apply_lora(tiny, seed=0)
    randomise_B(tiny)
    adapted = tiny(ids)
    merged = remove_lora(copy.deepcopy(tiny))
    dropped = remove_lora(tiny, merge=False)
    for model in (merged, dropped):
        assert not lora_layers(model) and type(model.layers[0].attn.q_proj) is nn.Linear
        to_transformers(model)  # the state-dict names are the plain model's again
    torch.testing.assert_close(merged(ids), adapted, atol=1e-5, rtol=0)
    torch.testing.assert_close(dropped(ids), base(ids), atol=1e-6, rtol=0)


def test_dropout_is_active_in_train_mode_and_off_in_eval_mode(tiny):
    apply_lora(tiny, dropout=0.5, seed=0)
    randomise_B(tiny)
    ids = tokens(tiny)
    assert torch.equal(tiny.eval()(ids), tiny(ids))
    evaluated = tiny(ids)
    assert not torch.allclose(tiny.train()(ids), evaluated)
    layer = LoRALinear(nn.Linear(8, 4), r=2, alpha=4, dropout=0.0)
    assert isinstance(layer.dropout, nn.Identity)


def test_unknown_targets_and_lm_head_are_refused_with_the_available_names(tiny):
    with pytest.raises(ValueError, match=r"unknown LoRA targets \['qkv_proj'\]; available: .*'q_proj'"):
        apply_lora(tiny, targets=["q_proj", "qkv_proj"])
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        apply_lora(tiny, targets="lm_head")
    assert not lora_layers(tiny)


def test_applying_lora_twice_is_refused(tiny):
    apply_lora(tiny)
    with pytest.raises(ValueError, match="already has LoRA on 4 linears; call remove_lora"):
        apply_lora(tiny)
