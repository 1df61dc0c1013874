"""What is specific to (IA)³: it computes what PEFT's IA3 computes (with PEFT's default targets per
model family), its adapters export to PEFT and start from PEFT, and it merges into the weights."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model

from deltatune.api import ConfigError
from deltatune.io.adapter import save_adapter
from deltatune.io.merged import export_merged
from deltatune.io.peft import export_peft, load_peft_adapter
from deltatune.model.assembly import build_model, resolve_spec
from deltatune.model.loading import tiny_llama
from deltatune.testing import logits_of, max_relative_difference, sample_batch
from deltatune.testing.families import TINY_FAMILIES

TARGETS = ["k_proj", "v_proj", "down_proj"]


def randomize(model, seed=1):
    """Trained-like vectors: 1 + 0.3 N(0, 1), seeded."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))


def ia3_model(plugin_manager, config=None, base="tiny-llama", model=None):
    """An IA3 model with random (seeded) vectors, fp32."""
    spec = {"base": base, "base_dtype": "fp32", "delta": [{"name": "ia3", "config": config or {}}]}
    resolved = resolve_spec(spec, plugin_manager)
    model = build_model(resolved, model)
    randomize(model)
    return model, resolved


def ours_by_module(model):
    return {k.replace(".deltas.ia3.ia3_l", ""): v for k, v in model.state_dict().items() if ".deltas.ia3." in k}


def peft_twin(model, base, config=None):
    """PEFT's IA3 on ``base`` (PEFT's family defaults unless ``config``), with the vectors of ``model``."""
    peft_model = get_peft_model(base, config or IA3Config(task_type="CAUSAL_LM"))
    ours = ours_by_module(model)
    found = {name for name, module in peft_model.base_model.model.named_modules() if hasattr(module, "ia3_l")}
    assert found == set(ours)
    with torch.no_grad():
        for name in found:
            peft_model.base_model.model.get_submodule(name).ia3_l["default"].copy_(ours[name])
    return peft_model


def test_the_installed_entry_point_provides_ia3(plugin_manager):
    points = {ep.name: ep for ep in entry_points(group="deltatune")}
    assert points["ia3"].value == "deltatune_ia3" and points["ia3"].dist.name == "deltatune-ia3"
    assert plugin_manager.get("delta_method", "ia3").distribution == "deltatune-ia3"


def test_logits_and_gradients_match_peft(plugin_manager, tiny_tokenizer):
    model, _ = ia3_model(plugin_manager, {"targets": TARGETS, "feedforward": ["down_proj"]})
    peft_model = peft_twin(model, tiny_llama(), IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"]))
    batch = sample_batch(tiny_tokenizer)
    torch.testing.assert_close(logits_of(model, batch), logits_of(peft_model, batch), rtol=1e-5, atol=1e-5)
    for m in (model, peft_model):
        m.train()
        m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    ours = {k.replace(".deltas.ia3.ia3_l", ""): p.grad for k, p in model.named_parameters() if p.requires_grad}
    theirs = {k.replace("base_model.model.", "").replace(".ia3_l.default", ""): p.grad
              for k, p in peft_model.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() and len(ours) == 6
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_unset_targets_are_peft_defaults_for_the_family(plugin_manager, family):
    """`- ia3` alone targets what PEFT's IA3Config() targets on that family, with equal logits."""
    model, _ = ia3_model(plugin_manager, model=TINY_FAMILIES[family]())
    peft_model = peft_twin(model, TINY_FAMILIES[family]())
    ids = torch.randint(3, 250, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert max_relative_difference(model.eval()(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits) <= 1e-5


def test_a_family_without_defaults_must_name_its_targets(plugin_manager):
    with pytest.raises(ConfigError, match="ia3: no default targets for model family 'phi3'; set `targets`"):
        ia3_model(plugin_manager, model=TINY_FAMILIES["phi3"]())


def test_shapes_say_which_side_is_scaled(plugin_manager):
    model, _ = ia3_model(plugin_manager)
    shapes = {k.split(".")[-4]: tuple(v.shape) for k, v in model.state_dict().items() if ".deltas.ia3." in k}
    assert shapes == {"k_proj": (32, 1), "v_proj": (32, 1), "down_proj": (1, 96)}
    assert sum(v.numel() for k, v in model.state_dict().items() if ".deltas.ia3." in k) == 2 * (32 + 32 + 96)


@pytest.mark.parametrize("config", [{}, {"targets": "all-linear", "feedforward": ["re:.*mlp\\.down_proj"]}])
def test_exported_adapter_loads_in_peft_and_back_with_the_same_logits(plugin_manager, tiny_tokenizer, tmp_path, config):
    model, resolved = ia3_model(plugin_manager, config)
    save_adapter(model, resolved, tmp_path / "adapter")
    export_peft(tmp_path / "adapter", tmp_path / "peft", manager=plugin_manager)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    batch = sample_batch(tiny_tokenizer)
    expected = logits_of(model, batch)
    assert max_relative_difference(logits_of(loaded, batch), expected) <= 1e-4
    imported, _ = load_peft_adapter(tmp_path / "peft", base="tiny-llama", manager=plugin_manager)
    assert max_relative_difference(logits_of(imported, batch), expected) <= 1e-5


def test_starts_from_a_peft_ia3_adapter(plugin_manager, tmp_path):
    peft_model = get_peft_model(tiny_llama(), IA3Config(target_modules=["q_proj", "up_proj", "down_proj"],
                                                         feedforward_modules=["down_proj"]))
    randomize(peft_model, seed=3)
    peft_model.save_pretrained(tmp_path / "peft")
    model, resolved = load_peft_adapter(tmp_path / "peft", base="tiny-llama", manager=plugin_manager)
    assert sorted(resolved.deltas[0].cfg.targets) == ["down_proj", "q_proj", "up_proj"]  # adopted from adapter_config.json
    ids = torch.arange(5, 30).unsqueeze(0)
    with torch.no_grad():
        assert max_relative_difference(model(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits) <= 1e-5


def test_merged_export_computes_the_adapter_model(plugin_manager, tmp_path):
    model, resolved = ia3_model(plugin_manager, {"targets": "all-linear", "feedforward": ["down_proj"]})
    save_adapter(model, resolved, tmp_path / "adapter")
    report = export_merged(tmp_path / "adapter", tmp_path / "merged", manager=plugin_manager)
    assert report.max_abs_logit_diff <= 1e-4


def test_a_feedforward_pattern_outside_the_targets_is_an_error(plugin_manager):
    with pytest.raises(ConfigError, match="ia3: feedforward 'down_proj' matches none"):
        ia3_model(plugin_manager, {"targets": ["k_proj", "v_proj"], "feedforward": ["down_proj"]})


def test_sharing_a_layer_with_lora_is_an_error_naming_both(plugin_manager):
    spec = {"base": "tiny-llama", "delta": [{"name": "ia3", "config": {"targets": ["v_proj"]}},
                                            {"name": "lora", "config": {"targets": ["v_proj"]}}]}
    with pytest.raises(ConfigError, match="'ia3' and 'lora'.*v_proj"):
        build_model(resolve_spec(spec, plugin_manager))


def test_ia3_and_lora_on_one_layer_are_refused_before_any_weight_loads():
    """The run's constructor applies the methods to the base's meta-device skeleton: no weight is read."""
    from deltatune.train.module import DeltaTuneModule

    delta = [{"name": "ia3", "config": {"targets": ["v_proj"]}}, {"name": "lora", "config": {"targets": ["v_proj"]}}]
    with pytest.raises(ConfigError, match="'ia3' and 'lora'.*v_proj"):
        DeltaTuneModule(base="tiny-llama", delta=delta)
