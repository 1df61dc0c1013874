"""DoRA on MoE expert parameters (transformers 5's 3-D expert weights) against deltatune's own dense DoRA
(itself checked against PEFT in test_dora.py), the oracle, applied to each expert's 2-D weight as an
``nn.Linear``: on tiny random Mixtral and Qwen3-MoE models (fp32), the effective expert weights, the loss
and every gradient equal the per-expert dense DoRA's, and the training loss the Hugging Face loss (fp32,
and bf16 as close to fp32 as Hugging Face's own); training and merging work on an NF4 base; a merged
export holds the adapter and a PEFT export is refused; backward keeps no dense copy of the experts."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from deltatune.api import ConfigError, DeltaExperts, DeltaLinear, ExpertShape
from deltatune.deltas import experts as experts_module
from deltatune.deltas.experts import delta_experts
from deltatune.io.adapter import save_adapter
from deltatune.io.merged import export_merged, merge_into_base
from deltatune.io.peft import export_peft
from deltatune.model.assembly import ModelSpec, build_model, resolve_spec
from deltatune.model.loading import tiny_tokenizer
from deltatune.testing import adam_losses
from deltatune.testing import max_relative_difference as rel
from deltatune.testing.families import TINY_FAMILIES, assert_bf16_conformance, assert_family_conformance
from deltatune_dora import DoraDelta
from deltatune_dora.experts import DoraExpertDelta

FAMILIES = ["mixtral", "qwen3_moe"]
R, ALPHA = 4, 8.0
NF4_FP32 = {"name": "nf4", "config": {"compute_dtype": "fp32"}}


def dora(config: dict, family: str = "mixtral", base: str = "tiny-llama", quantizer: dict | None = None,
         train_like: bool = True):
    resolved = resolve_spec(ModelSpec(base=base, quantizer=quantizer, base_dtype="fp32",
                                      delta=[{"name": "dora", "config": config}]))
    model = build_model(resolved, TINY_FAMILIES[family]())
    if train_like:
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for _, _, per_param in delta_experts(model, "dora"):
                for delta in per_param.values():
                    delta.lora_B.weight.copy_(torch.randn(delta.lora_B.weight.shape, generator=generator) * 0.3)
                    delta.magnitude.mul_(torch.rand(delta.magnitude.shape, generator=generator) + 0.5)
    return model, resolved


def ids() -> torch.Tensor:
    return torch.randint(3, 300, (2, 17), generator=torch.Generator().manual_seed(0))


def dense_dora(delta: DoraExpertDelta, weight: torch.Tensor, expert: int) -> DeltaLinear:
    """Deltatune's dense DoRA on expert ``expert``'s ``out x in`` weight as an ``nn.Linear``, holding that
    expert's pair and magnitude (copies, its own leaves)."""
    linear = nn.Linear(delta.shape.in_features, delta.shape.out_features, bias=False)
    layer = DeltaLinear(linear)
    with torch.no_grad():
        linear.weight.copy_(delta.rows(weight)[expert])
        linear.weight.requires_grad_(False)
        dense = DoraDelta(layer, delta.r, delta.scaling, 0.0)
        a, b = delta.pairs()
        dense.lora_A.weight.copy_(a[expert])
        dense.lora_B.weight.copy_(b[expert])
        dense.magnitude.copy_(delta.magnitude[expert])
    layer.add_delta("dora", dense)
    return layer


def dense_weight(layer: DeltaLinear) -> torch.Tensor:
    """The layer's effective ``out x in`` weight, through its own forward (``W' x`` for ``x`` the identity)."""
    return layer(torch.eye(layer.in_features)).T


@pytest.mark.parametrize("transposed", [False, True])
def test_expert_weights_equal_dense_dora_per_expert_in_either_layout(transposed: bool) -> None:
    experts, out_features, in_features = 3, 12, 20
    shape = ExpertShape(experts, in_features, out_features, transposed)
    weight = torch.randn(experts, out_features, in_features)
    stored = weight.mT.contiguous() if transposed else weight
    delta = DoraExpertDelta(shape, stored, R, ALPHA / R)
    layers = [dense_dora(delta, stored, e) for e in range(experts)]
    assert all(rel(delta.magnitude[e], layers[e].deltas["dora"].magnitude) <= 1e-6 for e in range(experts))
    assert rel(delta.magnitude, weight.norm(dim=-1)) <= 1e-6  # m starts at ||W_e|| per output
    with torch.no_grad():
        delta.lora_B.weight.normal_(0, 0.3)
        delta.magnitude.mul_(torch.rand(experts, out_features) + 0.5)
    layers = [dense_dora(delta, stored, e) for e in range(experts)]
    ours = delta(stored)
    assert ours.shape == stored.shape
    for e, layer in enumerate(layers):
        assert rel(delta.rows(ours)[e], dense_weight(layer)) <= 1e-6
    merged = delta.merge_weight(stored)
    assert rel(merged, ours) <= 1e-6
    assert rel(delta.unmerge_weight(merged), stored) <= 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_gradients_equal_per_expert_dense_dora(family: str) -> None:
    """The model with DoRA on its experts against the plain model computing with weights stacked from
    each expert's dense DoRA: the same loss, and every pair's and magnitude's gradient."""
    model, _ = dora({"r": R, "alpha": ALPHA, "targets": [], "target_parameters": "all-experts", "rslora": True}, family)
    assert next(iter(next(delta_experts(model, "dora"))[2].values())).scaling == ALPHA / R ** 0.5
    reference = TINY_FAMILIES[family]()
    dense, weights = {}, {}
    for name, experts, per_param in delta_experts(model, "dora"):
        for param_name, delta in per_param.items():
            base = experts.base_weight(param_name)
            assert torch.equal(base, reference.get_parameter(f"{name}.{param_name}"))
            layers = dense[name, param_name] = [dense_dora(delta, base, e) for e in range(delta.shape.experts)]
            stacked = torch.stack([dense_weight(layer) for layer in layers])
            weights[f"{name}.{param_name}"] = stacked.mT if delta.shape.transposed else stacked
            assert rel(experts.effective_weight(param_name), weights[f"{name}.{param_name}"]) <= 1e-6
    batch = ids()
    ours = model(input_ids=batch, labels=batch).loss
    theirs = torch.func.functional_call(reference, weights, (), {"input_ids": batch, "labels": batch}).loss
    assert rel(ours, theirs) <= 1e-6
    ours.backward()
    theirs.backward()
    for (name, param_name), layers in dense.items():
        delta = model.get_submodule(name).deltas["dora"][param_name]
        experts = delta.shape.experts
        grad_a = delta.lora_A.weight.grad.reshape(experts, R, -1)
        grad_b = delta.lora_B.weight.grad.reshape(-1, R, experts).permute(2, 0, 1)
        for e, layer in enumerate(layers):
            expected = layer.deltas["dora"]
            assert rel(delta.magnitude.grad[e], expected.magnitude.grad) <= 1e-5
            assert rel(grad_a[e], expected.lora_A.weight.grad) <= 1e-5
            assert rel(grad_b[e], expected.lora_B.weight.grad) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_training_loss_equals_the_hugging_face_loss(family: str) -> None:
    spec = {"delta": [{"name": "dora", "config": {"targets": "all-linear", "target_parameters": "all-experts",
                                                   "r": R, "alpha": ALPHA}}]}
    assert_family_conformance(TINY_FAMILIES[family], spec)
    if family == "mixtral":  # the rescaling in the weight's dtype: bf16 as close to fp32 as Hugging Face's bf16
        assert_bf16_conformance(TINY_FAMILIES[family], spec)


def test_fresh_dora_leaves_the_experts_unchanged_and_merge_unmerge_restores_them() -> None:
    model, resolved = dora({"r": R, "alpha": ALPHA, "targets": [], "target_parameters": "all-experts"}, train_like=False)
    model.eval()
    batch = ids()
    with torch.no_grad():
        assert rel(model(input_ids=batch).logits, TINY_FAMILIES["mixtral"]()(input_ids=batch).logits) <= 1e-6
    model, resolved = dora({"r": R, "alpha": ALPHA, "targets": [], "target_parameters": "all-experts"})
    model.eval()
    method = resolved.deltas[0].plugin
    experts = model.get_submodule("model.layers.1.mlp.experts").base_layer
    with torch.no_grad():
        logits = model(input_ids=batch).logits
        before = {p: getattr(experts, p).detach().clone() for p in ("gate_up_proj", "down_proj")}
        method.merge(model)
        assert rel(model(input_ids=batch).logits, logits) <= 1e-5
        assert all(rel(getattr(experts, p), before[p]) > 1e-3 for p in before)  # folded into the weights
        method.unmerge(model)
        assert all(rel(getattr(experts, p), before[p]) <= 1e-6 for p in before)
        assert rel(model(input_ids=batch).logits, logits) <= 1e-6


def test_merged_export_holds_it_and_peft_export_is_refused(tmp_path) -> None:
    folder = tmp_path / "base"
    TINY_FAMILIES["mixtral"]().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    model, resolved = dora({"r": R, "alpha": ALPHA, "targets": ["o_proj"], "target_parameters": "all-experts"},
                           base=str(folder))
    model.eval()
    save_adapter(model, resolved, tmp_path / "adapter")
    with pytest.raises(ConfigError, match=r"dora on expert parameters \(target_parameters\) has no PEFT form .*"
                                          r"only the deltatune adapter bundle and `deltatune export --format merged`"):
        export_peft(tmp_path / "adapter", tmp_path / "peft")
    merged = AutoModelForCausalLM.from_pretrained(export_merged(tmp_path / "adapter", tmp_path / "merged").out).eval()
    with torch.no_grad():
        assert rel(merged(input_ids=ids()).logits, model(input_ids=ids()).logits) <= 1e-5


def test_dora_on_nf4_experts_trains_and_merges() -> None:
    model, resolved = dora({"r": 2, "alpha": 4.0, "targets": ["q_proj"], "target_parameters": "all-experts"},
                           quantizer=NF4_FP32, train_like=False)
    for _, experts, per_param in delta_experts(model, "dora"):
        assert set(experts.quantized) == {"gate_up_proj", "down_proj"}
        for param_name, delta in per_param.items():  # m starts at the norm of the dequantized weight
            assert rel(delta.magnitude, delta.rows(experts.base_weight(param_name)).norm(dim=-1)) <= 1e-6
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("experts.deltas.dora.down_proj.magnitude" in n for n in trainable)
    losses = adam_losses(model, ids())
    assert losses[-1] < losses[0] - 0.05
    layer = model.get_submodule("model.layers.0.mlp.experts")
    assert all(delta.lora_B.weight.abs().sum() > 0 for delta in layer.deltas["dora"].values())
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids()).logits
        merge_into_base(model, resolved)
        assert not any(isinstance(m, DeltaExperts) for m in model.modules())
        assert rel(model(input_ids=ids()).logits, logits) <= 1e-4


def test_backward_keeps_no_dense_copy_of_the_expert_weights(monkeypatch) -> None:
    """What the experts layer saves for backward as a tensor (not as a recipe computed again in
    backward): never a tensor of an expert weight's size, DoRA's rescaled weight included."""
    kept: list[tuple[int, ...]] = []
    recipes: list[str] = []

    class Recording(experts_module._RecomputedInBackward):
        def unpack(self, packed):
            recipe = packed.recipe if isinstance(packed, experts_module._Pending) else packed
            if isinstance(recipe, experts_module._Recompute):
                recipes.append(recipe.param_name)
            tensor = super().unpack(packed)
            if recipe is packed or recipe is None:
                kept.append(tuple(tensor.shape))
            return tensor

    monkeypatch.setattr(experts_module, "_RecomputedInBackward", Recording)
    model, _ = dora({"r": R, "alpha": ALPHA, "targets": [], "target_parameters": "all-experts"})
    model(input_ids=ids(), labels=ids()).loss.backward()
    shapes = {tuple(experts.base_weight(p).shape) for _, experts, per_param in delta_experts(model, "dora") for p in per_param}
    assert kept and not shapes & set(kept)
    assert set(recipes) == {"gate_up_proj", "down_proj"}


def test_dora_and_lora_on_one_expert_parameter_is_an_error_naming_both() -> None:
    def build(lora_parameters: list[str]):
        spec = ModelSpec(base="tiny-llama", delta=[
            {"name": "lora", "config": {"targets": [], "target_parameters": lora_parameters}},
            {"name": "dora", "config": {"targets": [], "target_parameters": ["experts.down_proj"]}}])
        return build_model(resolve_spec(spec), TINY_FAMILIES["mixtral"]())

    with pytest.raises(ConfigError, match=r"'lora' and 'dora' both change the expert parameter "
                                          r"'model\.layers\.0\.mlp\.experts\.down_proj'"):
        build(["experts.down_proj"])
    experts = build(["experts.gate_up_proj"]).get_submodule("model.layers.0.mlp.experts")  # apart they compose
    assert (set(experts.deltas["lora"]), set(experts.deltas["dora"])) == ({"gate_up_proj"}, {"down_proj"})
