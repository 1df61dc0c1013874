"""Real tiny Lightning runs with the virtual-token methods (prefix-tuning, prompt tuning, P-tuning), alone
and prefix-tuning with LoRA: they train, save and reload; packing is refused before any weight loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from deltatune.cli.main import main
from deltatune.io.adapter import load_adapter, read_manifest
from deltatune.model.loading import tiny_tokenizer
from deltatune.api import ConfigError
from deltatune.io.adapter import save_adapter
from deltatune.io.merged import export_merged
from deltatune.model.loading import tiny_llama
from deltatune.testing import logits_of, sample_batch, trained_like
from deltatune.model.families import family_fast_forward, installed_families, serving_family

ROOT = Path(__file__).resolve().parents[2]
METHODS = [("prefix_tuning", {"num_virtual_tokens": 4}), ("prompt_tuning", {"num_virtual_tokens": 4}),
           ("p_tuning", {"num_virtual_tokens": 3, "encoder_hidden_size": 16})]
QUIET = ["--trainer.enable_progress_bar=false", "--model.samples=0"]


def write_config(folder: Path, delta: list, **data) -> Path:
    config = {
        "model": {"base": "tiny-llama", "base_dtype": "fp32", "delta": delta,
                  "optimizer": {"name": "adamw", "config": {"lr": 0.01}}},
        "data": {"builder": {"name": "alpaca", "config": {"path": str(ROOT / "examples/data/tasks-train.jsonl"),
                                                          "limit": 48, "max_length": 96}},
                 "batch_size": 8, "val_fraction": 0.25, **data},
        "trainer": {"max_steps": 8, "accelerator": "cpu", "logger": False},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("delta", [
    [{"name": "prefix_tuning", "config": {"num_virtual_tokens": 4, "prefix_projection": True}}],
    [{"name": "prefix_tuning", "config": {"num_virtual_tokens": 4}},
     {"name": "lora", "config": {"targets": ["q_proj", "v_proj"], "r": 4}}],
    [{"name": "prompt_tuning", "config": {"num_virtual_tokens": 4}}],
    [{"name": "p_tuning", "config": {"num_virtual_tokens": 4, "encoder": "lstm", "encoder_hidden_size": 16}}],
], ids=["prefix-projection", "prefix+lora", "prompt", "p-tuning-lstm"])
def test_fit_trains_saves_and_reloads_with_the_same_logits(tmp_path, delta):
    config = write_config(tmp_path, delta)
    assert main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}", *QUIET]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    base, tuned = (report[k]["validation"]["perplexity/loss"] for k in ("base_metrics", "tuned_metrics"))
    assert tuned < base  # the virtual tokens (and LoRA) learned something in 8 steps
    adapter = tmp_path / "adapter"
    assert [d["name"] for d in read_manifest(adapter)["delta"]] == [d["name"] for d in delta]
    model, _ = load_adapter(adapter)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    # checkpoints hold what trains (an encoder too, which the adapter drops), so a run resumes exactly
    own = [k for k in checkpoint["state_dict"] if f".virtual_tokens.{delta[0]['name']}." in k]
    encoded = delta[0]["name"] == "p_tuning" or delta[0]["config"].get("prefix_projection")
    assert own and any(".encoder." in k for k in own) == bool(encoded)
    if len(delta) == 2:
        assert any(".deltas.lora." in k for k in checkpoint["state_dict"])
    batch = sample_batch(tiny_tokenizer())
    again, _ = load_adapter(adapter)
    assert torch.equal(logits_of(model, batch), logits_of(again, batch))


def test_packing_is_refused_before_any_weight_loads(tmp_path, capsys):
    config = write_config(tmp_path, [{"name": "prefix_tuning"}], packing=True)
    assert main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}", *QUIET]) != 0
    out = capsys.readouterr()
    errors = [line for line in (out.out + out.err).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "prefix_tuning" in errors[0] and "data.packing: false" in errors[0]


def test_the_packing_refusal_comes_before_the_model_is_built(tmp_path):
    import lightning as L

    from deltatune.api import ConfigError
    from deltatune.data.module import InstructionDataModule
    from deltatune.train.module import DeltaTuneModule

    module = DeltaTuneModule(base="tiny-llama", delta=[{"name": "prefix_tuning"}])
    data = InstructionDataModule(builder={"name": "alpaca", "config": {"path": str(ROOT / "examples/data/tasks-train.jsonl"),
                                                                         "limit": 16}}, base="tiny-llama", packing=True)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match="prefix_tuning.*packing"):
        trainer.fit(module, data)
    assert module.model is None  # configure_model never ran: no weight was loaded


@pytest.mark.parametrize(("name", "config"), METHODS, ids=[m[0] for m in METHODS])
def test_generation_puts_the_virtual_tokens_in_every_prompts_cache(plugin_manager, tiny_tokenizer, name, config):
    """Cached greedy generation (left-padded prompts of different lengths) equals greedy decoding that
    recomputes the whole sequence at every step."""
    model, _ = trained_like(plugin_manager, [{"name": name, "config": config}])
    model.eval()
    prompts = tiny_tokenizer(["hello there", "a much longer prompt here"], return_tensors="pt", padding=True,
                             padding_side="left")
    with torch.no_grad():
        generated = model.generate(**prompts, max_new_tokens=5, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
        ids, mask = prompts["input_ids"], prompts["attention_mask"]
        for _ in range(5):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize(("name", "config"), METHODS, ids=[m[0] for m in METHODS])
def test_the_generic_forward_trains_them_and_a_merged_export_is_refused(plugin_manager, tmp_path, name, config):
    plain = tiny_llama()
    family, _ = serving_family(plain.config, installed_families())
    assert family_fast_forward(plain, family) is not None  # the plain tiny Llama has a fast training forward
    model, resolved = trained_like(plugin_manager, [{"name": name, "config": config}])
    assert family_fast_forward(model, family) is None
    save_adapter(model, resolved, tmp_path / "adapter")
    with pytest.raises(ConfigError, match=f"{name}.*cannot be merged"):
        export_merged(tmp_path / "adapter", tmp_path / "merged", manager=plugin_manager)


@pytest.mark.parametrize(("name", "config"), METHODS, ids=[m[0] for m in METHODS])
def test_evaluation_sees_the_virtual_tokens_the_same_in_any_batch(plugin_manager, tiny_tokenizer, name, config):
    """The core's batched generation (left padding) and sequence log-likelihoods (right padding) give
    each row what it gets alone, and differ from the base model's."""
    from deltatune.evaluation.helpers import sequence_logprobs
    from deltatune.model.generation import generate
    from deltatune.testing import sample_rows

    model, _ = trained_like(plugin_manager, [{"name": name, "config": config}], scale=0.5)
    prompts = ["reverse: a b c", "sort the letters of this much longer prompt: d a c b"]
    together = generate(model, tiny_tokenizer, prompts, max_new_tokens=6)
    assert together == [generate(model, tiny_tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    rows = sample_rows(tiny_tokenizer)
    scores = sequence_logprobs(model, rows, tiny_tokenizer.pad_token_id, batch_size=len(rows))
    alone = [sequence_logprobs(model, [row], tiny_tokenizer.pad_token_id)[0] for row in rows]
    assert scores == pytest.approx(alone, rel=1e-5)
    assert scores != pytest.approx(sequence_logprobs(tiny_llama(), rows, tiny_tokenizer.pad_token_id), rel=1e-3)


def test_a_prefix_with_gradient_checkpointing_is_refused_before_any_weight_loads(plugin_manager, tiny_tokenizer):
    """Checkpointed layers run without the KV cache that holds a prefix; input embeddings are unaffected."""
    from deltatune.train.loss import mean_loss
    from deltatune.train.module import DeltaTuneModule

    with pytest.raises(ConfigError, match="prefix_tuning.*gradient_checkpointing: false"):
        DeltaTuneModule(base="tiny-llama", delta=[{"name": "prefix_tuning"}], gradient_checkpointing=True)
    DeltaTuneModule(base="tiny-llama", delta=[{"name": "prompt_tuning"}], gradient_checkpointing=True)
    batch = sample_batch(tiny_tokenizer)
    for name, refused in (("prefix_tuning", True), ("prompt_tuning", False)):
        model, _ = trained_like(plugin_manager, [{"name": name, "config": {"num_virtual_tokens": 4}}])
        model.train()
        plain = mean_loss(model, batch)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if refused:
            with pytest.raises(ConfigError, match=f"{name}.*gradient checkpointing"):
                mean_loss(model, batch)
        else:
            torch.testing.assert_close(mean_loss(model, batch), plain)


def test_a_text_start_whose_tokenizer_does_not_load_is_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "no-tokenizer"
    delta = [{"name": "prefix_tuning", "config": {"init": "text", "init_text": "Sort it", "tokenizer": str(missing)}}]
    config = write_config(tmp_path, delta)
    assert main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'run'}", *QUIET]) != 0
    out = capsys.readouterr()
    errors = [line for line in (out.out + out.err).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "prefix_tuning" in errors[0] and str(missing) in errors[0], errors
    assert "Traceback" not in out.out + out.err
    assert not (tmp_path / "run" / "adapter").exists()
