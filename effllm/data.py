"""Alpaca instruction data for supervised fine-tuning: load, format, tokenise with prompt masking, batch.

Records follow Stanford Alpaca (Taori et al., 2023, https://github.com/tatsu-lab/stanford_alpaca):
`instruction`, `input` (may be empty), `output`. Prompts use Alpaca's own templates or the tokenizer's
chat template; the loss covers the response and its EOS only (prompt labels are -100, unshifted).
"""

import json
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from effllm import checks
from effllm.checks import InputError

IGNORE_INDEX = -100  # label of a position that is not a target (prompt, padding)
FIELDS = ("instruction", "input", "output")
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class DataError(InputError):
    """A malformed data file; the message names the file, record and field."""


def _check_record(obj: object, where: str) -> dict[str, str]:
    """Validate one Alpaca record; keep only its three fields (a missing `input` becomes "")."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with {', '.join(FIELDS)}, got {type(obj).__name__}")
    obj = {"input": "", **obj}
    for field in FIELDS:
        if field not in obj:
            raise DataError(f"{where}: field '{field}' is missing")
        if not isinstance(obj[field], str):
            raise DataError(f"{where}: field '{field}' must be a string, got {type(obj[field]).__name__}")
        if field != "input" and not obj[field].strip():
            raise DataError(f"{where}: field '{field}' is empty")
    return {field: obj[field] for field in FIELDS}


def _parse_jsonl(text: str, path: Path) -> list[dict[str, str]]:
    """One record per non-blank line."""
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: record {len(records)} (line {lineno})"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON at column {e.colno}: {e.msg}") from e
        records.append(_check_record(obj, where))
    return records


def load_examples(path: str | Path) -> list[dict[str, str]]:
    """Read Alpaca records from a JSON list or JSONL file (`.jsonl`, or several objects one per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from e
    if path.suffix == ".jsonl":
        records = _parse_jsonl(text, path)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSONL under another extension
                data = None
            else:
                raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
        if data is None:
            records = _parse_jsonl(text, path)
        elif not isinstance(data, list):
            raise DataError(f"{path}: top level must be a list of records, got {type(data).__name__}")
        else:
            records = [_check_record(obj, f"{path}: record {i}") for i, obj in enumerate(data)]
    if not records:
        raise DataError(f"{path}: no records")
    return records


def format_prompt(example: dict[str, str], *, template: str = "alpaca", tokenizer=None) -> str:
    """The prompt text that precedes the response: Alpaca's template or the tokenizer's chat template."""
    instruction, inp = example["instruction"], example.get("input", "")
    if template == "alpaca":
        fmt = ALPACA_PROMPT if inp else ALPACA_PROMPT_NO_INPUT
        return fmt.format(instruction=instruction, input=inp)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' needs a tokenizer with a chat template; use template='alpaca'")
        user = f"{instruction}\n\n{inp}" if inp else instruction
        messages = [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"template must be 'alpaca' or 'chat', got {template!r}")


def tokenize(
    examples: Sequence[dict[str, str]], tokenizer, *, max_len: int, template: str = "alpaca"
) -> tuple[list[dict[str, list[int]]], int]:
    """Tokenise to {input_ids, labels}, prompt labels -100, response + EOS kept; return (items, n_truncated).

    Sequences longer than max_len keep their first max_len tokens. n_truncated counts every example cut so;
    those left without a single target (labels[1:] all -100) are dropped, with a warning giving how many.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no eos_token_id; the response must end with EOS")
    checks.integer("max_len", max_len, minimum=2)
    # Chat templates write their own specials (a BOS if the model wants one); plain text gets the defaults.
    prompt_specials = template != "chat"
    items, n_truncated, n_dropped = [], 0, 0
    for i, example in enumerate(examples):
        example = _check_record(example, f"example {i}")
        prompt = format_prompt(example, template=template, tokenizer=tokenizer)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=prompt_specials)
        response_ids = tokenizer.encode(example["output"], add_special_tokens=False)
        response_ids.append(tokenizer.eos_token_id)
        input_ids = prompt_ids + response_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
        if len(input_ids) > max_len:
            n_truncated += 1
            input_ids, labels = input_ids[:max_len], labels[:max_len]
            if all(label == IGNORE_INDEX for label in labels[1:]):
                n_dropped += 1
                continue
        items.append({"input_ids": input_ids, "labels": labels})
    if n_dropped:
        warnings.warn(
            f"{n_dropped} of {len(examples)} examples dropped: prompt alone reaches max_len={max_len}; "
            "raise max_len to keep them",
            stacklevel=2,
        )
    return items, n_truncated


def collate(items: Sequence[dict[str, list[int]]], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item: input_ids (B, T) by pad_id, labels (B, T) by -100, attention_mask."""
    if not items:
        raise DataError("collate needs at least one item")
    T = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(items), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(items), T), dtype=torch.long)  # (B, T)
    for b, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[b, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(item["labels"], dtype=torch.long)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def batches(
    items: Sequence[dict[str, list[int]]],
    *,
    batch_size: int,
    pad_id: int,
    shuffle: bool = True,
    seed: int = 0,
    length_grouped: bool = False,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of collated batches, the same for the same seed (pass seed + epoch for a new order).

    length_grouped sorts each chunk of 50 * batch_size items by length (less padding), then shuffles the
    order of the batches so that lengths do not trend through the epoch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(items)))
    if shuffle:
        rng.shuffle(order)
    if length_grouped:
        chunk = 50 * batch_size
        length = lambda i: len(items[i]["input_ids"])
        order = [i for s in range(0, len(order), chunk) for i in sorted(order[s : s + chunk], key=length)]
    groups = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if drop_last and groups and len(groups[-1]) < batch_size:
        groups.pop()
    if length_grouped and shuffle:
        rng.shuffle(groups)
    for group in groups:
        yield collate([items[i] for i in group], pad_id=pad_id)


def count_target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions that carry a loss once the model shifts: labels[:, 1:] != -100 (EOS counts, padding not)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
