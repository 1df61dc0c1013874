"""deltatune.model.generation.generate: greedy by default; seeded sampling that leaves the global random
state alone; stop strings; whitespace kept on request — on the real tiny Llama."""

from __future__ import annotations

import pytest
import torch

from deltatune.model.generation import cut_at_stop, generate
from deltatune.model.loading import tiny_llama, tiny_tokenizer

PROMPTS = ["def add(a, b):\n", "hello", "x = [1, 2"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_llama().eval()


def test_sampling_is_seeded_and_leaves_the_global_random_state_alone(model, tokenizer):
    state = torch.get_rng_state()
    first = generate(model, tokenizer, PROMPTS, 12, temperature=1.0, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate(model, tokenizer, PROMPTS, 12, temperature=1.0, seed=3) == first
    assert generate(model, tokenizer, PROMPTS, 12, temperature=1.0, seed=4) != first
    greedy = generate(model, tokenizer, PROMPTS, 12)
    assert greedy != first and generate(model, tokenizer, PROMPTS, 12, seed=4) == greedy


def test_completions_end_before_the_first_stop_string(model, tokenizer):
    full = generate(model, tokenizer, PROMPTS, 16, strip=False)
    assert generate(model, tokenizer, PROMPTS, 16) == [text.strip() for text in full]
    stop = full[0][3:5]  # a string the first completion contains
    stopped = generate(model, tokenizer, PROMPTS, 16, stop=[stop], strip=False)
    assert stopped[0] == full[0][:full[0].index(stop)].rstrip()
    assert all(stop not in text for text in stopped)


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("    return 1\n#x\ndef g", ["\ndef ", "\n#"]) == "    return 1"
    assert cut_at_stop("abc", []) == "abc" and cut_at_stop("abc", ["", "z"]) == "abc"
