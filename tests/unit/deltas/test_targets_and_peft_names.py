"""deltas/targets (PEFT's target rules) and deltas/peft_names (the checked copy of PEFT tensors)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltatune.deltas.peft_names import copy_named_tensors
from deltatune.deltas.targets import find_targets, target_matches
from deltatune.errors import ConfigError


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.up_proj = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 8)
        self.norm = nn.LayerNorm(4)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(4, 10, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def test_suffix_and_regular_expression_matching_follow_peft():
    assert target_matches("layers.0.q_proj", "q_proj")
    assert not target_matches("layers.0.xq_proj", "q_proj")
    assert target_matches("layers.1.k_proj", r"re:layers\.1\..*")
    assert not target_matches("layers.10.k_proj", r"re:layers\.1\.k_proj")  # the whole name must match


def test_all_linear_leaves_out_the_head_and_non_linear_modules():
    names = find_targets(Tiny(), "all-linear", "lora")
    assert names == [f"layers.{i}.{p}" for i in range(2) for p in ("q_proj", "k_proj", "up_proj")]


def test_explicit_targets_keep_their_order_without_duplicates():
    names = find_targets(Tiny(), ["k_proj", r"re:layers\.0\..*", "q_proj"], "lora")
    assert names == ["layers.0.k_proj", "layers.1.k_proj", "layers.0.q_proj", "layers.0.up_proj", "layers.1.q_proj"]


def test_a_target_matching_nothing_names_the_method_and_the_modules_there():
    with pytest.raises(ConfigError, match=r"^dora: target 'v_proj' matches no linear module.*other: q_proj, k_proj, up_proj, lm_head"):
        find_targets(Tiny(), ["v_proj"], "dora")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        find_targets(Tiny(), ["re:("], "lora")


def test_copy_named_tensors_casts_and_refuses_missing_keys_or_other_shapes():
    target = {"a": torch.zeros(2, 3, dtype=torch.float32)}
    copy_named_tensors(target, {"a": torch.ones(2, 3, dtype=torch.bfloat16), "extra": torch.ones(1)}, "lora")
    assert torch.equal(target["a"], torch.ones(2, 3))
    with pytest.raises(ConfigError, match=r"^lora: the PEFT adapter lacks 1 tensor"):
        copy_named_tensors(target, {}, "lora")
    with pytest.raises(ConfigError, match=r"^lora: PEFT tensor a has shape \(3, 2\), the model needs \(2, 3\)"):
        copy_named_tensors(target, {"a": torch.ones(3, 2)}, "lora")
