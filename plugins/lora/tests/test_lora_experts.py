"""LoRA on MoE expert parameters (transformers 5's 3-D expert weights) against PEFT's
``target_parameters`` LoRA, the oracle, on tiny random Mixtral and Qwen3-MoE models: same weights in,
same loss and gradients out (fp32, ≤ 1e-5 relative), adapters that export to PEFT and import from it,
and merged export folding the expert deltas."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from deltatune.api import ConfigError
from deltatune.deltas.experts import DeltaExperts, delta_experts
from deltatune.deltas.layer import delta_layers
from deltatune.io.adapter import save_adapter
from deltatune.io.merged import export_merged
from deltatune.io.peft import export_peft, load_peft_adapter
from deltatune.model.loading import tiny_tokenizer
from deltatune.model.assembly import ModelSpec, build_model, resolve_spec
from deltatune.testing import max_relative_difference as rel
from deltatune.testing.families import TINY_FAMILIES

FAMILIES = ["mixtral", "qwen3_moe"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def ours(family: str, config: dict, base: str = "tiny-llama"):
    resolved = resolve_spec(ModelSpec(base=base, delta=[{"name": "lora", "config": config}], base_dtype="fp32"))
    model = build_model(resolved, TINY_FAMILIES[family]())
    torch.manual_seed(1)
    with torch.no_grad():
        for _, _, per_param in delta_experts(model, "lora"):
            for delta in per_param.values():
                delta.lora_B.weight.normal_(0, 0.2)  # trained-like: B is non-zero
        for _, _, delta in delta_layers(model, "lora"):
            delta.lora_B.weight.normal_(0, 0.2)
    return model, resolved


def peft_twin(family: str, model, config: dict):
    """PEFT's target_parameters LoRA on the same base, with our tensors copied in under PEFT's names."""
    peft = get_peft_model(TINY_FAMILIES[family](), LoraConfig(
        r=config["r"], lora_alpha=config["alpha"], target_modules=config.get("targets", []),
        target_parameters=EXPERTS))
    lora = resolve_spec(ModelSpec(base="tiny-llama", delta=[{"name": "lora", "config": config}])).deltas[0]
    named = lora.plugin.peft_state_dict(model, lora.cfg)
    theirs = {k: v for k, v in peft.named_parameters() if "lora_" in k}
    assert {k.replace(".default.", ".") for k in theirs} == set(named)  # every tensor, PEFT's names and shapes
    with torch.no_grad():
        for key, param in theirs.items():
            param.copy_(named[key.replace(".default.", ".")])
    return peft


def batch():
    ids = torch.randint(3, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", [[], ["q_proj", "v_proj"]])
def test_loss_and_gradients_match_peft_target_parameters(family: str, targets: list[str]) -> None:
    config = {"r": 2, "alpha": 6.0, "targets": targets, "target_parameters": EXPERTS}
    model, _ = ours(family, config)
    peft = peft_twin(family, model, config)
    ours_out, peft_out = model(**batch()), peft(**batch())
    assert rel(ours_out.loss, peft_out.loss) <= 1e-5
    assert rel(ours_out.logits, peft_out.logits) <= 1e-5
    ours_out.loss.backward()
    peft_out.loss.backward()
    grads = {k.replace(".default.", "."): p.grad for k, p in peft.named_parameters() if "lora_" in k}
    lora = resolve_spec(ModelSpec(base="tiny-llama", delta=[{"name": "lora", "config": config}])).deltas[0]
    named = lora.plugin.peft_state_dict(model, lora.cfg)
    assert sum(p.requires_grad for p in model.parameters()) == len(grads)
    by_storage = {p.data_ptr(): g for p, g in ((p, p.grad) for _, p in model.named_parameters() if p.requires_grad)}
    for key, tensor in named.items():
        assert by_storage[tensor.data_ptr()] is not None and grads[key] is not None, key
        assert rel(by_storage[tensor.data_ptr()], grads[key]) <= 1e-5, key


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_are_wrapped_and_train_only_the_pairs(family: str) -> None:
    model, _ = ours(family, {"r": 2, "targets": "all-linear", "target_parameters": "all-experts"})
    wrapped = [m for m in model.modules() if isinstance(m, DeltaExperts)]
    assert len(wrapped) == 2 and all(set(m.deltas["lora"]) == {"gate_up_proj", "down_proj"} for m in wrapped)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".deltas.lora." in n for n in trainable)
    assert any("experts.deltas.lora.gate_up_proj.lora_A" in n for n in trainable)
    # the expert pairs change the output: the base experts are really replaced in the forward
    before = model(**batch()).logits
    model.get_submodule("model.layers.0.mlp.experts").merged.add("lora")
    assert rel(before, model(**batch()).logits) > 1e-3


def test_bad_expert_targets_are_refused_naming_what_exists() -> None:
    with pytest.raises(ConfigError, match="matches no expert parameter; expert parameters here: experts.down_proj"):
        ours("mixtral", {"r": 2, "target_parameters": ["w1"]})
    with pytest.raises(ConfigError, match="no 3-D expert parameters"):
        ours("llama", {"r": 2, "target_parameters": "all-experts"})
    with pytest.raises(ConfigError, match="dropout must be 0 with target_parameters"):
        ours("mixtral", {"r": 2, "dropout": 0.1, "target_parameters": "all-experts"})
    with pytest.raises(ConfigError, match="rank r=100 exceeds both sizes of an expert"):
        ours("qwen3_moe", {"r": 100, "targets": [], "target_parameters": "all-experts"})


@pytest.fixture(params=FAMILIES)
def base_folder(request, tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp(request.param)
    TINY_FAMILIES[request.param]().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return request.param, str(folder)


def test_merge_unmerge_and_adapter_reload(base_folder, tmp_path) -> None:
    family, folder = base_folder
    config = {"r": 2, "alpha": 4.0, "targets": ["o_proj"], "target_parameters": "all-experts"}
    model, resolved = ours(family, config, base=folder)
    model.eval()
    with torch.no_grad():
        logits = model(**batch()).logits
        lora = resolved.deltas[0].plugin
        experts = model.get_submodule("model.layers.1.mlp.experts").base_layer
        before = experts.down_proj.detach().clone()
        lora.merge(model)
        assert rel(model(**batch()).logits, logits) <= 1e-5
        assert rel(experts.down_proj, before) > 1e-4  # folded into the weight
        lora.unmerge(model)
        assert rel(experts.down_proj, before) <= 1e-6
    save_adapter(model, resolved, tmp_path / "adapter")
    out = export_merged(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out.out).eval()
    with torch.no_grad():
        assert rel(merged(**batch()).logits, logits) <= 1e-4


def test_peft_export_and_import(base_folder, tmp_path) -> None:
    family, folder = base_folder
    config = {"r": 2, "alpha": 4.0, "targets": "all-linear", "target_parameters": EXPERTS}
    model, resolved = ours(family, config, base=folder)
    model.eval()
    save_adapter(model, resolved, tmp_path / "adapter")
    out = export_peft(tmp_path / "adapter", tmp_path / "peft")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), out).eval()
    assert sorted(peft.peft_config["default"].target_parameters) == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj"))
    with torch.no_grad():
        logits = model(**batch()).logits
        assert rel(peft(**batch()).logits, logits) <= 1e-4
        assert rel(peft(**batch()).logits, AutoModelForCausalLM.from_pretrained(folder)(**batch()).logits) > 1e-3
    imported, _ = load_peft_adapter(out)
    with torch.no_grad():
        assert rel(imported(**batch()).logits, logits) <= 1e-5


def test_starts_from_an_adapter_peft_itself_saved(base_folder, tmp_path) -> None:
    family, folder = base_folder
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), LoraConfig(
        r=3, lora_alpha=5, target_modules=["o_proj"], target_parameters=EXPERTS))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    peft.save_pretrained(tmp_path / "peft")
    model, resolved = load_peft_adapter(tmp_path / "peft", base=folder)
    cfg = resolved.deltas[0].cfg
    assert (cfg.r, cfg.alpha, sorted(cfg.target_parameters)) == (3, 5, sorted(EXPERTS))  # adopted from PEFT's config
    with torch.no_grad():
        assert rel(model(**batch()).logits, peft.eval()(**batch()).logits) <= 1e-5
