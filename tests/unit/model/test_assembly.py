"""Model assembly: options are validated before any weight loads; the base is quantized, then the
delta methods wrap it, then everything no method claims is frozen; conflicting claims name both
methods; frozen and trainable weights are held in their own dtypes."""

from __future__ import annotations

import platform
import types
from typing import ClassVar

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from deltatune import hookimpl
from deltatune.deltas.layer import Delta, DeltaLinear, is_quantized
from deltatune.deltas.method import LayerDeltaMethod
from deltatune.errors import ConfigError, ModelNotFoundError
from deltatune.model.assembly import (ModelSpec, build_model, cast_parameters, claim_parameters, compute_dtype,
                                      cpu_supports_bf16, resolve_spec)
from deltatune.model.loading import tiny_llama
from deltatune.testing import isolated_manager


class DiffConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    targets: list[str] | str = ["q_proj"]


class DiffDelta(Delta):
    """A full-rank additive difference (needs the dense base weight's shape only)."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.diff = nn.Parameter(torch.zeros(out_features, in_features))

    def forward(self, x, result, layer):
        return result + nn.functional.linear(x.to(self.diff.dtype), self.diff).to(result.dtype)

    def merge_weight(self, weight, layer):
        return weight + self.diff.detach().float()

    def unmerge_weight(self, weight, layer):
        return weight - self.diff.detach().float()


class DenseDiff(LayerDeltaMethod):
    """A delta method that refuses quantized bases."""

    name: ClassVar[str] = "dense_diff"
    Config: ClassVar[type[BaseModel]] = DiffConfig
    supports_quantized: ClassVar[bool] = False

    def make_delta(self, layer: DeltaLinear, cfg: BaseModel, layer_name: str) -> Delta:
        return DiffDelta(layer.out_features, layer.in_features)


class DiffWithBiases(DenseDiff):
    """Like ``dense_diff``, but also trains every bias: it competes with bitfit for them."""

    name: ClassVar[str] = "diff_with_biases"
    supports_quantized: ClassVar[bool] = True

    def trainable(self, name: str, param: nn.Parameter) -> bool:
        return super().trainable(name, param) or name.endswith(".bias")


def _plugin_module() -> types.ModuleType:
    module = types.ModuleType("deltatune_unit_assembly_methods")

    @hookimpl
    def deltatune_register_delta_methods(register) -> None:
        register(DenseDiff)
        register(DiffWithBiases)

    module.deltatune_register_delta_methods = deltatune_register_delta_methods
    return module


@pytest.fixture(scope="module")
def manager():
    return isolated_manager(_plugin_module())


MISSING_BASE = "/nonexistent/deltatune-unit-base"


# -- resolve_spec ---------------------------------------------------------------------------------
def test_resolve_spec_validates_options_without_loading_weights(manager):
    # a base that does not exist resolves: resolution reads no weights
    resolved = resolve_spec({"base": MISSING_BASE, "quantizer": "nf4", "delta": [{"name": "lora", "config": {"r": 4}}]},
                            manager)
    assert resolved.quantizer.name == "nf4" and [d.name for d in resolved.deltas] == ["lora"]
    assert resolved.deltas[0].cfg.r == 4 and not resolved.full_finetune
    with pytest.raises(ModelNotFoundError):
        build_model(resolved)  # only building touches the base

    with pytest.raises(ConfigError, match=r"delta method 'lora': r: Input should be greater than 0 \(got 0\)"):
        resolve_spec({"base": MISSING_BASE, "delta": [{"name": "lora", "config": {"r": 0}}]}, manager)
    with pytest.raises(ConfigError, match="rank_of_update"):
        resolve_spec({"base": MISSING_BASE, "delta": [{"name": "lora", "config": {"rank_of_update": 4}}]}, manager)
    with pytest.raises(ConfigError, match="no_such_method"):
        resolve_spec({"base": MISSING_BASE, "delta": "no_such_method"}, manager)


def test_resolve_spec_refuses_bad_combinations(manager):
    with pytest.raises(ConfigError, match="'lora' is listed twice"):
        resolve_spec({"base": MISSING_BASE, "delta": ["lora", {"name": "lora", "config": {"r": 2}}]}, manager)
    with pytest.raises(ConfigError, match="'dense_diff' cannot sit on quantizer 'nf4'"):
        resolve_spec({"base": MISSING_BASE, "quantizer": "nf4", "delta": ["dense_diff"]}, manager)
    with pytest.raises(ConfigError, match="quantizer 'nf4' without a delta method"):
        resolve_spec({"base": MISSING_BASE, "quantizer": "nf4"}, manager)
    assert resolve_spec({"base": MISSING_BASE, "delta": "dense_diff"}, manager).deltas[0].name == "dense_diff"
    assert resolve_spec(ModelSpec(base=MISSING_BASE, delta=None), manager).full_finetune


# -- build_model ----------------------------------------------------------------------------------
def test_build_model_quantizes_then_wraps_then_freezes(manager):
    resolved = resolve_spec({"base": "tiny-llama", "base_dtype": "fp32", "quantizer": "nf4",
                             "delta": [{"name": "lora", "config": {"r": 4, "targets": ["q_proj", "v_proj"]}}]}, manager)
    model = build_model(resolved)
    nf4 = resolved.quantizer.plugin

    wrapped = {name: m for name, m in model.named_modules() if isinstance(m, DeltaLinear)}
    assert len(wrapped) == 4 and all(name.endswith(("q_proj", "v_proj")) for name in wrapped)
    # the quantizer ran first: the layers the deltas wrap hold quantized bases, the deltas' own layers are dense
    assert all(nf4.is_quantized(m.base_layer) and is_quantized(m.base_layer) for m in wrapped.values())
    own_layers = [m for name, m in model.named_modules() if ".deltas." in name and isinstance(m, nn.Linear)]
    assert own_layers and not any(nf4.is_quantized(m) for m in own_layers)
    untouched = model.get_submodule("model.layers.0.mlp.up_proj")
    assert nf4.is_quantized(untouched) and not isinstance(untouched, DeltaLinear)

    # freezing came last: exactly the deltas' parameters train, in fp32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if ".deltas.lora." in n}
    assert len(trainable) == 8 and all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    ids = torch.tensor([[5, 9, 13, 21]])
    model(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_build_model_full_finetune_trains_every_floating_parameter(manager):
    model = build_model(resolve_spec({"base": "tiny-llama", "base_dtype": "fp32"}, manager))
    params = list(model.parameters())
    assert params and all(p.requires_grad for p in params)
    assert not any(isinstance(m, DeltaLinear) for m in model.modules())


# -- claim_parameters -----------------------------------------------------------------------------
def test_claim_parameters_names_both_methods_and_the_module(manager):
    resolved = resolve_spec({"base": "tiny-llama", "delta": ["bitfit", "diff_with_biases"]}, manager)
    model = tiny_llama()
    for delta in resolved.deltas:
        delta.plugin.apply(model, delta.cfg)
    with pytest.raises(ConfigError) as error:
        claim_parameters(model, resolved)
    message = str(error.value)
    assert "'bitfit'" in message and "'diff_with_biases'" in message
    assert "model.layers.0.self_attn.q_proj" in message


def test_claim_parameters_returns_owners_and_freezes_the_rest(manager):
    resolved = resolve_spec({"base": "tiny-llama", "delta": ["dense_diff", {"name": "bitfit", "config":
                                                                           {"targets": ["o_proj"]}}]}, manager)
    model = tiny_llama()
    for delta in resolved.deltas:
        delta.plugin.apply(model, delta.cfg)
    owners = claim_parameters(model, resolved)
    assert owners == {
        **{f"model.layers.{i}.self_attn.q_proj.deltas.dense_diff.diff": "dense_diff" for i in range(2)},
        **{f"model.layers.{i}.self_attn.o_proj.bias": "bitfit" for i in range(2)},
    }
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(owners)


def test_claim_parameters_refuses_a_run_that_trains_nothing(manager):
    resolved = resolve_spec({"base": "tiny-llama", "delta": "dense_diff"}, manager)
    with pytest.raises(ConfigError, match="no parameter is trainable"):
        claim_parameters(tiny_llama(), resolved)  # the method was never applied: it claims nothing


# -- precision ------------------------------------------------------------------------------------
def test_cast_parameters_holds_frozen_and_trainable_weights_in_their_dtypes():
    model = tiny_llama()
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith("q_proj.weight"))
    cast_parameters(model, torch.bfloat16, torch.float32)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {dtypes[n] for n in dtypes if n.endswith("q_proj.weight")} == {torch.float32}
    assert {dtypes[n] for n in dtypes if not n.endswith("q_proj.weight")} == {torch.bfloat16}

    cast_parameters(model, torch.float32, torch.bfloat16)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.float32}


def test_cast_parameters_leaves_quantized_weights_packed(manager):
    resolved = resolve_spec({"base": "tiny-llama", "base_dtype": "fp32", "quantizer": "nf4", "delta": "lora"}, manager)
    model = build_model(resolved)
    packed = {n: (p.dtype, p.data.clone()) for n, p in model.named_parameters() if hasattr(p, "quant_state")}
    assert packed
    cast_parameters(model, torch.bfloat16, torch.float32)
    for name, param in model.named_parameters():
        if name in packed:
            assert param.dtype == packed[name][0] and torch.equal(param.data, packed[name][1])


def test_compute_dtype():
    assert compute_dtype("bf16") == torch.bfloat16
    assert compute_dtype("fp32") == torch.float32
    if torch.cuda.is_available():
        native = torch.cuda.is_bf16_supported()
    else:  # what /proc/cpuinfo says of this CPU's bf16 instructions
        with open("/proc/cpuinfo") as fh:
            flags = set(fh.read().split())
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        native = bool({"avx512_bf16", "amx_bf16"} & flags) if x86 else "bf16" in flags
        assert cpu_supports_bf16() == native
    assert compute_dtype("auto") == (torch.bfloat16 if native else torch.float32)
