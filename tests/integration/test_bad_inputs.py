"""Bad input, as a user gives it to the ``deltatune`` command: every row is a one-line error on stderr
naming the input (file:line, option, plugin), a non-zero exit and no traceback — or, where the input
is accepted, exit 0 with a one-line warning. Core options and the model's shape are checked before
any weight loads: those rows point the base at a folder whose weights are garbage, so a load would
fail with a different error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from deltatune.cli.main import main
from deltatune.io.adapter import MANIFEST, WEIGHTS, save_adapter
from deltatune.model.assembly import ModelSpec, build_model, resolve_spec
from deltatune.model.loading import tiny_llama, tiny_tokenizer
from deltatune.plugin.manager import reset_plugin_manager
from plugin_sources import GOOD

ROWS = [
    {"instruction": f"Repeat the word {word}.", "input": "", "output": word}
    for word in ("apple", "river", "stone", "cloud", "maple", "ember", "frost", "bloom")
]


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """``deltatune ARGV``: exit code, stdout, stderr."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    """Exit code 1, exactly one ``error:`` line on stderr holding every fragment, no traceback."""
    assert code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny data, a run config, model folders (garbage weights, BERT, unknown type, custom code), a
    broken GGUF file and adapters (good, damaged, trained with trust_remote_code)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"base": "tiny-llama", "base_dtype": "fp32", "delta": [{"name": "lora", "config": {"r": 4}}],
                  "compare_base": False, "samples": 0, "max_new_tokens": 4},
        "data": {"builder": {"name": "alpaca", "config": {"path": str(data), "max_length": 48}},
                 "batch_size": 4, "val_fraction": 0.25},
        "trainer": {"max_steps": 1, "accelerator": "cpu", "logger": False},
    }))
    # a Llama folder whose config is fine and whose weights cannot be read: loading it is an error
    garbage = root / "garbage-weights"
    tiny_llama().config.save_pretrained(garbage)
    tiny_tokenizer().save_pretrained(garbage)
    (garbage / "model.safetensors").write_bytes(b"not safetensors " * 64)

    from transformers import BertConfig, BertForMaskedLM

    bert = root / "bert"
    BertForMaskedLM(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(bert)
    tiny_tokenizer().save_pretrained(bert)
    unknown = root / "unknown-type"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "nosuchmodel", "hidden_size": 8}))
    custom = root / "custom-code"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({
        "model_type": "mine", "auto_map": {"AutoConfig": "configuration_mine.MineConfig",
                                           "AutoModelForCausalLM": "modeling_mine.MineForCausalLM"}}))
    (custom / "modeling_mine.py").write_text("raise SystemExit('custom code ran')\n")
    gguf = root / "truncated.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x07" * 40)

    resolved = resolve_spec(ModelSpec(base="tiny-llama", base_dtype="fp32", delta=["lora"]))
    model = build_model(resolved)
    adapter = save_adapter(model, resolved, root / "adapter")
    damaged_weights = root / "damaged-weights"
    shutil.copytree(adapter, damaged_weights)
    weights = (damaged_weights / WEIGHTS).read_bytes()
    (damaged_weights / WEIGHTS).write_bytes(weights[: len(weights) // 2])
    damaged_manifest = root / "damaged-manifest"
    shutil.copytree(adapter, damaged_manifest)
    text = (damaged_manifest / MANIFEST).read_text()
    (damaged_manifest / MANIFEST).write_text(text[: len(text) // 2])
    trusted = resolve_spec(ModelSpec(base="tiny-llama", base_dtype="fp32", delta=["lora"], trust_remote_code=True))
    save_adapter(build_model(trusted), trusted, root / "trusted-adapter")
    return {"root": root, "data": data, "config": config, "garbage": garbage, "bert": bert, "unknown": unknown,
            "custom": custom, "gguf": gguf, "adapter": adapter, "damaged_weights": damaged_weights,
            "damaged_manifest": damaged_manifest, "trusted": root / "trusted-adapter"}


def fit(files: dict[str, Path], tmp_path: Path, *options: str) -> list[str]:
    return ["fit", "--config", str(files["config"]), f"--trainer.default_root_dir={tmp_path / 'run'}", *options]


# -- core options and model shape: refused before any weight loads ----------------------------------
@pytest.mark.parametrize("option, fragments", [
    ("--data.batch_size=0", ["data.batch_size", "at least 1", "(got 0)"]),
    ("--data.val_fraction=1.5", ["data.val_fraction", "[0, 1)", "(got 1.5)"]),
    ("--model.samples=-1", ["model.samples", "(got -1)"]),
    ("--model.max_new_tokens=0", ["model.max_new_tokens", "at least 1", "(got 0)"]),
    ("--model.delta=[{name: lora, config: {r: 100000}}]",
     ["lora on module 'model.layers.0.self_attn.q_proj'", "rank r=100000", "64x64", "r <= 64"]),
    ("--model.delta=[{name: lora, config: {targets: 're:(q_proj'}}]",
     ["lora", "'re:(q_proj'", "not a valid regular expression"]),
], ids=["batch_size", "val_fraction", "samples", "max_new_tokens", "rank", "regex"])
def test_core_options_are_refused_before_any_weight_loads(files, tmp_path, capsys, option, fragments):
    code, _, err = run(capsys, *fit(files, tmp_path, f"--model.base={files['garbage']}", option))
    line = assert_one_line_error(code, err, *fragments)
    assert "safetensors" not in line, "the weights were read before the option was checked"
    assert not (tmp_path / "run").exists(), "nothing may be written for a bad configuration"


@pytest.mark.parametrize("options", [["--optimizer", "AdamW"], ["--optimizer=torch.optim.SGD"],
                                     ["--lr_scheduler", "StepLR", "--lr_scheduler.step_size=1"]],
                         ids=["optimizer", "optimizer-class", "lr_scheduler"])
def test_lightnings_own_optimizer_options_point_to_model_optimizer(files, tmp_path, capsys, options):
    code, _, err = run(capsys, *fit(files, tmp_path, f"--model.base={files['garbage']}", *options))
    assert_one_line_error(code, err, options[0].split("=")[0][2:] + " (in the command line)", "model.optimizer")
    assert not (tmp_path / "run").exists()


def test_an_optimizer_section_in_the_config_file_points_to_model_optimizer(files, tmp_path, capsys):
    config = tmp_path / "with-optimizer.yaml"
    config.write_text(files["config"].read_text() + "optimizer:\n  class_path: torch.optim.AdamW\n")
    code, _, err = run(capsys, "fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'run'}")
    assert_one_line_error(code, err, "optimizer (in ", "with-optimizer.yaml", "model.optimizer")


@pytest.mark.parametrize("option", ["--trainer.logger.save_dir=elsewhere", "--trainer.logger.init_args.save_dir=elsewhere"])
def test_a_loggers_own_folder_is_refused_for_the_run_folder(files, tmp_path, capsys, option):
    code, _, err = run(capsys, *fit(files, tmp_path, "--trainer.logger=CSVLogger", option))
    assert_one_line_error(code, err, "trainer.logger.save_dir (in the command line)", "trainer.default_root_dir")


def test_a_saved_config_with_null_optimizer_sections_is_not_refused(files, tmp_path, capsys):
    config = tmp_path / "saved.yaml"  # what LightningCLI saved as config.yaml before they were removed
    config.write_text(files["config"].read_text() + "optimizer: null\nlr_scheduler: null\n")
    code, _, err = run(capsys, "fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'run'}",
                       f"--model.base={files['garbage']}")
    assert_one_line_error(code, err, "safetensors")  # it got as far as reading the weights


def test_the_optimizer_option_is_not_offered(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    help_text = capsys.readouterr().out
    assert "--model.optimizer" in help_text
    assert "--optimizer " not in help_text and "--lr_scheduler" not in help_text


def test_the_garbage_weights_really_fail_to_load(files, tmp_path, capsys):
    """The control for the rows above, and the damaged-weights row: loading the base is an error
    naming the folder."""
    code, _, err = run(capsys, *fit(files, tmp_path, f"--model.base={files['garbage']}"))
    assert_one_line_error(code, err, str(files["garbage"]), ".safetensors weights cannot be read")


@pytest.mark.parametrize("base, fragments", [
    ("bert", ["bert", "model_type 'bert'", "not a causal decoder"]),
    ("unknown", ["unknown-type/config.json", "unknown model_type 'nosuchmodel'"]),
    ("custom", ["custom-code/config.json", "own Python code", "model.trust_remote_code: true"]),
    ("gguf", ["truncated.gguf", "not a readable GGUF model"]),
])
def test_models_deltatune_cannot_train_are_refused_naming_the_file(files, tmp_path, capsys, base, fragments):
    code, _, err = run(capsys, *fit(files, tmp_path, f"--model.base={files[base]}"))
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "run").exists()


def test_data_that_is_not_utf8_names_file_and_line(files, tmp_path, capsys):
    data = tmp_path / "latin1.jsonl"
    lines = [json.dumps(r).encode() for r in ROWS]
    record = {"instruction": "Say café.", "input": "", "output": "café"}
    lines[2] = json.dumps(record, ensure_ascii=False).encode("latin-1")  # é is one byte, 0xe9: not UTF-8
    data.write_bytes(b"\n".join(lines) + b"\n")
    builder = f"--data.builder={{name: alpaca, config: {{path: {data}, max_length: 48}}}}"
    code, _, err = run(capsys, *fit(files, tmp_path, builder))
    assert_one_line_error(code, err, f"{data}:3:", "not UTF-8", "column")


# -- Lightning's own switches work -----------------------------------------------------------------
def test_fit_without_a_progress_bar(files, tmp_path, capsys):
    code, _, err = run(capsys, *fit(files, tmp_path, "--trainer.enable_progress_bar=false"))
    assert code == 0, err
    assert (tmp_path / "run" / "adapter" / MANIFEST).is_file()


def test_fit_without_checkpointing_says_it_cannot_be_resumed(files, tmp_path, capsys):
    code, _, err = run(capsys, *fit(files, tmp_path, "--trainer.enable_checkpointing=false"))
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "enable_checkpointing" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:") and "cannot be resumed" in warnings[0]
    assert (tmp_path / "run" / "adapter" / MANIFEST).is_file()
    assert not list((tmp_path / "run").rglob("*.ckpt"))


# -- generate and export ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, fragments", [
    (["--raw", "--prompt", ""], ["--prompt #1", "is empty"]),
    (["--prompt", "hi", "--max_new_tokens", "0"], ["--max_new_tokens", "at least 1", "(got 0)"]),
    (["--prompt", "hi", "--max_new_tokens", "-3"], ["--max_new_tokens", "(got -3)"]),
], ids=["empty-raw-prompt", "zero-new-tokens", "negative-new-tokens"])
def test_generate_refuses_bad_arguments(files, capsys, argv, fragments):
    code, _, err = run(capsys, "generate", "--adapter", str(files["adapter"]), *argv)
    assert_one_line_error(code, err, *fragments)


def test_a_prompt_longer_than_the_model_positions_loses_its_start_with_a_warning(files, capsys):
    code, out, err = run(capsys, "generate", "--adapter", str(files["adapter"]), "--raw",
                         "--prompt", "ab" * 300, "--max_new_tokens", "3")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "prompt 1 has 600 tokens" in warnings[0] and "first 91 tokens" in warnings[0]
    assert len(out.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["generate", "export"])
@pytest.mark.parametrize("adapter, fragments", [
    ("damaged_weights", [f"damaged-weights/{WEIGHTS}", "cannot be read"]),
    ("damaged_manifest", [f"damaged-manifest/{MANIFEST}:", "not valid JSON"]),
])
def test_a_damaged_adapter_is_named(files, tmp_path, capsys, command, adapter, fragments):
    rest = ["--prompt", "hi"] if command == "generate" else ["--out", str(tmp_path / "out")]
    code, _, err = run(capsys, command, "--adapter", str(files[adapter]), *rest)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "out").exists()


def test_an_adapter_trained_with_remote_code_needs_the_users_consent(files, tmp_path, capsys):
    assert json.loads((files["trusted"] / MANIFEST).read_text())["trust_remote_code"] is True
    assert json.loads((files["adapter"] / MANIFEST).read_text())["trust_remote_code"] is False
    for command, rest in (("generate", ["--prompt", "hi", "--max_new_tokens", "2"]),
                          ("export", ["--out", str(tmp_path / "peft")])):
        code, _, err = run(capsys, command, "--adapter", str(files["trusted"]), *rest)
        assert_one_line_error(code, err, str(files["trusted"]), "--trust_remote_code")
        code, out, err = run(capsys, command, "--adapter", str(files["trusted"]), *rest, "--trust_remote_code")
        assert code == 0, err
    assert (tmp_path / "peft" / "adapter_config.json").is_file()


# -- tracebacks on request ------------------------------------------------------------------------------
def test_debug_flag_and_environment_show_the_traceback(files, capsys, monkeypatch):
    argv = ["generate", "--adapter", str(files["damaged_manifest"]), "--prompt", "hi"]
    code, _, err = run(capsys, *argv, "--debug")
    assert code == 1 and "Traceback" in err and "DamagedFileError" in err
    monkeypatch.setenv("DELTATUNE_DEBUG", "1")
    code, _, err = run(capsys, *argv)
    assert code == 1 and "Traceback" in err
    monkeypatch.setenv("DELTATUNE_DEBUG", "0")
    assert_one_line_error(*run(capsys, *argv)[::2], "not valid JSON")


# -- plugins ------------------------------------------------------------------------------------------
EVALUATOR = GOOD.format(name="echo")  # an evaluator plugin module registering `echo`


@pytest.fixture
def fresh_plugins():
    """The process-wide plugin manager reloaded from the (faked) installed distributions."""
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def test_a_plugin_calling_sys_exit_on_import_is_skipped_and_named(files, tmp_path, capsys, fake_dist, fresh_plugins):
    fake_dist("deltatune-quitter", "0.3", {"quitter": "import sys\nsys.exit(3)\n"})
    code, out, err = run(capsys, "plugins", "--check", "--json")
    assert code == 0, err
    failed = json.loads(out)["failed"]
    assert [(f["distribution"], f["version"]) for f in failed] == [("deltatune-quitter", "0.3")]
    assert "SystemExit(3)" in failed[0]["error"]
    # fit names it in one line (this run then stops at its own bad option, before any weight loads)
    code, _, err = run(capsys, *fit(files, tmp_path, "--data.batch_size=0"))
    assert_one_line_error(code, err, "data.batch_size")
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "deltatune-quitter 0.3" in warnings[0] and "SystemExit(3)" in warnings[0]


def test_plugins_shows_two_distributions_registering_one_name(capsys, fake_dist, fresh_plugins):
    fake_dist("deltatune-echo-a", "1.0", {"echoa": EVALUATOR})
    fake_dist("deltatune-echo-b", "2.0", {"echob": EVALUATOR})
    code, out, err = run(capsys, "plugins", "--check", "--json")
    assert code == 0, err
    conflicts = json.loads(out)["conflicts"]
    assert conflicts == [{"kind": "evaluator", "name": "echo",
                          "distributions": ["deltatune-echo-a", "deltatune-echo-b"]}]
    code, out, _ = run(capsys, "plugins", "--check")
    assert code == 0 and "name conflicts" in out and "deltatune-echo-a 1.0" in out and "deltatune-echo-b 2.0" in out
