"""PiSSA and OLoRA initialisation of ``lora`` (``init``) against Hugging Face PEFT's own ``pissa``/``olora``
init on the same tiny model: the same starting pair and residual base weight, the base's outputs at
init, a saved adapter that reloads the trained model, a PEFT export (converted to plain LoRA of rank
2r) that PEFT loads on the original base with the trained model's logits, a merged model equal to the
trained one, and the refusals (quantized base, init_from) before any weight loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model

from deltatune.api import ConfigError
from deltatune.cli.main import main
from deltatune.deltas.layer import delta_layers
from deltatune.io.adapter import load_adapter, save_adapter
from deltatune.io.merged import export_merged
from deltatune.io.peft import export_peft, read_peft_config
from deltatune.model.assembly import ModelSpec, build_model, resolve_spec
from deltatune.model.loading import tiny_llama
from deltatune.testing import max_relative_difference as rel
from deltatune.testing.families import TINY_FAMILIES
from deltatune_lora.init import principal_pair
from transformers import AutoModelForCausalLM

IDS = torch.arange(3, 40).unsqueeze(0)
ROOT = Path(__file__).resolve().parents[3]


def ours(config: dict, quantizer: dict | None = None):
    resolved = resolve_spec(ModelSpec(base="tiny-llama", delta=[{"name": "lora", "config": config}],
                                      quantizer=quantizer, base_dtype="fp32"))
    return build_model(resolved, tiny_llama()), resolved


def train_like(model) -> None:
    """Move every trained tensor, as training would."""
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_start_and_residual_equal_peft_and_the_model_starts_as_the_base(init: str, rslora: bool) -> None:
    config = {"r": 4, "alpha": 12.0, "targets": "all-linear", "init": init, "rslora": rslora}
    model, _ = ours(config)
    peft = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=12.0, target_modules="all-linear",
                                                   init_lora_weights=init, use_rslora=rslora))
    layers = list(delta_layers(model, "lora"))
    assert len(layers) == 14  # 7 projections x 2 blocks
    for name, layer, delta in layers:
        twin = peft.base_model.model.get_submodule(name)
        assert (delta.lora_A.weight - twin.lora_A["default"].weight).abs().max() <= 1e-5
        assert (delta.lora_B.weight - twin.lora_B["default"].weight).abs().max() <= 1e-5
        assert (layer.base_layer.weight - twin.base_layer.weight).abs().max() <= 1e-5
        assert delta.lora_B.weight.abs().max() > 1e-2  # a real start, not B = 0
    base = tiny_llama()
    for name, layer, _ in layers:  # the residual is not the base weight: PiSSA/OLoRA took a part out
        assert (layer.base_layer.weight - base.get_submodule(name).weight).abs().max() > 1e-3
    assert (logits(model) - logits(base)).abs().max() <= 1e-5


def test_fast_pissa_equals_peft_with_the_same_random_draws() -> None:
    peft = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))  # kaiming: base intact
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj
    weight = layer.base_layer.weight.detach().clone()
    torch.manual_seed(5)
    a, b = principal_pair(weight, 4, 2.0, "pissa_niter_2")
    torch.manual_seed(5)
    layer.pissa_init("default", "pissa_niter_2")
    assert (a - layer.lora_A["default"].weight).abs().max() <= 1e-5
    assert (b - layer.lora_B["default"].weight).abs().max() <= 1e-5
    torch.testing.assert_close(weight - 2.0 * b @ a, layer.base_layer.weight, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_saved_adapter_reloads_and_peft_export_converts_to_lora_on_the_original_base(tmp_path, init, rslora) -> None:
    model, resolved = ours({"r": 4, "alpha": 8.0, "targets": "all-linear", "init": init, "rslora": rslora})
    train_like(model)
    trained = logits(model)
    save_adapter(model, resolved, tmp_path / "adapter")
    reloaded, _ = load_adapter(tmp_path / "adapter", base_dtype="fp32")
    assert rel(logits(reloaded), trained) <= 1e-6

    out = export_peft(tmp_path / "adapter", tmp_path / "peft")
    config = read_peft_config(out)
    assert config["r"] == 8 and config.get("init_lora_weights", True) is True
    peft = PeftModel.from_pretrained(tiny_llama(), out).eval()  # the ORIGINAL base, not the residual
    assert (logits(peft) - trained).abs().max() <= 1e-4
    assert (logits(tiny_llama()) - trained).abs().max() > 1e-2  # the adapter does change the model


def test_reload_follows_the_saved_start_not_a_new_randomised_decomposition(tmp_path) -> None:
    torch.manual_seed(0)
    model, resolved = ours({"r": 4, "alpha": 8.0, "targets": ["q_proj", "down_proj"], "init": "pissa_niter_1"})
    train_like(model)
    save_adapter(model, resolved, tmp_path / "adapter")
    torch.manual_seed(1)  # another seed: another randomised SVD at rebuild
    rebuilt, _ = ours(resolved.deltas[0].ref.config)
    saved = next(d for _, _, d in delta_layers(model, "lora")).initial_A
    assert (next(d for _, _, d in delta_layers(rebuilt, "lora")).initial_A - saved).abs().max() > 1e-4
    torch.manual_seed(1)
    reloaded, _ = load_adapter(tmp_path / "adapter", base_dtype="fp32")
    assert (logits(reloaded) - logits(model)).abs().max() <= 1e-5


def test_merged_export_equals_the_trained_model(tmp_path) -> None:
    model, resolved = ours({"r": 4, "alpha": 8.0, "targets": "all-linear", "init": "pissa"})
    train_like(model)
    save_adapter(model, resolved, tmp_path / "adapter")
    report = export_merged(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32)
    assert (logits(merged) - logits(model)).abs().max() <= 1e-4
    assert report.max_abs_logit_diff <= 1e-4


def test_gaussian_start_is_pefts() -> None:
    model, resolved = ours({"r": 4, "targets": ["q_proj"], "init": "gaussian"})
    a = torch.cat([d.lora_A.weight.flatten() for _, _, d in delta_layers(model, "lora")])
    assert abs(a.std().item() - 1 / 4) < 0.03  # PEFT's gaussian: N(0, 1/r); Kaiming-uniform here would be ~0.07
    assert all(d.lora_B.weight.abs().max() == 0 for _, _, d in delta_layers(model, "lora"))
    assert resolved.deltas[0].plugin.peft_config(resolved.deltas[0].cfg)["init_lora_weights"] == "gaussian"


def test_refusals_come_before_any_weight_loads() -> None:
    with pytest.raises(ConfigError, match="delta method 'lora' cannot sit on quantizer 'nf4': init=pissa decomposes "
                                          "the dense base weight"):
        resolve_spec(ModelSpec(base="tiny-llama", quantizer="nf4", delta=[{"name": "lora", "config": {"init": "pissa"}}]))
    with pytest.raises(ConfigError, match="init=olora derives the pair from the base weight and init_from"):
        resolve_spec(ModelSpec(base="tiny-llama", delta=[{"name": "lora", "config": {"init": "olora", "init_from": "x"}}]))
    with pytest.raises(ConfigError, match="init"):
        resolve_spec(ModelSpec(base="tiny-llama", delta=[{"name": "lora", "config": {"init": "pissa_niter_"}}]))
    resolve_spec(ModelSpec(base="tiny-llama", quantizer="nf4", delta=[{"name": "lora", "config": {"init": "gaussian"}}]))
    with pytest.raises(ConfigError, match="init=olora is for linear layers; expert parameters"):
        resolve_spec(ModelSpec(base="tiny-llama", delta=[{"name": "lora", "config": {
            "init": "olora", "target_parameters": ["experts.gate_up_proj"]}}]))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_gpt2_conv1d_layers_start_from_their_out_by_in_weight(init: str) -> None:
    """GPT-2 stores weights transposed (``Conv1D``). PiSSA equals PEFT's with ``fan_in_fan_out``; PEFT's
    OLoRA decomposes the stored (transposed) tensor, which gives pairs of the wrong shapes, so OLoRA is
    checked by its definition: ``B₀`` orthonormal and the model unchanged at init."""
    resolved = resolve_spec(ModelSpec(base="tiny-llama", delta=[{"name": "lora", "config": {
        "r": 4, "targets": ["c_attn", "c_fc"], "init": init}}], base_dtype="fp32"))
    model = build_model(resolved, TINY_FAMILIES["gpt2"]())
    reference = TINY_FAMILIES["gpt2"]()
    layers = list(delta_layers(model, "lora"))
    assert len(layers) == 4
    if init == "pissa":
        peft = get_peft_model(TINY_FAMILIES["gpt2"](), LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"],
                                                                   init_lora_weights="pissa", fan_in_fan_out=True))
        for name, layer, delta in layers:
            twin = peft.base_model.model.get_submodule(name)
            assert (delta.lora_A.weight - twin.lora_A["default"].weight).abs().max() <= 1e-5
            assert (layer.base_layer.weight - twin.base_layer.weight).abs().max() <= 1e-5
    else:
        for _, _, delta in layers:
            b0 = delta.lora_B.weight
            torch.testing.assert_close(b0.t() @ b0, torch.eye(4), rtol=0, atol=1e-5)
    assert (logits(model, IDS[:, :20]) - logits(reference, IDS[:, :20])).abs().max() <= 1e-5


def test_a_real_fit_with_fast_pissa_exports_to_peft_on_the_original_base(tmp_path) -> None:
    config = yaml.safe_load((ROOT / "tests" / "configs" / "tiny-lora.yaml").read_text())
    config["model"]["delta"] = [{"name": "lora", "config": {"r": 4, "alpha": 8, "targets": "all-linear",
                                                            "init": "pissa_niter_4"}}]
    config["model"]["optimizer"]["config"]["lr"] = 0.002  # the pair starts large: PiSSA takes a smaller rate
    config["data"]["builder"]["config"]["path"] = str(ROOT / "examples" / "data" / "tasks-train.jsonl")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(tmp_path / "run.yaml"), f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.max_steps=12", "--model.samples=0"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tuned_metrics"]["validation"]["perplexity/loss"] < report["base_metrics"]["validation"]["perplexity/loss"]
    model, _ = load_adapter(tmp_path / "adapter", base_dtype="fp32")
    peft = PeftModel.from_pretrained(tiny_llama(), export_peft(tmp_path / "adapter", tmp_path / "peft")).eval()
    assert (logits(peft) - logits(model)).abs().max() <= 1e-4


def test_a_rank_above_a_layers_smaller_size_is_allowed_but_not_for_principal_inits() -> None:
    """Qwen2-MoE's shared-expert gate is 1 wide: ``all-linear`` with r = 4 adapts it as PEFT does
    (the update has rank 1); PiSSA/OLoRA need r principal directions of every targeted weight and say
    which layer lacks them, before any weight loads."""
    from deltatune.api import ConfigError
    from deltatune.model.assembly import build_model, resolve_spec
    from deltatune.testing.families import TINY_FAMILIES

    lora = {"name": "lora", "config": {"targets": "all-linear", "r": 4}}
    model = build_model(resolve_spec({"delta": [lora], "base_dtype": "fp32"}), TINY_FAMILIES["qwen2_moe"]())
    gate = model.get_submodule("model.layers.0.mlp.shared_expert_gate")
    assert gate.out_features == 1 and gate.deltas["lora"].lora_A.out_features == 4
    pissa = {"name": "lora", "config": {"targets": "all-linear", "r": 4, "init": "pissa"}}
    with pytest.raises(ConfigError, match=r"init 'pissa' takes r=4 principal directions of a 1x64 weight"):
        build_model(resolve_spec({"delta": [pissa], "base_dtype": "fp32"}), TINY_FAMILIES["qwen2_moe"]())
