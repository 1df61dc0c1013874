"""The ``adapter`` delta method on real tiny models: placement per family, identity at init, gradients
equal to a plain-torch reference, bad options and targets refused, merge refused with a reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltatune.api import ConfigError
from deltatune.io.peft import peft_export
from deltatune.model.assembly import ModelSpec, build_model, resolve_spec
from deltatune.testing.families import TINY_FAMILIES
from deltatune_adapter import AdapterConfig, BottleneckAdapter


def build(config: dict, family: str = "llama"):
    resolved = resolve_spec(ModelSpec(base="tiny-llama", delta=[{"name": "adapter", "config": config}], base_dtype="fp32"))
    base = TINY_FAMILIES[family]()
    reference = TINY_FAMILIES[family]()
    return build_model(resolved, base), reference, resolved


def adapted(model: nn.Module) -> list[str]:
    return sorted({n.split(".deltas.")[0] for n, p in model.named_parameters() if p.requires_grad})


@pytest.mark.parametrize("family, placement, suffixes", [
    ("llama", "houlsby", {"o_proj", "down_proj"}), ("llama", "pfeiffer", {"down_proj"}),
    ("gpt2", "houlsby", {"attn.c_proj", "mlp.c_proj"}), ("gpt2", "pfeiffer", {"mlp.c_proj"}),
])
def test_placement_targets_the_family_output_projections_and_starts_as_the_base(family, placement, suffixes) -> None:
    model, reference, _ = build({"placement": placement, "bottleneck": 8}, family)
    names = adapted(model)
    assert len(names) == 2 * len(suffixes)  # two blocks
    assert {s for s in suffixes for n in names if n.endswith(s)} == suffixes
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def reference_adapter(h: torch.Tensor, down: nn.Linear, up: nn.Linear) -> torch.Tensor:
    return h + up(torch.nn.functional.gelu(down(h)))


def test_gradients_equal_a_plain_torch_bottleneck() -> None:
    torch.manual_seed(0)
    delta = BottleneckAdapter(16, 4, "gelu", 0.0)
    nn.init.normal_(delta.up.weight)  # a trained adapter: up is no longer zero
    down, up = nn.Linear(16, 4), nn.Linear(4, 16)
    down.load_state_dict(delta.down.state_dict())
    up.load_state_dict(delta.up.state_dict())
    h = torch.randn(3, 5, 16, requires_grad=True)
    h_ref = h.detach().clone().requires_grad_(True)
    out = delta(None, h, None)
    expected = reference_adapter(h_ref, down, up)
    torch.testing.assert_close(out, expected)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad)
    for mine, theirs in ((delta.down, down), (delta.up, up)):
        torch.testing.assert_close(mine.weight.grad, theirs.weight.grad)
        torch.testing.assert_close(mine.bias.grad, theirs.bias.grad)


def test_a_trained_adapter_changes_the_output_and_merge_and_peft_export_are_refused_with_a_reason() -> None:
    model, reference, resolved = build({"reduction_factor": 8})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(3, 200, (1, 8))
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="cannot be merged.*only the deltatune adapter bundle"):
        resolved.deltas[0].plugin.merge(model)
    with pytest.raises(ConfigError, match="no PEFT equivalent; it cannot be merged.*only the deltatune adapter bundle"):
        peft_export(model, resolved)


def test_options_and_targets_are_checked() -> None:
    with pytest.raises(ValueError, match="either reduction_factor or bottleneck"):
        AdapterConfig(reduction_factor=4, bottleneck=8)
    with pytest.raises(ValueError):
        AdapterConfig(placement="sideways")
    assert AdapterConfig().width(64) == 4  # reduction factor 16 by default
    with pytest.raises(ConfigError, match="target 'nope' matches no linear module.*o_proj"):
        build({"targets": ["nope"]})
