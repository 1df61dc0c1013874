"""VeRA against Hugging Face PEFT's ``VeraConfig`` (the oracle): the same seed gives the same shared
projections, the same vectors give the same logits and gradients; and its own invariants: one
shared projection pair, exact reload from the adapter bundle, exact merge/unmerge."""

from __future__ import annotations

import json

import pytest
import torch
from peft import VeraConfig, get_peft_model
from safetensors.torch import load_file

from deltatune.io.adapter import WEIGHTS, load_adapter, save_adapter
from deltatune.deltas.layer import delta_layers
from deltatune.model.loading import tiny_llama
from deltatune.model.assembly import ModelSpec, build_model, resolve_spec
from deltatune.testing import max_relative_difference as rel

TARGETS = ["q_proj", "k_proj", "down_proj", "up_proj"]  # largest in 96 (down_proj), largest out 96 (up_proj)


def spec(**config) -> ModelSpec:
    return ModelSpec(base="tiny-llama", delta=[{"name": "vera", "config": {"r": 8, "targets": TARGETS, **config}}],
                     base_dtype="fp32")


def ours(train_like: bool = True, **config):
    resolved = resolve_spec(spec(**config))
    model = build_model(resolved, tiny_llama())
    if train_like:
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for _, _, delta in delta_layers(model, "vera"):
                delta.vera_lambda_b.copy_(torch.randn(delta.vera_lambda_b.shape, generator=gen))
                delta.vera_lambda_d.add_(torch.randn(delta.vera_lambda_d.shape, generator=gen))
    return model, resolved


def peft_twin(model, seed: int = 0):
    peft = get_peft_model(tiny_llama(), VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=seed))
    with torch.no_grad():
        for name, _, delta in delta_layers(model, "vera"):
            layer = peft.base_model.model.get_submodule(name)
            layer.vera_lambda_b["default"].copy_(delta.vera_lambda_b)
            layer.vera_lambda_d["default"].copy_(delta.vera_lambda_d)
    return peft


def shared(model):
    return next(delta_layers(model, "vera"))[2].projections


@pytest.mark.parametrize("seed", [0, 1234])
def test_projections_are_peft_s_for_the_same_seed(seed: int) -> None:
    model, _ = ours(projection_prng_key=seed)
    peft = peft_twin(model, seed)
    projections = shared(model)
    assert projections.vera_A.shape == (8, 96) and projections.vera_B.shape == (96, 8)  # sized for the largest layer
    assert torch.equal(projections.vera_A, peft.base_model.vera_A["default"])
    assert torch.equal(projections.vera_B, peft.base_model.vera_B["default"])


def test_logits_and_gradients_match_peft() -> None:
    model, _ = ours()
    peft = peft_twin(model)
    batch = torch.randint(0, 250, (2, 19), generator=torch.Generator().manual_seed(0))
    mine, theirs = model(input_ids=batch, labels=batch), peft(input_ids=batch, labels=batch)
    assert rel(mine.logits, theirs.logits) <= 1e-5
    mine.loss.backward()
    theirs.loss.backward()
    for name, _, delta in delta_layers(model, "vera"):
        layer = peft.base_model.model.get_submodule(name)
        assert rel(delta.vera_lambda_b.grad, layer.vera_lambda_b["default"].grad) <= 1e-5
        assert rel(delta.vera_lambda_d.grad, layer.vera_lambda_d["default"].grad) <= 1e-5


def test_initial_vectors_leave_the_model_unchanged() -> None:
    model, _ = ours(train_like=False, d_initial=0.25)
    for _, _, delta in delta_layers(model, "vera"):
        assert torch.all(delta.vera_lambda_d == 0.25) and torch.all(delta.vera_lambda_b == 0)
    batch = torch.arange(20).unsqueeze(0)
    assert rel(model(input_ids=batch).logits, tiny_llama()(input_ids=batch).logits) <= 1e-7


def test_one_shared_frozen_pair_and_only_vectors_train() -> None:
    model, _ = ours()
    deltas = [d for _, _, d in delta_layers(model, "vera")]
    assert len({id(d.projections) for d in deltas}) == 1
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("vera_lambda_b", "vera_lambda_d")) for n in trainable)
    assert sum(trainable.values()) == sum(8 + d.out_features for d in deltas)


def test_reload_reproduces_projections_exactly_even_with_another_seed(tmp_path) -> None:
    model, resolved = ours()
    model.eval()
    batch = torch.arange(30).unsqueeze(0)
    before = model(input_ids=batch).logits
    save_adapter(model, resolved, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / WEIGHTS))
    assert sum(k.endswith("projections.vera_A") for k in saved) == 1  # saved once, not per layer
    manifest = tmp_path / "adapter" / "deltatune.json"
    data = json.loads(manifest.read_text())
    data["delta"][0]["config"]["projection_prng_key"] = 99  # a reload must not depend on the generator
    manifest.write_text(json.dumps(data))
    reloaded, _ = load_adapter(tmp_path / "adapter")
    assert torch.equal(shared(reloaded).vera_A, shared(model).vera_A)
    assert torch.equal(reloaded(input_ids=batch).logits, before)


def test_merge_and_unmerge_are_exact() -> None:
    model, resolved = ours()
    model.eval()
    method = resolved.deltas[0].plugin
    batch = torch.arange(40).unsqueeze(0)
    with torch.no_grad():
        before = model(input_ids=batch).logits
        weights = {n: l.base_layer.weight.clone() for n, l, _ in delta_layers(model, "vera")}
        method.merge(model)
        assert rel(model(input_ids=batch).logits, before) <= 1e-5
        method.unmerge(model)
        for name, layer, _ in delta_layers(model, "vera"):
            assert rel(layer.base_layer.weight, weights[name]) <= 1e-6
