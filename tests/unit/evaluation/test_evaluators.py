"""The evaluator plugins score what they should, on a real (tiny) model whose answer is known.

The "parrot" is the tiny Llama with an LM head whose bias makes one byte the greedy choice at every
step, so its generation is known ("aaaa…") and option likelihoods are ordered; everything else —
tokenisation, chat prompts, batched generation, log-likelihoods — runs for real.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltatune.plugin.resolve import resolve
from deltatune.data.module import encode_example
from deltatune.evaluation.helpers import answer_rows, sequence_logprobs
from deltatune.model.generation import chat_prompt
from deltatune.model.loading import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def parrot(tokenizer):
    model = tiny_llama()
    head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.convert_tokens_to_ids("a")] = 10.0
    model.lm_head = head
    return model.eval()


def rows_for(tokenizer, pairs, **extra):
    rows = []
    for i, (prompt, response) in enumerate(pairs):
        row = encode_example(tokenizer, chat_prompt(tokenizer, prompt), response, 256)
        row.update(family=f"f{i % 2}", **extra)
        rows.append(row)
    return rows


def run(name, model, tokenizer, rows, **config):
    plugin = resolve("evaluator", {"name": name, "config": config})
    with torch.no_grad():
        return plugin.plugin.evaluate(model, tokenizer, rows, plugin.cfg)


def test_exact_match_compares_normalised_answers_per_family(parrot, tokenizer):
    rows = rows_for(tokenizer, [("q1", " AAAA."), ("q2", "aaaa"), ("q3", "aaab"), ("q4", "aaa")])
    metrics = run("exact_match", parrot, tokenizer, rows, max_new_tokens=4, batch_size=3, by_family=True)
    assert metrics["accuracy"] == 0.5 and metrics["rows"] == 4
    assert metrics["accuracy.f0"] == 0.5 and metrics["accuracy.f1"] == 0.5
    assert run("exact_match", parrot, tokenizer, rows, max_new_tokens=4, limit=2)["accuracy"] == 1.0


def test_rouge_l_scores_the_longest_common_subsequence(parrot, tokenizer):
    rows = rows_for(tokenizer, [("q1", "aaaa"), ("q2", "zzz"), ("q3", "aaaa zzz")])
    metrics = run("rouge", parrot, tokenizer, rows, max_new_tokens=4, by_family=True, types=["rougeL"])
    # answers are "aaaa": F = 1, 0 and 2*(1/1*1/2)/(1+1/2) = 2/3
    assert metrics["rougeL"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert metrics["rougeL.f1"] == 0.0


def test_choice_picks_the_most_likely_option_and_normalises_by_length(parrot, tokenizer):
    pairs = [("pick", "a"), ("pick", "a")]
    rows = rows_for(tokenizer, pairs)
    rows[0].update(choices=["zz", "aa"], answer_index=1)
    rows[1].update(choices=["a", "aaaaaaaa"], answer_index=0)
    metrics = run("choice", parrot, tokenizer, rows, eos=False)
    # the parrot prefers "a" at every step, so more "a"s cost little: "a" beats "aaaaaaaa" on the sum
    assert metrics["accuracy"] == 1.0 and metrics["rows"] == 2
    rows[1]["answer_index"] = 1
    assert run("choice", parrot, tokenizer, rows, eos=False)["accuracy"] == 0.5


def test_sequence_logprobs_match_a_plain_forward_pass(tokenizer):
    """Rows are batched by length (the longest here is batched with the middle one): each value still
    belongs to its own row."""
    model = tiny_llama(seed=3)
    rows = rows_for(tokenizer, [("the third and longest prompt of all", "four five six"), ("first prompt", "one"),
                                ("second, longer prompt", "two three")])
    got = sequence_logprobs(model, rows, tokenizer.pad_token_id, batch_size=2)
    for row, value in zip(rows, got):
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        labels = torch.tensor(row["labels"][1:])
        mask = labels != -100
        want = logp[mask].gather(1, labels[mask].unsqueeze(1)).sum()
        assert value == pytest.approx(float(want), abs=1e-4)


def test_generating_evaluators_skip_rows_without_text(tokenizer):
    text_rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}]
    assert answer_rows(text_rows) == []
    assert run("exact_match", tiny_llama(), tokenizer, text_rows) == {"rows": 0.0}
