"""A byte-level Hugging Face tokenizer built in memory, for the random-weight "tiny" preset.

Ids 0..255 are the bytes 0..255 (through GPT-2's printable byte alphabet, so any unicode string round
trips), then the ChatML specials `<|im_start|>` = 256, `<|im_end|>` = 257 (EOS and BOS) and
`<|pad|>` = 258. The chat template follows SmolLM2-Instruct's ChatML, without its default system prompt.
"""

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode: the printable character that stands for each byte 0..255, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}  # '!'..'~', '¡'..'¬', '®'..'ÿ'
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:  # unprintable bytes are moved past 255, in order
            chars.append(chr(256 + extra))
            extra += 1
    return chars


@lru_cache(maxsize=1)
def _byte_tokenizer_json() -> str:
    """The serialised `tokenizers` pipeline; cached as a string so each caller gets a fresh object."""
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([IM_START, IM_END, PAD])  # ids 256, 257, 258
    return tok.to_str()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A new 259-token byte-level tokenizer with ChatML specials and chat template (no files, no network)."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_byte_tokenizer_json()),
        bos_token=IM_END,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
