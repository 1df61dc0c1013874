"""Every first-party model family passes the family contract: its tiny models train on their own
Hugging Face loss and gradients under full fine-tuning, LoRA, DoRA and QLoRA, padded and packed."""

from __future__ import annotations

import pytest

from deltatune.testing import ModelFamilyContract
from deltatune.testing.families import TINY_FAMILIES

LORA = {"name": "lora", "config": {"targets": "all-linear", "r": 4, "alpha": 8}}
SPECS = {
    "full fine-tuning": None,
    "lora": {"delta": [LORA]},
    "dora": {"delta": [{"name": "dora", "config": {"targets": "all-linear", "r": 4, "alpha": 8}}]},
    "qlora": {"quantizer": {"name": "nf4", "config": {"compute_dtype": "fp32"}}, "delta": [LORA]},
}


SERVED = {"llama": ("llama", "llama3"), "mistral": ("mistral",), "qwen2": ("qwen2",), "qwen3": ("qwen3",),
          "phi3": ("phi3",), "gpt2": ("gpt2",), "gemma": ("gemma", "gemma2", "gemma3"), "granite": ("granite",),
          "cohere": ("cohere",), "mixtral": ("mixtral",), "qwen_moe": ("qwen2_moe", "qwen3_moe")}
"""Each first-party family → the tiny models (``TINY_FAMILIES`` names) of configs it serves."""


FAST = {"llama": ("llama", "llama3"), "qwen2": ("qwen2",), "qwen3": ("qwen3",)}
"""The tiny models on which a family's fast training forward must run (the tiny Mistral's sliding
window, 8 tokens, is narrower than the conformance examples: its fast forward declines them)."""


class TestFirstPartyFamily(ModelFamilyContract):
    specs = SPECS
    bf16_specs = ("lora",)

    @pytest.fixture(autouse=True, params=list(SERVED))
    def family(self, request: pytest.FixtureRequest) -> None:
        """Run the contract once per first-party family."""
        self.family_name = request.param
        self.tiny_models = {name: TINY_FAMILIES[name] for name in SERVED[request.param]}
        self.fast_models = FAST.get(request.param, ())
