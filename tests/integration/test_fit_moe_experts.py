"""End to end on a mixture of experts: a real Lightning fit of LoRA on Mixtral's expert parameters
(``target_parameters``), dense and on an NF4 base, → the deltatune adapter → PEFT export →
``peft.PeftModel.from_pretrained`` gives the trained model's logits; a bad expert target stops the run
before any weight is read."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from deltatune.api import ConfigError
from deltatune.data.module import InstructionDataModule
from deltatune.deltas.experts import delta_experts
from deltatune.io.adapter import load_adapter
from deltatune.io.peft import export_peft
from deltatune.model.loading import tiny_tokenizer
from deltatune.testing.families import TINY_FAMILIES
from deltatune.train.module import DeltaTuneModule

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("mixtral")
    TINY_FAMILIES["mixtral"]().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def fit(base: str, folder: Path, delta: dict, quantizer: dict | None = None) -> InstructionDataModule:
    module = DeltaTuneModule(base=base, base_dtype="fp32", compare_base=False, samples=0, delta=[delta],
                             quantizer=quantizer, optimizer={"name": "adamw", "config": {"lr": 0.01}},
                             adapter_dir=str(folder / "adapter"))
    data = InstructionDataModule(
        builder={"name": "alpaca", "config": {"path": str(ROOT / "examples/data/tasks-train.jsonl"), "limit": 32,
                                               "max_length": 64}},
        base=base, batch_size=8, val_fraction=0.25,
    )
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=folder)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3
    return data


EXPERT_LORA = {"name": "lora", "config": {"r": 2, "alpha": 4, "targets": ["q_proj"],
                                          "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}}


def test_fit_lora_on_experts_then_peft_export_reloads_with_the_same_logits(mixtral, tmp_path) -> None:
    data = fit(mixtral, tmp_path, EXPERT_LORA)
    model, _ = load_adapter(tmp_path / "adapter")
    pairs = [d for _, _, per_param in delta_experts(model, "lora") for d in per_param.values()]
    assert len(pairs) == 4 and all(d.lora_B.weight.abs().sum() > 0 for d in pairs)  # the expert pairs trained
    out = export_peft(tmp_path / "adapter", tmp_path / "peft")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(mixtral), out).eval()
    ids = torch.tensor([data.rows("validation")[0]["input_ids"][:48]])
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, peft(input_ids=ids).logits
    assert float((ours - theirs).abs().max() / theirs.abs().max()) <= 1e-4


def test_fit_qlora_on_experts_trains_the_expert_pairs(mixtral, tmp_path) -> None:
    fit(mixtral, tmp_path, EXPERT_LORA, quantizer={"name": "nf4", "config": {"compute_dtype": "fp32"}})
    model, _ = load_adapter(tmp_path / "adapter")
    experts = model.get_submodule("model.layers.0.mlp.experts")
    assert set(experts.quantized) == {"gate_up_proj", "down_proj"}
    assert all(d.lora_B.weight.abs().sum() > 0 for d in experts.deltas["lora"].values())


def test_a_bad_expert_target_stops_the_run_before_weights_load(mixtral, tmp_path) -> None:
    bad = {"name": "lora", "config": {"r": 2, "target_parameters": ["w1"]}}
    with pytest.raises(ConfigError, match="target parameter 'w1' matches no expert parameter"):
        DeltaTuneModule(base=mixtral, base_dtype="fp32", delta=[bad], adapter_dir=str(tmp_path / "adapter"))
