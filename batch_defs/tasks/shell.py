"""`shell` task: runs a command per item from an argv list of templates (never through a shell)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
from pydantic import Field

from batch_defs.env import ENV_REFERENCE, RUN_ENV_MARKER
from batch_defs.tasks.base import Handler, TaskContext, TaskParams
from batch_defs.tasks.templating import compile_template, render, template_env, template_vars


class ShellParams(TaskParams):
    argv: list[str] = Field(min_length=1)  # templates; argv[0] is the program
    cwd: str | None = None  # template; relative to the batch file's folder (default: it)
    env: dict[str, str] = Field(default_factory=dict)  # templates; ${env:NAME} at run time
    inherit_env: bool = True  # start from this process's environment (false: PATH only)
    timeout_s: float | None = Field(default=None, gt=0)  # kills the command's process group
    max_output_bytes: int = Field(default=4096, ge=0)  # tail of stdout/stderr kept per item


class CommandFailedError(RuntimeError):
    """The command exited with a non-zero status; the message ends with its stderr."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def tail(data: bytes, limit: int) -> str:
    """The last `limit` bytes as text, marked when cut."""
    text = data[-limit:].decode("utf-8", errors="replace") if limit else ""
    return f"...{text}" if len(data) > limit else text


def env_template(value: str) -> str:
    """`${env:NAME}` in a param becomes a lookup in `_env`, filled when the command runs:
    expanded in the param's text only, never in item values rendered into it."""
    return ENV_REFERENCE.sub(lambda m: "{{ _env['" + m.group(1) + "'] }}", value)


def environment_values(names: set[str]) -> dict[str, str]:
    missing = sorted(n for n in names if n not in os.environ)
    if missing:
        raise ValueError(f"environment variable {missing[0]} is not set")
    return {name: os.environ[name] for name in names}


def working_dir(relative: str, ctx: TaskContext) -> Path:
    """cwd inside the batch file's folder or the output folder, never elsewhere."""
    path = (ctx.base_dir / relative).resolve()
    output = ctx.output_dir.resolve()
    if path.is_relative_to(output):
        path.mkdir(parents=True, exist_ok=True)
    elif not path.is_relative_to(ctx.base_dir.resolve()):
        raise PermissionError(f"cwd {relative!r} is outside the batch and output folders")
    if not path.is_dir():
        raise FileNotFoundError(f"cwd {relative!r}: no such folder")
    return path


# Linux: the command gets SIGKILL when the run's process dies (even by SIGKILL), through
# util-linux's setpriv, not preexec_fn (which is not safe in a process with threads).
DEATH_SIGNAL = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


def resolve_program(program: str, env: dict[str, str], cwd: Path) -> str:
    """The program to run, checked first, so a missing one is named whatever wraps it."""
    if os.sep in program:
        path = (cwd / program) if not os.path.isabs(program) else Path(program)
        if path.is_file() and os.access(path, os.X_OK):
            return program
    elif shutil.which(program, path=env.get("PATH", os.defpath)):
        return program
    raise FileNotFoundError(f"command not found: {program!r}")


def run_command(argv: list[str], cwd: Path, env: dict[str, str], timeout_s: float | None,
                ctx: TaskContext | None = None) -> tuple[int, bytes, bytes]:
    """(exit code, stdout, stderr). The command gets its own process group, so a timeout
    kills whatever it started too (a script's children would otherwise hold the pipes open
    and keep the item waiting); it dies with the run's process, and the group is recorded
    in the ledger so that a resume ends what a killed run left running."""
    resolve_program(argv[0], env, cwd)
    if ctx is not None:  # how a resume finds what this command left, recorded or not
        env = {**env, RUN_ENV_MARKER: ctx.run_id}
    process = subprocess.Popen([*DEATH_SIGNAL, *argv], cwd=cwd, env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        started = psutil.Process(process.pid).create_time()
    except psutil.NoSuchProcess:  # already over: there is nothing left to track
        started = time.time()
    ended = ctx.track_process(process.pid, started) if ctx is not None else (lambda: None)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise TimeoutError(f"{argv[0]} timed out after {timeout_s:g}s; stderr: "
                           f"{tail(stderr, 500) or '(none)'}") from None
    finally:
        if process.poll() is None:  # the item's thread is being torn down: no orphans
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        ended()
    return process.returncode, stdout, stderr


def make_handler(params: ShellParams, base_dir: Path) -> Handler:
    env = template_env()
    argv = [compile_template(env, a, f"argv[{i}]") for i, a in enumerate(params.argv)]
    cwd = compile_template(env, params.cwd, "cwd") if params.cwd else None
    variables_env = {name: compile_template(env, env_template(value), f"env.{name}")
                     for name, value in params.env.items()}
    env_names = {m.group(1) for value in params.env.values() for m in ENV_REFERENCE.finditer(value)}

    def run(item: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        variables = {**template_vars(item, ctx), "output_dir": str(ctx.output_dir),
                     "base_dir": str(ctx.base_dir)}
        command = [render(t, variables, f"argv[{i}]") for i, t in enumerate(argv)]
        if not command[0].strip():
            raise ValueError("argv[0] rendered to an empty program name")
        folder = working_dir(render(cwd, variables, "cwd"), ctx) if cwd else ctx.base_dir
        environ = (dict(os.environ) if params.inherit_env
                   else {"PATH": os.environ.get("PATH", os.defpath)})
        with_env = {**variables, "_env": environment_values(env_names)}
        environ.update({name: render(t, with_env, f"env.{name}")
                        for name, t in variables_env.items()})
        code, stdout, stderr = run_command(command, folder, environ, params.timeout_s, ctx)
        if code != 0:
            raise CommandFailedError(f"{command[0]} exited with {code}: "
                                     f"{tail(stderr, 1000).strip() or '(no stderr)'}", code)
        limit = params.max_output_bytes
        return {f"{ctx.phase}_exit_code": code, f"{ctx.phase}_stdout": tail(stdout, limit),
                f"{ctx.phase}_stderr": tail(stderr, limit)}

    return run
