"""Where a slot's handler call runs: in the slot's thread, or in a worker process.

`options.workers: processes` is for CPU-bound handlers (templating, parsing, hashing), which
threads cannot spread over cores (the GIL). The engine's slots stay threads: ledger writes,
group commit, limits, leases and retries are unchanged. A slot only hands the handler call
to an idle worker process and waits for its answer.

Why our own small pool rather than concurrent.futures.ProcessPoolExecutor: when one of its
processes dies, that pool breaks and fails every call in flight; here a worker that dies
(os._exit, a segfault, the OOM killer) fails only the item it held, and is replaced.

Workers are fresh interpreters running this module's worker_main (WORKER_BOOT): they
never re-run the parent's __main__ (multiprocessing's spawn and forkserver both do) nor import
Dagster or the batch definitions. What crosses to a worker is
pickled: the handler by reference (module:function, imported beside the batch file), the
item, and a TaskContext without resources, journal or Dagster log.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from batch_defs.tasks.base import RejectItem, TaskContext


class WorkerMode(StrEnum):
    THREADS = "threads"  # the handler runs in the slot's own thread (today's behaviour)
    PROCESSES = "processes"  # the slot hands the call to a worker process


class WorkerDiedError(RuntimeError):
    """The worker process running an item ended without answering (killed, crashed)."""


class NoJournalInWorkerError(RuntimeError):
    """ctx.recall/remember/track_process need the ledger, which stays in the run's process."""


@dataclass(frozen=True)
class HandlerRef:
    """A handler as a worker finds it: `module:function`, importable beside the batch file."""

    module: str
    function: str
    base_dir: str


def handler_ref(handler: Callable[..., Any], base_dir: Path) -> HandlerRef | None:
    """The handler's reference if a worker process can import it (a module-level function,
    as `python` tasks give); None for closures and objects, which hold state (clients,
    compiled templates, connections) and run in the slot's thread."""
    module, name = getattr(handler, "__module__", None), getattr(handler, "__qualname__", "")
    if not module or "." in name or "<" in name or module == "__main__":
        return None
    if getattr(sys.modules.get(module), name, None) is not handler:
        return None
    return HandlerRef(module, name, str(base_dir))


# The worker's side


class _WorkerJournal:
    def recall(self, key: str) -> Any:
        raise NoJournalInWorkerError("ctx.recall() is not available with options.workers: "
                                "processes (use workers: threads)")

    def remember(self, key: str, value: Any) -> None:
        raise NoJournalInWorkerError("ctx.remember() is not available with options.workers: "
                                "processes (use workers: threads)")


@dataclass(frozen=True)
class _Call:
    ref: HandlerRef
    data: dict[str, Any]
    context: TaskContext  # without resources, log and journal


@dataclass(frozen=True)
class _Failure:
    """An exception as it crosses back: the original if it pickles, else its name, text and
    the attributes retries look at (transient, status codes)."""

    error: BaseException | None
    type_name: str = ""
    text: str = ""
    attributes: tuple[tuple[str, Any], ...] = ()


RETRY_ATTRIBUTES = ("transient", "status_code", "retry_after_s")


def _failure(exc: BaseException) -> _Failure:
    if isinstance(exc, RejectItem):  # its cost and tokens are not in its args
        return _Failure(None, "RejectItem", str(exc), attributes=(
            ("cost", exc.cost), ("tokens", exc.tokens), ("attempt_log", exc.attempt_log)))
    try:
        pickle.loads(pickle.dumps(exc))
        return _Failure(exc)
    except Exception:  # an exception class that does not survive pickling
        attributes = tuple((name, getattr(exc, name)) for name in RETRY_ATTRIBUTES
                           if isinstance(getattr(exc, name, None), bool | int | float | str))
        return _Failure(None, type(exc).__name__, str(exc), attributes)


def raise_failure(failure: _Failure) -> None:
    """Raise, in the slot's thread, what the handler raised in the worker."""
    if failure.error is not None:
        raise failure.error
    values = dict(failure.attributes)
    if failure.type_name == "RejectItem":
        raise RejectItem(failure.text, values["cost"], values["tokens"], values["attempt_log"])
    # A stand-in of the same name, so the item's error text and retry_on match as in a thread.
    stand_in = type(failure.type_name, (Exception,), {})
    error = stand_in(failure.text)
    for name, value in values.items():
        setattr(error, name, value)
    raise error


def _answer(call: _Call, imported: dict[HandlerRef, Callable[..., Any]]) -> tuple[bool, Any]:
    from batch_defs.tasks.python import import_function

    try:
        handler = imported.get(call.ref)
        if handler is None:
            handler = import_function(f"{call.ref.module}:{call.ref.function}",
                                      Path(call.ref.base_dir))
            imported[call.ref] = handler
        context = replace(call.context, journal=_WorkerJournal(),
                          log=logging.getLogger("batch_defs.task"))
        return True, handler(call.data, context)
    except BaseException as exc:  # every failure goes back to the slot, as in a thread
        return False, _failure(exc)


def serve(calls: Any, answers: Any) -> None:
    """A worker's loop: one call at a time, until the run's process closes the pipe."""
    imported: dict[HandlerRef, Callable[..., Any]] = {}
    while True:
        try:
            call = pickle.load(calls)
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if call is None:
            return
        ok, value = _answer(call, imported)
        try:
            data = pickle.dumps((ok, value))
        except Exception as exc:  # the output does not pickle: the item fails saying so
            data = pickle.dumps((False, _failure(TypeError(
                f"the handler's output cannot be sent back from its worker process: {exc}"))))
        answers.write(data)
        answers.flush()


def worker_main() -> None:
    """`python -m batch_defs.workers`: the protocol on stdin and a private copy of stdout;
    what handlers print goes to stderr."""
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, answers)


# The run's side


class _Worker:
    """A fresh interpreter that imports only this module and the handlers' modules: never
    the parent's __main__ (as multiprocessing's spawn and forkserver do), nor Dagster."""

    def __init__(self, number: int):
        self.number = number
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.process = subprocess.Popen([sys.executable, "-c", WORKER_BOOT],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env=env)

    @property
    def pid(self) -> int:
        return self.process.pid

    def call(self, call: _Call) -> tuple[bool, Any]:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(pickle.dumps(call))
            stdin.flush()
            return pickle.load(stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            code = self.process.wait(5)
            raise WorkerDiedError(f"worker process {self.pid} died (exit code {code}) while "
                             f"running item {call.context.key}") from None

    def stop(self) -> None:
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()  # its loop ends at EOF
            self.process.wait(2)
        except (OSError, subprocess.TimeoutExpired):  # a handler still running
            self.process.kill()
            self.process.wait(2)
        if self.process.stdout is not None:
            self.process.stdout.close()


class ProcessPool:
    """Up to `size` worker processes, started when first needed; each runs one call at a
    time, and a slot waits for an idle one."""

    def __init__(self, size: int):
        self.size = size
        self.idle: queue.Queue[_Worker] = queue.Queue()
        self.lock = threading.Lock()
        self.started = 0
        self.workers: list[_Worker] = []
        self.closed = False

    def call(self, ref: HandlerRef, data: dict[str, Any], ctx: TaskContext) -> Any:
        context = replace(ctx, resources={}, log=None, journal=None)  # type: ignore[arg-type]
        worker = self._checkout()
        try:
            ok, value = worker.call(_Call(ref, data, context))
        except WorkerDiedError:
            self._replace(worker)
            raise
        self.idle.put(worker)
        if not ok:
            raise_failure(value)
        return value

    def _checkout(self) -> _Worker:
        with self.lock:
            if self.closed:
                raise RuntimeError("the run's worker processes are shut down")
            if self.idle.empty() and self.started < self.size:
                self.started += 1
                worker = _Worker(len(self.workers))
                self.workers.append(worker)
                return worker
        return self.idle.get()

    def _replace(self, dead: _Worker) -> None:
        """A new worker takes the dead one's place (started when next needed)."""
        with self.lock:
            self.started -= 1
            self.workers.remove(dead)
        dead.stop()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            workers, self.workers = self.workers, []
        for worker in workers:
            worker.stop()

    @property
    def pids(self) -> list[int]:
        return [worker.pid for worker in self.workers]


_pools: dict[str, ProcessPool] = {}
_pools_lock = threading.Lock()


def pool_for(run_id: str, size: int) -> ProcessPool:
    """The run's pool in this process, made by the first call that needs it."""
    with _pools_lock:
        pool = _pools.get(run_id)
        if pool is None:
            pool = _pools[run_id] = ProcessPool(size)
            if len(_pools) == 1:
                atexit.register(close_all)  # before multiprocessing's own exit joins them
        return pool


def worker_count(options: Any) -> int:
    return options.processes or os.cpu_count() or 1


def call_handler(options: Any, handler: Callable[..., Any], data: dict[str, Any],
                 ctx: TaskContext) -> Any:
    """One item's handler call, where options.workers says: the slot engine's only hook."""
    if options.workers == WorkerMode.PROCESSES:
        ref = handler_ref(handler, ctx.base_dir)
        if ref is not None:
            return pool_for(ctx.run_id, worker_count(options)).call(ref, data, ctx)
    return handler(data, ctx)


def close_workers(run_id: str) -> None:
    """At the run's end in this process: its worker processes exit."""
    with _pools_lock:
        pool = _pools.pop(run_id, None)
    if pool is not None:
        pool.close()


def close_all() -> None:
    for run_id in list(_pools):
        close_workers(run_id)


def runs_in_processes(task: str) -> bool:
    """Task types whose handlers go to worker processes under workers: processes."""
    return task == "python"


THREAD_REASONS: Mapping[str, str] = {
    "http": "it holds a connection pool",
    "sql": "it holds database connections and transactions",
    "email": "it holds an SMTP connection",
    "llm": "it holds a client and waits on the network",
    "embed": "it holds the model in memory",
    "shell": "it already runs a process of its own",
    "template": "its templates are compiled once in the run's process",
    "validate": "it is cheap next to the cost of sending the item to a process",
}


# A worker's first lines (`python -c`): the packages batch_defs and batch_defs.tasks run their
# __init__ only when an attribute of theirs is first read, so a worker imports what its
# handler needs, not every task type (2-3 s of CPU per worker otherwise). runpy's `-m` would
# import the package before any of this could run.
WORKER_BOOT = """
import importlib.util, sys, types
for name in ("batch_defs", "batch_defs.tasks"):
    spec = importlib.util.find_spec(name)
    package = types.ModuleType(name)
    package.__spec__, package.__file__ = spec, spec.origin
    package.__path__ = list(spec.submodule_search_locations)
    def load(attr, package=package, spec=spec):
        del package.__dict__["__getattr__"]
        spec.loader.exec_module(package)
        return getattr(package, attr)
    package.__dict__["__getattr__"] = load
    sys.modules[name] = package
from batch_defs.workers import worker_main
worker_main()
"""


# What `batch-defs validate` says about these choices (notes: the batch loads and runs)

ONE_STEP_PER_ITEM = (
    "chunk_size: 1 makes each item its own Dagster step (its own logs and retry in the UI), "
    "and Dagster's in-process executor runs one step at a time: the slots work ahead into "
    "the next steps' items, but every step adds its own overhead (100 items x 2 phases x "
    "100 ms at concurrency 10 take about 20 s here, against 2 s for plain threads and a "
    "few seconds in chunks); choose it for a few dozen items that each "
    "need their own step, else keep chunk_size: auto (docs/yaml.md, options)")


def option_notes(spec: Any) -> list[tuple[list[str | int], str]]:
    """(loc, note) for options that cost more than a user may expect."""
    from batch_defs.tasks import TASK_TYPES

    notes: list[tuple[list[str | int], str]] = []
    options = spec.options
    if options.chunk_size == 1:
        notes.append((["options", "chunk_size"], ONE_STEP_PER_ITEM))
    if options.workers != WorkerMode.PROCESSES:
        return notes
    for index, phase in enumerate(spec.phases):
        tasks = ([task for task, _ in phase.route_configs().values()]
                 if phase.route is not None else [phase.task])
        for task in sorted(set(tasks) - {"python"}):
            reason = THREAD_REASONS.get(task, "only python handlers are sent to processes")
            if task in TASK_TYPES:
                notes.append((["phases", index, "task"],
                              f"task {task} runs in the slots' threads under workers: "
                              f"processes ({reason})"))
    return notes


def validate_notes(loaded: Any) -> list[Any]:
    """option_notes as SpecProblems naming the file and line, for `batch-defs validate`."""
    from batch_defs import loader, yamlio

    found = option_notes(loaded.spec)
    if not found:
        return []
    display = loaded.path.name
    data, root = yamlio.load(yamlio.read_text(loaded.path))
    if loaded.path.name == loader.COMPONENT_FILE:
        display = f"{loaded.path.parent.name}/{loaded.path.name}"
        root, _ = loader._component_attributes(root, data, display)
    return [loader.SpecProblem(display, loader._line_of(root, loc), loader.format_loc(loc),
                               note) for loc, note in found]
