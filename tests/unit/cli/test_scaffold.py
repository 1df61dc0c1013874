"""``deltatune new-plugin``: the scaffolded packages run their contract tests, which fail until the
plugin is written, and pass once it is (filled in here the way an author would)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from deltatune.cli.main import main
from deltatune.cli.scaffold import KINDS, _class_name, scaffold

FILL_IN = {
    # a full-rank additive difference: the simplest delta method that keeps every promise
    ("delta_method", "diff"): [
        ("        # TODO: create the trainable nn.Parameter(s), initialised so the model is unchanged at first\n"
         '        raise NotImplementedError("diff: create the trainable parameters in DiffDelta.__init__")\n',
         "        self.diff = nn.Parameter(torch.zeros(out_features, in_features))\n"),
        ('        raise NotImplementedError("diff: write DiffDelta.forward")',
         "        return result + nn.functional.linear(x.to(self.diff.dtype), self.diff).to(result.dtype)"),
        ('        raise NotImplementedError("diff: write DiffDelta.merge_weight")',
         "        return weight + self.diff.detach().float()"),
        ('        raise NotImplementedError("diff: write DiffDelta.unmerge_weight")',
         "        return weight - self.diff.detach().float()"),
    ],
    # prompt/response records, checked, through the core's encoder
    ("dataset_builder", "qa_rows"): [
        ('            raise NotImplementedError("qa_rows: write QaRowsBuilder.build")',
         '            for key in ("prompt", "response"):\n'
         '                if not isinstance(record.get(key), str):\n'
         '                    raise DataError(f"{where}: field \'{key}\' is missing or not a string")\n'
         '            return encode_example(tokenizer, record["prompt"], record["response"], cfg.max_length,\n'
         '                                  stats=stats, line=line)'),
    ],
    ("evaluator", "rowcount"): [
        ('        # TODO: compute the metrics\n        raise NotImplementedError("rowcount: write Rowcount.evaluate")',
         '        lengths = [len(r["input_ids"]) for r in rows]\n'
         '        return {"rows": float(len(rows)), "mean_length": sum(lengths) / max(len(lengths), 1)}'),
    ],
    ("optimizer", "plain_sgd"): [
        ('        raise NotImplementedError("plain_sgd: write PlainSgd.create")',
         "        return torch.optim.SGD([p for _, p in named_params], lr=cfg.lr), None"),
    ],
    # a family for a model type no first-party family claims, whose head output is its logits
    ("model_family", "olmo_like"): [
        ("    model_types: ClassVar[tuple[str, ...]] = ()", '    model_types: ClassVar[tuple[str, ...]] = ("olmo2",)'),
        ('        raise NotImplementedError("olmo_like: write OlmoLike.unhandled")', "        return None"),
    ],
}
FILL_IN_CONTRACT = {
    "olmo_like": [
        ("from deltatune.testing import ModelFamilyContract",
         "from deltatune.testing import ModelFamilyContract\nfrom deltatune.testing.families import TINY_FAMILIES"),
        ("    tiny_models: dict = {}", '    tiny_models = {"olmo2": TINY_FAMILIES["olmo2"]}'),
    ],
}


def outcomes(report: Path) -> dict[str, dict[str, str]]:
    """``{test class: {test name: passed|failure: …|error: …}}`` from a JUnit XML report."""
    result: dict[str, dict[str, str]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        package = case.get("classname", "").rsplit(".", 1)[-1]
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        state = "passed" if problem is None else f"{problem.tag}: {problem.get('message', '')}"
        result.setdefault(package, {})[case.get("name")] = state
    return result


def run_pytest(cwd: Path, args: list[str], report: Path, pythonpath: list[Path] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
               "-o", "junit_family=xunit1", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_every_kind_scaffolds_a_package_whose_contract_fails_until_written_and_passes_once_written(tmp_path):
    packages = {}
    for kind in KINDS:
        name = f"my_{kind.split('_')[0]}"
        assert main(["new-plugin", name, "--kind", kind, "--dir", str(tmp_path / "todo")]) == 0
        packages[kind] = tmp_path / "todo" / f"deltatune-{name}"
    done = []
    for (kind, name), edits in FILL_IN.items():
        folder = scaffold(name, kind, tmp_path / "done")
        module = folder / f"deltatune_{name}" / "__init__.py"
        source = module.read_text()
        for old, new in edits:
            assert old in source, f"the {kind} template changed: {old!r} is gone"
            source = source.replace(old, new)
        module.write_text(source)
        contract = folder / "tests" / "test_contract.py"
        text = contract.read_text()
        for old, new in FILL_IN_CONTRACT.get(name, []):
            assert old in text, f"the {kind} contract template changed: {old!r} is gone"
            text = text.replace(old, new)
        contract.write_text(text)
        done.append(folder)

    # what an author sees: `cd deltatune-NAME && pytest` before installing anything
    first = packages["delta_method"]
    project = tomllib.loads((first / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["deltatune"] == {"my_delta": "deltatune_my_delta"}
    single = run_pytest(first, [], tmp_path / "single.xml")
    assert single.returncode == 1, single.stdout[-3000:] + single.stderr[-3000:]
    single_outcomes = next(iter(outcomes(tmp_path / "single.xml").values()))

    everything = [*(packages[k] for k in KINDS if k != "delta_method"), *done]
    rest = run_pytest(tmp_path, [str(p / "tests") for p in everything], tmp_path / "rest.xml", pythonpath=everything)
    assert rest.returncode == 1, rest.stdout[-3000:] + rest.stderr[-3000:]
    found = outcomes(tmp_path / "rest.xml")

    def contract_class(folder: Path) -> str:  # the scaffold names it Test<Name>Contract
        return f"Test{_class_name(folder.name.removeprefix('deltatune-'))}Contract"

    for kind, folder in packages.items():
        tests = single_outcomes if kind == "delta_method" else found[contract_class(folder)]
        assert not [t for t, s in tests.items() if s.startswith("error")], f"{kind}: tests that could not run: {tests}"
        failed = {t: s for t, s in tests.items() if s.startswith("failure")}
        assert len(failed) >= 3, f"{kind}: an unwritten plugin passes {sorted(set(tests) - set(failed))}"
        assert any("NotImplementedError" in s or "write" in s for s in failed.values()), failed
        # registration works from the first minute: the scaffold is a valid, discoverable plugin
        assert tests["test_registered_and_follows_its_protocol"] == "passed", tests
    for folder in done:
        tests = found[contract_class(folder)]
        assert tests and all(s == "passed" for s in tests.values()), f"{folder.name}: {tests}"


def test_bad_names_kinds_and_existing_folders_are_clear_errors(tmp_path, capsys):
    assert main(["new-plugin", "Bad-Name", "--kind", "evaluator", "--dir", str(tmp_path)]) == 1
    assert "lower case" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["new-plugin", "ok", "--kind", "nonsense", "--dir", str(tmp_path)])
    assert main(["new-plugin", "ok", "--kind", "evaluator", "--dir", str(tmp_path)]) == 0
    assert main(["new-plugin", "ok", "--kind", "evaluator", "--dir", str(tmp_path)]) == 1
    assert "already exists" in capsys.readouterr().err
