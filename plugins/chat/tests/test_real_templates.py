"""chat with the published chat templates of SmolLM2, Llama 3, Qwen 2.5, Qwen 3, Gemma 2, Mistral v0.3
and Phi-3.5 (deltatune.testing.chat_templates): loss placement per turn, templates that rewrite earlier turns,
empty reasoning blocks, template variables, tool calls."""

from __future__ import annotations

import json

import pytest

from deltatune.api import DataError
from deltatune.model.generation import user_text
from deltatune.plugin.resolve import resolve
from deltatune.testing.chat_templates import GEMMA2, PHI3, QWEN3, TEMPLATES, RealTemplate, tokenizer_with

SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"},
         {"role": "user", "content": "And 4 and 4?"}, {"role": "assistant", "content": "8"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
TOOL_CONVERSATION = {"tools": [WEATHER], "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call00001", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "{\"sky\": \"sunny\"}"},
    {"role": "assistant", "content": "Sunny."},
]}


def build(tmp_path, real: RealTemplate, records, **config):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    builder = resolve("dataset_builder", {"name": "chat", "config": {"path": str(path), **config}})
    tokenizer = tokenizer_with(real)
    return tokenizer, builder.plugin.build(builder.cfg, tokenizer, "train")


def labelled(tokenizer, row) -> list[str]:
    """The runs of labelled tokens, decoded."""
    runs, run = [], []
    for label in row["labels"] + [-100]:
        if label != -100:
            run.append(label)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


def conversation(real: RealTemplate) -> list[dict]:
    return TURNS if real is GEMMA2 else [SYSTEM, *TURNS]  # Gemma 2's template refuses a system turn


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_assistant_turn_is_learnt_through_its_end_of_turn_token(tmp_path, name):
    real = TEMPLATES[name]
    messages = conversation(real)
    tokenizer, (row,) = build(tmp_path, real, [{"messages": messages}])
    eot = real.end_of_turn or real.eos
    # the row is the template's own rendering of the whole conversation, token for token
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)
    space = " " if name == "mistral" else ""  # Mistral's template writes the reply as " " + content
    reasoning = "<think>\n\n</think>\n\n" if real is QWEN3 else ""  # Qwen3 thinks on its last reply only
    assert labelled(tokenizer, row) == [f"{space}5{eot}", f"{space}{reasoning}8{eot}"]
    assert row["prompt"] == tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert row["response"] == "8"


def test_qwen3_multi_turn_with_and_without_thinking(tmp_path):
    record = {"messages": [SYSTEM, *TURNS]}
    tokenizer, (row,) = build(tmp_path, QWEN3, [record], train_on_empty_reasoning=False)
    assert labelled(tokenizer, row) == ["5<|im_end|>", "8<|im_end|>"], "the injected empty block carries no loss"
    tokenizer, (off,) = build(tmp_path, QWEN3, [record], chat_template_kwargs={"enable_thinking": False})
    assert off["prompt"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n"), "the template saw the kwargs"
    assert labelled(tokenizer, off) == ["5<|im_end|>", "8<|im_end|>"]
    # the row keeps the variables, so the run's sample table finds the user's text in the prompt
    assert off["chat_template_kwargs"] == {"enable_thinking": False} and "chat_template_kwargs" not in row
    assert user_text(tokenizer, off["prompt"], off["chat_template_kwargs"]) == "And 4 and 4?"
    thought = {"messages": [*TURNS[:3], {"role": "assistant", "content": "<think>4+4</think>8"}]}
    tokenizer, (row,) = build(tmp_path, QWEN3, [thought], train_on="last")
    assert labelled(tokenizer, row) == ["<think>\n4+4\n</think>\n\n8<|im_end|>"]


@pytest.mark.parametrize("name", ["qwen2.5", "qwen3", "llama3", "mistral"])
def test_tool_calls_and_results_reach_templates_that_support_tools(tmp_path, name):
    tokenizer, (row,) = build(tmp_path, TEMPLATES[name], [TOOL_CONVERSATION], max_length=2048)
    text = tokenizer.decode(row["input_ids"])
    assert "get_weather" in text and "sunny" in text and "Weather of a city" in text
    call, answer = labelled(tokenizer, row)
    assert "get_weather" in call and "Paris" in call and "sunny" not in call, "the call is learnt, the result is not"
    assert "Sunny." in answer


@pytest.mark.parametrize("real", [GEMMA2, PHI3], ids=["gemma2", "phi3"])
def test_templates_without_tools_are_a_one_line_error_naming_the_row(tmp_path, real):
    with pytest.raises(DataError, match=r"chat\.jsonl:2: the tokenizer's chat template (refuses|does not render tool)"):
        build(tmp_path, real, [{"messages": TURNS}, TOOL_CONVERSATION])


def test_bad_tool_calls_name_the_row(tmp_path):
    bad = json.loads(json.dumps(TOOL_CONVERSATION))
    bad["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{city"
    with pytest.raises(DataError, match=r"chat\.jsonl:1: turn 1: tool call arguments are not JSON"):
        build(tmp_path, TEMPLATES["qwen2.5"], [bad])


def test_generation_blocks_of_a_template_place_the_loss(tmp_path):
    """A template that marks the assistant's text with ``{% generation %}`` (as TRL's patched
    templates do) is taken at its word: here the block leaves the end-of-turn token out, so the loss
    does too, unlike the per-turn placement."""
    smollm2 = TEMPLATES["smollm2"]
    marked = RealTemplate(
        source="SmolLM2's template with {% generation %} around assistant content",
        template=smollm2.template.replace(
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
            "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
            "{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>\n' }}{% else %}"
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"),
        eos=smollm2.eos, bos=smollm2.bos, specials=smollm2.specials)
    assert "{% generation %}" in marked.template
    record = {"messages": [SYSTEM, *TURNS]}
    tokenizer, (row,) = build(tmp_path, marked, [record])
    assert labelled(tokenizer, row) == ["5", "8"]
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(record["messages"], tokenize=False)
    tokenizer, (last,) = build(tmp_path, marked, [record], train_on="last")
    assert labelled(tokenizer, last) == ["8"]
    tokenizer, (plain,) = build(tmp_path, smollm2, [record])
    assert plain["input_ids"] == row["input_ids"] and labelled(tokenizer, plain) == ["5<|im_end|>", "8<|im_end|>"]
