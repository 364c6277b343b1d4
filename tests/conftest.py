import warnings

import pytest
import torch

import effllm
from effllm.data import load_examples, tokenize
from effllm.loading import init_weights
from effllm.model import PRESETS, Llama, with_overrides

LLAMA32_FEATURES = dict(  # Llama 3.2's features (GQA, llama3 rope scaling, tied embeddings), small
    vocab_size=300,
    dim=64,
    n_layers=3,
    n_heads=8,
    n_kv_heads=2,
    hidden_dim=160,
    head_dim=8,
    rope_theta=500000.0,
    tie_embeddings=True,
    max_seq_len=256,
    norm_eps=1e-5,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
)


@pytest.fixture
def tiny() -> Llama:
    return effllm.load_model("tiny", device="cpu")


@pytest.fixture
def llama32_like() -> Llama:
    torch.manual_seed(0)
    return init_weights(Llama(with_overrides(PRESETS["tiny"], **LLAMA32_FEATURES)), seed=1).eval()


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (real weights) and its tokenizer, loaded once."""
    return effllm.load("smollm2-135m-instruct", device="cpu")


@pytest.fixture(scope="session")
def pad_id() -> int:
    return effllm.load_tokenizer("tiny").pad_token_id


@pytest.fixture(scope="session")
def items() -> list[dict]:
    """The four shortest real Alpaca examples (178..192 byte tokens), with 6, 8, 22 and 14 targets."""
    tok = effllm.load_tokenizer("tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few long prompts are dropped at max_len=512
        all_items, _ = tokenize(load_examples("data/alpaca_subset.json"), tok, max_len=512)
    return sorted(all_items, key=lambda item: len(item["input_ids"]))[:4]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One smoke run of every notebook (about 3 minutes), shared by the report tests: (exit code, run dir)."""
    from effllm.report import runner

    out = tmp_path_factory.mktemp("reports")
    code = runner.run_report(profile="smoke", run="smoke", out=out)
    return code, out / "smoke"


def ragged_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded with token 0: (input_ids, attention_mask)."""
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=gen)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, T - n :] = 1
    return ids.masked_fill(mask == 0, 0), mask
