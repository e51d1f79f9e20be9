"""Every item once, nothing lost: crashes, concurrent launches and fresh instances (issue 11).

Handler calls are counted in a table of their own (tests.handlers.counted), so "ran once" is
checked against what happened, not against the ledger's word.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import sqlalchemy as sa
import yaml

from tests.cli_zygote import CliProcess
from tests.conftest import (
    PROJECT,
    cli,
    fresh_pg_database,
    inline_items,
    start_cli,
    write_batch,
)

pytestmark = pytest.mark.cli


def counted_phases(calls: Path, phases: int, ms: float, **gate: object) -> list[dict]:
    """`gate=FILE, open_for=N`: calls after the first N wait until FILE exists."""
    return [{"name": f"step{p}", "task": "python",
             "params": {"function": "tests.handlers:counted", "ms": ms, "calls_db": str(calls),
                        **gate}}
            for p in range(1, phases + 1)]


def calls_made(calls: Path) -> pd.DataFrame:
    if not calls.exists():
        return pd.DataFrame(columns=["phase", "key"])
    with sqlite3.connect(calls, timeout=30) as conn:
        try:
            return pd.read_sql("select phase, key from calls", conn)
        except pd.errors.DatabaseError:  # the table does not exist yet
            return pd.DataFrame(columns=["phase", "key"])


def wait_for(condition: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def ledger_url(home: Path) -> str:
    config = yaml.safe_load((home / "dagster.yaml").read_text()) or {}
    postgres = (config.get("storage") or {}).get("postgres")
    return postgres["postgres_url"] if postgres else f"sqlite:///{home / 'batch_ledger.db'}"


def ledger_items(home: Path) -> pd.DataFrame:
    url = ledger_url(home)
    if url.startswith("sqlite") and not (home / "batch_ledger.db").exists():
        return pd.DataFrame(columns=["run_id", "phase", "item_key", "status", "reused_from"])
    engine = sa.create_engine(url)
    try:
        return pd.read_sql("select run_id, phase, item_key, status, reused_from, error "
                           "from batch_item", engine)
    except sa.exc.DBAPIError:
        return pd.DataFrame(columns=["run_id", "phase", "item_key", "status", "reused_from"])
    finally:
        engine.dispose()


def runs_of(home: Path) -> list[dg.DagsterRun]:
    with dg.DagsterInstance.from_config(str(home)) as inst:
        return list(reversed(inst.get_runs()))  # oldest first


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def home(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A fresh DAGSTER_HOME: the embedded SQLite instance, or one on a new Postgres database
    (the ledger then lives in that database too)."""
    folder = tmp_path / "home"
    folder.mkdir()
    if request.param == "sqlite":
        (folder / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        yield folder
        return
    with fresh_pg_database() as url:
        (folder / "dagster.yaml").write_text(yaml.safe_dump({
            "telemetry": {"enabled": False}, "storage": {"postgres": {"postgres_url": url}}}))
        yield folder


def test_a_crash_mid_phase_reruns_only_the_items_in_flight(home: Path, batch_dir: Path,
                                                           tmp_path: Path) -> None:
    """1,000 items x 2 phases x 50 ms at concurrency 10, SIGKILL at a random point, resume:
    every item done in both phases, and at most 10 handler calls (the slots) beyond 2,000."""
    calls, gate = tmp_path / "calls.db", tmp_path / "gate"
    kill_at = random.Random().randint(200, 1800)
    # Calls after the kill_at-th wait for the gate, so the kill lands there however loaded
    # the machine is (1,800 calls leave 1 s of work); the resumed run finds the gate open.
    write_batch(batch_dir, {"name": "durable", "source": inline_items(1000),
                            "phases": counted_phases(calls, 2, 50, gate=str(gate),
                                                     open_for=kill_at),
                            "options": {"concurrency": 10}})
    env = {**os.environ, "DAGSTER_HOME": str(home), "BATCH_DEFS_PATH": str(batch_dir),
           "PYTHONPATH": str(PROJECT), "COLUMNS": "200"}
    worker = start_cli(env, "run", "durable", "--partition", "nov")
    wait_for(lambda: len(calls_made(calls)) >= kill_at)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    recorded = ledger_items(home)
    assert 0 < len(recorded) <= kill_at < 2000, f"killed after {kill_at} calls"
    gate.touch()

    (killed,) = runs_of(home)
    resumed = cli(env, "resume", killed.run_id[:8])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    rows = ledger_items(home)
    last = rows[rows["run_id"] != killed.run_id]
    assert len(last) == 2000 and set(last["status"]) == {"succeeded"}
    made = calls_made(calls)
    per_item = made.groupby(["phase", "key"]).size()
    assert len(per_item) == 2000  # every item in both phases
    extra = len(made) - 2000
    print(f"killed after {kill_at} calls: {extra} item-phases ran twice")  # shown with -s
    assert 0 <= extra <= 10, f"{extra} items ran twice (killed at {kill_at})"
    # The killed run's ledger row no longer says it is running.
    with dg.DagsterInstance.from_config(str(home)) as inst:
        assert inst.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.FAILURE
        assert inst.get_run_by_id(killed.run_id).tags["batch/state"] == "failed"


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    return cli_env


def test_two_runs_of_one_partition_at_once(env: dict[str, str], batch_dir: Path,
                                           tmp_path: Path) -> None:
    calls, gate = tmp_path / "calls.db", tmp_path / "gate"
    # The run that takes the partition holds its calls after the fifth until the other has
    # been refused: however late the other starts, the partition is still held.
    write_batch(batch_dir, {"name": "twice", "source": inline_items(300),
                            "phases": counted_phases(calls, 2, 10, gate=str(gate),
                                                     open_for=5),
                            "options": {"concurrency": 10}})
    launches = [start_cli(env, "run", "twice", "--partition", "p") for _ in range(2)]
    wait_for(lambda: any(launch.poll() is not None for launch in launches), timeout=240)
    gate.touch()
    outputs = [launch.communicate(timeout=240) for launch in launches]
    codes = sorted(launch.returncode for launch in launches)
    assert codes[0] == 0 and codes[1] != 0, outputs
    home = Path(env["DAGSTER_HOME"])
    winner = next(r for r in runs_of(home) if r.status == dg.DagsterRunStatus.SUCCESS)
    refused = next("".join(out) for launch, out in zip(launches, outputs, strict=True)
                   if launch.returncode != 0)
    assert f"is held by run {winner.run_id}" in refused
    # Every item ran once, in both phases, whichever of the two took the partition.
    made = calls_made(calls)
    assert len(made) == 600 and made.groupby(["phase", "key"]).size().eq(1).all()


def test_a_waiting_launch_runs_once_the_partition_is_free(env: dict[str, str],
                                                          batch_dir: Path,
                                                          tmp_path: Path) -> None:
    calls, gate = tmp_path / "calls.db", tmp_path / "gate"
    # The first run holds its calls after the fifth until the second launch says it waits.
    write_batch(batch_dir, {"name": "queued", "source": inline_items(200),
                            "phases": counted_phases(calls, 1, 100, gate=str(gate),
                                                     open_for=5),
                            "options": {"concurrency": 4}})
    first = start_cli(env, "run", "queued", "--partition", "p")
    wait_for(lambda: len(calls_made(calls)) >= 5)
    second = start_cli(env, "run", "queued", "--partition", "p", "--wait")
    assert isinstance(second, CliProcess)  # its output is a file, readable while it runs
    said = ""
    while "waiting for run" not in said and second.poll() is None:
        time.sleep(0.05)  # until it says whom it waits for (or ends without saying so)
        said = second.stderr_text()
    gate.touch()
    out, err = second.communicate(timeout=240)
    first.communicate(timeout=240)
    assert first.returncode == 0 and second.returncode == 0, out + said + err
    assert "waiting for run" in said
    assert len(calls_made(calls)) == 200  # the second found every item done


SHELL_SCRIPT = """\
# Starts a grandchild that outlives this script unless someone ends its process group.
sleep 300 >/dev/null 2>&1 &
echo $! > "$PIDS/$KEY.child"
echo $$ > "$PIDS/$KEY.main"
if [ -e "$PIDS/resumed" ]; then
  for old in "$PIDS"/*.child.old; do  # a killed process may linger as a zombie: not alive
    state=$(cut -d' ' -f3 "/proc/$(cat "$old")/stat" 2>/dev/null)
    [ -n "$state" ] && [ "$state" != Z ] && echo "$KEY" >> "$PIDS/orphans"
  done
  exit 0
fi
wait
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has ended too
        return stat.read().split()[2] != "Z"


def test_shell_commands_end_with_a_killed_run_and_resume_ends_their_children(
        env: dict[str, str], batch_dir: Path, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    (batch_dir / "spawn.sh").write_text(SHELL_SCRIPT)
    write_batch(batch_dir, {
        "name": "spawner", "source": inline_items(6),
        "phases": [{"name": "build", "task": "shell",
                    "params": {"argv": ["sh", "spawn.sh"],
                               "env": {"PIDS": str(pids), "KEY": "{{ key }}"}}}],
        "options": {"concurrency": 3}})
    worker = start_cli(env, "run", "spawner", "--partition", "p")
    wait_for(lambda: len(list(pids.glob("*.child"))) == 3)
    children = [int(p.read_text()) for p in pids.glob("*.child")]
    wait_for(lambda: len(list(pids.glob("*.main"))) == 3)
    commands = [int(p.read_text()) for p in pids.glob("*.main")]
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    # The commands die with the run; their children (in the commands' sessions) live on.
    wait_for(lambda: not any(alive(pid) for pid in commands), timeout=10)
    assert all(alive(pid) for pid in children)
    for child in pids.glob("*.child"):
        child.rename(child.with_suffix(".child.old"))
    (pids / "resumed").touch()
    (killed,) = runs_of(Path(env["DAGSTER_HOME"]))
    resumed = cli(env, "resume", killed.run_id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    # Before any item ran again, resume had ended what the killed run left running.
    assert not (pids / "orphans").exists()
    wait_for(lambda: not any(alive(pid) for pid in children), timeout=10)
    for pid_file in pids.glob("*.child"):  # this run's own grandchildren: end them too
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_run_killed_in_an_after_step_never_reads_succeeded(env: dict[str, str],
                                                             batch_dir: Path,
                                                             tmp_path: Path) -> None:
    marker = tmp_path / "in_after_step"
    write_batch(batch_dir, {
        "name": "late", "source": inline_items(20),
        "phases": [{"name": "work", "task": "python",
                    "params": {"function": "tests.handlers:sleep_ms", "ms": 1}}],
        "after": [{"task": "python", "name": "slow_after",
                   "params": {"function": "tests.handlers:after_then_wait",
                              "marker": str(marker)}}]})
    worker = start_cli(env, "run", "late", "--partition", "p")
    wait_for(lambda: marker.exists())
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    home = Path(env["DAGSTER_HOME"])
    (killed,) = runs_of(home)
    assert killed.tags.get("batch/state") != "succeeded"
    status = cli(env, "status", killed.run_id, "--json")
    assert '"state": "running"' in status.stdout or '"state": "failed"' in status.stdout
    marker.unlink()
    (tmp_path / "release").touch()
    resumed = cli(env, "resume", killed.run_id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    with dg.DagsterInstance.from_config(str(home)) as inst:
        old = inst.get_run_by_id(killed.run_id)
        assert old.status == dg.DagsterRunStatus.FAILURE and old.tags["batch/state"] == "failed"
    engine = sa.create_engine(ledger_url(home))
    with engine.connect() as conn:
        states = dict(conn.execute(sa.text("select run_id, status from batch_run")).all())
    engine.dispose()
    assert states[killed.run_id] == "failed"  # no longer "running"
    assert sorted(states.values()) == ["failed", "succeeded"]


def test_five_runs_on_a_fresh_home_at_once(env: dict[str, str], batch_dir: Path) -> None:
    for n in range(5):
        write_batch(batch_dir, {"name": f"fresh{n}", "source": inline_items(20),
                                "phases": [{"name": "work", "task": "python",
                                            "params": {"function": "tests.handlers:sleep_ms",
                                                       "ms": 5}}]})
    launches = [start_cli(env, "run", f"fresh{n}") for n in range(5)]
    outputs = [launch.communicate(timeout=240) for launch in launches]
    assert [launch.returncode for launch in launches] == [0] * 5, outputs
    # And the instance stays usable.
    again = cli(env, "run", "fresh0", "--partition", "again")
    assert again.returncode == 0, again.stderr


def test_messages_print_literally(env: dict[str, str], batch_dir: Path) -> None:
    """Console markup never eats a message's brackets (a pattern printed as `'^*$'`)."""
    (batch_dir / "Bad.yaml").write_text(
        "name: Bad\nsource: {type: inline, items: [{id: 1}]}\n"
        "phases: [{name: w, task: python, params: {function: 'tests.handlers:sleep_ms'}}]\n")
    validated = cli(env, "validate", str(batch_dir / "Bad.yaml"))
    assert validated.returncode == 1
    assert "Bad.yaml:1 name: String should match pattern '^[a-z][a-z0-9_]*$'" in \
        validated.stderr
    write_batch(batch_dir, {"name": "good", "source": inline_items(1),
                            "phases": [{"name": "w", "task": "python",
                                        "params": {"function": "tests.handlers:sleep_ms"}}]})
    refused = cli(env, "run", "good", "--set", "notify.on=[sometimes]")
    assert refused.returncode == 2
    assert "--set notify.on=[sometimes]" in refused.stderr and "[/" not in refused.stderr
