import json

import pytest
import torch
from torch.testing import assert_close

import effllm
from effllm.loading import (
    EMBEDDED_SHA256,
    embedded_path,
    hf_config,
    hf_to_ours,
    ours_to_hf,
    sha256,
    to_transformers,
)


@pytest.fixture
def hf_dir(tmp_path, llama32_like):
    """A random-weight Llama 3.2-style model saved by transformers as sharded safetensors."""
    to_transformers(llama32_like).save_pretrained(tmp_path, max_shard_size="100KB")
    return tmp_path


def test_sharded_hf_directory_loads_and_matches_transformers(hf_dir, llama32_like):
    assert (hf_dir / "model.safetensors.index.json").is_file()
    assert len(list(hf_dir.glob("*.safetensors"))) > 1
    model = effllm.load_model(hf_dir, device="cpu")
    ids = torch.randint(0, model.args.vocab_size, (2, 40))
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=0)
        assert_close(model(ids), llama32_like(ids), atol=1e-6, rtol=0)
    assert model.args.rope_scaling["rope_type"] == "llama3"
    assert model.lm_head.weight is model.embed.weight


def test_names_round_trip_between_transformers_and_ours(tiny):
    for name in tiny.state_dict():
        assert hf_to_ours(ours_to_hf(name)) == name
    assert ours_to_hf("layers.3.attn_norm.weight") == "model.layers.3.input_layernorm.weight"
    assert ours_to_hf("norm.weight") == "model.norm.weight"


def test_dtype_and_device_are_applied():
    model = effllm.load_model("tiny", device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def test_hf_directory_without_tokenizer_loads_with_load_model_only(hf_dir):
    effllm.load_model(hf_dir, device="cpu")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        effllm.load(hf_dir, device="cpu")


def test_missing_path_is_named():
    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        effllm.load_model("./no/such/dir")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(FileNotFoundError, match="tiny"):
        effllm.load_model("huge-preset")


def test_hub_id_offline_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pass the downloaded directory"):
        effllm.load_model("meta-llama/Llama-3.2-1B")


def test_config_that_is_not_llama_is_refused(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="not 'llama'"):
        effllm.load_model(hf_dir)


def test_truncated_weights_file_is_named(hf_dir):
    shard = sorted(hf_dir.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{shard.name}: corrupt or truncated"):
        effllm.load_model(hf_dir)


def test_missing_and_misshaped_tensors_are_named(tmp_path, tiny):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps(hf_config(tiny.args)))
    state = {ours_to_hf(k): v.clone() for k, v in tiny.state_dict().items() if k != "lm_head.weight"}
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj.*q_proj\.weight: \(3, 3\)"):
        effllm.load_model(tmp_path)


def test_pickled_weights_are_not_loaded(tmp_path, tiny):
    (tmp_path / "config.json").write_text(json.dumps(hf_config(tiny.args)))
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled .bin files are not loaded"):
        effllm.load_model(tmp_path)


def test_corrupt_gguf_is_named(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(embedded_path().read_bytes()[:5000])
    with pytest.raises(ValueError, match="broken.gguf: corrupt or truncated"):
        effllm.load_model(bad)


@pytest.mark.slow
def test_embedded_file_is_the_recorded_one():
    assert sha256(embedded_path()) == EMBEDDED_SHA256


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf_loader(smollm2):
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    path = embedded_path()
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = tok(["The capital of France is Paris, and the capital of Italy is"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=0)
    assert (model.args.n_heads, model.args.n_kv_heads, model.args.n_layers) == (9, 3, 30)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
