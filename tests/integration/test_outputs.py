"""deltatune never deletes what it did not write: export and fit targets, leftovers of killed writers,
permissions, and the run's own plot (core/deltatune/io/atomic.py, core/deltatune/train/resume.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_output import error_line

from adapter_cases import LORA_ATTN, trained_adapter
from deltatune.cli.main import main
from deltatune.errors import OutputError
from deltatune.io.atomic import MARKER, atomic_file, atomic_folder, recover

ROOT = Path(__file__).resolve().parents[2]
LORA = ROOT / "tests" / "configs" / "tiny-lora.yaml"
QUICK = ["--seed_everything=0", "--model.compare_base=false", "--model.samples=0", "--trainer.max_steps=2"]


def dead_pid() -> int:
    """The id of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}



@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    trained_adapter(tmp_path / "adapter", [LORA_ATTN])
    return tmp_path / "adapter"


@pytest.mark.parametrize("fmt", ["peft", "merged"])
def test_export_refuses_to_replace_a_folder_deltatune_did_not_write(tmp_path, adapter, capsys, fmt):
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.py").write_text("print('mine')\n")
    for overwrite in ([], ["--overwrite"]):
        assert main(["export", "--adapter", str(adapter), "--out", str(project), "--format", fmt, *overwrite]) == 1
        assert "deltatune did not write it" in error_line(capsys)
    assert snapshot(project) == {"main.py": b"print('mine')\n"}


@pytest.mark.parametrize("out, says", [
    ("adapter", "it would replace"),  # the source adapter itself
    (".", "current folder"),
    ("", "current folder"),
])
def test_export_refuses_the_source_adapter_and_the_current_folder(tmp_path, adapter, capsys, monkeypatch, out, says):
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert main(["export", "--adapter", str(adapter), "--out", out or str(tmp_path), "--overwrite"]) == 1
    assert says in error_line(capsys)
    assert snapshot(tmp_path) == before


def test_export_refuses_a_folder_holding_the_adapter_and_an_existing_file(tmp_path, adapter, capsys):
    assert main(["export", "--adapter", str(adapter), "--out", str(tmp_path), "--overwrite"]) == 1
    assert "it would replace" in error_line(capsys)
    (tmp_path / "notes.txt").write_text("keep")
    assert main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "notes.txt")]) == 1
    assert "is not a folder" in error_line(capsys)
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_an_earlier_export_is_replaced_only_with_overwrite(tmp_path, adapter, capsys):
    out = tmp_path / "peft"
    assert main(["export", "--adapter", str(adapter), "--out", str(out)]) == 0
    assert (out / MARKER).is_file()
    first = snapshot(out)
    assert main(["export", "--adapter", str(adapter), "--out", str(out)]) == 1
    assert "--overwrite" in error_line(capsys)
    assert snapshot(out) == first
    assert main(["export", "--adapter", str(adapter), "--out", str(out), "--overwrite"]) == 0
    assert snapshot(out) == first and not list(tmp_path.glob(".peft*"))


def test_fit_refuses_an_adapter_dir_holding_the_run_before_training(tmp_path, capsys):
    assert main(["fit", "--config", str(LORA), f"--trainer.default_root_dir={tmp_path}", *QUICK,
                 "--checkpoint.every_n_train_steps=1"]) == 0
    before = snapshot(tmp_path)
    for target in (tmp_path, tmp_path.parent, tmp_path / "checkpoints"):
        capsys.readouterr()
        assert main(["fit", "--config", str(LORA), f"--trainer.default_root_dir={tmp_path}", *QUICK,
                     f"--model.adapter_dir={target}", "--ckpt_path=last", "--trainer.max_steps=3"]) == 1
        line = error_line(capsys)
        assert "refusing" in line and str(target) in line
    assert snapshot(tmp_path) == before, "nothing was trained or written"


def test_a_new_fit_over_an_earlier_run_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    run = ["fit", "--config", str(LORA), f"--trainer.default_root_dir={tmp_path}", *QUICK,
           "--checkpoint.every_n_train_steps=1"]
    assert main(run) == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(run) == 1
    line = error_line(capsys)
    assert "earlier run" in line and "--ckpt_path last" in line and "--model.overwrite true" in line
    assert snapshot(tmp_path) == before
    assert main([*run, "--model.overwrite=true"]) == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"], "no last-v1.ckpt"


def test_fit_refuses_an_adapter_dir_deltatune_did_not_write(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("a,b\n")
    assert main(["fit", "--config", str(LORA), f"--trainer.default_root_dir={tmp_path / 'run'}", *QUICK,
                 f"--model.adapter_dir={mine}", "--model.overwrite=true"]) == 1
    assert "deltatune did not write it" in error_line(capsys)
    assert snapshot(mine) == {"data.csv": b"a,b\n"} and not (tmp_path / "run" / "checkpoints").exists()


def test_outputs_get_the_permissions_of_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "folder") as tmp:
            (tmp / "x").write_text("x")
        with atomic_file(tmp_path / "file.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "file.json").stat().st_mode & 0o777 == 0o644


def test_a_failed_write_leaves_the_previous_version_and_no_leftover(tmp_path):
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(OutputError, match="previous version is intact"):
        with atomic_folder(tmp_path / "out", overwrite=True) as tmp:
            raise OSError(28, "No space left on device")
    assert (tmp_path / "out" / "v").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_killed_writers_are_cleaned_and_a_parked_version_is_restored(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    (tmp_path / f".adapter.tmp-{dead}-0123abcd").mkdir()
    (tmp_path / f".report.json.tmp-{dead}-0123abcd").write_text("{")
    (tmp_path / f".adapter.tmp-{alive}-0123abcd").mkdir()  # a writer still running: untouched
    parked = tmp_path / f".adapter.old-{dead}"
    parked.mkdir()
    (parked / MARKER).write_text("{}")
    (tmp_path / ".adapter.backup").mkdir()  # not deltatune's pattern: untouched
    actions = recover(tmp_path / "adapter") + recover(tmp_path / "report.json")
    assert len(actions) == 3 and any("restored" in a for a in actions)
    assert (tmp_path / "adapter" / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".adapter.backup", f".adapter.tmp-{alive}-0123abcd", "adapter"])


def test_report_never_rewrites_the_runs_plot(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"name": "run", "history": {"train": [[1, 2.0], [2, 1.5]]}}))
    (run / "losses.png").write_bytes(b"the plot fit wrote")
    assert main(["report", str(run)]) == 0
    assert (run / "losses.png").read_bytes() == b"the plot fit wrote"
    assert str(run / "losses.png") in capsys.readouterr().out.replace("\n", "")  # rich wraps a long path
