"""Base model loading: the embedded default (real SmolLM2), local folders, refusals."""

from __future__ import annotations

import pytest
import torch

from deltatune.errors import ModelNotFoundError
from deltatune.model.loading import DEFAULT_MODEL, load_base, load_model, resolve_base, tiny_llama


def test_default_model_loads_from_the_cached_safetensors_folder():
    folder = resolve_base(DEFAULT_MODEL)
    assert (folder / "model.safetensors").is_file()
    model, tokenizer = load_base(DEFAULT_MODEL)
    assert "quantization_config" not in model.config.to_dict()
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_folder_without_safetensors_is_refused(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle: must never be loaded
    with pytest.raises(ModelNotFoundError, match="does not unpickle"):
        load_model(str(tmp_path))


def test_missing_model_says_it_never_downloads():
    with pytest.raises(ModelNotFoundError, match="never downloads from the Hugging Face Hub"):
        resolve_base("HuggingFaceTB/SmolLM2-360M")
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        resolve_base("/nowhere/model.gguf")


def test_local_folder_round_trip(tmp_path):
    model = tiny_llama(seed=3)
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
