"""deltatune.model.generation: ``generate`` greedy by default; seeded sampling (temperature, top-k,
top-p) that leaves the global random state alone; stop strings; whitespace kept on request; streaming;
``ChatSession``'s multi-turn prompts — on the real tiny Llama."""

from __future__ import annotations

import pytest
import torch

from deltatune.errors import ConfigError
from deltatune.model.generation import ChatSession, cut_at_stop, generate
from deltatune.model.loading import tiny_llama, tiny_tokenizer
from deltatune.testing.chat_templates import QWEN3, tokenizer_with

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


def test_sampling_limited_to_the_likeliest_token_is_greedy(model, tokenizer):
    greedy = generate(model, tokenizer, PROMPTS, 12)
    assert generate(model, tokenizer, PROMPTS, 12, temperature=1.5, top_k=1, seed=5) == greedy
    assert generate(model, tokenizer, PROMPTS, 12, temperature=1.5, top_p=1e-9, seed=5) == greedy
    wide = generate(model, tokenizer, PROMPTS, 12, temperature=1.5, top_k=50, seed=5)
    assert wide != greedy and generate(model, tokenizer, PROMPTS, 12, temperature=1.5, top_k=50, seed=5) == wide


@pytest.mark.parametrize("options", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}])
def test_impossible_sampling_options_are_refused(model, tokenizer, options):
    with pytest.raises(ConfigError, match="sampling needs"):
        generate(model, tokenizer, PROMPTS, 4, **options)


def test_streamed_text_arrives_while_tokens_are_generated_and_adds_up_to_the_completion(model, tokenizer):
    events: list[str] = []
    hook = model.lm_head.register_forward_hook(lambda *_: events.append("step"))
    try:
        pieces: list[str] = []
        (completion,) = generate(model, tokenizer, ["hello"], 12, strip=False,
                              on_text=lambda piece: (pieces.append(piece), events.append("text")))
    finally:
        hook.remove()
    assert "".join(pieces).rstrip() == completion
    assert events.index("text") < len(events) - 1 - events[::-1].index("step")  # text came before the last step
    with pytest.raises(ConfigError, match="one prompt at a time"):
        generate(model, tokenizer, PROMPTS, 4, on_text=print)


def test_a_chat_session_sends_every_earlier_turn_with_the_next(model, tokenizer):
    session = ChatSession(model, tokenizer, system="Be brief.", max_new_tokens=6)
    first = session.reply("What is two plus two?")
    prompt = session.prompt("And three?")
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"},
         {"role": "assistant", "content": first}, {"role": "user", "content": "And three?"}],
        tokenize=False, add_generation_prompt=True)
    assert prompt == expected
    assert session.reply("And three?") == generate(model, tokenizer, [expected], 6)[0]
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    assert session.reply("What is two plus two?") == first


def test_a_chat_session_needs_a_chat_template(model):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="chat template"):
        ChatSession(model, tokenizer)


def test_a_chat_session_renders_every_turn_with_the_template_variables():
    tokenizer = tokenizer_with(QWEN3)
    tokenizer.pad_token = tokenizer.eos_token  # as deltatune's tokenizer loading sets it
    model = tiny_llama(vocab_size=len(tokenizer)).eval()
    session = ChatSession(model, tokenizer, template_kwargs={"enable_thinking": False}, max_new_tokens=4)
    first = session.reply("Add 2 and 3.")
    prompt = session.prompt("And 4 and 4?")
    assert prompt == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": first},
         {"role": "user", "content": "And 4 and 4?"}], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
