"""QLoRA and its relatives end to end: delta methods training on an NF4 (4-bit) base.

Real bitsandbytes kernels on the tiny Llama, assembled the way ``fit`` assembles a run
(:func:`deltatune.model.assembly.resolve_spec` + :func:`~deltatune.model.assembly.build_model`, frozen base in
the compute dtype the core picks), trained with the ``adamw`` plugin's optimizer on the core's
:func:`deltatune.train.loss.token_loss`. Checked for QLoRA (nf4 + lora), QDoRA (nf4 + dora),
nf4 + vera, nf4 + bitfit and nf4 + lora(attention) + bitfit:

* a few steps lower the loss, change exactly the claimed tensors and leave the 4-bit weights alone;
* the saved adapter, reloaded onto a base quantized the same way, gives bit-identical logits (and
  onto a base quantized differently, different ones);
* delta methods see base weights only through the quantizer's dequantization;
* trainable tensors stay fp32 while the 4-bit layers compute in bf16;
* the merged export's logit report is measured, not assumed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import deltatune_nf4
from deltatune.deltas.layer import base_weight, delta_layers
from deltatune.io.adapter import load_adapter, load_adapter_weights, save_adapter
from deltatune.plugin.resolve import resolve
from deltatune.io.adapter import load_for_export
from deltatune.io.merged import PROMPTS, export_merged, model_logits, prompt_batch
from deltatune.train.loss import token_loss
from deltatune.model.loading import tiny_llama, tiny_tokenizer
from deltatune.data.packing import collate
from deltatune.model.assembly import ModelSpec, build_model, compute_context, resolve_spec
from deltatune.testing import logits_of, sample_rows

NF4 = {"name": "nf4", "config": {"double_quant": True}}  # compute dtype "auto", as runs use it
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA = {"name": "lora", "config": {"r": 8, "alpha": 16, "targets": "all-linear"}}
DORA = {"name": "dora", "config": {"r": 8, "alpha": 16, "targets": "all-linear"}}

# name -> (delta methods, AdamW learning rate)
COMBINATIONS: dict[str, tuple[list, float]] = {
    "qlora": ([LORA], 1e-2),
    "qdora": ([DORA], 1e-2),
    "nf4+vera": ([{"name": "vera", "config": {"r": 16, "targets": "all-linear"}}], 1e-1),
    "nf4+bitfit": (["bitfit"], 1e-2),
    "nf4+lora(attention)+bitfit": ([{"name": "lora", "config": {"r": 8, "alpha": 16, "targets": ATTN}}, "bitfit"], 1e-2),
}
STEPS = 8


def build(delta: list, quantizer: dict | None = NF4, base_dtype: str = "auto"):
    """``(model, resolved)`` on the tiny Llama; deltas initialised from a fixed seed."""
    resolved = resolve_spec(ModelSpec(base="tiny-llama", quantizer=quantizer, delta=delta, base_dtype=base_dtype))
    torch.manual_seed(0)  # LoRA's A (and DoRA's) draw from the global generator
    return build_model(resolved), resolved


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """Instruction rows as the data module makes them: prompt masked, response labelled."""
    tokenizer = tiny_tokenizer()
    return collate(sample_rows(tokenizer), tokenizer.pad_token_id)


def quantized_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if deltatune_nf4.is_quantized(m)}


def train(model: torch.nn.Module, batch: dict[str, torch.Tensor], lr: float, steps: int = STEPS) -> list[float]:
    """``steps`` AdamW steps (the ``adamw`` plugin's optimizer and schedule) on the core's token loss,
    as ``DeltaTuneModule.training_step`` computes it; the losses before each step."""
    adamw = resolve("optimizer", {"name": "adamw", "config": {"lr": lr}})
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer, scheduler = adamw.plugin.create(named, adamw.cfg, steps)
    losses = []
    model.train()
    for _ in range(steps):
        with compute_context(model):
            total, count = token_loss(model, batch)
        loss = total / count
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


# -- training and reloading -----------------------------------------------------------------------
@pytest.mark.parametrize("combo", list(COMBINATIONS))
def test_trains_on_the_4bit_base_and_reloads_bit_exactly(tmp_path: Path, batch, combo: str) -> None:
    delta, lr = COMBINATIONS[combo]
    model, resolved = build(delta)
    quantized = quantized_layers(model)
    assert len(quantized) == 2 * 7  # every projection of both layers is 4-bit; the LM head stays dense
    packed = {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for n, m in quantized.items()}
    claimed = {n for n, p in model.named_parameters() if p.requires_grad}
    assert claimed and all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in claimed)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    losses = train(model, batch, lr)

    assert all(torch.isfinite(torch.tensor(losses)))
    # the tiny model's frozen random LM head keeps its logits small, so the loss cannot fall far below
    # ln(vocabulary) = 5.6; every method gets about a third of the way there to ~5.2
    assert losses[-1] < losses[0] - 0.25, f"{combo}: loss did not fall: {losses}"
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= STEPS - 3, f"{combo}: loss is not falling: {losses}"
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == claimed  # every claimed tensor trained, nothing else moved
    for name, layer in quantized_layers(model).items():  # the 4-bit weights are untouched
        assert torch.equal(layer.weight.data, packed[name][0])
        assert torch.equal(layer.weight.quant_state.absmax, packed[name][1])
    # trainable tensors stay fp32 even where the 4-bit layers compute in bf16 (BitFit's biases live in them)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in claimed)

    logits = logits_of(model, batch)
    save_adapter(model, resolved, tmp_path / "adapter")
    reloaded, again = load_adapter(tmp_path / "adapter")
    assert again.quantizer is not None and again.quantizer.cfg == resolved.quantizer.cfg
    assert set(quantized_layers(reloaded)) == set(quantized)
    assert torch.equal(logits_of(reloaded, batch), logits)


def test_reloading_needs_the_same_quantization(tmp_path: Path, batch) -> None:
    """The adapter's logits are those of *its* 4-bit base: onto a base quantized differently (no
    double quantization) the same tensors load, but the logits move."""
    model, resolved = build([LORA])
    train(model, batch, 1e-2, steps=2)
    save_adapter(model, resolved, tmp_path / "adapter")
    other = {"name": "nf4", "config": {"double_quant": False}}
    elsewhere, resolved_elsewhere = build([LORA], quantizer=other)
    load_adapter_weights(elsewhere, resolved_elsewhere, tmp_path / "adapter")
    same, _ = load_adapter(tmp_path / "adapter")
    assert torch.equal(logits_of(same, batch), logits_of(model, batch))
    assert not torch.equal(logits_of(elsewhere, batch), logits_of(model, batch))


def test_trainable_bias_on_a_4bit_layer_stays_fp32_with_bf16_compute(batch) -> None:
    """bitsandbytes' ``Linear4bit.forward`` casts its bias parameter to the compute dtype in place;
    nf4's layers must not, or BitFit's fp32 biases (and their gradients and AdamW state) became bf16."""
    model, _ = build(["bitfit"], quantizer={"name": "nf4", "config": {"compute_dtype": "bf16"}})
    layer = model.model.layers[0].self_attn.q_proj
    assert deltatune_nf4.is_quantized(layer) and layer.compute_dtype == torch.bfloat16
    train(model, batch, 1e-2, steps=2)
    assert layer.bias.dtype == torch.float32 and layer.bias.requires_grad
    # the update is not lost to bf16 rounding: a step far below bf16's resolution still lands
    with torch.no_grad():
        layer.bias.fill_(1.0)
    model.train()
    with compute_context(model):
        total, count = token_loss(model, batch)
    (total / count).backward()
    assert layer.bias.grad.dtype == torch.float32
    with torch.no_grad():
        layer.bias.sub_(1e-4 * layer.bias.grad.sign())
    assert layer.bias.dtype == torch.float32 and not torch.all(layer.bias == 1.0)


# -- base weights only through the quantizer ------------------------------------------------------
def test_dora_magnitude_starts_at_the_row_norms_of_the_dequantized_weights() -> None:
    model, _ = build([DORA])
    dense = tiny_llama()
    found = 0
    for name, layer, delta in delta_layers(model, "dora"):
        assert deltatune_nf4.is_quantized(layer.base_layer)
        dequantized = deltatune_nf4.dequantize_weight(layer.base_layer)
        assert torch.equal(delta.magnitude.detach(), dequantized.norm(dim=1))
        original = dense.get_submodule(name).weight.detach().norm(dim=1)
        assert not torch.equal(delta.magnitude.detach(), original)  # 4-bit rounding moved the norms
        found += 1
    assert found == 2 * 7


def test_delta_methods_read_base_weights_only_through_dequantize_weight(monkeypatch, batch) -> None:
    """Make the quantizer's dequantization report *twice* the true weights: everything a method
    derives from base weights (DoRA's magnitude and norm, merged weights) follows, so nothing reads
    the packed 4-bit data (or a dense copy of it) behind the quantizer's back."""
    calls = []
    true_dequantize = deltatune_nf4.NF4.dequantize_weight

    def doubled(self, module, dtype=torch.float32):
        calls.append(module)
        return 2 * true_dequantize(self, module, dtype)

    monkeypatch.setattr(deltatune_nf4.NF4, "dequantize_weight", doubled)
    fp32 = {"name": "nf4", "config": {"compute_dtype": "fp32"}}  # so that merging stays in fp32
    model, resolved = build([DORA], quantizer=fp32, base_dtype="fp32")
    assert len(calls) == 2 * 7  # DoRA's magnitude: one dequantization per layer
    true = {name: true_dequantize(None, layer.base_layer) for name, layer, _ in delta_layers(model, "dora")}
    for name, layer, delta in delta_layers(model, "dora"):
        assert torch.equal(delta.magnitude.detach(), (2 * true[name]).norm(dim=1))
        torch.testing.assert_close(delta.weight_norm(layer), (2 * true[name]).norm(dim=1))  # B = 0: n = ||W||
        assert torch.equal(base_weight(layer), 2 * true[name])

    calls.clear()
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    assert len(calls) == 2 * 7  # DoRA's norm n in the forward pass, through the quantizer

    resolved.deltas[0].plugin.merge(model)  # the merged dense weight starts from the dequantization
    for name, layer, _ in delta_layers(model, "dora"):
        assert not deltatune_nf4.is_quantized(layer.base_layer)
        torch.testing.assert_close(layer.base_layer.weight, 2 * true[name])  # B = 0, m = n: W' = W


@pytest.mark.parametrize("delta", [[LORA], [{"name": "vera", "config": {"r": 16, "targets": "all-linear"}}], ["bitfit"]])
def test_additive_methods_never_need_base_weights(monkeypatch, batch, delta) -> None:
    """LoRA, VeRA and BitFit add to the base output: training them never dequantizes a whole weight
    (the 4-bit layers' own kernels do their work)."""
    calls = []
    true_dequantize = deltatune_nf4.NF4.dequantize_weight
    monkeypatch.setattr(deltatune_nf4.NF4, "dequantize_weight",
                        lambda self, module, dtype=torch.float32: calls.append(module) or true_dequantize(self, module, dtype))
    model, _ = build(delta)
    train(model, batch, 1e-2, steps=1)
    assert calls == []


# -- merged export from a 4-bit base ----------------------------------------------------------------
def trained_qlora(folder: Path, scale: float) -> None:
    """A QLoRA adapter with trained-like weights (``B`` non-zero, update ``scale``-sized), saved."""
    model, resolved = build([LORA])
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * scale)
    save_adapter(model, resolved, folder)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, object]:
    """Plain and requantized merged exports of two QLoRA adapters that differ only in their weights."""
    root = tmp_path_factory.mktemp("qlora-export")
    reports = {}
    for scale in (0.03, 0.06):
        trained_qlora(root / f"adapter-{scale}", scale)
        reports[f"merged-{scale}"] = export_merged(root / f"adapter-{scale}", root / f"merged-{scale}")
        reports[f"nf4-{scale}"] = export_merged(root / f"adapter-{scale}", root / f"nf4-{scale}", requantize=True)
    reports["root"] = root
    return reports


def written_logits(folder: Path) -> list[torch.Tensor]:
    written = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True,
                                                   device_map="cpu").eval()
    for module in written.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model_logits(written, prompt_batch(tiny_tokenizer(), PROMPTS))


@pytest.mark.parametrize("kind", ["merged", "nf4"])
def test_merge_report_is_the_measured_logit_difference(exports, kind) -> None:
    """The report's number is the one measured here: the adapter model (fp32 base, 4-bit layers
    dequantized in fp32) against the written folder reloaded by ``transformers``."""
    root, report = exports["root"], exports[f"{kind}-0.03"]
    adapter, _ = load_for_export(root / "adapter-0.03", None)
    assert all(m.compute_dtype == torch.float32 for m in quantized_layers(adapter).values())
    reference = model_logits(adapter, prompt_batch(tiny_tokenizer(), PROMPTS))
    measured = max(float((a - b).abs().max()) for a, b in zip(reference, written_logits(root / f"{kind}-0.03")))
    assert report.max_abs_logit_diff == pytest.approx(measured, rel=1e-6, abs=1e-7)
    assert report.requantized == (kind == "nf4") and report.methods == ["lora"]


def test_merge_report_follows_the_adapter_and_requantizing_costs_more(exports) -> None:
    for scale in (0.03, 0.06):
        merged, nf4 = exports[f"merged-{scale}"], exports[f"nf4-{scale}"]
        # merging in fp32 is exact up to rounding; re-rounding the merged weights to 4 bits is not
        assert 0 < merged.max_abs_logit_diff <= 1e-5 * merged.max_abs_logit
        assert nf4.max_abs_logit_diff > 100 * merged.max_abs_logit_diff
        assert nf4.max_abs_logit_diff < 0.5 * nf4.max_abs_logit
    # other adapter weights, other numbers: nothing in the report is a constant
    for kind in ("merged", "nf4"):
        assert exports[f"{kind}-0.03"].max_abs_logit_diff != exports[f"{kind}-0.06"].max_abs_logit_diff
        assert exports[f"{kind}-0.03"].max_abs_logit != exports[f"{kind}-0.06"].max_abs_logit
    # a larger update moves the merged weights further from the 4-bit grid they started on
    assert exports["nf4-0.06"].max_abs_logit_diff > exports["nf4-0.03"].max_abs_logit_diff
