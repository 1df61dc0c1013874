"""The sample table of a run shows the user's text, cut out of whatever chat template framed it
(:func:`deltatune.model.generation.user_text`), not only ChatML."""

from __future__ import annotations

import pytest

from deltatune.model.generation import chat_prompt, user_text
from deltatune.model.loading import tiny_tokenizer
from deltatune.testing.chat_templates import QWEN3, tokenizer_with

TEMPLATES = {
    "chatml": None,  # the tiny tokenizer's own
    "llama2": "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
              "{% else %}{{ ' ' + m['content'] + ' </s>' }}{% endif %}{% endfor %}",
    "zephyr-with-system": "{{ '<|system|>\\nYou help.</s>\\n' }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + "
                          "m['content'] + '</s>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
                          "{% endif %}",
}


@pytest.mark.parametrize("template", TEMPLATES)
def test_the_user_turn_comes_back_from_a_framed_prompt(template):
    tokenizer = tiny_tokenizer()
    if TEMPLATES[template]:
        tokenizer.chat_template = TEMPLATES[template]
    text = "Reverse the words:\nred fox jumps"
    framed = chat_prompt(tokenizer, text)
    assert framed != text
    assert user_text(tokenizer, framed) == text
    later = tokenizer.apply_chat_template(
        [{"role": "user", "content": "first"}, {"role": "assistant", "content": "reply"},
         {"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    assert user_text(tokenizer, later) == text


def test_without_a_template_the_prompt_is_kept():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    assert user_text(tokenizer, "  Name a colour. ") == "Name a colour."


def test_template_variables_reach_the_prompt_and_the_user_text_comes_back_with_them():
    tokenizer = tokenizer_with(QWEN3)
    off = {"enable_thinking": False}
    framed = chat_prompt(tokenizer, "Add 2 and 3.", off)
    assert framed.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3's thinking switched off
    assert not chat_prompt(tokenizer, "Add 2 and 3.").endswith("</think>\n\n")
    assert user_text(tokenizer, framed, off) == "Add 2 and 3."
    assert user_text(tokenizer, framed) != "Add 2 and 3."  # read without the variables, the framing stays
