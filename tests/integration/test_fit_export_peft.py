"""End to end: a real Lightning fit (DoRA on the tiny model) → the deltatune adapter → PEFT export →
``peft.PeftModel.from_pretrained`` gives the trained model's logits."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from peft import PeftModel

from deltatune.io.adapter import load_adapter
from deltatune.data.module import InstructionDataModule
from deltatune.io.peft import export_peft
from deltatune.deltas.layer import delta_layers
from deltatune.model.loading import tiny_llama
from deltatune.train.module import DeltaTuneModule

ROOT = Path(__file__).resolve().parents[2]


def test_fit_then_peft_export_reloads_in_peft_with_the_same_logits(tmp_path) -> None:
    module = DeltaTuneModule(
        base="tiny-llama", base_dtype="fp32", compare_base=False, samples=0,
        delta=[{"name": "dora", "config": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]}}],
        optimizer={"name": "adamw", "config": {"lr": 0.01}}, adapter_dir=str(tmp_path / "adapter"),
    )
    data = InstructionDataModule(
        builder={"name": "alpaca", "config": {"path": str(ROOT / "examples/data/tasks-train.jsonl"), "limit": 32,
                                               "max_length": 64}},
        base="tiny-llama", batch_size=8, val_fraction=0.25,
    )
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4

    model, _ = load_adapter(tmp_path / "adapter")
    assert all(delta.lora_B.weight.abs().sum() > 0 for _, _, delta in delta_layers(model, "dora"))  # it trained
    out = export_peft(tmp_path / "adapter", tmp_path / "peft")
    peft = PeftModel.from_pretrained(tiny_llama(), out).eval()
    ids = torch.tensor([data.rows("validation")[0]["input_ids"][:48]])
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, peft(input_ids=ids).logits
    assert float((ours - theirs).abs().max() / theirs.abs().max()) <= 1e-5
