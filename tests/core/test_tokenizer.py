"""The in-memory byte-level tokenizer of the tiny preset."""

import pytest
from tokenizers import pre_tokenizers
from transformers import PreTrainedTokenizerFast

from effllm.loading.tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


def test_tokenizer_is_a_fast_hugging_face_tokenizer_of_259_tokens(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 259


def test_special_tokens_have_the_fixed_ids(tok):
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|pad|>"]) == [256, 257, 258]
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 257)
    assert tok.bos_token_id == 257
    assert (tok.pad_token, tok.pad_token_id) == ("<|pad|>", 258)


def test_byte_ids_are_the_utf8_bytes(tok):
    text = "Aé\x00 ~"
    assert tok.encode(text) == list(text.encode("utf-8"))


def test_byte_vocabulary_is_the_byte_level_alphabet(tok):
    byte_tokens = {t for t, i in tok.get_vocab().items() if i < 256}
    assert byte_tokens == set(pre_tokenizers.ByteLevel.alphabet())


@pytest.mark.parametrize(
    "text",
    ["Hello, world!", "  two leading spaces\n\ttab", "héllo wörld — 日本語 🦙", "\x00\x01\x7f\r\n", ""],
)
def test_decode_of_encode_gives_back_any_unicode_string(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_encode_adds_no_bos_or_eos(tok):
    assert tok("ab")["input_ids"] == [97, 98]


def test_special_tokens_in_text_encode_to_one_id_and_can_be_skipped(tok):
    ids = tok.encode("hi<|im_end|>")
    assert ids == [104, 105, 257]
    assert tok.decode(ids) == "hi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_chat_template_writes_chatml(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_generation_prompt_opens_an_assistant_turn(tok):
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(text)[:1] == [256]


def test_each_call_returns_an_independent_tokenizer():
    a, b = byte_tokenizer(), byte_tokenizer()
    a.padding_side = "left"
    a.chat_template = None
    assert a is not b
    assert b.padding_side == "right"
    assert b.chat_template is not None
