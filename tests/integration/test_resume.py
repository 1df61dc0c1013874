"""Exact resume: a run crashed after step k and resumed reaches the uninterrupted run's adapter bit for bit.

Each case trains ``tiny-llama`` on the CPU (fp32, and one case with the frozen base in bf16) through the real CLI: N steps in one go; the same
run crashed when step k+1 starts (its last checkpoint is step k's); then ``--ckpt_path last``. The
resumed adapter must equal the uninterrupted one exactly (data order, position inside the epoch,
optimizer and scheduler state, random state all restored). Real kills are in ``tests/faults/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crash_callback import Crash
from deltatune.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
LORA = ROOT / "tests" / "configs" / "tiny-lora.yaml"
PACKED = ROOT / "tests" / "configs" / "tiny-chat-packed.yaml"
QUIET = ["--seed_everything=0", "--model.compare_base=false", "--model.samples=0", "--checkpoint.every_n_train_steps=2"]
MIX = ('[{name: alpaca, weight: 2, config: {path: examples/data/tasks-train.jsonl, limit: 40, max_length: 96}}, '
       '{name: alpaca, weight: 1, config: {path: examples/data/tasks-test.jsonl, limit: 24, max_length: 96}}]')

CASES = {  # config, options, steps N, crash after step k
    # 48 training rows in batches of 8 make 6 batches an epoch: step 8 is inside the second epoch
    "lora-adamw": (LORA, [], 10, 8),
    "lora-adamw-epoch-end": (LORA, [], 10, 6),
    "lora-adamw-bf16-base": (LORA, ["--model.base_dtype=bf16"], 10, 8),
    "lora-dropout-grouped": (LORA, ["--model.delta=[{name: lora, config: {r: 4, targets: all-linear, dropout: 0.2}}]",
                                    "--data.group_by_length=true"], 10, 4),
    "packing": (PACKED, ["--trainer.val_check_interval=null", "--data.extra_eval=null",
                         "--model.evaluators=[{name: perplexity}]"], 8, 4),
    "mixing": (LORA, [f"--data.builder={MIX}", "--data.val_fraction=0.2"], 10, 8),
    "lomo": (LORA, ["--model.optimizer={name: lomo, config: {lr: 0.05, clip_grad_norm: 1.0}}"], 10, 8),
}


def fit(config: Path, root: Path, *extra: str) -> int:
    return main(["fit", "--config", str(config), f"--trainer.default_root_dir={root}", *QUIET, *extra])


def adapter(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / "adapter" / "adapter.safetensors"))


@pytest.mark.parametrize("case", list(CASES))
def test_crashed_and_resumed_run_reaches_the_uninterrupted_adapter_exactly(case, tmp_path):
    config, extra, steps, crash = CASES[case]
    run = [*extra, f"--trainer.max_steps={steps}"]
    assert fit(config, tmp_path / "whole", *run) == 0
    try:
        code = fit(config, tmp_path / "parts", *run, "--trainer.callbacks+=crash_callback.RaiseAtStep",
                   f"--trainer.callbacks.step={crash + 1}")
    except Crash:
        code = 1
    assert code == 1 and not (tmp_path / "parts" / "adapter").exists()
    last = torch.load(tmp_path / "parts" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == crash
    assert fit(config, tmp_path / "parts", *run, "--ckpt_path=last") == 0
    whole, parts = adapter(tmp_path / "whole"), adapter(tmp_path / "parts")
    assert whole.keys() == parts.keys()
    different = [k for k in whole if not torch.equal(whole[k], parts[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}: " \
        f"{float((whole[different[0]] - parts[different[0]]).abs().max()):.3g}"
    report = json.loads((tmp_path / "parts" / "report.json").read_text())
    assert report["steps"] == steps
    assert [s for s, _ in report["history"]["train"]] == list(range(1, steps + 1)), "the loss history spans both parts"


def test_base_metrics_are_measured_once_and_reused_on_resume(tmp_path):
    run = ["fit", "--config", str(LORA), f"--trainer.default_root_dir={tmp_path}", "--seed_everything=0",
           "--model.samples=0", "--checkpoint.every_n_train_steps=2", "--trainer.max_steps=8"]
    assert main([*run, "--trainer.max_steps=4"]) == 0
    first = json.loads((tmp_path / "report.json").read_text())
    assert main([*run, "--ckpt_path=last"]) == 0
    second = json.loads((tmp_path / "report.json").read_text())
    assert second["base_metrics"] == first["base_metrics"], "not measured again on the trained weights"
    loss = "perplexity/loss"
    assert second["tuned_metrics"]["validation"][loss] < second["base_metrics"]["validation"][loss] - 0.1


@pytest.mark.parametrize("change, named", [
    (["--model.delta=[{name: lora, config: {r: 8, alpha: 16, targets: [o_proj]}}]"], "delta[0].config.targets"),
    (["--model.delta=[{name: vera, config: {r: 8, targets: all-linear}}]"], "delta[0].name"),
    (["--model.delta=[{name: lora, config: {r: 4, alpha: 16, targets: all-linear}}]"], "delta[0].config.r"),
])
def test_resuming_under_another_model_spec_is_refused_naming_what_differs(tmp_path, capsys, change, named):
    assert fit(LORA, tmp_path, "--trainer.max_steps=2") == 0
    before = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    capsys.readouterr()
    assert main(["fit", "--config", str(LORA), f"--trainer.default_root_dir={tmp_path}", *QUIET, *change,
                 "--trainer.max_steps=4", "--ckpt_path=last"]) == 1
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "cannot resume from" in out and named in out and "last.ckpt" in out
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == before


def test_ckpt_path_last_without_a_checkpoint_is_an_error_naming_the_folder(tmp_path, capsys):
    assert main(["fit", "--config", str(LORA), f"--trainer.default_root_dir={tmp_path / 'typo'}", *QUIET,
                 "--ckpt_path=last"]) == 1
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "no last checkpoint in" in out and str(tmp_path / "typo" / "checkpoints") in out
    assert not (tmp_path / "typo" / "adapter").exists()


@pytest.mark.parametrize("grouped", [False, True])
def test_the_loader_order_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch(grouped):
    from deltatune.data.order import ResumableLoader, ShuffledRows
    from deltatune.data.packing import LengthGroupedBatches

    def loader() -> ResumableLoader:
        if grouped:
            order = LengthGroupedBatches([(i * 7) % 11 + 1 for i in range(20)], 3, seed=5, group_batches=2)
            return ResumableLoader(list(range(20)), batch_sampler=order)
        return ResumableLoader(list(range(20)), batch_size=3, sampler=ShuffledRows(20, 3, seed=5))

    def epoch(dl: ResumableLoader, number: int) -> list[list[int]]:
        dl.order.set_epoch(number)
        return [b.tolist() for b in dl]

    whole = loader()
    epochs = [epoch(whole, e) for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2] and epoch(loader(), 2) == epochs[2], "a function of (seed, epoch)"
    interrupted = loader()
    interrupted.order.set_epoch(1)
    served = iter(interrupted)
    first = [next(served).tolist() for _ in range(4)]
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches": 4}
    resumed = loader()
    resumed.load_state_dict(state)
    assert first + [b.tolist() for b in resumed] == epochs[1]
    assert resumed.state_dict() == {"epoch": 2, "batches": 0}, "an epoch served whole resumes at the next one"
