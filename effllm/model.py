"""A Llama decoder as Llama 3.2 uses it, in plain PyTorch.

RMSNorm, rotary position embedding (with Llama 3.x frequency scaling), grouped-query attention and a
SwiGLU MLP; one module serves training (no cache) and decoding (a pre-allocated KV cache written at
`input_pos`). Follows gpt-fast's `model.py` and Meta's reference; numerics match transformers' Llama.
"""

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effllm import checks


@dataclass
class ModelArgs:
    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    hidden_dim: int = 1536  # SwiGLU inner size
    head_dim: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    extra: dict = field(default_factory=dict)  # token ids and names carried along, not used by the math

    def __post_init__(self):
        sizes = (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "hidden_dim",
            "head_dim",
            "max_seq_len",
        )
        for name in sizes:
            checks.integer(f"ModelArgs.{name}", getattr(self, name), minimum=1)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")


LLAMA_3_2_ROPE = {  # Llama 3.2's RoPE scaling (Llama 3.1 8B's differs only in its factor, 8)
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
PRESETS = {
    "tiny": ModelArgs(
        vocab_size=259,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=128,
        head_dim=16,
        rope_theta=10000.0,
        max_seq_len=512,
    ),
    "smollm2-135m": ModelArgs(rope_theta=100000.0, max_seq_len=8192),
    "llama-3.2-1b": ModelArgs(
        vocab_size=128256,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        hidden_dim=8192,
        head_dim=64,
        rope_theta=500000.0,
        max_seq_len=131072,
        rope_scaling=LLAMA_3_2_ROPE,
    ),
    "llama-3.2-3b": ModelArgs(  # shapes only (memory predictions): 3.21 B parameters
        vocab_size=128256,
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        hidden_dim=8192,
        head_dim=128,
        rope_theta=500000.0,
        max_seq_len=131072,
        rope_scaling=LLAMA_3_2_ROPE,
    ),
    "llama-3.1-8b": ModelArgs(  # shapes only (memory predictions): 8.03 B parameters, untied head
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        hidden_dim=14336,
        head_dim=128,
        rope_theta=500000.0,
        max_seq_len=131072,
        tie_embeddings=False,
        rope_scaling={**LLAMA_3_2_ROPE, "factor": 8.0},
    ),
}


def rope_frequencies(args: ModelArgs) -> Tensor:
    """Inverse frequencies (head_dim/2,), with Llama 3.x scaling of the low frequencies when configured."""
    inv_freq = 1.0 / (
        args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim)
    )
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"rope_type {kind!r} is not supported (only 'default' and 'llama3')")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)  # long wavelengths: scaled
    medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(medium, smoothed, out)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: (B, H, T, hd); cos, sin: (B, 1, T, hd)
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype  # normalise in fp32, as transformers does, then cast back
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class KVCache(nn.Module):
    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, end: int) -> tuple[Tensor, Tensor]:
        # input_pos: (T,); k, v: (B, n_kv, T, hd). Returns slots [0, end), end = last written slot + 1.
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None
        self.use_sdpa = True  # False: the plain-math path, for profiling and as a reference

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            end = T if mask is None else mask.shape[-1]  # known from the mask: no device sync per layer
            k, v = self.kv_cache.update(input_pos, k, v, end)  # (B, n_kv, S, hd), S = slots written so far
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_heads != self.n_kv_heads
            )
        else:
            y = math_attention(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y)


def math_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v with explicit GQA expansion; mask is boolean, True = attend."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is None:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._inv_freq: Tensor | None = None  # fp32 whatever the model's dtype; not a buffer: .to() keeps it
        self.checkpoint_every = 0  # n > 0: recompute every n-th block's activations in backward
        self.static_cache = False  # True: attend over the whole cache (fixed shapes, for torch.compile)

    def setup_cache(self, batch_size: int, max_len: int, *, static: bool = False) -> None:
        """Pre-allocate a KV cache of (batch_size, max_len) in the model's dtype and device.

        static: every step attends over all max_len slots, the unwritten ones masked, so that a decode
        step has the same shapes every time (what torch.compile needs); the default attends over the
        slots written so far."""
        if max_len > self.args.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the model's context of {self.args.max_seq_len}")
        self.static_cache = static
        w = self.embed.weight
        if static:  # the same cache objects for the same shape: a compiled step keeps its graph
            key = (batch_size, max_len, w.dtype, w.device)
            pool = self.__dict__.setdefault("_static_caches", {})
            if key not in pool:
                pool.clear()  # one static cache at a time
                pool[key] = [
                    KVCache(batch_size, max_len, self.args.n_kv_heads, self.args.head_dim, w.dtype, w.device)
                    for _ in self.layers
                ]
            for layer, cache in zip(self.layers, pool[key], strict=True):
                cache.k.zero_()
                cache.v.zero_()
                layer.attn.kv_cache = cache
            return
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(
                batch_size, max_len, self.args.n_kv_heads, self.args.head_dim, w.dtype, w.device
            )

    def clear_cache(self) -> None:
        """Drop the KV cache; forward then runs without one (training, uncached decoding)."""
        self.static_cache = False
        for layer in self.layers:
            layer.attn.kv_cache = None

    @property
    def has_cache(self) -> bool:
        return self.layers[0].attn.kv_cache is not None

    def forward(
        self,
        input_ids: Tensor,
        *,
        position_ids: Tensor | None = None,
        input_pos: Tensor | None = None,
        key_mask: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits (B, T, vocab) for input_ids (B, T); (B, 1, vocab) of the last position if last_only.

        position_ids (B, T): rotary positions (default 0..T-1); with left padding they start at each
        sequence's first real token. input_pos (T,): the cache slots written (cache mode only).
        key_mask (B, S) bool: which key slots are real tokens (S = T without cache, the cache length with it).
        """
        B, T = input_ids.shape
        if self.has_cache and input_pos is None:
            raise ValueError("the model has a KV cache: pass input_pos (the slots to write)")
        device = input_ids.device
        if position_ids is None:
            start = 0 if input_pos is None else input_pos[0]
            position_ids = (start + torch.arange(T, device=device)).expand(B, T)
        x = self.embed(input_ids)  # (B, T, dim)
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = rope_frequencies(self.args).to(device)
        angles = position_ids[:, None, :, None].float() * self._inv_freq  # (B, 1, T, hd/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, 1, T, hd)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        mask = self._attention_mask(T, input_pos, key_mask, device)
        for i, layer in enumerate(self.layers):
            if self.checkpoint_every and self.training and i % self.checkpoint_every == 0:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, cos, sin, mask, input_pos, use_reentrant=False
                )
            else:
                x = layer(x, cos, sin, mask, input_pos)
        if last_only:  # decoding needs one position: skip a (B, T, vocab) projection
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    def _attention_mask(
        self, T: int, input_pos: Tensor | None, key_mask: Tensor | None, device
    ) -> Tensor | None:
        """Boolean (B or 1, 1, T, S) mask, True = attend; None means plain causal over S = T keys."""
        if input_pos is None:
            if key_mask is None:
                return None  # training: the fast is_causal path of SDPA
            q_slots, S = torch.arange(T, device=device), T
        elif self.static_cache:  # every key slot of the cache, unwritten ones masked: fixed shapes
            q_slots, S = input_pos, self.layers[0].attn.kv_cache.k.shape[2]
        else:
            q_slots, S = input_pos, int(input_pos[-1]) + 1  # one host sync per forward, not per layer
            if key_mask is None and S == T:
                return None  # prefill from slot 0
        k_slots = torch.arange(S, device=device)
        mask = k_slots[None, :] <= q_slots[:, None]  # (T, S) causal
        if key_mask is not None:
            # Padding keys are hidden; a padding query still sees itself so its row is never all -inf.
            real = key_mask[:, None, None, :S].bool() | (k_slots[None, :] == q_slots[:, None])
            mask = mask & real  # (B, 1, T, S)
        return mask


@contextlib.contextmanager
def training_mode(model: nn.Module, *, checkpointing: int = 0) -> Iterator[nn.Module]:
    """Train mode with every `checkpointing`-th block recomputed in backward (0: none); restored after."""
    restore = model.training, getattr(model, "checkpoint_every", 0)
    model.train()
    model.checkpoint_every = checkpointing
    try:
        yield model
    finally:
        model.train(restore[0])
        model.checkpoint_every = restore[1]


class FrozenLinear(nn.Module):
    """A frozen stand-in for a bias-free nn.Linear whose weight lives in buffers (a quantized layer):
    LoRA can wrap it, and its buffers are weights to `param_bytes`. Subclasses set these three."""

    storage = "quantized"  # the weight format's name (nf4, int8, int4), as the memory ledger lists it
    name: str  # the layer's qualified name, for error messages
    in_features: int
    out_features: int


def quantized_base(model: nn.Module) -> str | None:
    """The storage format of the model's frozen quantized linears (nf4, int8, int4), or None."""
    return next((m.storage for m in model.modules() if isinstance(m, FrozenLinear)), None)


BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, parent module, attribute) of every plain linear of the blocks, in order."""
    return [
        (f"{name}.{child}", module, child)
        for name, module in model.named_modules()
        for child in BLOCK_LINEARS
        if isinstance(getattr(module, child, None), nn.Linear) and name.startswith("layers.")
    ]


def param_bytes(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Bytes held by the model's weights: its parameters (tied weights counted once) and, unless
    trainable_only, the buffers of its frozen quantized linears."""
    params = (p for p in model.parameters() if p.requires_grad or not trainable_only)  # tied: listed once
    frozen = [] if trainable_only else [m for m in model.modules() if isinstance(m, FrozenLinear)]
    buffers = (b for m in frozen for b in m.buffers())
    return sum(t.numel() * t.element_size() for t in (*params, *buffers))


def weight_read_bytes(model: Llama) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer (a quantized layer's codes and
    scales) but the KV cache, and the embedding table only when it is also the head (a lookup reads a row)."""
    skip = {
        id(t)
        for layer in model.layers
        if layer.attn.kv_cache is not None
        for t in layer.attn.kv_cache.buffers()
    }
    if getattr(model.lm_head, "weight", None) is not model.embed.weight:
        skip.add(id(model.embed.weight))
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in skip}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def kv_cache_bytes(args: ModelArgs, batch_size: int, length: int, dtype: torch.dtype = torch.float32) -> int:
    """KV cache bytes for (batch, length): 2 (K, V) x layers x batch x length x kv heads x head_dim."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * args.n_layers * batch_size * length * args.n_kv_heads * args.head_dim * itemsize


def with_overrides(args: ModelArgs, **kwargs) -> ModelArgs:
    """A copy of args with some fields replaced."""
    return replace(args, **kwargs)
