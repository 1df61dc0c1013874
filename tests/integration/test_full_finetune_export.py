"""A full fine-tune (no delta method) saves the whole trained model, and `deltatune export --format
merged` writes it as a plain Hugging Face folder that ``transformers`` alone loads with the trained
model's logits; `--format peft` refuses it and points to the merged export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from deltatune.io.adapter import read_manifest
from deltatune.cli.main import main
from deltatune.model.loading import tiny_llama
from deltatune.train.module import DeltaTuneModule

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "configs" / "tiny-lora.yaml"
IDS = torch.randint(0, 250, (2, 19), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A tiny full fine-tune with LOMO (tied embedding, activation checkpointing) through `deltatune fit`,
    with the logits of the trained model, taken in memory before the run saves it."""
    root = tmp_path_factory.mktemp("full-run")
    trained: dict[str, torch.Tensor] = {}
    original = DeltaTuneModule.on_fit_end

    def record(self: DeltaTuneModule) -> None:
        self.model.eval()
        with torch.no_grad():
            trained["logits"] = self.model(input_ids=IDS).logits.float()
        trained["embedding"] = self.model.get_input_embeddings().weight.detach().clone()
        self.model.train()
        original(self)

    patch = pytest.MonkeyPatch()
    patch.setattr(DeltaTuneModule, "on_fit_end", record)
    try:
        code = main(["fit", "--config", str(CONFIG), f"--trainer.default_root_dir={root}",
                     "--model.base=tiny-llama-tied", "--model.delta=[]", "--model.gradient_checkpointing=true",
                     "--model.optimizer={name: lomo, config: {lr: 0.05}}", "--model.samples=0",
                     "--model.compare_base=false", "--trainer.max_steps=4"])
    finally:
        patch.undo()
    assert code == 0
    return root, trained


def test_a_full_fine_tune_saves_the_whole_trained_model(full_run):
    root, trained = full_run
    manifest = read_manifest(root / "adapter")
    assert manifest["delta"] == [] and manifest["weights"] == "model"
    assert (root / "adapter" / "model" / "model.safetensors").is_file()
    untouched = tiny_llama(tie_word_embeddings=True).get_input_embeddings().weight
    assert not torch.allclose(trained["embedding"], untouched), "training did not move the weights"


def test_merged_export_is_a_plain_hugging_face_model_with_the_trained_logits(full_run, tmp_path, capsys):
    root, trained = full_run
    out = tmp_path / "merged"
    assert main(["export", "--adapter", str(root / "adapter"), "--format", "merged", "--out", str(out)]) == 0
    assert "full fine-tune" in capsys.readouterr().out
    assert not (out / "deltatune.json").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["use_cache"] is True, "the training-time activation checkpointing leaked into the saved config"

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    model.eval()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        logits = model(input_ids=IDS).logits.float()
    torch.testing.assert_close(logits, trained["logits"], rtol=0, atol=1e-5)


def test_peft_export_of_a_full_fine_tune_is_a_clear_error_pointing_to_merged(full_run, tmp_path, capsys):
    root, _ = full_run
    out = tmp_path / "peft"
    assert main(["export", "--adapter", str(root / "adapter"), "--format", "peft", "--out", str(out)]) == 1
    message = capsys.readouterr().err
    assert "full fine-tune" in message and "--format merged" in message
    assert not out.exists()
