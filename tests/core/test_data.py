"""Alpaca loading, prompt masking, truncation, collation and batching."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effllm.data import (
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    DataError,
    batches,
    collate,
    count_target_tokens,
    format_prompt,
    load_examples,
    tokenize,
)
from effllm.loading.tokenizer import byte_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data"
POOL = ROOT.parent / "shared" / "data" / "alpaca_pool.json"
RECORDS = [
    {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue — ünïcødé"},
]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# Loading


def test_json_and_jsonl_files_load_the_same_records(tmp_path):
    as_json = write(tmp_path, "a.json", json.dumps(RECORDS, indent=2))
    as_jsonl = write(tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    jsonl_named_json = write(tmp_path, "b.json", "\n".join(json.dumps(r) for r in RECORDS))
    assert load_examples(as_json) == load_examples(as_jsonl) == load_examples(jsonl_named_json) == RECORDS


def test_missing_input_is_read_as_empty_and_extra_fields_are_dropped(tmp_path):
    path = write(tmp_path, "a.json", json.dumps([{"instruction": "i", "output": "o", "id": 7}]))
    assert load_examples(path) == [{"instruction": "i", "input": "", "output": "o"}]


def test_missing_file_raises_file_not_found_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.json"))):
        load_examples(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.json", '[{"instruction": "i",, }]', r"bad\.json: invalid JSON at line 1 column 22"),
        (
            "obj.json",
            '{"instruction": "i", "input": "", "output": "o"}',
            r"obj\.json: top level must be a list",
        ),
        ("empty.json", "[]", r"empty\.json: no records"),
        ("empty.jsonl", "\n\n", r"empty\.jsonl: no records"),
        (
            "rec.json",
            '[{"instruction": "i", "output": "o"}, "text"]',
            r"rec\.json: record 1: expected an object",
        ),
        (
            "miss.json",
            '[{"instruction": "i", "input": ""}]',
            r"miss\.json: record 0: field 'output' is missing",
        ),
        (
            "type.json",
            '[{"instruction": "i", "input": 3, "output": "o"}]',
            r"record 0: field 'input' must be a str",
        ),
        (
            "none.json",
            '[{"instruction": null, "output": "o"}]',
            r"record 0: field 'instruction' must be a str",
        ),
        ("blank.json", '[{"instruction": "i", "output": "  "}]', r"record 0: field 'output' is empty"),
        (
            "bad.jsonl",
            '{"instruction": "i", "output": "o"}\n\n{"instruction": oops}\n',
            r"record 1 \(line 3\)",
        ),
        (
            "miss.jsonl",
            '{"instruction": "i"}\n',
            r"miss\.jsonl: record 0 \(line 1\): field 'output' is missing",
        ),
    ],
)
def test_each_malformed_file_raises_a_data_error_naming_file_record_and_field(tmp_path, name, text, expected):
    path = write(tmp_path, name, text)
    with pytest.raises(DataError, match=expected) as info:
        load_examples(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_jsonl_error_gives_the_column_of_the_bad_json(tmp_path):
    path = write(tmp_path, "bad.jsonl", '{"instruction": oops}\n')
    with pytest.raises(DataError, match=r"line 1\): invalid JSON at column 17"):
        load_examples(path)


# Committed subsets


def test_committed_subsets_load_with_200_and_100_disjoint_records():
    train, held_out = load_examples(DATA / "alpaca_subset.json"), load_examples(DATA / "alpaca_eval.json")
    assert (len(train), len(held_out)) == (200, 100)
    key = lambda r: (r["instruction"], r["input"])
    assert len({key(r) for r in train}) == 200
    assert not {key(r) for r in train} & {key(r) for r in held_out}


def test_committed_subsets_keep_exactly_the_alpaca_fields():
    for name in ("alpaca_subset.json", "alpaca_eval.json"):
        records = json.loads((DATA / name).read_text(encoding="utf-8"))
        assert all(list(r) == ["instruction", "input", "output"] for r in records)


def test_committed_subsets_match_the_checksums_in_the_data_readme():
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for name in ("alpaca_subset.json", "alpaca_eval.json"):
        digest = hashlib.sha256((DATA / name).read_bytes()).hexdigest()
        assert re.search(rf"`{re.escape(name)}` \|.*`{digest}`", readme), name


@pytest.mark.skipif(not POOL.is_file(), reason="the Alpaca pool in ../shared is not present")
def test_subset_script_reproduces_the_committed_files(tmp_path):
    script = ROOT / "scripts" / "make_alpaca_subset.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("alpaca_subset.json", "alpaca_eval.json", "README.md"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


# Prompts and tokenisation


def test_alpaca_prompt_uses_the_input_template_only_when_input_is_given():
    with_input, without = (format_prompt(r) for r in RECORDS)
    assert "### Input:\n2, 3\n\n### Response:\n" in with_input
    assert "paired with an input" in with_input
    assert without == ALPACA_PROMPT_NO_INPUT.format(instruction="Name a colour.")
    assert "### Input" not in without


def test_chat_prompt_puts_instruction_and_input_in_one_user_turn(tok):
    prompt = format_prompt(RECORDS[0], template="chat", tokenizer=tok)
    assert prompt == "<|im_start|>user\nAdd the numbers.\n\n2, 3<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_without_a_template_on_the_tokenizer_says_so():
    bare = byte_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        format_prompt(RECORDS[0], template="chat", tokenizer=bare)
    with pytest.raises(ValueError, match="template must be"):
        format_prompt(RECORDS[0], template="llama")


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_labels_mask_exactly_the_prompt_and_end_with_eos(tok, template):
    items, n_truncated = tokenize(RECORDS, tok, max_len=1024, template=template)
    assert n_truncated == 0
    for record, item in zip(RECORDS, items, strict=True):
        n_prompt = len(tok.encode(format_prompt(record, template=template, tokenizer=tok)))
        ids, labels = item["input_ids"], item["labels"]
        assert len(ids) == len(labels) == n_prompt + len(record["output"].encode()) + 1
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:]
        assert labels[-1] == ids[-1] == tok.eos_token_id
        assert tok.decode(ids[n_prompt:-1]) == record["output"]


def test_chat_tokens_decode_to_a_full_chatml_conversation(tok):
    (item,), _ = tokenize(RECORDS[:1], tok, max_len=1024, template="chat")
    assert tok.decode(item["input_ids"]) == (
        "<|im_start|>user\nAdd the numbers.\n\n2, 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>"
    )


def test_truncation_keeps_the_start_and_is_counted(tok):
    short = {"instruction": "Say hi.", "input": "", "output": "hi"}
    long = {"instruction": "Say hi.", "input": "", "output": "hello there, my friend"}
    n_prompt = len(tok.encode(format_prompt(short)))
    full, _ = tokenize([short, long], tok, max_len=1024)
    max_len = n_prompt + 5  # short (prompt + 3) fits, long is cut
    items, n_truncated = tokenize([short, long], tok, max_len=max_len)
    assert n_truncated == 1
    assert items[0] == full[0]
    assert items[1]["input_ids"] == full[1]["input_ids"][:max_len]
    assert items[1]["labels"] == full[1]["labels"][:max_len]
    assert tok.decode(items[1]["labels"][n_prompt:]) == "hello"  # no EOS left


def test_examples_left_without_targets_are_dropped_with_a_warning_and_counted_as_truncated(tok):
    kept = {"instruction": "Say hi.", "input": "", "output": "hello there"}
    dropped = {"instruction": "Say hi, in a much longer instruction.", "input": "", "output": "hi"}
    max_len = len(tok.encode(format_prompt(kept))) + 2
    with pytest.warns(UserWarning, match=r"1 of 2 examples dropped: .* max_len="):
        items, n_truncated = tokenize([kept, dropped], tok, max_len=max_len)
    assert n_truncated == 2
    assert len(items) == 1
    assert items[0]["labels"][-2:] == items[0]["input_ids"][-2:]  # the kept, cut example still has targets


# Collation and batching


def test_collate_right_pads_ids_labels_and_mask(tok):
    items = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    batch = collate(items, pad_id=tok.pad_token_id)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 258, 258]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_target_tokens_are_counted_after_the_shift():
    batch = {"labels": torch.tensor([[-100, 2, 3], [4, 5, -100]])}
    assert count_target_tokens(batch) == 3  # labels[:, 1:]; the first position is never predicted


def fake_items(n: int) -> list[dict[str, list[int]]]:
    """Item i is token i repeated 1..50 times, so a batch's first column names its items."""
    lengths = [1 + (i * 37) % 50 for i in range(n)]
    return [{"input_ids": [i] * k, "labels": [i] * k} for i, k in enumerate(lengths)]


def item_order(batch_list: list[dict[str, torch.Tensor]]) -> list[list[int]]:
    return [b["input_ids"][:, 0].tolist() for b in batch_list]


def padding(batch_list: list[dict[str, torch.Tensor]]) -> int:
    return sum(int((b["attention_mask"] == 0).sum()) for b in batch_list)


@pytest.mark.parametrize("length_grouped", [False, True])
def test_batches_are_the_same_for_the_same_seed_and_differ_for_another(length_grouped):
    items = fake_items(40)
    order = lambda seed: item_order(
        batches(items, batch_size=4, pad_id=0, seed=seed, length_grouped=length_grouped)
    )
    assert order(0) == order(0)
    assert order(0) != order(1)


def test_batches_cover_every_item_once_and_drop_last_drops_the_partial_batch():
    items = fake_items(10)
    order = item_order(batches(items, batch_size=4, pad_id=0))
    assert [len(ids) for ids in order] == [4, 4, 2]
    assert sorted(sum(order, [])) == list(range(10))
    assert [len(ids) for ids in item_order(batches(items, batch_size=4, pad_id=0, drop_last=True))] == [4, 4]


def test_unshuffled_batches_keep_item_order():
    assert item_order(batches(fake_items(6), batch_size=2, pad_id=0, shuffle=False)) == [
        [0, 1],
        [2, 3],
        [4, 5],
    ]


def test_length_grouped_batches_have_less_padding_than_random_ones():
    items = fake_items(400)
    grouped = list(batches(items, batch_size=8, pad_id=0, length_grouped=True))
    shuffled = list(batches(items, batch_size=8, pad_id=0))
    assert padding(grouped) < padding(shuffled) / 4
    assert sorted(sum(item_order(grouped), [])) == list(range(400))
