"""``deltatune chat`` and ``deltatune generate``: a real multi-turn chat in a subprocess fed on stdin,
several prompts (repeated flags, JSONL and text files) batched, seeded sampling, clear one-line errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltatune.cli.main import main
from deltatune.io.adapter import save_adapter
from deltatune.model.assembly import ModelSpec, build_model, resolve_spec


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny Llama with weights far from their start (so it changes the answers)."""
    resolved = resolve_spec(ModelSpec(base="tiny-llama", base_dtype="fp32", delta=["lora"]))
    model = build_model(resolved)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("chat") / "adapter"
    save_adapter(model, resolved, folder)
    return folder


def test_chat_streams_answers_and_sends_the_earlier_exchange_with_the_next_turn(adapter, tmp_path):
    command = [sys.executable, "-m", "deltatune.cli.main", "chat", "--adapter", str(adapter), "--max_new_tokens", "6",
               "--system", "Be brief.", "--show_prompt"]
    done = subprocess.run(command, input="What is two plus two?\nAnd three?\n/reset\nHi\n", capture_output=True,
                          text=True, timeout=600, cwd=tmp_path, env={**os.environ, "NO_COLOR": "1"})
    assert done.returncode == 0, done.stderr
    prompts = done.stderr.split("<|im_start|>system\n")[1:]
    assert len(prompts) == 3
    first_turn = "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n"
    assert prompts[0] == "Be brief.<|im_end|>\n" + first_turn + "\n"
    # the second prompt holds the first exchange: the question and the answer the chat printed
    assert prompts[1].startswith("Be brief.<|im_end|>\n" + first_turn)
    first_answer = prompts[1][len("Be brief.<|im_end|>\n" + first_turn):].partition("<|im_end|>")[0]
    assert first_answer and done.stdout.count(first_answer) >= 1
    assert prompts[1].endswith("<|im_start|>user\nAnd three?<|im_end|>\n<|im_start|>assistant\n\n")
    assert "two plus two" not in prompts[2] and "Be brief." in prompts[2]  # /reset kept only the system turn


def test_chat_ends_at_exit_before_reading_more(adapter, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/exit\nnever read\n"))
    assert main(["chat", "--adapter", str(adapter), "--max_new_tokens", "3", "--show_prompt"]) == 0
    assert capsys.readouterr().err.count("<|im_start|>user\n") == 1  # "Hi" answered; nothing read after /exit


def test_generate_reads_prompts_from_flags_and_files_and_batches_them(adapter, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "bye"}\n\n{"prompt": "one more", "id": 3}\n')
    (tmp_path / "p.txt").write_text("bye\n\none more\n")
    args = ["generate", "--adapter", str(adapter), "--max_new_tokens", "5"]
    assert main([*args, "--prompt", "hello", "--prompt", "bye", "--prompt", "one more", "--batch_size", "1"]) == 0
    singly = capsys.readouterr().out.splitlines()
    assert len(singly) == 3
    assert main([*args, "--prompt", "hello", "--prompts_file", str(tmp_path / "p.jsonl")]) == 0
    assert capsys.readouterr().out.splitlines() == singly
    assert main([*args, "--prompt", "hello", "--prompts-file", str(tmp_path / "p.txt"), "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.splitlines() == singly
    assert main([*args, "--prompt", "hello", "--prompts_file", str(tmp_path / "p.txt"), "--jsonl"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records == [{"prompt": p, "completion": c} for p, c in zip(["hello", "bye", "one more"], singly)]


def test_generate_samples_reproducibly_with_a_seed(adapter, capsys):
    args = ["generate", "--adapter", str(adapter), "--prompt", "hello", "--prompt", "bye", "--max_new_tokens", "8"]
    runs = {}
    for seed in ("1", "1", "2"):
        assert main([*args, "--temperature", "1.2", "--top_p", "0.95", "--top_k", "40", "--seed", seed]) == 0
        runs.setdefault(seed, []).append(capsys.readouterr().out)
    assert runs["1"][0] == runs["1"][1] != runs["2"][0]
    assert main(args) == 0
    greedy = capsys.readouterr().out
    assert main([*args, "--temperature", "0", "--seed", "7"]) == 0
    assert capsys.readouterr().out == greedy


def test_chat_template_variables_reach_the_prompts_of_generate_and_chat(tmp_path, monkeypatch, capsys):
    from deltatune.model.loading import tiny_llama
    from deltatune.testing.chat_templates import QWEN3, tokenizer_with

    tokenizer = tokenizer_with(QWEN3)  # a base with Qwen3's chat template
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "qwen3-template")
    tokenizer.save_pretrained(tmp_path / "qwen3-template")
    off = ["--base", str(tmp_path / "qwen3-template"), "--chat_template_kwargs", '{"enable_thinking": false}',
           "--max_new_tokens", "3"]
    monkeypatch.setattr("sys.stdin", io.StringIO("Add 2 and 3.\nAnd 4 and 4?\n"))
    assert main(["chat", *off, "--show_prompt"]) == 0
    prompts = capsys.readouterr().err.split("<|im_start|>user\nAdd 2 and 3.<|im_end|>\n")[1:]
    assert len(prompts) == 2 and all(p.rstrip("\n").endswith("<|im_start|>assistant\n<think>\n\n</think>") for p in prompts)
    assert main(["generate", *off, "--prompt", "Add 2 and 3."]) == 0
    with_variables = capsys.readouterr().out
    assert main(["generate", *off[:2], "--max_new_tokens", "3", "--prompt", "Add 2 and 3."]) == 0
    assert capsys.readouterr().out != with_variables  # the model saw a different prompt


@pytest.mark.parametrize(("extra", "expected"), [
    (["--prompts_file", "{tmp}/bad.jsonl"], "bad.jsonl:2: no non-empty string 'prompt'"),
    (["--prompts_file", "{tmp}/missing.txt"], "prompts file not found"),
    (["--chat_template_kwargs", "[1]"], "--chat_template_kwargs must be a JSON object"),
    (["--chat_template_kwargs", "{nope"], "--chat_template_kwargs is not valid JSON"),
    (["--top_p", "0"], "--top_p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
])
def test_bad_generation_input_is_one_line_naming_it(tmp_path, capsys, extra, expected):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    assert main(["generate", "--adapter", str(tmp_path / "not-loaded"), "--prompt", "hi", *extra]) == 1
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1
