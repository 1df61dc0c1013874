"""The Llama family's estimate terms (``activation_terms``): ``deltatune estimate`` asks the family
whose fast forward runs the model, and a family without them gets the plain forward's terms."""

from __future__ import annotations

import types

import pytest

from deltatune.api import hookimpl, plain_activation_bytes
from deltatune.estimate.activations import activation_bytes
from deltatune.estimate.counting import layout, load_config
from deltatune.model.assembly import resolve_spec
from deltatune.plugin import families
from deltatune.testing import isolated_manager
from deltatune_families import Family, Llama
from deltatune_families.estimate import LlamaActivations

LORA = [{"name": "lora", "config": {"r": 8, "targets": "all-linear"}}]


class LlamaWithoutTerms(Family):
    """A Llama family with the fast forward but without estimate terms."""

    name = "llama_without_terms"
    model_types = ("llama",)
    fast_forward = Llama.fast_forward


def _only(family: type) -> types.ModuleType:
    """A plugin module registering ``family``."""
    module = types.ModuleType(f"deltatune_test_{family.__name__.lower()}")
    module.deltatune_register_model_families = hookimpl(lambda register: register(family))
    return module


def test_the_estimate_takes_the_terms_of_the_family_whose_fast_forward_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    config, deltas = load_config("tiny-llama"), resolve_spec({"base": "tiny-llama", "delta": LORA}).deltas
    fast = layout(config, deltas, None)
    assert isinstance(fast.fast_terms, LlamaActivations) and fast.compute_copies > 0
    assert layout(config, deltas, None, fast_path=False).fast_terms is None
    plain = plain_activation_bytes(config, fast, 2, 64, 2)
    assert activation_bytes(config, fast, 2, 64, 2) != plain

    manager = isolated_manager(_only(LlamaWithoutTerms), entry_points_too=False)
    monkeypatch.setattr(families, "get_plugin_manager", lambda: manager)
    without = layout(config, deltas, None)
    assert without.fast_terms is None and without.compute_copies == 0
    assert activation_bytes(config, without, 2, 64, 2) == plain_activation_bytes(config, without, 2, 64, 2)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_qwen3_terms_count_what_its_qk_norm_keeps(dtype) -> None:
    """Qwen 3 runs the same fast forward plus QK-norm: the estimate matches what autograd keeps."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from saved_tensors import saved_bytes

    config = Qwen3Config(vocab_size=256, hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
    base = Qwen3ForCausalLM(config)
    spec = {"base": "tiny-llama", "base_dtype": dtype, "delta": LORA}
    measured, resolved = saved_bytes(spec, 2, 64, {}, fast=True, base=base)
    lay = layout(config, resolved.deltas, None)
    assert isinstance(lay.fast_terms, LlamaActivations) and lay.fast_terms.qk_norm
    compute = 2 if dtype == "bf16" else 4
    predicted = activation_bytes(config, lay, 2, 64, compute, labelled=63 / 64)["total"] + lay.compute_copies * compute
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)
