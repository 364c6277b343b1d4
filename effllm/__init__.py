"""effllm: running and fine-tuning Llama-family models efficiently on limited hardware."""

from effllm.decoding import generate
from effllm.load import load, load_model, load_tokenizer
from effllm.model import Llama, ModelArgs, kv_cache_bytes, param_bytes

__all__ = [
    "Llama",
    "ModelArgs",
    "generate",
    "kv_cache_bytes",
    "load",
    "load_model",
    "load_tokenizer",
    "param_bytes",
]
