"""Bad sources and bad files are refused at load time, each error naming the file, the field and its value."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import effllm
from effllm.checks import ConfigError, InputError
from effllm.loading import (
    EMBEDDED,
    LOADABLE,
    describe_source,
    hf_config,
    load,
    load_model,
    load_tokenizer,
    ours_to_hf,
    resolve,
)
from effllm.loading.gguf import GGUF_NAMES, REQUIRED_KEYS
from effllm.loading.peft import load_adapter, save_adapter
from effllm.lora import apply_lora, lora_layers
from effllm.model import PRESETS

ARCHITECTURE_ONLY = sorted(set(PRESETS) - set(LOADABLE))


def write_hf(path, model, **config):
    """model as a Hugging Face directory (config.json with `config` merged in, one safetensors file)."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in {**hf_config(model.args), **config}.items() if v is not ...}  # ...: drop
    (path / "config.json").write_text(json.dumps(cfg))
    state = {ours_to_hf(k): v.clone() for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        state.pop("lm_head.weight")
    save_file(state, path / "model.safetensors")
    return path


@pytest.fixture
def hf_dir(tmp_path, tiny):
    return write_hf(tmp_path / "model", tiny)


# --- 1. architecture presets are not model sources ----------------------------------------------------


def test_only_tiny_and_the_embedded_model_load_by_name():
    assert set(LOADABLE) == {"tiny", EMBEDDED}
    assert {"smollm2-135m", "llama-3.2-1b"} <= set(ARCHITECTURE_ONLY)  # the shapes stay, for memory budgets
    assert PRESETS["llama-3.2-1b"].n_layers == 16


@pytest.mark.parametrize("name", ARCHITECTURE_ONLY)
@pytest.mark.parametrize("entry", [load_model, load, load_tokenizer, resolve, describe_source])
def test_an_architecture_preset_is_refused_saying_how_to_get_weights(name, entry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file of that name
    with pytest.raises(InputError) as error:
        entry(name)
    message = str(error.value)
    assert not isinstance(error.value, FileNotFoundError)
    assert f"{name!r} is an architecture preset" in message and "no weights" in message
    assert "Hugging Face directory" in message and ".gguf" in message and "hf download " in message
    assert "'tiny'" in message and repr(EMBEDDED) in message


def test_the_preset_message_names_the_presets_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="hf download meta-llama/Llama-3.2-1B"):
        load_model("llama-3.2-1b")
    with pytest.raises(InputError, match="hf download HuggingFaceTB/SmolLM2-135M"):
        load_model("smollm2-135m")


def test_a_directory_named_like_a_preset_loads_as_a_directory(tmp_path, monkeypatch, tiny):
    write_hf(tmp_path / "llama-3.2-1b", tiny)
    monkeypatch.chdir(tmp_path)
    assert resolve("llama-3.2-1b")[0] == "hf"
    assert load_model("llama-3.2-1b", device="cpu").args.dim == tiny.args.dim


def test_an_unknown_name_advertises_only_the_loadable_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        load_model("huge-preset")
    message = str(error.value)
    assert "huge-preset" in message and "'tiny'" in message and repr(EMBEDDED) in message
    assert not [name for name in ARCHITECTURE_ONLY if repr(name) in message]


def test_tiny_still_loads_and_is_described_as_random():
    assert describe_source("tiny")["kind"] == "preset"
    assert load_model("tiny", device="cpu").args == PRESETS["tiny"]
    assert load_tokenizer("tiny").pad_token_id == 258


def test_max_seq_len_does_not_change_the_shared_preset():
    before = copy.deepcopy(PRESETS["tiny"])
    assert load_model("tiny", device="cpu", max_seq_len=64).args.max_seq_len == 64
    assert PRESETS["tiny"] == before
    with pytest.raises(InputError, match="max_seq_len must be at least 1, got 0"):
        load_model("tiny", max_seq_len=0)


# --- 2. invalid JSON ------------------------------------------------------------------------------------


def _adapter_dir(tiny, path):
    save_adapter(apply_lora(copy.deepcopy(tiny), seed=0), path)
    return path


def _index(hf_dir):
    weight_map = {k: "model.safetensors" for k in load_file(hf_dir / "model.safetensors")}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return hf_dir


@pytest.mark.parametrize(
    "file",
    ["config.json", "model.safetensors.index.json", "adapter_config.json"],
)
@pytest.mark.parametrize("text, why", [('{"model_type": "llama",', "not valid JSON"), ("[1, 2]", "a list")])
def test_malformed_json_is_a_config_error_naming_the_file_and_position(
    hf_dir, tiny, tmp_path, file, text, why
):
    if file == "adapter_config.json":
        folder = _adapter_dir(tiny, tmp_path / "adapter")
        do = lambda: load_adapter(copy.deepcopy(tiny), folder)
    else:
        folder = _index(hf_dir)
        do = lambda: load_model(folder, device="cpu")
    (folder / file).write_text(text)
    with pytest.raises(ConfigError) as error:
        do()
    message = str(error.value)
    assert str(folder / file) in message and why in message
    if why == "not valid JSON":
        assert "at line 1, column " in message


def test_an_index_without_a_weight_map_is_named(hf_dir):
    (_index(hf_dir) / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["x"]}))
    with pytest.raises(ConfigError, match=r"model.safetensors.index.json: weight_map must be"):
        load_model(hf_dir)


# --- 3. config.json fields ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, named",
    [
        ({"num_key_value_heads": 0}, "num_key_value_heads must be at least 1, got 0"),
        ({"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
        ({"num_attention_heads": 0}, "num_attention_heads must be at least 1, got 0"),
        ({"hidden_size": 62, "head_dim": ...}, "hidden_size=62 is not divisible by num_attention_heads=4"),
        ({"head_dim": 15}, "head_dim=15 is odd"),
        ({"hidden_size": "64"}, "hidden_size must be an integer, got '64'"),
        ({"num_hidden_layers": 2.0}, "num_hidden_layers must be an integer, got 2.0"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps must be above 0, got -1.0"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false, got 'yes'"),
        ({"vocab_size": ...}, "missing the required field 'vocab_size'"),
        ({"num_attention_heads": ...}, "missing the required field 'num_attention_heads'"),
        ({"intermediate_size": None}, "missing the required field 'intermediate_size'"),
        ({"model_type": "gpt2"}, "model_type is 'gpt2', not 'llama'"),
    ],
)
def test_a_bad_config_field_is_a_config_error_naming_it_and_its_value(tmp_path, tiny, change, named):
    folder = write_hf(tmp_path, tiny, **change)
    with pytest.raises(ConfigError) as error:
        load_model(folder)
    assert f"{folder / 'config.json'}: " in str(error.value)
    assert named in str(error.value)


# --- 4. GGUF metadata -----------------------------------------------------------------------------------


def write_gguf(path, model, *, arch="llama", drop=(), **override):
    """model as a llama.cpp GGUF file (fp32 tensors, q and k interleaved as llama.cpp does)."""
    import gguf

    args = model.args
    meta = {
        "llama.block_count": args.n_layers,
        "llama.context_length": args.max_seq_len,
        "llama.embedding_length": args.dim,
        "llama.feed_forward_length": args.hidden_dim,
        "llama.attention.head_count": args.n_heads,
        "llama.attention.head_count_kv": args.n_kv_heads,
        "llama.attention.layer_norm_rms_epsilon": args.norm_eps,
        "llama.rope.freq_base": args.rope_theta,
        "llama.rope.dimension_count": args.head_dim,
        **override,
    }
    writer = gguf.GGUFWriter(path, arch)  # writes general.architecture
    for key, value in meta.items():
        if key in drop:
            continue
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    if "tokenizer.ggml.tokens" not in drop:
        writer.add_token_list([f"<{i}>" for i in range(args.vocab_size)])
    to_gguf = {ours: theirs for theirs, ours in GGUF_NAMES.items()}
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and args.tie_embeddings:
            continue
        parts = name.split(".")
        if parts[0] == "layers":  # layers.0.attn.q_proj.weight -> blk.0.attn_q.weight
            kind = to_gguf[".".join(parts[2:-1])]
            heads = {"attn_q": args.n_heads, "attn_k": args.n_kv_heads}.get(kind)
            if heads:
                w = w.reshape(heads, 2, args.head_dim // 2, -1).transpose(1, 2).reshape(w.shape)
            gguf_name = f"blk.{parts[1]}.{kind}.{parts[-1]}"
        else:
            gguf_name = f"{to_gguf[parts[0]]}.{parts[1]}"
        writer.add_tensor(gguf_name, w.detach().float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_written_gguf_loads_with_the_same_logits(tmp_path, tiny):
    model = load_model(write_gguf(tmp_path / "tiny.gguf", tiny), device="cpu")
    ids = torch.tensor([[1, 2, 3, 200, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), tiny(ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("key", [*REQUIRED_KEYS, "tokenizer.ggml.tokens"])
def test_a_gguf_missing_a_required_key_is_named(tmp_path, tiny, key):
    path = write_gguf(tmp_path / "partial.gguf", tiny, drop={key})
    with pytest.raises(ConfigError) as error:
        load_model(path)
    assert f"{path}: GGUF metadata is missing the required key {key!r}" in str(error.value)


@pytest.mark.parametrize(
    "override, named",
    [
        ({"llama.attention.head_count_kv": 0}, "llama.attention.head_count_kv must be at least 1, got 0"),
        (
            {"llama.attention.head_count_kv": 3},
            "head_count=4 is not a multiple of llama.attention.head_count_kv=3",
        ),
        ({"llama.attention.head_count": 0}, "llama.attention.head_count must be at least 1, got 0"),
        ({"llama.rope.scaling.type": "linear"}, "llama.rope.scaling.type 'linear' is not supported"),
        ({"arch": "qwen2"}, "architecture is 'qwen2', not 'llama'"),
    ],
)
def test_a_bad_gguf_key_is_named_with_its_value(tmp_path, tiny, override, named):
    path = write_gguf(tmp_path / "bad.gguf", tiny, **override)
    with pytest.raises(ConfigError) as error:
        load_model(path)
    assert f"{path}: " in str(error.value) and named in str(error.value)


# --- 5. rope scaling ------------------------------------------------------------------------------------

LLAMA3 = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize(
    "rope, named",
    [
        (
            {"rope_type": "linear", "factor": 2.0},
            "rope_type 'linear' is not supported; supported: 'default', 'llama3'",
        ),
        ({"type": "dynamic", "factor": 2.0}, "rope_type 'dynamic' is not supported"),
        ({"rope_type": "yarn", "factor": 4.0}, "rope_type 'yarn' is not supported"),
        (
            {"rope_type": "llama3", "factor": 8.0},
            "of rope_type 'llama3' is missing the field 'low_freq_factor'",
        ),
        ({"rope_type": "llama3", **LLAMA3, "factor": 0}, ".factor must be above 0, got 0"),
        ({"rope_type": "llama3", **LLAMA3, "high_freq_factor": 1.0}, "high_freq_factor (1.0) must exceed"),
    ],
)
def test_an_unsupported_rope_scaling_is_refused_at_load(tmp_path, tiny, key, rope, named):
    folder = write_hf(tmp_path, tiny, **{"rope_scaling": ..., key: rope})
    with pytest.raises(ConfigError) as error:
        load_model(folder)
    assert f"{folder / 'config.json'}: {key}" in str(error.value) and named in str(error.value)


def test_llama3_rope_scaling_still_loads(tmp_path, tiny):
    folder = write_hf(tmp_path, tiny, rope_scaling={"rope_type": "llama3", **LLAMA3})
    assert load_model(folder, device="cpu").args.rope_scaling == {"rope_type": "llama3", **LLAMA3}


# --- 6. adapter config fields, non-finite weights ------------------------------------------------------


@pytest.mark.parametrize(
    "change, named",
    [
        ({"r": ...}, "missing the required field 'r'"),
        ({"lora_alpha": ...}, "missing the required field 'lora_alpha'"),
        ({"target_modules": ...}, "missing the required field 'target_modules'"),
        ({"r": None}, "missing the required field 'r'"),
        ({"target_modules": None}, "missing the required field 'target_modules'"),
        ({"r": 0}, "r must be at least 1, got 0"),
        ({"r": "8"}, "r must be an integer, got '8'"),
        ({"lora_alpha": "big"}, "lora_alpha must be a number, got 'big'"),
        ({"lora_dropout": 1.5}, "lora_dropout must be below 1, got 1.5"),
        ({"target_modules": [3]}, "target_modules must be a list of module names or a string, got [3]"),
    ],
)
def test_a_bad_adapter_config_field_is_named(tmp_path, tiny, change, named):
    folder = _adapter_dir(tiny, tmp_path)
    cfg = {**json.loads((folder / "adapter_config.json").read_text()), **change}
    cfg = {k: v for k, v in cfg.items() if v is not ...}  # ...: the field is absent
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as error:
        load_adapter(tiny, folder)
    assert f"{folder / 'adapter_config.json'}: " in str(error.value) and named in str(error.value)
    assert not lora_layers(tiny)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_adapter_weights_are_refused_naming_the_tensor(tmp_path, tiny, bad):
    weights = _adapter_dir(tiny, tmp_path) / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    tensors[name][0, 0] = bad
    save_file(tensors, weights)
    with pytest.raises(ConfigError) as error:
        load_adapter(tiny, tmp_path)
    assert f"{weights}: tensor {name!r} holds NaN or inf" in str(error.value)
    assert not lora_layers(tiny)


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_model_weights_are_refused_naming_file_and_tensor(hf_dir, tmp_path, tiny, bad):
    weights = hf_dir / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name][3, 1] = bad
    save_file(tensors, weights)
    with pytest.raises(ConfigError, match="holds NaN or inf") as error:
        load_model(hf_dir)
    assert f"{weights}: tensor {name!r}" in str(error.value)
    broken = copy.deepcopy(tiny)
    with torch.no_grad():
        broken.norm.weight[0] = bad
    path = write_gguf(tmp_path / "broken.gguf", broken)
    with pytest.raises(ConfigError) as error:
        load_model(path)
    assert f"{path}: tensor 'output_norm.weight' holds NaN or inf" in str(error.value)


# --- 7. dtype names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("torch.float16", torch.float16),
        (torch.float16, torch.float16),
    ],
)
def test_dtype_may_be_a_name(name, dtype):
    assert {p.dtype for p in load_model("tiny", device="cpu", dtype=name).parameters()} == {dtype}
    assert next(load("tiny", device="cpu", dtype=name)[0].parameters()).dtype == dtype


@pytest.mark.parametrize("bad", ["half", "float64x", "int8", torch.int8, 16, None])
def test_an_unknown_dtype_lists_the_accepted_ones(bad):
    with pytest.raises(InputError) as error:
        load_model("tiny", dtype=bad)
    message = str(error.value)
    assert repr(bad) in message
    assert all(name in message for name in ("fp32", "bf16", "fp16", "float32", "bfloat16", "float16"))


# --- 8. the offline hub hint ---------------------------------------------------------------------------


def test_the_offline_hub_hint_names_the_installed_cli(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        effllm.load_model("meta-llama/Llama-3.2-1B")
    assert "`hf download meta-llama/Llama-3.2-1B`" in str(error.value)
    assert "huggingface-cli" not in str(error.value)
