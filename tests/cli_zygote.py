"""A process that imports the batch-defs CLI once and forks a child for each command.

Each command still runs in a process of its own, with its own environment, working folder,
output and exit code, exactly as `python -m batch_defs.cli ARGS` would; it only skips the
~2.5 s of CPU that importing dagster, pandas and SQLAlchemy costs every fresh interpreter (the
suite runs some 150 commands on 2 cores). Because the imports happen before any command's
environment exists, a module that read DAGSTER_HOME or BATCH_DEFS_PATH at import time would
break these tests: the zygote also guards "no work at import time".

Tests that signal, kill or race the CLI start it with subprocess instead (tests.conftest.CLI).

Protocol: one JSON request per line on stdin ({"args", "env", "cwd", "stdout", "stderr",
"timeout_s"}); one JSON reply per line on stdout ({"returncode"}).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any


def _run_command(request: dict[str, Any]) -> int:
    """In the forked child: become the command's process, run it, return its exit code."""
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
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
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


def serve() -> None:
    import batch_defs.cli  # noqa: F401 - the imports every command would pay
    import batch_defs.client  # noqa: F401
    import batch_defs.control  # noqa: F401
    import batch_defs.ledger  # noqa: F401

    # fork() copies only the calling thread: a thread started by an import would be lost.
    assert threading.active_count() == 1, threading.enumerate()
    replies = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        replies.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _run_command(request)
            except BaseException as exc:  # noqa: BLE001 - the child must never return here
                import traceback

                traceback.print_exception(exc)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code if 0 <= code < 256 else 1)
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve()
