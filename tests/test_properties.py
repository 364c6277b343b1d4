"""Property-based: malformed tensors, switches, records and command-line values thrown at the public
boundaries. Whatever comes in, either the call works or effllm's own InputError (a ValueError naming the
argument) comes out: never an IndexError, a RuntimeError from deep inside torch, or a silent answer.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import effllm
from effllm.checks import InputError
from effllm.data import DataError, collate, tokenize
from effllm.loading import load_tokenizer
from effllm.report import profiles
from effllm.training import train

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
TINY = effllm.load_model("tiny")
TOKENIZER = load_tokenizer("tiny")
V = TINY.args.vocab_size

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 10),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(-2, 4), max_size=3),
)


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from([torch.long, torch.int32, torch.float32, torch.bool]))
    shape = draw(st.lists(st.integers(0, 3), min_size=0, max_size=3))
    values = draw(st.integers(-2, V + 2))
    return torch.full(shape, values).to(dtype)


@SETTINGS
@given(ids=st.one_of(tensors(), junk), mask=st.one_of(st.none(), tensors()), new=junk, temperature=junk)
def test_generate_works_or_says_what_was_wrong(ids, mask, new, temperature):
    try:
        out = effllm.generate(TINY, ids, mask, max_new_tokens=new, temperature=temperature)
    except InputError:
        return
    assert isinstance(out, torch.Tensor) and out.shape[1] == ids.shape[1] + new


@SETTINGS
@given(
    lr=junk,
    steps=junk,
    accum_steps=junk,
    max_grad_norm=junk,
    precision=st.sampled_from(["fp32", "bf16", "fp8", "float16", ""]),
)
def test_train_works_or_says_what_was_wrong(lr, steps, accum_steps, max_grad_norm, precision):
    batch = collate(tokenize([{"instruction": "add", "output": "2"}], TOKENIZER, max_len=512)[0], pad_id=0)
    model = effllm.load_model("tiny")
    kwargs = dict(lr=lr, steps=steps, accum_steps=accum_steps, max_grad_norm=max_grad_norm)
    try:
        result = train(model, [batch], precision=precision, progress=False, **kwargs)
    except InputError:
        return
    assert result.status in ("ok", "diverged", "unsupported")
    if result.status == "ok":
        assert math.isfinite(result.final_loss)


record_values = st.one_of(st.text(max_size=6), st.integers(), st.none(), st.lists(st.text(max_size=2)))


@SETTINGS
@given(
    records=st.lists(
        st.dictionaries(st.sampled_from(["instruction", "input", "output", "extra"]), record_values),
        max_size=3,
    ),
    max_len=junk,
)
def test_tokenize_works_or_names_the_record(records, max_len):
    try:
        items, _ = tokenize(records, TOKENIZER, max_len=max_len)
    except DataError as e:
        assert "example" in str(e) or "max_len" in str(e) or "eos" in str(e)
        return
    except InputError:
        return
    for item in items:
        assert len(item["input_ids"]) == len(item["labels"]) <= max_len


@SETTINGS
@given(items=st.lists(st.text(max_size=20), max_size=4))
def test_command_line_overrides_parse_or_say_why(items):
    declared = {"01_a": {"repeats": {"inferred_type_name": "int"}, "sizes": {"inferred_type_name": "list"}}}
    try:
        overrides = profiles.parse_overrides(items)
        profiles.check_overrides(overrides, declared)
    except ValueError as e:
        assert str(e).startswith(("--set", "bad --set"))


def test_properties_module_uses_effllm_errors_only():
    assert issubclass(InputError, ValueError) and issubclass(DataError, InputError)
    with pytest.raises(InputError):
        effllm.generate(TINY, torch.tensor([[V]]), max_new_tokens=1)


FIELDS = [
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "tie_word_embeddings",
    "head_dim",
    "rope_scaling",
]


@SETTINGS
@given(
    cfg=st.dictionaries(st.sampled_from(FIELDS), st.one_of(junk, st.dictionaries(st.text(max_size=8), junk)))
)
def test_a_config_loads_or_names_the_file_and_field(cfg):
    from effllm.checks import ConfigError
    from effllm.loading import args_from_hf_config

    try:
        args = args_from_hf_config(cfg, "config.json")
    except ConfigError as e:
        assert str(e).startswith("config.json")
        return
    assert args.n_heads % args.n_kv_heads == 0 and args.vocab_size > 0
