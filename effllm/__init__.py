"""effllm: running and fine-tuning Llama-family models efficiently on limited hardware.

Three layers, each importing only the ones below it: the core (this package's top-level modules and
`loading`: the model, decoding, LoRA, precision, the training step and loop, data, the memory ledger),
`effllm.bench` (measurements) and `effllm.report` (the notebooks' report). The public API below is
imported lazily, so that `effllm report` starts without loading torch.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time `__getattr__` imports on first use
    from effllm.decoding import generate, stream
    from effllm.loading import load, load_model, load_tokenizer
    from effllm.model import Llama, ModelArgs, kv_cache_bytes, param_bytes
    from effllm.quantization import quantize
    from effllm.training import train

_API = {
    "Llama": "effllm.model",
    "ModelArgs": "effllm.model",
    "kv_cache_bytes": "effllm.model",
    "param_bytes": "effllm.model",
    "generate": "effllm.decoding",
    "stream": "effllm.decoding",
    "load": "effllm.loading",
    "load_model": "effllm.loading",
    "load_tokenizer": "effllm.loading",
    "train": "effllm.training",
    "quantize": "effllm.quantization",
}
__all__ = [
    "Llama",
    "ModelArgs",
    "generate",
    "kv_cache_bytes",
    "load",
    "load_model",
    "load_tokenizer",
    "param_bytes",
    "quantize",
    "stream",
    "train",
]  # the names of _API, spelled out so that tools read them


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'effllm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
