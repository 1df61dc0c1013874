"""The role targets ``attention`` and ``mlp``: the generic placement of linear layers by their blocks
(plain, ``Conv1D`` and fused projections), the by-role error, PEFT's reading of a role word, and a
model family's own ``target_roles``."""

from __future__ import annotations

import types

import pytest
from pydantic import BaseModel, ConfigDict

from deltatune.api import hookimpl
from deltatune.deltas.targets import find_targets, target_roles
from deltatune.errors import ConfigError
from deltatune.io.peft import _targets_from_peft
from deltatune.plugin import families
from deltatune.testing import isolated_manager
from deltatune.testing.families import TINY_FAMILIES


def _layer(model, role: str) -> list[str]:
    """The last name parts of the first decoder layer's ``role`` targets, in model order."""
    return [name.rsplit(".", 1)[-1] for name in find_targets(model, [role], "lora") if ".0." in name]


@pytest.mark.parametrize(("family", "attention", "mlp"), [
    ("llama", ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]),
    ("gpt2", ["c_attn", "c_proj"], ["c_fc", "c_proj"]),  # transformers' Conv1D
    ("phi3", ["o_proj", "qkv_proj"], ["gate_up_proj", "down_proj"]),  # fused projections
])
def test_attention_and_mlp_select_the_layers_of_their_blocks(family: str, attention: list[str], mlp: list[str]) -> None:
    model = TINY_FAMILIES[family]()
    assert _layer(model, "attention") == attention and _layer(model, "mlp") == mlp
    both = find_targets(model, ["attention", "mlp"], "lora")
    assert len(both) == 2 * (len(attention) + len(mlp)) and set(both) == set(find_targets(model, "all-linear", "lora"))
    assert target_roles(model)["other"] == ["lm_head"]


def test_a_target_matching_nothing_lists_the_modules_by_role() -> None:
    with pytest.raises(ConfigError) as error:
        find_targets(TINY_FAMILIES["gpt2"](), ["attention", "q_proj"], "dora")
    assert str(error.value).startswith("dora: target 'q_proj' matches no linear module. Linear modules here, by "
                                       "role: attention: c_attn, c_proj; mlp: c_fc, c_proj; other: lm_head; e.g. ")
    assert "\n" not in str(error.value)


def test_a_peft_target_named_like_a_role_stays_a_module_name() -> None:
    assert _targets_from_peft(["q_proj", "mlp"]) == ["q_proj", r"re:(.*\.)?mlp"]
    with pytest.raises(ConfigError, match=r"target 're:\(\.\*\\\.\)\?mlp' matches no linear module"):
        find_targets(TINY_FAMILIES["llama"](), _targets_from_peft(["mlp"]), "lora")  # a block, not a linear layer


class ByDepth(BaseModel):
    """Options of :class:`Olmo2ByDepth` (none)."""

    model_config = ConfigDict(extra="forbid")


class Olmo2ByDepth:
    """A third-party family placing roles where the generic placement does not: its attention role is
    the first layer's attention, its mlp role the down projections."""

    name = "olmo2_by_depth"
    Config = ByDepth
    model_types = ("olmo2",)

    def unhandled(self, config):
        return None

    def logit_transform(self, config):
        return None

    def target_roles(self, model):
        names = [name for name, _ in model.named_modules()]
        return {"attention": [n for n in names if n.startswith("model.layers.0.self_attn.") and n.endswith("_proj")],
                "mlp": [n for n in names if n.endswith("down_proj")]}


class Olmo2Wrong(Olmo2ByDepth):
    """A family whose roles name a block that is not a linear layer."""

    def target_roles(self, model):
        return {"mlp": ["model.layers.0.mlp"]}


def _installing(family: type) -> types.ModuleType:
    """A plugin module registering ``family``."""
    module = types.ModuleType(f"deltatune_test_{family.__name__.lower()}")
    module.deltatune_register_model_families = hookimpl(lambda register: register(family))
    return module


def test_an_installed_family_places_the_roles_of_its_models(monkeypatch: pytest.MonkeyPatch) -> None:
    model = TINY_FAMILIES["olmo2"]()
    assert _layer(model, "attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]  # generic: every layer's
    manager = isolated_manager(_installing(Olmo2ByDepth))
    monkeypatch.setattr(families, "get_plugin_manager", lambda: manager)
    attention = find_targets(model, ["attention"], "lora")
    assert attention == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    assert find_targets(model, ["mlp"], "lora") == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert "model.layers.1.self_attn.q_proj" in target_roles(model)["other"]


def test_a_family_naming_a_module_that_is_not_a_linear_layer_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    manager = isolated_manager(_installing(Olmo2Wrong))
    monkeypatch.setattr(families, "get_plugin_manager", lambda: manager)
    with pytest.raises(ConfigError, match=r"^model family 'olmo2_by_depth': target_roles names model.layers.0.mlp, "
                                          "neither a role"):
        find_targets(TINY_FAMILIES["olmo2"](), ["mlp"], "lora")
