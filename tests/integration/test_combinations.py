"""Mix and match: delta methods compose when they claim different parameters, train together, save
and reload as one adapter bundle with identical logits, and merge/unmerge exactly; two methods on
one parameter (or a non-additive method sharing a layer) is an error naming both and the module."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import BaseModel, ConfigDict

from deltatune import hookimpl
from deltatune.errors import ConfigError
from deltatune.io.adapter import load_adapter, save_adapter
from deltatune.io.peft import peft_export
from deltatune.plugin.resolve import resolve
from deltatune.model.assembly import ModelSpec, build_model, claim_parameters, resolve_spec
from deltatune.plugin.manager import PluginManager
from deltatune.testing import max_relative_difference as rel

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
COMBINATIONS = {
    "lora-attn+bitfit": [{"name": "lora", "config": {"r": 4, "targets": ATTN}}, "bitfit"],
    "dora-mlp+lora-attn": [{"name": "dora", "config": {"r": 4, "targets": MLP}},
                           {"name": "lora", "config": {"r": 4, "targets": ATTN}}],
    "vera+bitfit(existing biases)": [{"name": "vera", "config": {"r": 8, "targets": ATTN + MLP}}, "bitfit"],
    "ia3+bitfit": ["ia3", "bitfit"],  # IA3 scales k/v outputs, bias included: merge folds both
    "ia3-kv+lora-rest": [{"name": "ia3", "config": {"targets": ["k_proj", "v_proj"]}},
                         {"name": "lora", "config": {"r": 4, "targets": ["q_proj", "o_proj", "gate_proj", "up_proj"]}}],
    "lora+vera on the same layers": [{"name": "lora", "config": {"r": 2, "targets": "all-linear"}},
                                     {"name": "vera", "config": {"r": 8, "targets": "all-linear"}}],
    "lora(pissa)-attn+bitfit": [{"name": "lora", "config": {"r": 4, "targets": ATTN, "init": "pissa"}}, "bitfit"],
}
BUNDLE_ONLY_COMBINATIONS = {  # a bottleneck adapter cannot be merged: these train, save and reload together
    "adapter(houlsby)+bitfit": [{"name": "adapter", "config": {"placement": "houlsby", "bottleneck": 8}}, "bitfit"],
    "adapter(parallel)+bitfit": [{"name": "adapter", "config": {"placement": "parallel", "beside": ["mlp", "attention"],
                                                                "bottleneck": 8}}, "bitfit"],
}


def train(model: torch.nn.Module, steps: int = 3) -> None:
    """A few real AdamW steps on random tokens."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.01)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, 250, (4, 24), generator=gen)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def trained_and_reloaded(tmp_path: Path, base: str, delta: list) -> tuple[torch.nn.Module, object, torch.Tensor, torch.Tensor]:
    """Build ``delta`` on ``base``, train a few steps (exactly the claimed parameters change), save
    the bundle and reload it with identical logits; returns (reloaded model, its resolved spec, the
    batch, the trained logits)."""
    resolved = resolve_spec(ModelSpec(base=base, delta=delta, base_dtype="fp32"))
    model = build_model(resolved)
    owners = claim_parameters(model, resolved)
    assert set(owners.values()) == {d.name for d in resolved.deltas}  # every method owns something
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(owners)  # exactly the claimed parameters trained

    batch = torch.randint(0, 250, (2, 31), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=batch).logits
    save_adapter(model, resolved, tmp_path / "adapter")
    reloaded, again = load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=batch).logits, logits)
    return reloaded, again, batch, logits


@pytest.mark.parametrize("combo", list(COMBINATIONS))
def test_combination_trains_saves_reloads_and_merges(tmp_path, biased_base, combo) -> None:
    base = biased_base if "existing biases" in combo else "tiny-llama"
    reloaded, again, batch, logits = trained_and_reloaded(tmp_path, base, COMBINATIONS[combo])
    with torch.no_grad():
        weights = {n: p.detach().clone() for n, p in reloaded.named_parameters() if n.endswith("base_layer.weight")}
        for delta in again.deltas:
            delta.plugin.merge(reloaded)
        assert rel(reloaded(input_ids=batch).logits, logits) <= 1e-5
        for delta in reversed(again.deltas):
            delta.plugin.unmerge(reloaded)
        for name, param in reloaded.named_parameters():
            if name in weights:
                assert rel(param, weights[name]) <= 1e-6, name
        assert rel(reloaded(input_ids=batch).logits, logits) <= 1e-6


@pytest.mark.parametrize("combo", list(BUNDLE_ONLY_COMBINATIONS))
def test_adapter_combination_trains_saves_and_reloads_and_refuses_to_merge(tmp_path, combo) -> None:
    reloaded, again, batch, logits = trained_and_reloaded(tmp_path, "tiny-llama", BUNDLE_ONLY_COMBINATIONS[combo])
    adapter = next(d for d in again.deltas if d.name == "adapter")
    with pytest.raises(ConfigError, match="only the deltatune adapter bundle holds it"):
        adapter.plugin.merge(reloaded)
    with pytest.raises(ConfigError, match="only the deltatune adapter bundle holds it"):
        peft_export(reloaded, again)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=batch).logits, logits)


class ProbeConfig(BaseModel):
    """No options."""

    model_config = ConfigDict(extra="forbid")


class BiasProbe:
    """A real (minimal) delta method that claims the attention query biases."""

    name = "biasprobe"
    Config = ProbeConfig
    supports_quantized = True

    def apply(self, model, cfg) -> None:
        """Nothing to wrap."""

    def trainable(self, name, param) -> bool:
        """Claims ``…q_proj.bias``."""
        return name.endswith("q_proj.bias")

    def merge(self, model) -> None:
        """No-op."""

    def unmerge(self, model) -> None:
        """No-op."""

    def state_dict(self, model):
        """Nothing of its own."""
        return {}

    def peft_config(self, cfg):
        """No PEFT form."""
        return None


def probe_manager() -> PluginManager:
    """The installed plugins plus ``biasprobe``, registered as a plugin module would be."""
    manager = PluginManager()
    manager.load_entry_points()
    module = types.ModuleType("deltatune_biasprobe")

    @hookimpl
    def deltatune_register_delta_methods(register) -> None:
        register(BiasProbe)

    module.deltatune_register_delta_methods = deltatune_register_delta_methods
    manager.register_module(module, distribution="deltatune-biasprobe")
    return manager


def test_two_methods_claiming_one_parameter_is_an_error_naming_both_and_the_module() -> None:
    resolved = resolve_spec(ModelSpec(base="tiny-llama", delta=["bitfit", "biasprobe"]), probe_manager())
    with pytest.raises(ConfigError) as error:
        build_model(resolved)
    message = str(error.value)
    assert "'bitfit' and 'biasprobe'" in message
    assert "module 'model.layers.0.self_attn.q_proj'" in message
    # distinct parameters of one module compose
    delta = [{"name": "bitfit", "config": {"targets": ["q_proj"]}}, {"name": "lora", "config": {"targets": ["q_proj"]}}]
    fine = resolve_spec(ModelSpec(base="tiny-llama", delta=delta))
    owners = claim_parameters(build_model(fine), fine)
    assert owners["model.layers.0.self_attn.q_proj.base_layer.bias"] == "bitfit"
    assert owners["model.layers.0.self_attn.q_proj.deltas.lora.lora_A.weight"] == "lora"


@pytest.mark.parametrize("first, second", [("vera", "dora"), ("dora", "lora")])
def test_a_non_additive_method_cannot_share_a_layer(first, second) -> None:
    delta = [{"name": first, "config": {"r": 4, "targets": ["o_proj"]}},
             {"name": second, "config": {"r": 4, "targets": ["v_proj", "o_proj"]}}]
    with pytest.raises(ConfigError, match=rf"'{first}' and '{second}' .*module 'model\.layers\.0\.self_attn\.o_proj'"):
        build_model(resolve_spec(ModelSpec(base="tiny-llama", delta=delta)))


EXAMPLES = ["dora-smollm2.yaml", "vera-smollm2.yaml", "bitfit-smollm2.yaml", "lora-bitfit-smollm2.yaml",
            "dora-lora-smollm2.yaml"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_configs_resolve(name) -> None:
    """Every plugin and option in the example configs is valid (checked before any weight loads)."""
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / name).read_text())
    model = config["model"]
    resolved = resolve_spec(ModelSpec(base=model["base"], delta=model["delta"]))
    assert [d.name for d in resolved.deltas] == [d["name"] for d in model["delta"]]
    resolve("optimizer", model["optimizer"])
    resolve("dataset_builder", config["data"]["builder"])
