import pytest
import torch

from effllm.bench import equivalence
from effllm.data import collate
from effllm.lora import apply_lora


@pytest.fixture(scope="module")
def batch(items, pad_id):
    """The four shortest real Alpaca examples as one batch: unequal lengths and target counts."""
    return collate(items, pad_id=pad_id)


def test_split_pads_each_micro_batch_only_to_its_own_longest_row(batch):
    micro = equivalence.split(batch, 2)
    lengths = batch["attention_mask"].sum(1)
    assert [b["input_ids"].shape for b in micro] == [(2, int(lengths[:2].max())), (2, int(lengths[2:].max()))]
    assert torch.equal(micro[1]["labels"], batch["labels"][2:, : micro[1]["labels"].shape[1]])
    assert sum(equivalence.targets_per_micro_batch(batch, 4)) == sum(
        equivalence.targets_per_micro_batch(batch, 1)
    )
    with pytest.raises(ValueError, match="cannot split a batch of 4 rows into 3"):
        equivalence.split(batch, 3)


@pytest.mark.parametrize("lora", [False, True])
def test_checkpointed_gradients_match_plain(tiny, batch, lora):
    if lora:
        equivalence.nudge_adapters(apply_lora(tiny, r=4, alpha=8, dropout=0.05, seed=0))
    for every in (1, 2):
        err = equivalence.grad_difference(tiny, batch, reference={}, candidate={"checkpointing": every})
        assert err["max_abs_grad"] > 0 and err["max_abs_error"] <= 1e-6 * err["max_abs_grad"]
    assert tiny.checkpoint_every == 0 and not tiny.training  # switches restored


def test_nudged_adapters_give_every_lora_tensor_a_gradient(tiny, batch):
    equivalence.nudge_adapters(apply_lora(tiny, r=4, alpha=8, dropout=0.0, seed=0))
    grads = equivalence.gradients(tiny, batch)
    assert grads and all("lora_" in n and g.abs().sum() > 0 for n, g in grads.items())


def test_token_normalised_accumulation_matches_one_batch_and_the_naive_mean_does_not(tiny, batch):
    rows = equivalence.compare(
        tiny,
        batch,
        reference={},
        candidates={
            "2x2 tokens": {"split": 2},
            "4x1 tokens": {"split": 4},
            "4x1 mean": {"split": 4, "normalisation": "mean"},
        },
        section="accumulation",
    )
    rel = {r["config"]: r["value"] for r in rows if r["metric"] == "relative_error"}
    assert rel["2x2 tokens"] < 1e-5 and rel["4x1 tokens"] < 1e-5
    assert rel["4x1 mean"] > 0.05  # target counts differ several-fold between these examples
    assert {r["section"] for r in rows} == {"accumulation"} and {r["status"] for r in rows} == {"ok"}
    assert {(r["config"], r["split"], r["normalisation"]) for r in rows} >= {("4x1 mean", 4, "mean")}


def test_an_unknown_setting_is_refused(tiny, batch):
    with pytest.raises(ValueError, match="unknown setting accum"):
        equivalence.gradients(tiny, batch, accum=2)


def test_out_of_memory_in_a_setting_is_a_row_with_its_reason(tiny, batch, monkeypatch):
    real = equivalence._backward

    def backward(model, batch, *, seed=0, **setting):
        if setting.get("split") == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, batch, seed=seed, **setting)

    monkeypatch.setattr(equivalence, "_backward", backward)
    rows = equivalence.compare(
        tiny, batch, reference={}, candidates={"2x2": {"split": 2}, "4x1": {"split": 4}}
    )
    failed = [r for r in rows if r["status"] != "ok"]
    assert len(failed) == 1 and failed[0]["config"] == "4x1" and "out of memory" in failed[0]["reason"]


def test_interleaved_rounds_time_every_setting_after_a_warm_up(tiny, batch):
    rows = equivalence.compare(
        tiny, batch, reference={}, candidates={"ckpt": {"checkpointing": 1}}, rounds=2, reference_label="none"
    )
    times = {r["config"]: r["value"] for r in rows if r["metric"] == "backward_s"}
    assert set(times) == {"none", "ckpt"} and all(t > 0 for t in times.values())
    assert [r["metric"] for r in rows if r["config"] == "none"] == ["backward_s"]
    assert not any(
        r["metric"] == "backward_s" for r in equivalence.compare(tiny, batch, reference={}, candidates={})
    )


def test_the_same_effective_batch_sees_the_same_examples_per_step(batch):
    rows = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(4)]

    def per_step(micro: int, accum: int) -> list:
        micro_batches = [collate_rows(rows[s : s + micro]) for s in range(0, 4, micro)]
        return equivalence.step_examples(micro_batches, accum_steps=accum, steps=3)

    assert per_step(4, 1) == per_step(2, 2) == per_step(1, 4)
    assert per_step(1, 3)[1] != per_step(3, 1)[1]  # 4 examples do not split into steps of 3: epochs shift


def collate_rows(rows: list[dict]) -> dict:
    """Stack single-row batches, right-padded to the longest, as collate would."""
    width = max(int(r["attention_mask"].sum()) for r in rows)
    return {k: torch.cat([r[k][:, :width] for r in rows]) for k in rows[0]}
