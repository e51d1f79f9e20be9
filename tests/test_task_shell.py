"""The `shell` task (argv templates, no shell, confined cwd, env, timeouts) and dependency-aware
scheduling: the slot runner's order, limits and skips, and the shipped package_build batch."""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from batch_defs.definitions import build_definitions
from batch_defs.engine import run_items
from batch_defs.items import DependencyError, Item, dependency_order
from batch_defs.ledger import Ledger
from batch_defs.loader import PACKAGE_BATCHES
from batch_defs.tasks import TaskContext, build_handler
from batch_defs.tasks.shell import CommandFailedError
from batch_defs.tasks.templating import TemplateSecurityError
from resources.storage import BatchStorageResource
from tests.conftest import engine_plan, run_batch

PRINT_ARGV = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))"]


def context(tmp_path: Path, key: str = "k1") -> TaskContext:
    base = tmp_path / "batch"
    base.mkdir(exist_ok=True)
    return TaskContext(params={}, batch="builds", partition="p1", run_id="run-1",
                       phase="build", key=key, base_dir=base, output_dir=tmp_path / "out")


@pytest.mark.unit
def test_argv_items_are_single_arguments_never_shell_code(tmp_path: Path) -> None:
    hostile = "x; touch pwned && echo $(id) `id` | cat > pwned2 '\" \\"
    handler = build_handler("shell", {"argv": [*PRINT_ARGV, "{{ name }}", "--",
                                               "{{ key }}-{{ partition }}"]}, tmp_path)
    output = handler({"name": hostile}, context(tmp_path))
    assert json.loads(output["build_stdout"]) == [hostile, "--", "k1-p1"]
    assert output["build_exit_code"] == 0 and output["build_stderr"] == ""
    assert not list((tmp_path / "batch").iterdir())  # nothing was executed by a shell


@pytest.mark.unit
def test_env_values_are_templates_with_env_lookups(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUILD_TOKEN", "s3cret")
    monkeypatch.setenv("OTHER_SECRET", "must not leak")
    show = [sys.executable, "-c",
            "import os; print(os.environ['AUTH'], os.environ['LABEL'], sep='|')"]
    handler = build_handler("shell", {"argv": show, "env": {
        "AUTH": "Bearer ${env:BUILD_TOKEN}", "LABEL": "{{ label }}"}}, tmp_path)
    # An item value that looks like an env lookup stays text: item data cannot read secrets.
    output = handler({"label": "${env:OTHER_SECRET}"}, context(tmp_path))
    assert output["build_stdout"].strip() == "Bearer s3cret|${env:OTHER_SECRET}"
    monkeypatch.delenv("BUILD_TOKEN")
    with pytest.raises(ValueError, match="environment variable BUILD_TOKEN is not set"):
        handler({"label": "x"}, context(tmp_path))
    bare = build_handler("shell", {"argv": [sys.executable, "-c",
                                            "import os; print(sorted(os.environ))"],
                                   "inherit_env": False, "env": {"ONLY": "1"}}, tmp_path)
    assert "OTHER_SECRET" not in bare({}, context(tmp_path))["build_stdout"]


@pytest.mark.unit
def test_cwd_stays_inside_the_batch_or_output_folder(tmp_path: Path) -> None:
    pwd = [sys.executable, "-c", "import os; print(os.getcwd())"]
    default = build_handler("shell", {"argv": pwd}, tmp_path)
    ctx = context(tmp_path)
    assert default({}, ctx)["build_stdout"].strip() == str(ctx.base_dir)
    into_output = build_handler("shell", {"argv": pwd, "cwd": "{{ output_dir }}/{{ key }}"},
                                tmp_path)
    assert into_output({}, ctx)["build_stdout"].strip() == str(ctx.output_dir / "k1")
    escaping = build_handler("shell", {"argv": pwd, "cwd": "{{ where }}"}, tmp_path)
    for where in ("..", "/etc", "../batch/../../"):
        with pytest.raises(PermissionError, match="outside the batch and output folders"):
            escaping({"where": where}, ctx)


@pytest.mark.unit
def test_failures_timeouts_and_unsafe_templates(tmp_path: Path) -> None:
    failing = build_handler("shell", {"argv": [
        sys.executable, "-c", "import sys; print('x' * 9000); sys.stderr.write('e' * 3000 + "
        "'compiler error: missing header'); sys.exit(2)"]}, tmp_path)
    with pytest.raises(CommandFailedError, match=r"exited with 2: \.\.\.e+compiler error: "
                                                 r"missing header$") as failed:
        failing({}, context(tmp_path))
    assert failed.value.returncode == 2 and len(str(failed.value)) < 1100
    chatty = build_handler("shell", {"argv": [sys.executable, "-c", "print('y' * 9000)"],
                                     "max_output_bytes": 100}, tmp_path)
    assert chatty({}, context(tmp_path))["build_stdout"] == "..." + "y" * 99 + "\n"

    pid_file = tmp_path / "child.pid"
    # The command starts a grandchild holding the pipes; the timeout must end both, at once.
    sleeper = build_handler("shell", {"argv": [
        "sh", "-c", f"sleep 30 & echo $! > {pid_file}; wait"], "timeout_s": 0.5}, tmp_path)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out after 0.5s"):
        sleeper({}, context(tmp_path))
    assert time.monotonic() - started < 5
    grandchild = Path(f"/proc/{pid_file.read_text().strip()}/stat")
    time.sleep(0.2)
    assert not grandchild.exists() or grandchild.read_text().split()[2] == "Z"

    unsafe = build_handler("shell", {"argv": ["echo", "{{ ''.__class__.__mro__ }}"]}, tmp_path)
    with pytest.raises(TemplateSecurityError, match=r"argv\[1\]: unsafe template"):
        unsafe({}, context(tmp_path))
    missing = build_handler("shell", {"argv": ["no-such-program-here"]}, tmp_path)
    with pytest.raises(FileNotFoundError, match="command not found: 'no-such-program-here'"):
        missing({}, context(tmp_path))


class Recorder:
    """A handler recording start and end times and the most items running at once."""

    def __init__(self, seconds: float, fail: frozenset[str] = frozenset()):
        self.seconds, self.fail = seconds, fail
        self.lock = threading.Lock()
        self.running = self.peak = 0
        self.times: dict[str, tuple[float, float]] = {}

    def __call__(self, item: dict[str, Any], ctx: Any) -> Any:
        started = time.monotonic()
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(self.seconds * (1 + len(ctx.key) % 3))
            if ctx.key in self.fail:
                raise ValueError(f"build of {ctx.key} broke")
            return {"built": ctx.key}
        finally:
            with self.lock:
                self.running -= 1
                self.times[ctx.key] = (started, time.monotonic())


def random_graph(n: int, seed: int) -> tuple[list[Item], dict[str, list[str]]]:
    rng = random.Random(seed)
    depends = {f"p{i}": sorted({f"p{rng.randrange(i)}" for _ in range(rng.randint(0, 3))})
               if i else [] for i in range(n)}
    items = [Item(key, seq, {"depends_on": depends[key]})
             for seq, key in enumerate(rng.sample(sorted(depends), n))]
    return items, depends


def schedule(items: list[Item], slots: int, recorder: Recorder, folder: Path,
             satisfied: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Run items with dependencies through the engine; item key -> its ledger row."""
    with Ledger(f"sqlite:///{folder / 'ledger.db'}") as ledger:
        if satisfied:  # succeeded in an earlier run of the partition
            ledger.record([{"batch": "unit", "partition": "p1", "run_id": "earlier",
                            "phase": "phase0", "item_key": key, "seq": 0,
                            "status": "succeeded"} for key in satisfied])
        run_items(engine_plan(ledger, [recorder], folder, concurrency=slots,
                              on_error="continue", tolerated_failures=100), items, folder)
        recorded = ledger.rows("run-1")
    return {row.item_key: row for row in recorded.itertuples()}


@pytest.mark.unit
@pytest.mark.parametrize("slots", [1, 3, 6])
def test_scheduler_respects_dependencies_and_slots(slots: int, tmp_path: Path) -> None:
    items, depends = random_graph(30, seed=slots)
    recorder = Recorder(0.005)
    outcomes = schedule(items, slots, recorder, tmp_path)
    assert sorted(outcomes) == sorted(depends)
    assert {o.status for o in outcomes.values()} == {"succeeded"}
    for key, deps in depends.items():
        for dep in deps:
            assert recorder.times[key][0] >= recorder.times[dep][1], (key, dep)
    assert recorder.peak <= slots
    assert recorder.peak == slots or slots > 3  # with 6 slots the graph may be too narrow


@pytest.mark.unit
def test_dependants_of_a_failure_are_skipped_and_others_run(tmp_path: Path) -> None:
    depends = {"core": [], "db": ["core"], "api": ["db"], "web": ["api"], "cli": ["core"],
               "docs": ["web", "cli"], "tools": []}
    items = [Item(key, seq, {"depends_on": deps}) for seq, (key, deps)
             in enumerate(depends.items())]
    outcomes = schedule(items, 3, Recorder(0.01, frozenset({"db"})), tmp_path)
    assert {k: o.status for k, o in outcomes.items()} == {
        "core": "succeeded", "db": "failed", "api": "skipped", "web": "skipped",
        "cli": "succeeded", "docs": "skipped", "tools": "succeeded"}
    assert outcomes["api"].error == "dependency 'db' failed"
    assert outcomes["web"].error == "dependency 'db' failed (through 'api')"
    assert outcomes["docs"].error == "dependency 'db' failed (through 'web')"
    assert outcomes["api"].attempts == 0


@pytest.mark.unit
def test_dependencies_done_before_count_and_missing_ones_skip(tmp_path: Path) -> None:
    depends = {"api": ["db"], "web": ["api"], "report": ["gone"]}
    items = [Item(key, seq, {"depends_on": deps}) for seq, (key, deps)
             in enumerate(depends.items())]
    recorder = Recorder(0.005)
    found = schedule(items, 2, recorder, tmp_path, satisfied=frozenset({"db"}))
    outcomes = {key: (row.status, row.error) for key, row in found.items()}
    assert outcomes == {"api": ("succeeded", None), "web": ("succeeded", None),
                        "report": ("skipped", "dependency 'gone' failed")}
    assert recorder.times["web"][0] >= recorder.times["api"][1]


@pytest.mark.unit
def test_cycles_and_unknown_keys_are_named() -> None:
    items = [Item("a", 1, {"depends_on": "c"}), Item("b", 2, {"depends_on": ["a"]}),
             Item("c", 3, {"depends_on": "b, x"}), Item("x", 4, {})]
    with pytest.raises(DependencyError,
                       match=r"dependency cycle: 'a' -> 'c' -> 'b' -> 'a' \(each depends on"):
        dependency_order(items, "depends_on")
    with pytest.raises(DependencyError, match="item 'b' depends on 'zz', which is not a valid"):
        dependency_order([Item("b", 1, {"depends_on": ["zz"]})], "depends_on")
    with pytest.raises(DependencyError, match="depends_on must be a list"):
        dependency_order([Item("b", 1, {"depends_on": 7})], "depends_on")


def build_times(instance: dg.DagsterInstance, run_id: str) -> dict[str, tuple[float, float]]:
    recorded = BatchStorageResource().ledger(instance).rows(run_id, phase="build")
    return {row.item_key: (row.started_at, row.finished_at) for row in recorded.itertuples()
            if row.status == "succeeded" and not isinstance(row.reused_from, str)}


def overlap_peak(times: dict[str, tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in times.values()] + [(e, -1) for _, e in times.values()])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


PACKAGES_FILE = PACKAGE_BATCHES / "package_build" / "data" / "packages.jsonl"
PACKAGES = [json.loads(line) for line in PACKAGES_FILE.read_text().splitlines()]


@pytest.mark.job
def test_package_build_runs_in_dependency_order_four_at_a_time(
        instance: dg.DagsterInstance) -> None:
    result = run_batch(PACKAGE_BATCHES, instance, "package_build", run_config={
        "resources": {"run_overrides": {"config": {
            "overrides": ["phases[0].params.env.BUILD_SECONDS=\"0.25\""]}}}})
    assert result.success
    times = build_times(instance, result.run_id)
    assert sorted(times) == sorted(p["name"] for p in PACKAGES)
    for package in PACKAGES:
        for dep in package["depends_on"]:
            assert times[package["name"]][0] >= times[dep][1], (package["name"], dep)
    assert 2 <= overlap_peak(times) <= 4
    artifacts = Path(instance.root_directory) / "batch_output" / "package_build" / "p1"
    assert sorted(p.stem for p in (artifacts / "artifacts").glob("*.tar")) == sorted(times)


@pytest.mark.job
def test_package_build_cycle_fails_before_any_build(instance: dg.DagsterInstance,
                                                    tmp_path: Path) -> None:
    cyclic = tmp_path / "cyclic.jsonl"
    cyclic.write_text("".join(json.dumps(p) + "\n" for p in [
        {"name": "base", "version": "1", "depends_on": []},
        {"name": "left", "version": "1", "depends_on": ["base", "right"]},
        {"name": "right", "version": "1", "depends_on": ["left"]}]))
    result = run_batch(PACKAGE_BATCHES, instance, "package_build", run_config={
        "resources": {"run_overrides": {"config": {"data": str(cyclic)}}}})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "package_build_batch.fan_out"
    assert ("depends_on: dependency cycle: 'left' -> 'right' -> 'left' (each depends on the "
            "next)") in failure.event_specific_data.error.message
    assert BatchStorageResource().ledger(instance).rows(result.run_id).empty


def package_build_job() -> dg.JobDefinition:
    """Reconstructable job of the shipped package_build batch (for Dagster's re-execution)."""
    return build_definitions([PACKAGE_BATCHES]).resolve_job_def("package_build")


@pytest.mark.job
def test_failed_build_skips_dependants_until_reexecuted(dagster_home: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Dagster's re-execution from failure (as in the UI) reruns only collect: the failed
    package is retried there, and the dependants skipped because of it run after it."""
    from dagster import build_reconstructable_job  # public: dagster exports it

    monkeypatch.setenv("FAIL_PACKAGE", "auth")
    job = build_reconstructable_job("tests.test_task_shell", "package_build_job")
    config = {"resources": {"run_overrides": {"config": {
        "overrides": ["phases[0].params.env.BUILD_SECONDS=\"0.05\""]}}}}
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("package_build", ["p1"])
        first = dg.execute_job(job, instance=instance, run_config=config,
                               tags={"dagster/partition": "p1"})
        assert not first.success
        ledger = BatchStorageResource().ledger(instance)
        rows = ledger.rows(first.run_id)
        statuses = dict(zip(rows["item_key"], rows["status"], strict=True))
        assert statuses["auth"] == "failed"
        assert {k for k, s in statuses.items() if s == "skipped"} == {"api", "web", "admin",
                                                                      "docs"}
        assert "FAIL_PACKAGE=auth" in rows.set_index("item_key").loc["auth", "error"]

        monkeypatch.delenv("FAIL_PACKAGE")
        options = dg.ReexecutionOptions.from_failure(first.run_id, instance)
        second = dg.execute_job(job, instance=instance, run_config=config,
                                reexecution_options=options, tags={"dagster/partition": "p1"})
        assert second.success
        rows = ledger.rows(second.run_id)
        assert len(rows) == 13 and set(rows["status"]) == {"succeeded"}
        rebuilt = build_times(instance, second.run_id)
        assert sorted(rebuilt) == ["admin", "api", "auth", "docs", "web"]
        assert rebuilt["api"][0] >= rebuilt["auth"][1]
        assert rebuilt["docs"][0] >= rebuilt["web"][1] >= rebuilt["api"][1]
