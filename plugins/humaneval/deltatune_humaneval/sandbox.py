"""Running untrusted Python programs: one process each, limited, isolated where the OS allows it.

Every program runs as ``python -I`` on a temporary file, in a new session, with an empty temporary
working directory, an empty environment, stdin closed, and these ``setrlimit`` limits: CPU time,
address space, size of a written file, number of processes, no core dump. A wall-clock timeout kills
the whole process group. On top of that, where the OS allows it without privileges:

* **network and processes**: ``unshare --user --map-root-user --net --pid --fork --kill-child`` runs
  the program in new user, network and PID namespaces: no network interface but a loopback that is
  down, so nothing can be reached, not even 127.0.0.1; and every process the program starts dies with
  it, even one that left the process group;
* **files and processes, when deltatune runs as root**: the program runs as ``nobody`` (uid 65534),
  so it cannot write where ``nobody`` may not (the user's home, the caller's folders), and the
  process limit binds (the kernel does not apply it to root).

:func:`detect` finds out, by running a trivial program, which of these this machine allows;
:meth:`Sandbox.describe` says in words what a run is guaranteed.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from deltatune.api import ConfigError

NOBODY = 65534
ISOLATE = ("--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child")
MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one program may use."""

    timeout_s: float = 5.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    max_processes: int = 16


@dataclass(frozen=True)
class Outcome:
    """How one program ended: ``passed`` when it exited with status 0 within its limits."""

    passed: bool
    status: str


@dataclass(frozen=True)
class Sandbox:
    """How programs run here: the interpreter, the ``unshare`` prefix (empty: no namespaces), and the
    user id they run as (``None``: deltatune's own, which is not root)."""

    python: str
    unshare: tuple[str, ...]
    uid: int | None

    def describe(self) -> str:
        """What a sandboxed program is guaranteed on this machine, in one line."""
        parts = ["network: none (new network namespace)" if self.unshare else
                 "network: NOT isolated (no unprivileged user namespaces here)",
                 "processes: killed with the program (new PID namespace)" if self.unshare else
                 "processes: killed with the program's process group",
                 "files: runs as nobody (uid 65534)" if self.uid is not None else
                 "files: runs as this user (it can write where this user can; file size limited)"]
        return "; ".join(parts)

    def run(self, program: str, limits: Limits) -> Outcome:
        """Run ``program`` (Python source) under ``limits``; never raises for what the program does."""
        with tempfile.TemporaryDirectory(prefix="deltatune-sandbox-") as tmp:
            root = Path(tmp)
            source, workdir = root / "program.py", root / "work"
            source.write_text(program)
            workdir.mkdir()
            if self.uid is not None:  # nobody reads the program and owns its working folder, nothing else
                root.chmod(0o711)
                source.chmod(0o644)
                os.chown(workdir, self.uid, self.uid)
            with open(root / "output", "w+b") as output:
                try:
                    process = subprocess.Popen(
                        [*self.unshare, self.python, "-I", str(source)], cwd=workdir, env={}, stdin=subprocess.DEVNULL,
                        stdout=output, stderr=output, start_new_session=True,
                        preexec_fn=functools.partial(_limit_child, limits, self.uid, _tasks_of(self.uid)))
                except OSError as exc:
                    return Outcome(False, f"could not start: {exc}")
                try:
                    code: int | None = process.wait(timeout=limits.timeout_s)
                except subprocess.TimeoutExpired:
                    code = None
                _kill_group(process)  # the program if it outlived its time, or what it left in its group
                output.seek(max(0, output.seek(0, os.SEEK_END) - 2000))
                tail = output.read().decode(errors="replace").strip()
        if code is None:
            return Outcome(False, f"timed out after {limits.timeout_s:g} s")
        if code == 0:
            return Outcome(True, "passed")
        if code < 0:
            return Outcome(False, f"killed by {signal.Signals(-code).name}")
        last = tail.splitlines()[-1] if tail else f"exit status {code}"
        return Outcome(False, last[:300])


def _tasks_of(uid: int | None) -> int:
    """How many processes and threads the user ``uid`` (``None``: this one) runs now: the kernel's
    process limit counts them all, so a program's own allowance comes on top."""
    uid = os.getuid() if uid is None else uid
    count = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:  # it ended meanwhile
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            count += int(fields.get("Threads", "1"))
    return count


def _limit_child(limits: Limits, uid: int | None, running: int) -> None:
    """In the child, before ``exec``: the resource limits (the process limit ``max_processes`` above
    the user's ``running`` tasks), then (as root) the switch to ``uid``."""
    cpu = int(limits.timeout_s) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * MiB,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_mb * MiB,) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (running + limits.max_processes,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process group of ``process`` (it leads a session of its own) and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _interpreters() -> list[str]:
    """Python interpreters to try, this one first (``nobody`` may not be able to reach it)."""
    found = [os.path.realpath(sys.executable)] + [p for p in (shutil.which("python3"), "/usr/bin/python3") if p]
    return list(dict.fromkeys(os.path.realpath(p) for p in found if os.path.exists(p)))


@functools.cache
def detect() -> Sandbox:
    """The most isolated sandbox this machine allows, proved by running a program in it.

    As root, a sandbox that runs as ``nobody`` with an interpreter it can run is required (root ignores
    the process limit): raises :class:`deltatune.ConfigError` when there is none.
    """
    uid = NOBODY if os.geteuid() == 0 else None
    unshare = shutil.which("unshare")
    prefixes = ([(unshare, *ISOLATE)] if unshare else []) + [()]
    probe = Limits(timeout_s=10.0, max_processes=64)
    for prefix in prefixes:
        for python in _interpreters():
            sandbox = Sandbox(python, prefix, uid)
            if sandbox.run("import typing", probe).passed:
                return sandbox
    raise ConfigError("humaneval: no sandbox for model-written code works here (tried "
                      f"{', '.join(_interpreters())}{' as nobody' if uid is not None else ''}); "
                      "run deltatune as a user who is not root, or make a python3 reachable by uid 65534")
