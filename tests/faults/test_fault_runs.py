"""Faults during ``deltatune fit``: kill -9 mid-step, during the checkpoint write and during the adapter
write; Ctrl+C; a full disk while writing a checkpoint and while writing the adapter.

Each asserts that nothing is lost (the previous checkpoint and adapter load and are unchanged), that an
error is one clear line (no traceback), and that ``--ckpt_path last`` then reaches the uninterrupted
run's adapter bit for bit.
"""

from __future__ import annotations

import signal

from faults.faultrun import STEPS, adapter_tensors, assert_one_line_error, assert_same_adapter, fit, step_of


def test_kill_mid_step_then_resume_is_exact(tmp_path, uninterrupted):
    killed = fit(tmp_path, "--trainer.callbacks.step=5", fault="KillMidStep")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert step_of(tmp_path / "checkpoints" / "last.ckpt") == 4
    assert not (tmp_path / "adapter").exists()
    resumed = fit(tmp_path, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_adapter(adapter_tensors(tmp_path), uninterrupted)


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, uninterrupted):
    killed = fit(tmp_path, "--trainer.callbacks.step=6", fault="KillDuringCheckpointWrite")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = tmp_path / "checkpoints"
    assert step_of(checkpoints / "last.ckpt") == 4, "the half-written checkpoint never replaced the last one"
    assert [p.name for p in checkpoints.glob(".last.ckpt.tmp-*")], "the cut-off write is a temporary file"
    resumed = fit(tmp_path, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"], "the dead writer's file is cleaned"
    assert_same_adapter(adapter_tensors(tmp_path), uninterrupted)


def test_kill_during_adapter_write_keeps_the_previous_adapter(tmp_path, uninterrupted):
    first = fit(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}
    # resuming from the last step's checkpoint trains nothing and writes the adapter again: killed mid-write
    killed = fit(tmp_path, "--ckpt_path=last", fault="KillDuringAdapterWrite")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()} == before
    assert list(tmp_path.glob(".adapter.tmp-*")), "the cut-off adapter is a temporary folder"
    again = fit(tmp_path, "--ckpt_path=last")
    assert again.returncode == 0, again.stderr[-3000:]
    assert not list(tmp_path.glob(".adapter*")), "the dead writer's folder is cleaned"
    assert_same_adapter(adapter_tensors(tmp_path), uninterrupted)


def test_ctrl_c_stops_cleanly_and_resume_is_exact(tmp_path, uninterrupted):
    stopped = fit(tmp_path, "--trainer.callbacks.step=6", fault="InterruptAt")
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert step_of(tmp_path / "checkpoints" / "last.ckpt") == 4
    resumed = fit(tmp_path, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_adapter(adapter_tensors(tmp_path), uninterrupted)


def test_disk_full_during_checkpoint_write_is_one_line_and_keeps_the_previous_checkpoint(small_disk, uninterrupted):
    root = small_disk / "run"
    full = fit(root, "--trainer.callbacks.step=6", fault="FillDiskAt")
    assert_one_line_error(full, "cannot write checkpoint", "last.ckpt", "No space left on device", "intact")
    checkpoints = root / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"], "no partial file is left"
    assert step_of(checkpoints / "last.ckpt") == 4
    (root / "filler").unlink()
    resumed = fit(root, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_adapter(adapter_tensors(root), uninterrupted)


def test_disk_full_during_adapter_write_is_one_line_and_keeps_the_previous_adapter(small_disk):
    root = small_disk / "run"
    first = fit(root, "--trainer.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    saved = {p.name: p.read_bytes() for p in (root / "adapter").iterdir()}
    full = fit(root, "--ckpt_path=last", "--trainer.callbacks.step=0", fault="FillDiskAt")
    assert_one_line_error(full, "cannot write", "adapter", "intact")
    assert {p.name: p.read_bytes() for p in (root / "adapter").iterdir()} == saved
    assert not list(root.glob(".adapter*")), "no temporary folder is left"
    assert step_of(root / "checkpoints" / "last.ckpt") == STEPS, "the run's checkpoint is there to write it again"
