"""DoRA against Hugging Face PEFT's ``use_dora=True`` (the oracle), and its own invariants: the
magnitude starts at the row norms, the norm is a constant of backward, merge/unmerge are exact,
the cached ``||W||²`` follows the base weight, and a quantized base works."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from deltatune.api import ConfigError, base_weight
from deltatune.deltas.layer import delta_layers
from deltatune.model.loading import tiny_llama
from deltatune.model.assembly import ModelSpec, build_model, resolve_spec
from deltatune.testing import max_relative_difference as rel

TARGETS = ["q_proj", "k_proj", "down_proj", "up_proj"]  # square, GQA 32x64, 64x96, 96x64


def ours(config: dict, quantizer: dict | None = None, train_like: bool = True, **model_kw):
    spec = ModelSpec(base="tiny-llama", quantizer=quantizer, delta=[{"name": "dora", "config": config}], base_dtype="fp32")
    model = build_model(resolve_spec(spec), tiny_llama(**model_kw))
    if train_like:
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for _, _, delta in delta_layers(model, "dora"):
                delta.lora_B.weight.copy_(torch.randn(delta.lora_B.weight.shape, generator=gen) * 0.3)
                delta.magnitude.mul_(torch.rand(delta.magnitude.shape, generator=gen) + 0.5)
    return model


def peft_twin(model, config: dict, **model_kw):
    """PEFT's DoRA on the same base weights, with our A, B and magnitude copied into its modules."""
    peft = get_peft_model(
        tiny_llama(**model_kw),
        LoraConfig(r=config["r"], lora_alpha=config["alpha"], target_modules=config["targets"], use_dora=True,
                   lora_dropout=config.get("dropout", 0.0), use_rslora=config.get("rslora", False)),
    )
    with torch.no_grad():
        for name, _, delta in delta_layers(model, "dora"):
            layer = peft.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(delta.lora_A.weight)
            layer.lora_B["default"].weight.copy_(delta.lora_B.weight)
            layer.lora_magnitude_vector["default"].weight.copy_(delta.magnitude)
    return peft


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 250, (2, 21), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_logits_and_gradients_match_peft(bias: bool, rslora: bool) -> None:
    config = {"r": 4, "alpha": 8.0, "targets": TARGETS, "rslora": rslora}
    model = ours(config, attention_bias=bias, mlp_bias=bias)
    peft = peft_twin(model, config, attention_bias=bias, mlp_bias=bias)
    batch = ids()
    mine, theirs = model(input_ids=batch, labels=batch), peft(input_ids=batch, labels=batch)
    assert rel(mine.logits, theirs.logits) <= 1e-5
    mine.loss.backward()
    theirs.loss.backward()
    for name, _, delta in delta_layers(model, "dora"):
        layer = peft.base_model.model.get_submodule(name)
        assert rel(delta.magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad) <= 1e-5
        assert rel(delta.lora_A.weight.grad, layer.lora_A["default"].weight.grad) <= 1e-5
        assert rel(delta.lora_B.weight.grad, layer.lora_B["default"].weight.grad) <= 1e-5


def test_dropout_path_matches_peft_in_training() -> None:
    """With dropout PEFT rescales a base output recomputed from the dropped-out input; so do we."""
    config = {"r": 4, "alpha": 8.0, "targets": TARGETS, "dropout": 0.3}
    model = ours(config).train()
    peft = peft_twin(model, config).train()
    batch = ids(1)
    torch.manual_seed(7)
    mine = model(input_ids=batch).logits
    torch.manual_seed(7)
    theirs = peft(input_ids=batch).logits
    assert rel(mine, theirs) <= 1e-5
    torch.manual_seed(8)
    assert rel(model(input_ids=batch).logits, mine) > 1e-4  # dropout is really on


def test_fresh_dora_leaves_the_model_unchanged_and_magnitude_is_the_row_norm() -> None:
    model = ours({"r": 4, "alpha": 8.0, "targets": TARGETS}, train_like=False)
    base = tiny_llama()
    batch = ids(2)
    assert rel(model(input_ids=batch).logits, base(input_ids=batch).logits) <= 1e-6
    for name, layer, delta in delta_layers(model, "dora"):
        expected = base.get_submodule(name).weight.norm(dim=1)
        assert rel(delta.magnitude, expected) <= 1e-6
        assert delta.magnitude.requires_grad and not layer.base_layer.weight.requires_grad


def test_norm_is_a_constant_of_backward() -> None:
    """The magnitude's gradient is the detached-norm one: d loss/d m = sum over tokens of g ⊙ (Wx + sBAx)/n."""
    model = ours({"r": 4, "alpha": 8.0, "targets": ["q_proj"]})
    name, layer, delta = next(delta_layers(model, "dora"))
    x = torch.randn(5, layer.in_features, requires_grad=True)
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    with torch.no_grad():
        weight = base_weight(layer) + delta.delta_weight()
        n = weight.norm(dim=1)
        expected = (grad * (x @ weight.t()) / n).sum(0)
    assert rel(delta.magnitude.grad, expected) <= 1e-5
    assert rel(out, (x @ weight.t()) * (delta.magnitude / n)) <= 1e-6


def test_merge_and_unmerge_are_exact() -> None:
    model = ours({"r": 4, "alpha": 8.0, "targets": TARGETS}, attention_bias=True).eval()
    batch = ids(3)
    with torch.no_grad():
        before = model(input_ids=batch).logits
        weights = {n: l.base_layer.weight.clone() for n, l, _ in delta_layers(model, "dora")}
        model_method = resolve_spec(ModelSpec(base="tiny-llama", delta=["dora"])).deltas[0].plugin
        model_method.merge(model)
        merged = model(input_ids=batch).logits
        assert all(l.merged == {"dora"} for _, l, _ in delta_layers(model, "dora"))
        assert rel(merged, before) <= 1e-5
        assert max(rel(l.base_layer.weight, weights[n]) for n, l, _ in delta_layers(model, "dora")) > 1e-3
        model_method.unmerge(model)
        for name, layer, _ in delta_layers(model, "dora"):
            assert rel(layer.base_layer.weight, weights[name]) <= 1e-6
        assert rel(model(input_ids=batch).logits, before) <= 1e-6


def test_cached_base_norm_follows_the_base_weight() -> None:
    model = ours({"r": 4, "alpha": 8.0, "targets": ["down_proj"]})
    _, layer, delta = next(delta_layers(model, "dora"))
    direct = lambda: (base_weight(layer) + delta.delta_weight()).norm(dim=1)  # noqa: E731
    assert rel(delta.weight_norm(layer), direct()) <= 1e-6
    with torch.no_grad():
        layer.base_layer.weight.mul_(1.5)  # in place: same storage, new version
    assert rel(delta.weight_norm(layer), direct()) <= 1e-6
    layer.base_layer.weight.data = layer.base_layer.weight.data * 0.5  # new storage
    assert rel(delta.weight_norm(layer), direct()) <= 1e-6


def test_works_on_an_nf4_base_through_base_weight() -> None:
    quantizer = {"name": "nf4", "config": {"compute_dtype": "fp32"}}
    model = ours({"r": 4, "alpha": 8.0, "targets": TARGETS}, quantizer=quantizer).eval()
    batch = ids(4)
    for _, layer, delta in delta_layers(model, "dora"):
        assert type(layer.base_layer).__name__ == "Linear4bit"
        dense = base_weight(layer).float()  # dequantized
        assert rel(delta.weight_norm(layer), (dense + delta.delta_weight()).norm(dim=1)) <= 1e-5
    with torch.no_grad():
        adapter = model(input_ids=batch).logits
        resolve_spec(ModelSpec(base="tiny-llama", delta=["dora"])).deltas[0].plugin.merge(model)
        merged = model(input_ids=batch).logits
    assert all(type(l.base_layer).__name__ == "Linear" for _, l, _ in delta_layers(model, "dora"))
    assert rel(merged, adapter) <= 1e-5


def test_dora_and_lora_on_one_layer_is_an_error_naming_both_and_the_module() -> None:
    spec = ModelSpec(base="tiny-llama", delta=[
        {"name": "lora", "config": {"targets": ["q_proj"]}},
        {"name": "dora", "config": {"targets": ["q_proj", "down_proj"]}},
    ])
    with pytest.raises(ConfigError, match=r"'lora' and 'dora'.*model\.layers\.0\.self_attn\.q_proj"):
        build_model(resolve_spec(spec), tiny_llama())
