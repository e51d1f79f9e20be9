"""A process that imports the batch-defs CLI once and forks a child for each command.

Each command still runs in a process of its own, with its own environment, working folder,
output files, pid and exit code, exactly as `python -m batch_defs.cli ARGS` would; it only
skips the CPU that a fresh interpreter spends importing and first using dagster, pandas,
SQLAlchemy and the chart library (~2.5 s per command, and a `run` 3.6 s -> 1.1 s: the suite
runs some 200 commands on 2 cores). Tests may signal or kill the child
by its pid. Because the imports happen before any command's environment exists, a module that
read DAGSTER_HOME or BATCH_DEFS_PATH at import time would break these tests: the zygote also
guards "no work at import time".

Protocol: one JSON request per line on stdin ({"args", "env", "cwd", "stdout", "stderr",
"returncode", "timeout_s"}: paths of files), one JSON reply per line on stdout ({"pid"}). When
the child ends, its exit code is written to the "returncode" file (written whole, by rename).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "batch_defs.cli"]

_ENDED: dict[int, str] = {}  # child pid -> its returncode file


def _run_command(request: dict[str, Any]) -> int:
    """In the forked child: become the command's process, run it, return its exit code."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})  # blocked while forking
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, name in ((1, "stdout"), (2, "stderr")):
        target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - fd 0 lives as long as the process
    for number in (signal.SIGCHLD, signal.SIGALRM):
        signal.signal(number, signal.SIG_DFL)
    signal.alarm(int(request["timeout_s"]))  # the default action ends the process
    sys.argv = ["batch-defs", *request["args"]]
    from batch_defs.cli import main

    try:
        main(args=request["args"], prog_name="batch-defs")
    except SystemExit as exit_:
        code = exit_.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    return 0


def _reap(*_: Any) -> None:
    """SIGCHLD: write each ended child's exit code where its request asked."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        path = _ENDED.pop(pid, None)
        if path is not None:
            with open(path + ".part", "w") as out:
                out.write(str(os.waitstatus_to_exitcode(status)))
            os.replace(path + ".part", path)


def _fork(request: dict[str, Any]) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        code = _run_command(request)
    except BaseException as exc:  # noqa: BLE001 - the child must never return to the loop
        import traceback

        traceback.print_exception(exc)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if 0 <= code < 256 else 1)
    return pid


def _warm_up() -> None:
    """Pay once what a `run` pays on its way: the CLI, the definitions and their assets,
    resources and sensors, the engine, sources and tasks, the results step's pandas and
    charts, and Dagster's execution machinery (a one-op job on a throwaway instance). A forked
    `run` then costs about 1.1 s of CPU instead of 3.6 s (measured on this machine)."""
    import importlib

    import dagster as dg

    for name in ("batch_defs.cli", "batch_defs.client", "batch_defs.control",
                 "batch_defs.ledger", "batch_defs.definitions", "batch_defs.engine",
                 "batch_defs.runner", "batch_defs.watch", "batch_defs.sources.files",
                 "batch_defs.sources.jsonstream", "batch_defs.sources.remote",
                 "batch_defs.tasks.python", "batch_defs.tasks.http", "batch_defs.tasks.sql",
                 "batch_defs.tasks.templating", "assets.factory", "assets.results",
                 "resources", "sensors.inbox", "sensors.schedules", "sensors.run_end",
                 "pandas", "alembic.command", "alembic.migration"):
        importlib.import_module(name)
    from batch_defs.report import prepare_charts

    prepare_charts()

    @dg.op
    def nothing() -> None:
        return None

    @dg.job
    def warm_up() -> None:
        nothing()

    # Quietly: its log lines would land in the captured output of the test that asked first.
    warm_up.execute_in_process(
        run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}})


def serve() -> None:
    _warm_up()
    # fork() copies only the calling thread: a thread started by an import would be lost.
    assert threading.active_count() == 1, threading.enumerate()
    replies = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        replies.flush()
        sys.stderr.flush()
        # No child may be reaped before its returncode file is known.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            pid = _fork(request)
            _ENDED[pid] = request["returncode"]
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()


class CliProcess:
    """A command forked by the zygote, seen from the test: the parts of subprocess.Popen that
    tests use (pid, poll, wait, communicate, kill, send_signal, returncode), its output in
    files (`stderr_text()` reads what it has written so far)."""

    def __init__(self, args: list[str], pid: int, folder: Path):
        self.args, self.pid, self.folder = args, pid, folder
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and (self.folder / "returncode").exists():
            self.returncode = int((self.folder / "returncode").read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def stdout_text(self) -> str:
        return (self.folder / "stdout").read_text()

    def stderr_text(self) -> str:
        return (self.folder / "stderr").read_text()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.stdout_text(), self.stderr_text()

    def send_signal(self, number: int) -> None:
        if self.poll() is None:  # an ended child's pid may belong to another process now
            os.kill(self.pid, number)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def result(self, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        try:
            out, err = self.communicate(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        if self.returncode == -signal.SIGALRM:
            raise subprocess.TimeoutExpired(self.args, timeout or 0, out, err)
        return subprocess.CompletedProcess(self.args, self.returncode or 0, out, err)


class Zygote:
    """The test process's side: starts the zygote on first use, asks it for commands."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None
        self.folder: Path | None = None
        self.lock = threading.Lock()

    def spawn(self, env: dict[str, str], args: tuple[str, ...],
              timeout_s: float) -> CliProcess | None:
        """The forked command; None when its import path is not the zygote's (a test that
        hides a package puts a folder first: the zygote has done its imports already)."""
        if env.get("PYTHONPATH") != str(PROJECT):
            return None
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self.folder = Path(tempfile.mkdtemp(prefix="cli_zygote_"))
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "tests.cli_zygote"], cwd=PROJECT, text=True,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    env={**os.environ, "PYTHONPATH": str(PROJECT), "COLUMNS": "200"})
            assert self.folder and self.process.stdin and self.process.stdout
            folder = Path(tempfile.mkdtemp(dir=self.folder))
            for name in ("stdout", "stderr"):  # readable from the start
                (folder / name).touch()
            request = {"args": list(args), "env": env, "cwd": str(PROJECT),
                       "stdout": str(folder / "stdout"), "stderr": str(folder / "stderr"),
                       "returncode": str(folder / "returncode"), "timeout_s": timeout_s}
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            reply = self.process.stdout.readline()
            assert reply, "the CLI zygote ended (tests/cli_zygote.py)"
        return CliProcess([*CLI, *args], json.loads(reply)["pid"], folder)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGCHLD, _reap)
    serve()
