"""LoRA and rsLoRA against Hugging Face PEFT, the oracle: same weights in, same logits and gradients
out (relative difference ≤ 1e-6 in fp32), and checkpoints that move both ways."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from deltatune.api import ConfigError
from deltatune.io.peft import export_peft, load_peft_adapter, resolve_with_peft_init
from deltatune.io.adapter import save_adapter
from deltatune.deltas.layer import delta_layers
from deltatune.model.loading import tiny_llama
from deltatune.model.assembly import ModelSpec, build_model, resolve_spec
from deltatune.testing import max_relative_difference as rel

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # GQA k/v: 32x64; MLP 96x64


def ours(config: dict, **model_kw):
    resolved = resolve_spec(ModelSpec(base="tiny-llama", delta=[{"name": "lora", "config": config}], base_dtype="fp32"))
    model = build_model(resolved, tiny_llama(**model_kw))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, _, delta in delta_layers(model, "lora"):
            delta.lora_B.weight.normal_(0, 0.2)  # trained-like: B is non-zero
    return model, resolved


def peft_twin(model, config: dict, **model_kw):
    """The PEFT model on the same base weights, with our A and B copied in through PEFT's modules."""
    peft = get_peft_model(
        tiny_llama(**model_kw),
        LoraConfig(r=config["r"], lora_alpha=config["alpha"], target_modules=config["targets"],
                   use_rslora=config.get("rslora", False)),
    )
    with torch.no_grad():
        for name, _, delta in delta_layers(model, "lora"):
            layer = peft.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(delta.lora_A.weight)
            layer.lora_B["default"].weight.copy_(delta.lora_B.weight)
    return peft


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_logits_and_gradients_match_peft(rslora: bool, bias: bool) -> None:
    config = {"r": 4, "alpha": 12.0, "targets": TARGETS, "rslora": rslora}
    model, _ = ours(config, attention_bias=bias, mlp_bias=bias)
    peft = peft_twin(model, config, attention_bias=bias, mlp_bias=bias)
    ids = torch.randint(0, 250, (2, 19), generator=torch.Generator().manual_seed(0))
    ours_loss = model(input_ids=ids, labels=ids)
    peft_loss = peft(input_ids=ids, labels=ids)
    assert rel(ours_loss.logits, peft_loss.logits) <= 1e-6
    ours_loss.loss.backward()
    peft_loss.loss.backward()
    for name, _, delta in delta_layers(model, "lora"):
        layer = peft.base_model.model.get_submodule(name)
        assert rel(delta.lora_A.weight.grad, layer.lora_A["default"].weight.grad) <= 1e-5
        assert rel(delta.lora_B.weight.grad, layer.lora_B["default"].weight.grad) <= 1e-5


def test_rslora_scaling_differs_from_lora() -> None:
    """The rsLoRA flag really changes the scale (alpha / sqrt(r)), so the test above can fail."""
    lora, _ = ours({"r": 4, "alpha": 12.0, "targets": ["q_proj"]})
    rs, _ = ours({"r": 4, "alpha": 12.0, "targets": ["q_proj"], "rslora": True})
    ids = torch.arange(10).unsqueeze(0)
    assert rel(lora(input_ids=ids).logits, rs(input_ids=ids).logits) > 1e-4
    assert next(d for _, _, d in delta_layers(rs, "lora")).scaling == pytest.approx(6.0)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_export_loads_in_peft(tmp_path, rslora: bool) -> None:
    config = {"r": 4, "alpha": 8.0, "targets": "all-linear", "rslora": rslora}
    model, resolved = ours(config)
    model.eval()
    save_adapter(model, resolved, tmp_path / "adapter")
    out = export_peft(tmp_path / "adapter", tmp_path / "peft")
    peft = PeftModel.from_pretrained(tiny_llama(), out).eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert rel(peft(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-6
    assert peft.peft_config["default"].use_rslora is rslora


def test_starts_from_a_peft_lora_adapter(tmp_path) -> None:
    peft = get_peft_model(tiny_llama(), LoraConfig(r=6, lora_alpha=3, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    peft.save_pretrained(tmp_path / "peft")
    model, resolved = load_peft_adapter(tmp_path / "peft", base="tiny-llama")
    assert resolved.deltas[0].cfg.r == 6 and resolved.deltas[0].cfg.alpha == 3  # adopted from adapter_config.json
    ids = torch.arange(5, 30).unsqueeze(0)
    with torch.no_grad():
        assert rel(model(input_ids=ids).logits, peft.eval()(input_ids=ids).logits) <= 1e-6
    with pytest.raises(ConfigError, match="r=4 .* r=6"):
        resolve_with_peft_init(ModelSpec(base="tiny-llama", delta=[{"name": "lora", "config": {"r": 4, "init_from": str(tmp_path / "peft")}}]))
