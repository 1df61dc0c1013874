"""The parallel placement of ``adapter`` (He et al., 2022) on real tiny models: beside the family's MLP
and attention modules, the base's outputs at init, exactly ``sublayer(x) + s · up(act(down(x)))`` with
its gradients, a real Lightning fit that lowers the loss and reloads with the same logits, and merge
and foreign exports refused with the bundle-only message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from deltatune.api import ConfigError
from deltatune.cli.main import main
from deltatune.io.adapter import load_adapter
from deltatune.io.merged import export_merged
from deltatune.io.peft import peft_export
from deltatune.model.assembly import ModelSpec, build_model, resolve_spec
from deltatune.testing.families import TINY_FAMILIES
from deltatune_adapter import AdapterConfig

ROOT = Path(__file__).resolve().parents[3]


def build(config: dict, family: str = "llama"):
    config = {"placement": "parallel", **config}
    resolved = resolve_spec(ModelSpec(base="tiny-llama", delta=[{"name": "adapter", "config": config}], base_dtype="fp32"))
    return build_model(resolved, TINY_FAMILIES[family]()), TINY_FAMILIES[family](), resolved


def adapted(model: nn.Module) -> list[str]:
    return sorted({n.split(".deltas.")[0] for n, p in model.named_parameters() if p.requires_grad})


def perturb(model: nn.Module) -> None:
    torch.manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)


@pytest.mark.parametrize("family, beside, sublayers", [
    ("llama", ["mlp"], {"mlp"}), ("llama", ["attention", "mlp"], {"self_attn", "mlp"}),
    ("gpt2", ["mlp", "attention"], {"attn", "mlp"}), ("falcon", ["attention"], {"self_attention"}),
])
def test_sits_beside_the_family_sublayers_and_starts_as_the_base(family, beside, sublayers) -> None:
    model, reference, _ = build({"beside": beside, "bottleneck": 8}, family)
    names = adapted(model)
    assert len(names) == 2 * len(sublayers)  # two blocks
    assert {n.rsplit(".", 1)[-1] for n in names} == sublayers
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-6)
        perturb(model)
        assert (model(ids).logits - reference(ids).logits).abs().max() > 1e-2


def test_output_and_gradients_are_the_scaled_bottleneck_beside_the_mlp() -> None:
    model, reference, _ = build({"bottleneck": 8, "scale": 3.0, "nonlinearity": "gelu"})
    perturb(model)
    mlp, base_mlp = model.model.layers[0].mlp, reference.model.layers[0].mlp
    adapter = mlp.deltas["adapter"]
    x = torch.randn(2, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    down_w, down_b = adapter.down.weight.detach().clone().requires_grad_(True), adapter.down.bias.detach().clone()
    up_w, up_b = adapter.up.weight.detach().clone().requires_grad_(True), adapter.up.bias.detach().clone()
    out = mlp(x)
    expected = base_mlp(x_ref) + 3.0 * F.linear(F.gelu(F.linear(x_ref, down_w, down_b)), up_w, up_b)
    torch.testing.assert_close(out, expected)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(adapter.down.weight.grad, down_w.grad)
    torch.testing.assert_close(adapter.up.weight.grad, up_w.grad)


def test_merge_and_foreign_exports_are_refused_saying_only_the_bundle_holds_it() -> None:
    model, _, resolved = build({"bottleneck": 8})
    with pytest.raises(ConfigError, match="cannot be merged.*only the deltatune adapter bundle"):
        resolved.deltas[0].plugin.merge(model)
    with pytest.raises(ConfigError, match="no PEFT equivalent; it cannot be merged.*only the deltatune adapter bundle"):
        peft_export(model, resolved)


def test_options_are_checked() -> None:
    assert AdapterConfig(placement="parallel").beside == ["mlp"] and AdapterConfig(placement="parallel").scale == 4.0
    with pytest.raises(ValueError, match="scale apply to placement: parallel only"):
        AdapterConfig(scale=2.0)
    with pytest.raises(ValueError, match="not beside linear `targets`"):
        AdapterConfig(placement="parallel", targets=["down_proj"])
    with pytest.raises(ValueError):
        AdapterConfig(placement="parallel", beside=["embeddings"])
    with pytest.raises(ConfigError, match="placement parallel finds no mlp"):
        build({}, "mixtral")  # its experts are fused tensors, not linear modules


def test_a_real_fit_lowers_the_loss_and_the_bundle_reloads_the_trained_model(tmp_path) -> None:
    config = yaml.safe_load((ROOT / "tests" / "configs" / "tiny-lora.yaml").read_text())
    config["model"]["delta"] = [{"name": "adapter", "config": {"placement": "parallel", "beside": ["mlp", "attention"],
                                                               "bottleneck": 16}}]
    config["data"]["builder"]["config"]["path"] = str(ROOT / "examples" / "data" / "tasks-train.jsonl")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    code = main(["fit", "--config", str(tmp_path / "run.yaml"), f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.max_steps=20", "--model.samples=0"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tuned_metrics"]["validation"]["perplexity/loss"] < report["base_metrics"]["validation"]["perplexity/loss"] - 0.1
    model, _ = load_adapter(tmp_path / "adapter")
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    trained = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    assert trained and all(".deltas.adapter." in k for k in trained)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())  # the bundle holds the trained adapter
    ids = torch.arange(3, 30).unsqueeze(0)
    again, _ = load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    with pytest.raises(ConfigError, match="only the deltatune adapter bundle"):
        export_merged(tmp_path / "adapter", tmp_path / "merged")
