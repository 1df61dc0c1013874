"""Sequence packing changes nothing: every example's loss is the same packed and unpacked (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune.plugin.resolve import resolve
from deltatune.data.module import InstructionDataModule, collate
from deltatune.model.forward import hidden_states
from deltatune.train.loss import token_loss
from deltatune.train.packing_check import packing_problem
from deltatune.testing import fast_forward_runs
from deltatune.model.loading import tiny_llama, tiny_tokenizer
from deltatune.data.packing import (
    IGNORE_INDEX,
    LengthGroupedBatches,
    collate_packed,
    pack_rows,
    padding_fraction,
)

TRAIN = "examples/data/tasks-train.jsonl"


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=1, max_position_embeddings=1024)


def suite_rows(limit: int, **config) -> list[dict]:
    builder = resolve("dataset_builder", {"name": "alpaca", "config": {"path": TRAIN, "limit": limit, **config}})
    return builder.plugin.build(builder.cfg, tiny_tokenizer(), "train")


def token_losses(model, batch) -> torch.Tensor:
    """Cross-entropy of every next-token prediction (0 where the label is ignored): ``batch x (length-1)``."""
    labels = batch["labels"][:, 1:]
    with torch.no_grad():
        logits = model.get_output_embeddings()(hidden_states(model, batch)[:, :-1]).float()
    losses = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return losses * (labels != IGNORE_INDEX)


def packed_example_losses(model, packed_rows) -> list[float]:
    """Summed loss of each example inside packed rows, in packing order."""
    losses = token_losses(model, collate_packed(packed_rows, pad_id=0))
    result = []
    for i, row in enumerate(packed_rows):
        start = 0
        for n in row["lengths"]:
            # predictions of tokens start+1 .. start+n-1 come from positions start .. start+n-2
            result.append(float(losses[i, start:start + n - 1].sum()))
            start += n
    return result


def unpacked_example_losses(model, rows) -> list[float]:
    return [float(token_losses(model, collate([r], pad_id=0))[0].sum()) for r in rows]


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_every_example_has_the_same_loss_packed_and_unpacked(model, train_on_prompt):
    rows = suite_rows(40, train_on_prompt=train_on_prompt)
    packed = pack_rows(rows, 256)
    assert len(packed) < len(rows) / 2, "several examples per packed row"
    order = [r for p in packed for r in _members(p, rows)]
    got = packed_example_losses(model, packed)
    want = unpacked_example_losses(model, order)
    assert len(got) == len(rows)
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5 * max(max(want), 1.0)
    # and the batch loss the trainer optimises is the same too
    with torch.no_grad(), fast_forward_runs() as runs:
        total_packed, count_packed = token_loss(model, collate_packed(packed, pad_id=0))
        total_plain, count_plain = token_loss(model, collate(rows, pad_id=0))
    assert runs == ["llama", "llama"]  # both through the fast forward, which is what is compared here
    assert count_packed == count_plain, "an example's first token is predicted from nothing, packed or not"
    assert abs(float(total_packed) - sum(want)) < 1e-4 * sum(want)


def _members(packed_row, rows):
    """The original rows inside ``packed_row``, found by their token sequences."""
    ids, start, found = packed_row["input_ids"], 0, []
    for n in packed_row["lengths"]:
        found.append(next(r for r in rows if r["input_ids"] == ids[start:start + n]))
        start += n
    return found


def test_packing_without_restarted_positions_would_leak_and_the_test_sees_it(model):
    rows = suite_rows(12)
    packed = pack_rows(rows, 512)
    batch = collate_packed(packed, pad_id=0)
    leaky = {"input_ids": batch["input_ids"], "labels": batch["labels"],
             "attention_mask": torch.ones_like(batch["input_ids"])}
    leaked = token_losses(model, leaky).sum()
    honest = token_losses(model, batch).sum()
    assert abs(float(leaked) - float(honest)) > 1e-3
    assert packing_problem(model) is None


def test_data_module_packs_batches_and_reports_padding():
    config = {"name": "alpaca", "config": {"path": TRAIN, "limit": 96, "max_length": 96}}
    plain = InstructionDataModule(builder=config, base="tiny-llama", batch_size=8, val_fraction=0.0)
    packed = InstructionDataModule(builder=config, base="tiny-llama", batch_size=2, val_fraction=0.0,
                                   packing=True, pack_length=384)
    grouped = InstructionDataModule(builder=config, base="tiny-llama", batch_size=8, val_fraction=0.0,
                                    group_by_length=True)
    for dm in (plain, packed, grouped):
        dm.setup()
    batch = next(iter(packed.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["input_ids"].shape[1] <= 384
    assert batch["position_ids"][0, 0] == 0 and (batch["position_ids"][0] == 0).sum() > 2
    stats = {name: dm.batch_stats() for name, dm in (("plain", plain), ("packed", packed), ("grouped", grouped))}
    assert stats["packed"]["examples"] == stats["plain"]["examples"] == 96
    assert stats["packed"]["rows"] < 40 and stats["packed"]["tokens"] == stats["plain"]["tokens"]
    assert stats["grouped"]["padding"] < stats["plain"]["padding"] / 2
    seen = sorted(i for b in grouped._train_order().batches(0) for i in b)
    assert seen == list(range(96)), "length grouping visits every row once per epoch"


def test_length_grouped_batches_are_seeded_and_padding_fraction_is_exact():
    lengths = [1, 9, 2, 8, 3, 7, 4, 6]
    sampler = LengthGroupedBatches(lengths, batch_size=2, seed=3, group_batches=4)
    assert sampler.batches(0) == LengthGroupedBatches(lengths, 2, seed=3, group_batches=4).batches(0)
    assert sampler.batches(0) != sampler.batches(1)
    assert padding_fraction(lengths, sampler.batches(0)) == pytest.approx(4 / 44)
    assert padding_fraction([2, 4], [[0, 1]]) == pytest.approx(0.25)


@pytest.mark.parametrize("name, config_class, model_class, settings", [
    ("bloom", "BloomConfig", "BloomForCausalLM", {"n_head": 4}),  # ALiBi: its mask ignores position_ids
    ("mamba", "MambaConfig", "MambaForCausalLM", {}),  # a state-space model: no attention to mask
    ("opt", "OPTConfig", "OPTForCausalLM", {"ffn_dim": 96, "word_embed_proj_dim": 64, "dropout": 0.0}),
])
def test_packing_is_refused_for_models_whose_examples_see_each_other(name, config_class, model_class, settings):
    """Bloom leaks less than the earlier together-against-apart loss check could see (8.9e-5 < 1e-4):
    the check compares an example's loss after two different examples, which agree exactly when the model
    keeps them apart."""
    import transformers

    config = getattr(transformers, config_class)(vocab_size=320, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=96, pad_token_id=0,
                                                  **settings)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).float()
    problem = packing_problem(model)
    assert problem is not None and "crosses packed examples" in problem, (name, problem)
