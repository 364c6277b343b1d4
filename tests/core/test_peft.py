"""Adapters in PEFT's file format: PEFT loads ours with our logits, we load PEFT's, bad files are refused."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from effllm.loading import to_transformers
from effllm.loading.peft import hf_path, load_adapter, save_adapter
from effllm.lora import apply_lora, lora_layers
from tests.core.test_lora import PEFT_CONFIG, randomise_B, tokens


def test_saved_adapter_has_peft_names_and_loads_in_peft_with_our_logits(tiny, tmp_path):
    base = copy.deepcopy(tiny)
    apply_lora(tiny, dropout=0.1, seed=0)
    randomise_B(tiny)
    save_adapter(tiny, tmp_path, base_model_name_or_path="tiny")
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys and len(keys) == 8
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (16, 32, 0.1)
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["base_model_name_or_path"] == "tiny"
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    pm = PeftModel.from_pretrained(to_transformers(base), tmp_path)
    ids = tokens(tiny)
    torch.testing.assert_close(pm(input_ids=ids).logits, tiny(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_an_adapter_saved_by_peft_loads_into_ours_with_equal_logits(tiny, tmp_path, targets):
    config = LoraConfig(task_type="CAUSAL_LM", **{**PEFT_CONFIG, "target_modules": targets})
    pm = get_peft_model(to_transformers(tiny), config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    pm.save_pretrained(tmp_path)
    load_adapter(tiny, tmp_path)
    assert len(lora_layers(tiny)) == (4 if isinstance(targets, list) else 14)
    ids = tokens(tiny)
    torch.testing.assert_close(tiny(ids), pm(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_targets_may_be_module_paths_and_are_saved_as_transformers_paths(tiny, tmp_path):
    fresh = copy.deepcopy(tiny)
    apply_lora(tiny, targets=["layers.1.attn.q_proj", "mlp.down_proj"], seed=0)
    randomise_B(tiny)
    assert sorted(lora_layers(tiny)) == [
        "layers.0.mlp.down_proj",
        "layers.1.attn.q_proj",
        "layers.1.mlp.down_proj",
    ]
    save_adapter(tiny, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(hf_path(n) for n in lora_layers(tiny))
    assert "model.layers.1.self_attn.q_proj" in cfg["target_modules"]  # PEFT's names, loaded back below
    ids = tokens(tiny)
    torch.testing.assert_close(load_adapter(fresh, tmp_path)(ids), tiny(ids), atol=1e-6, rtol=0)


def saved(model, path):
    """An adapter for a copy of model, saved in path."""
    save_adapter(apply_lora(copy.deepcopy(model), seed=0), path)
    return path


def test_an_adapter_missing_or_misshaping_a_tensor_is_refused_naming_it(tiny, tmp_path):
    weights = saved(tiny, tmp_path) / "adapter_model.safetensors"
    tensors = load_file(weights)
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != gone}, weights)
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors: .*missing {gone}"):
        load_adapter(tiny, tmp_path)
    save_file({**tensors, gone: torch.zeros(32, 8)}, weights)
    with pytest.raises(ValueError, match=rf"{gone} is \(32, 8\), not \(32, 16\)"):
        load_adapter(tiny, tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors: not found"):
        load_adapter(tiny, tmp_path)
    assert not lora_layers(tiny)  # nothing applied when loading fails


@pytest.mark.parametrize(
    "option, match",
    [
        ({"use_dora": True}, "unsupported LoRA options {'use_dora': True}"),
        ({"use_rslora": True}, "unsupported LoRA options {'use_rslora': True}"),
        ({"bias": "all"}, "unsupported LoRA options {'bias': 'all'}"),
        ({"modules_to_save": ["lm_head"]}, "unsupported LoRA options {'modules_to_save'"),
        ({"init_lora_weights": "pissa"}, "unsupported LoRA options {'init_lora_weights': 'pissa'}"),
        ({"target_modules": ["q_proj", "lm_head"]}, "unknown LoRA targets ['lm_head']"),
        ({"target_modules": ".*q_proj"}, "is a regex"),
        ({"peft_type": "IA3"}, "only LORA adapters load"),
    ],
)
def test_unsupported_config_options_are_refused_naming_the_file(tiny, tmp_path, option, match):
    config_file = saved(tiny, tmp_path) / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **option}))
    with pytest.raises(ValueError, match="adapter_config.json: ") as error:
        load_adapter(tiny, tmp_path)
    assert match in str(error.value)
    assert not lora_layers(tiny)
