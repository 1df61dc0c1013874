"""The expert-parameter seam: 3-D expert weights found by structure, selected as PEFT's
``target_parameters``, and a :class:`DeltaExperts` that computes with the changed weights under every
experts implementation transformers offers, merges and unmerges exactly."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from deltatune.deltas.experts import (DeltaExperts, ExpertDelta, ExpertShape, find_expert_targets,
                                      iter_expert_parameters, peft_expert_names, wrap_experts)
from deltatune.deltas.layer import unwrap
from deltatune.errors import ConfigError
from deltatune.testing import max_relative_difference as rel
from deltatune.testing.families import TINY_FAMILIES


class FullUpdate(ExpertDelta):
    """A dense trainable update of the whole 3-D weight (the simplest expert delta)."""

    def __init__(self, like: torch.Tensor) -> None:
        super().__init__()
        self.update = nn.Parameter(torch.randn_like(like) * 0.05)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.update.to(weight.dtype)

    def merge_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.update.detach().float()

    def unmerge_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.update.detach().float()


def ids() -> torch.Tensor:
    return torch.randint(3, 300, (2, 13), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_expert_parameters_found_by_structure_and_selected_as_peft(family: str) -> None:
    model = TINY_FAMILIES[family]()
    found = [(m, p) for m, p, _ in iter_expert_parameters(model)]
    assert found == [(f"model.layers.{i}.mlp.experts", p) for i in (0, 1) for p in ("gate_up_proj", "down_proj")]
    assert find_expert_targets(model, "all-experts", "m") == found
    assert find_expert_targets(model, ["layers.1.mlp.experts.down_proj"], "m") == [("model.layers.1.mlp.experts", "down_proj")]
    assert find_expert_targets(model, [r"re:.*\.0\..*gate_up_proj"], "m") == [("model.layers.0.mlp.experts", "gate_up_proj")]
    assert find_expert_targets(model, None, "m") == []
    with pytest.raises(ConfigError, match="m: target parameter 'up_proj' matches no expert parameter"):
        find_expert_targets(model, ["up_proj"], "m")
    shape = ExpertShape.of(model.model.layers[0].mlp.experts, model.model.layers[0].mlp.experts.gate_up_proj)
    assert (shape.experts, shape.in_features, shape.transposed) == (4, 64, False)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_delta_experts_compute_with_the_changed_weights(implementation: str) -> None:
    model, reference = TINY_FAMILIES["mixtral"](), TINY_FAMILIES["mixtral"]()
    for m in (model, reference):
        m.config._experts_implementation = implementation
    for name, param_name in find_expert_targets(model, "all-experts", "m"):
        experts = wrap_experts(model, name)
        torch.manual_seed(len(experts.deltas))
        delta = FullUpdate(getattr(experts.base_layer, param_name))
        experts.add_delta("m", param_name, delta, name)
        with torch.no_grad():
            getattr(reference.get_submodule(name), param_name).add_(delta.update)
    out = model(input_ids=ids(), labels=ids())
    expected = reference(input_ids=ids(), labels=ids())
    assert rel(out.logits, expected.logits) <= 1e-5
    out.loss.backward()
    expected.loss.backward()
    for name, module in model.named_modules():
        if isinstance(module, DeltaExperts):
            for param_name, delta in module.deltas["m"].items():
                assert rel(delta.update.grad, getattr(reference.get_submodule(name), param_name).grad) <= 1e-5


def test_merge_unmerge_unwrap_and_peft_names() -> None:
    model = TINY_FAMILIES["qwen3_moe"]()
    experts = wrap_experts(model, "model.layers.0.mlp.experts")
    assert wrap_experts(model, "model.layers.0.mlp.experts") is experts
    for param_name in ("down_proj", "gate_up_proj"):
        experts.add_delta("m", param_name, FullUpdate(getattr(experts.base_layer, param_name)))
    with pytest.raises(ConfigError, match="'m' is already applied to here.down_proj"):
        experts.add_delta("m", "down_proj", FullUpdate(experts.base_layer.down_proj), "here")
    assert peft_expert_names("e", experts, ["down_proj", "gate_up_proj"]) == {"gate_up_proj": "e.base_layer", "down_proj": "e"}
    assert peft_expert_names("e", experts, ["down_proj"]) == {"down_proj": "e"}
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids()).logits
        before = experts.base_layer.gate_up_proj.clone()
        experts.merge_delta("m")
        assert rel(model(input_ids=ids()).logits, logits) <= 1e-5
        experts.unmerge_delta("m")
        assert rel(experts.base_layer.gate_up_proj, before) <= 1e-6
        experts.merge_delta("m")
        unwrap(model, DeltaExperts)
        assert not any(isinstance(m, DeltaExperts) for m in model.modules())
        assert rel(model(input_ids=ids()).logits, logits) <= 1e-5


class Recording(FullUpdate):
    """A :class:`FullUpdate` that remembers (weakly) each weight it computed, and counts them."""

    def __init__(self, like: torch.Tensor) -> None:
        super().__init__(like)
        self.outputs: list = []

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        out = super().forward(weight)
        self.outputs.append(weakref.ref(out))
        return out


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_effective_weights_are_not_kept_for_backward_but_computed_again(implementation: str) -> None:
    model = TINY_FAMILIES["mixtral"]()
    model.config._experts_implementation = implementation
    experts = wrap_experts(model, "model.layers.0.mlp.experts")
    delta = Recording(experts.base_layer.down_proj)
    experts.add_delta("m", "down_proj", delta)
    loss = model(input_ids=ids(), labels=ids()).loss
    gc.collect()
    assert len(delta.outputs) == 1 and delta.outputs[0]() is None  # the dense expert weight was not kept
    loss.backward()
    assert len(delta.outputs) == 2  # computed again in backward
    assert delta.update.grad is not None and delta.update.grad.abs().sum() > 0
