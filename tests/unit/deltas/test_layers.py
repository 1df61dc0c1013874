"""The delta-layer seam: a DeltaLinear adds its deltas to the base output, merging folds a delta into
the base weight and unmerging restores it; target selection by suffix, ``re:`` pattern and
``all-linear``, with an error naming the method when a target matches nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltatune.deltas.layer import Delta, DeltaLinear, wrap_linear
from deltatune.deltas.targets import find_targets
from deltatune.errors import ConfigError
from deltatune.model.loading import tiny_llama


class ScaleRows(Delta):
    """A non-trivial delta whose merge depends on the weight: ``W' = diag(1 + s) W``."""

    additive = False

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(-0.5, 0.75, out_features))

    def forward(self, x, result, layer):
        bias = layer.bias if layer.bias is not None else 0
        return (result - bias) * (1 + self.s) + bias

    def merge_weight(self, weight, layer):
        return weight * (1 + self.s.detach().float())[:, None]

    def unmerge_weight(self, weight, layer):
        return weight / (1 + self.s.detach().float())[:, None]


class AddUpdate(Delta):
    """A fixed additive update ``ΔW``."""

    def __init__(self, out_features: int, in_features: int, seed: int) -> None:
        super().__init__()
        self.update = nn.Parameter(torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x, result, layer):
        return result + nn.functional.linear(x, self.update)

    def merge_weight(self, weight, layer):
        return weight + self.update.detach().float()

    def unmerge_weight(self, weight, layer):
        return weight - self.update.detach().float()


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(12, 8)


@pytest.mark.parametrize("make", [lambda: ScaleRows(8), lambda: AddUpdate(8, 12, 1)], ids=["scale", "additive"])
def test_merge_keeps_outputs_and_unmerge_restores_the_weight(make):
    layer = DeltaLinear(_linear())
    original = layer.weight.detach().clone()
    layer.add_delta("m", make())
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = layer.base_layer(x)
        unmerged = layer(x)
        assert not torch.allclose(unmerged, plain)  # the delta changes the output

        layer.merge_delta("m")
        assert layer.merged == {"m"} and not torch.allclose(layer.weight, original)
        assert torch.allclose(layer(x), unmerged, atol=1e-5)  # merged: the weight carries the delta, once
        layer.merge_delta("m")  # a second merge is a no-op
        assert torch.allclose(layer(x), unmerged, atol=1e-5)

        layer.unmerge_delta("m")
        assert layer.merged == set()
        assert torch.allclose(layer.weight, original, atol=1e-6)
        assert torch.allclose(layer(x), unmerged, atol=1e-5)


def test_additive_deltas_stack_and_merge_one_at_a_time():
    layer = DeltaLinear(_linear())
    original = layer.weight.detach().clone()
    layer.add_delta("a", AddUpdate(8, 12, 1))
    layer.add_delta("b", AddUpdate(8, 12, 2))
    x = torch.randn(3, 12)
    with torch.no_grad():
        both = layer(x)
        layer.merge_delta("a")
        assert torch.allclose(layer(x), both, atol=1e-5)
        assert torch.allclose(layer.weight, original + layer.deltas["a"].update, atol=1e-6)
        layer.unmerge_delta("a")
        assert torch.allclose(layer.weight, original, atol=1e-6)
    with pytest.raises(ConfigError, match="'a' is already applied to model.x"):
        layer.add_delta("a", AddUpdate(8, 12, 3), "model.x")


def test_a_weight_changing_delta_refuses_company():
    layer = DeltaLinear(_linear())
    layer.add_delta("scale", ScaleRows(8))
    with pytest.raises(ConfigError, match="'scale' and 'add' both change the weight of module 'model.x'"):
        layer.add_delta("add", AddUpdate(8, 12, 1), "model.x")


def _attention_and_mlp(layer: int) -> list[str]:
    prefix = f"model.layers.{layer}"
    return [f"{prefix}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
        [f"{prefix}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]


def test_find_targets_by_suffix_regex_and_all_linear():
    model = tiny_llama()
    assert find_targets(model, ["q_proj", "v_proj"], "m") == [  # target by target, each in model order
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj",
    ]
    assert find_targets(model, "down_proj", "m") == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert find_targets(model, [r"re:model\.layers\.1\.self_attn\.[qk]_proj"], "m") == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    assert find_targets(model, ["re:.*layers\\.0\\.mlp\\..*", "mlp.up_proj"], "m") == [  # no duplicates
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.up_proj"]
    # a suffix matches whole name parts only; a regex must match the whole name
    with pytest.raises(ConfigError):
        find_targets(model, "re:q_proj", "m")
    with pytest.raises(ConfigError):
        find_targets(model, "_proj", "m")

    every = find_targets(model, "all-linear", "m")
    assert every == _attention_and_mlp(0) + _attention_and_mlp(1)  # the LM head is left out
    tied = tiny_llama(tie_word_embeddings=True)
    assert find_targets(tied, "all-linear", "m") == every


def test_find_targets_sees_wrapped_layers_once():
    model = tiny_llama()
    wrapped = wrap_linear(model, "model.layers.0.self_attn.q_proj")
    wrapped.add_delta("a", AddUpdate(64, 64, 0))
    assert wrap_linear(model, "model.layers.0.self_attn.q_proj") is wrapped
    assert find_targets(model, "all-linear", "m") == _attention_and_mlp(0) + _attention_and_mlp(1)
    with pytest.raises(ConfigError, match="not a linear layer"):
        wrap_linear(model, "model.layers.0.self_attn")


def test_a_target_that_matches_nothing_names_the_method_and_what_exists():
    with pytest.raises(ConfigError) as error:
        find_targets(tiny_llama(), ["q_proj", "query_key_value"], "my_method")
    message = str(error.value)
    assert message.startswith("my_method: target 'query_key_value' matches no linear module")
    assert "q_proj" in message and "down_proj" in message and "model.layers.0.self_attn.q_proj" in message
