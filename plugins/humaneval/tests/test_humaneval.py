"""humaneval: the evaluator contract, the opt-in, pass@k, the code taken from answers, the cache, and the
sandbox's limits proved with real subprocesses running hostile programs."""

from __future__ import annotations

import json
import math
import socket
import time
import uuid
from pathlib import Path

import pytest
import torch

from deltatune.api import ConfigError, DataError
from deltatune.model import loading
from deltatune.plugin.resolve import PluginRef, resolve
from deltatune.testing import EvaluatorContract
from deltatune_humaneval import OPT_IN_VARIABLE, HumanEval, HumanEvalConfig, run_tests
from deltatune_humaneval.problems import Problem, load_problems, pass_at_k, program
from deltatune_humaneval.sandbox import NOBODY, Limits, _tasks_of, detect

ONE = Problem("Test/one", "def one():\n    \"\"\"Return 1.\"\"\"\n", "def check(candidate):\n    assert candidate() == 1\n",
              "one")
FAST = Limits(timeout_s=2.0)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every test caches its completions in its own folder, and opts in only where it says so."""
    monkeypatch.setenv("DELTATUNE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(OPT_IN_VARIABLE, raising=False)


class TestHumanEvalContract(EvaluatorContract):
    evaluator_name = "humaneval"
    config = {"allow_code_execution": True, "limit": 2, "max_new_tokens": 8}
    expected_metrics = {"pass@1.chat", "rows"}  # the tiny tokenizer has a chat template: auto picks chat


# .. opt-in .........................................................................................
def test_refuses_to_run_code_without_the_opt_in(monkeypatch):
    with pytest.raises(ConfigError, match=r"runs model-written code .*allow_code_execution: true .*"
                                          + OPT_IN_VARIABLE) as caught:
        resolve("evaluator", PluginRef(name="humaneval", config={}))
    assert "humaneval" in str(caught.value)
    monkeypatch.setenv(OPT_IN_VARIABLE, "0")
    with pytest.raises(ConfigError):
        resolve("evaluator", PluginRef(name="humaneval", config={"limit": 1}))
    monkeypatch.setenv(OPT_IN_VARIABLE, "1")
    assert resolve("evaluator", PluginRef(name="humaneval", config={"limit": 1})).cfg.limit == 1


def test_evaluate_itself_refuses_a_config_that_skipped_validation(tiny_model, tiny_tokenizer):
    with pytest.raises(ConfigError, match="allow_code_execution"):
        HumanEval().evaluate(tiny_model, tiny_tokenizer, [], HumanEvalConfig.model_construct(limit=1))


def test_sampling_options_are_checked():
    with pytest.raises(ValueError, match="temperature"):
        HumanEvalConfig(allow_code_execution=True, n=5)
    with pytest.raises(ValueError, match="between 1 and n=5"):
        HumanEvalConfig(allow_code_execution=True, n=5, temperature=0.8, k=[1, 10])


# .. pass@k ..........................................................................................
def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5)=21, C(10,5)=252
    assert pass_at_k(5, 1, 2) == pytest.approx(1 - 6 / 10)  # C(4,2)=6, C(5,2)=10
    assert pass_at_k(5, 4, 2) == 1.0  # every pair of 5 includes one of the 4
    assert pass_at_k(20, 0, 10) == 0.0
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)


# .. problems and answers ..............................................................................
def test_the_packaged_problems_load():
    problems = load_problems()
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    assert problems[0].entry_point == "has_close_elements" and "def check(candidate)" in problems[0].test


def test_a_bad_problems_file_is_named_with_its_line(tmp_path):
    bad = tmp_path / "mine.jsonl"
    bad.write_text(json.dumps({"task_id": "a", "prompt": "x", "test": "y", "entry_point": "f"}) + "\n"
                   + json.dumps({"task_id": "b", "prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"mine.jsonl:2: .*test, entry_point"):
        load_problems(bad)


@pytest.mark.parametrize("answer", [
    "Sure:\n```python\ndef one():\n    return 1\n```\nThis returns one.",           # signature repeated
    "```python\nimport math\n\ndef one():\n    \"\"\"Return 1.\"\"\"\n    return math.floor(1.5)\n```",
    "```python\n    return 1\n```",                                                     # body only, indented
    "```\nx = 1\nreturn x\n```",                                                        # body, not indented
    "```python\ndef one():\n    return 1\n\nprint(one())\nassert one() == 2\n```",     # test code after it
    "```python\ndef one():\n    return 1",                                              # block never closed
])
def test_chat_answers_run_as_the_function(answer):
    [[outcome]] = run_tests([ONE], [[answer]], "chat", FAST)
    assert outcome.passed, (outcome.status, program(ONE, answer, "chat"))


def test_completion_mode_continues_the_prompt():
    [[right], [wrong]] = run_tests([ONE, ONE], [["    return 1"], ["    return 2"]], "completion", FAST)
    assert right.passed and not wrong.passed and "AssertionError" in wrong.status


# .. the sandbox ......................................................................................
def nobody_processes() -> int:
    return _tasks_of(NOBODY)


def test_hostile_programs_fail_and_the_evaluation_goes_on(tmp_path):
    """Loop, fork bomb, 10 GB, writes outside its folder, a socket to 127.0.0.1, a huge file: each
    is stopped or fails, counted as failed, and the correct completion after them still passes."""
    sandbox = detect()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    outside, in_home = tmp_path / "escaped.txt", Path.home() / f"deltatune-sandbox-probe-{uuid.uuid4().hex}"
    hostile = {
        "loop": "    while True:\n        pass",
        "fork bomb": "    import os\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass",
        "10 GB": "    return len(bytearray(10 * 1024 ** 3))",
        "write outside": f"    open({str(outside)!r}, 'w').write('x')\n    return 1",
        "write in home": f"    open({str(in_home)!r}, 'w').write('x')\n    return 1",
        "socket": f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n    return 1",
        "big file": "    open('big', 'wb').write(b'x' * (64 * 1024 ** 2))\n    return 1",
        "correct": "    return 1",
    }
    start = time.perf_counter()
    try:
        outcomes = run_tests([ONE] * len(hostile), [[c] for c in hostile.values()], "completion", FAST)
        took = time.perf_counter() - start
        results = {name: o for name, [o] in zip(hostile, outcomes)}
        assert results.pop("correct").passed
        if sandbox.uid is None:  # running as a user who can write there: only the file size limit holds
            results.pop("write outside"), results.pop("write in home")
        else:
            assert not outside.exists() and not in_home.exists()
            assert "Permission denied" in results["write outside"].status
        if not sandbox.unshare:  # no network namespace here: nothing is promised about sockets
            results.pop("socket")
        else:
            listener.settimeout(0.5)
            with pytest.raises(socket.timeout):
                listener.accept()
            assert "unreachable" in results["socket"].status
        failed = {name: o.status for name, o in results.items() if o.passed}
        assert not failed, f"passed although they should not: {failed}"
        assert "timed out" in results["loop"].status and "MemoryError" in results["10 GB"].status
        assert "File too large" in results["big file"].status
        assert took < 2 * FAST.timeout_s + 10, f"{took:.1f} s: a program outlived its timeout"
    finally:
        listener.close()
        in_home.unlink(missing_ok=True)
    if sandbox.uid is not None:  # the fork bomb left nothing behind
        deadline = time.monotonic() + 5
        while nobody_processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert nobody_processes() == 0


def test_a_fork_bomb_is_bounded_while_it_runs():
    """The program counts the processes it managed to start, and reports the count as its failure."""
    bomb = ("    import os, sys, time\n    started = 0\n    for _ in range(1000):\n        try:\n"
            "            if os.fork() == 0:\n                time.sleep(30)\n                os._exit(0)\n"
            "            started += 1\n        except OSError:\n            break\n"
            "    raise SystemExit(f'started {started}')")
    [[outcome]] = run_tests([ONE], [[bomb]], "completion", Limits(timeout_s=5.0, max_processes=8))
    started = int(outcome.status.split()[-1])
    assert not outcome.passed and started < 8, outcome.status


def test_the_environment_is_empty_and_the_folder_is_new(monkeypatch):
    monkeypatch.setenv("DELTATUNE_SECRET_TOKEN", "hunter2")
    probe = ("    import os\n    assert 'DELTATUNE_SECRET_TOKEN' not in os.environ, dict(os.environ)\n"
             "    assert os.listdir('.') == [], os.listdir('.')\n    return 1")
    [[outcome]] = run_tests([ONE], [[probe]], "completion", FAST)
    assert outcome.passed, outcome.status


# .. the evaluator end to end, and its cache .............................................................
def test_completions_are_cached_per_model(tmp_path, tiny_tokenizer):
    problems = tmp_path / "one.jsonl"
    problems.write_text(json.dumps(ONE.__dict__) + "\n")
    cfg = HumanEvalConfig(allow_code_execution=True, problems=str(problems), mode="completion", max_new_tokens=4,
                          per_problem=True)
    model = loading.load_model("tiny-llama", torch.float32).eval()
    with torch.no_grad():
        first = HumanEval().evaluate(model, tiny_tokenizer, [], cfg)
    assert first == {"pass@1.completion": 0.0, "rows": 1.0, "passed.completion.Test_one": 0.0}
    [cache_file] = (tmp_path / "home" / "humaneval").glob("*.json")
    entries = json.loads(cache_file.read_text())
    [entry] = entries.values()
    assert entry["task_id"] == "Test/one" and entry["passed"] is False and entry["status"]
    entry["completion"] = "    return 1"  # what a second evaluation runs if it reads the cache and generates nothing
    cache_file.write_text(json.dumps(entries))
    with torch.no_grad():
        assert HumanEval().evaluate(model, tiny_tokenizer, [], cfg)["pass@1.completion"] == 1.0
        next(model.parameters()).add_(1e-3)  # another model (an adapter changes the weights alike)
        assert HumanEval().evaluate(model, tiny_tokenizer, [], cfg)["pass@1.completion"] == 0.0
    assert len(list(cache_file.parent.glob("*.json"))) == 2


def test_n_samples_give_pass_at_k(tmp_path, tiny_model, tiny_tokenizer):
    cfg = HumanEvalConfig(allow_code_execution=True, limit=2, mode="completion", n=3, k=[1, 3], temperature=1.0,
                          max_new_tokens=4, per_problem=True, cache_dir=str(tmp_path / "cache"))
    metrics = HumanEval().evaluate(tiny_model, tiny_tokenizer, [], cfg)
    assert set(metrics) == {"pass@1.completion", "pass@3.completion", "rows", "passed.completion.HumanEval_0",
                            "passed.completion.HumanEval_1"}
    [cache_file] = (tmp_path / "cache").glob("*.json")
    entries = json.loads(cache_file.read_text()).values()
    assert sorted((e["task_id"], e["sample"]) for e in entries) == [(f"HumanEval/{i}", s) for i in range(2) for s in range(3)]
    assert all(math.isfinite(v) for v in metrics.values())


def test_chat_template_variables_reach_the_chat_prompts(tmp_path):
    from deltatune.testing.chat_templates import QWEN3, tokenizer_with

    tokenizer = tokenizer_with(QWEN3)
    tokenizer.pad_token = tokenizer.eos_token
    model = loading.tiny_llama(vocab_size=len(tokenizer)).eval()
    problems = tmp_path / "one.jsonl"
    problems.write_text(json.dumps(ONE.__dict__) + "\n")
    cfg = HumanEvalConfig(allow_code_execution=True, problems=str(problems), mode="chat", max_new_tokens=4,
                          chat_template_kwargs={"enable_thinking": False}, cache_dir=str(tmp_path / "cache"))
    with torch.no_grad():
        HumanEval().evaluate(model, tokenizer, [], cfg)
    [cache_file] = (tmp_path / "cache").glob("*.json")
    [entry] = json.loads(cache_file.read_text()).values()
    assert entry["prompt"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3, thinking off
    assert "Return 1." in entry["prompt"]
