"""effllm: running and fine-tuning Llama-family models efficiently on limited hardware.

The public API is imported lazily, so that `effllm report` starts without loading torch.
"""

import importlib

_API = {
    "Llama": "effllm.model",
    "ModelArgs": "effllm.model",
    "kv_cache_bytes": "effllm.model",
    "param_bytes": "effllm.model",
    "generate": "effllm.decoding",
    "load": "effllm.loading",
    "load_model": "effllm.loading",
    "load_tokenizer": "effllm.loading",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'effllm' has no attribute {name!r}")
