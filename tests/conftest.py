"""Shared fixtures: temporary Dagster instances (SQLite or Postgres) and batch folders."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml
from aiosmtpd.controller import Controller

from batch_defs.definitions import build_definitions
from tests import handlers
from tests.cli_zygote import CLI, PROJECT, CliProcess, Zygote

PG_ADMIN_URL = os.environ.get("BATCH_TEST_PG_URL",
                              "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


# Tests that mostly wait (for daemons, webservers, browsers, queued runs) go first: under
# xdist they then wait beside the CPU-bound rest instead of after it, at the suite's end.
WAITING_MARKERS = ("daemon", "browser")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: not any(item.get_closest_marker(m) for m in WAITING_MARKERS))


@pytest.fixture(autouse=True)
def _reset_handlers() -> None:
    handlers.reset()


def prepared_home(folder: Path, config: Path | None = None) -> Path:
    """A DAGSTER_HOME whose storage (Dagster's and the ledger's) is created and migrated, as
    a first use leaves it: with `config` (a dagster.yaml), as `batch-defs` sets up a home."""
    from batch_defs.instance import MINIMAL_CONFIG, set_up

    folder.mkdir()
    if config is None:
        (folder / "dagster.yaml").write_text(MINIMAL_CONFIG)
    set_up(folder, config.parent if config else folder)
    return folder


@pytest.fixture(scope="session")
def home_templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Prepared homes that tests copy: creating and migrating a fresh instance's schemas
    costs ~0.4 s of CPU, copying its files ~0.01 s. First use of a fresh home is tested where
    it matters (test_trust's five runs on a fresh home)."""
    root = tmp_path_factory.mktemp("home_templates")
    return {"minimal": prepared_home(root / "minimal"),
            "project": prepared_home(root / "project", PROJECT / "dagster.yaml")}


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 home_templates: dict[str, Path]) -> Path:
    home = tmp_path / "dagster_home"
    shutil.copytree(home_templates["minimal"], home)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


@pytest.fixture
def instance(dagster_home: Path) -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.from_config(str(dagster_home)) as inst:
        yield inst


@pytest.fixture
def batch_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "batches"
    folder.mkdir()
    return folder


def write_batch(folder: Path, spec: dict) -> Path:
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def inline_items(n: int) -> dict:
    return {"type": "inline", "key": "id",
            "items": [{"id": i, "name": f"item {i}"} for i in range(1, n + 1)]}


def run_batch(batch_dir: Path, instance: dg.DagsterInstance, name: str, partition: str = "p1",
              run_config: dict | None = None) -> dg.ExecuteInProcessResult:
    defs = build_definitions([batch_dir])
    if not instance.has_dynamic_partition(name, partition):
        instance.add_dynamic_partitions(name, [partition])
    job = defs.resolve_job_def(name)
    return job.execute_in_process(instance=instance, partition_key=partition,
                                  run_config=run_config or {}, raise_on_error=False)


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A new, empty Postgres database, dropped afterwards; yields its URL."""
    name = f"batch_defs_test_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'create database "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'drop database if exists "{name}" with (force)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh Postgres database for this test session."""
    with fresh_pg_database() as url:
        yield url


@pytest.fixture
def pg_instance(tmp_path: Path, pg_database: str,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[dg.DagsterInstance]:
    home = tmp_path / "pg_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({
        "telemetry": {"enabled": False},
        "storage": {"postgres": {"postgres_url": pg_database}},
    }))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.from_config(str(home)) as inst:
        yield inst


@dataclass
class Inbox:
    """What the SMTP server received: one entry per accepted message."""

    received: list[tuple[str, list[str], EmailMessage]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        message = email.message_from_bytes(envelope.original_content or envelope.content,
                                           policy=email.policy.default)
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"

    def messages(self) -> list[EmailMessage]:
        return [message for _, _, message in self.received]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serve_smtp(inbox: Inbox) -> Iterator[tuple[Inbox, int]]:
    """A real SMTP server (aiosmtpd) on a free loopback port, handing mail to `inbox`."""
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


@pytest.fixture
def smtp_server() -> Iterator[tuple[Inbox, int]]:
    with serve_smtp(Inbox()) as served:
        yield served


@pytest.fixture
def cli_env(tmp_path: Path, batch_dir: Path, home_templates: dict[str, Path]) -> dict[str, str]:
    """Environment for the batch-defs command: its own DAGSTER_HOME (a copy of one set up as
    a first command sets it up, with the project's dagster.yaml) and batch folder."""
    shutil.copytree(home_templates["project"], tmp_path / "home")
    return {**os.environ, "DAGSTER_HOME": str(tmp_path / "home"), "COLUMNS": "200",
            "BATCH_DEFS_PATH": str(batch_dir), "PYTHONPATH": str(PROJECT)}


ZYGOTE = Zygote()


@pytest.fixture(scope="session", autouse=True)
def _stop_zygote() -> Iterator[None]:
    yield
    ZYGOTE.stop()


def start_cli(env: dict[str, str], *args: str,
              timeout_s: int = 240) -> CliProcess | subprocess.Popen[str]:
    """`batch-defs ARGS` started in a process of its own, forked from a zygote that has the
    imports done (tests/cli_zygote.py); a fresh interpreter when the zygote cannot serve it.
    Either way: pid, poll, wait, communicate (text), kill, returncode."""
    forked = ZYGOTE.spawn(env, args, timeout_s)
    if forked is not None:
        return forked
    return subprocess.Popen([*CLI, *args], env=env, cwd=PROJECT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def cli(env: dict[str, str], *args: str, timeout_s: int = 240) -> subprocess.CompletedProcess[str]:
    """`batch-defs ARGS` run to its end (start_cli)."""
    started = start_cli(env, *args, timeout_s=timeout_s)
    if isinstance(started, CliProcess):
        return started.result(timeout_s)
    try:
        out, err = started.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        started.kill()
        raise
    return subprocess.CompletedProcess(started.args, started.returncode, out, err)


@pytest.fixture
def unit_ledger(tmp_path: Path) -> Iterator[Any]:
    """A ledger in a fresh SQLite file."""
    from batch_defs.ledger import Ledger

    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        yield ledger


def engine_plan(ledger: Any, handlers: list[Any], folder: Path, run_id: str = "run-1",
                phases: list[dict] | None = None, partition: str = "p1", ahead: bool = True,
                **options: Any) -> Any:
    """A RunPlan for `handlers` (one phase each), for tests of the engine outside Dagster."""
    from batch_defs.engine import RunPlan
    from batch_defs.spec import BatchSpec

    declared = phases or [{} for _ in handlers]
    spec = BatchSpec.model_validate({
        "name": "unit", "source": {"type": "inline", "items": []},
        "phases": [{"name": f"phase{i}", "task": "python", "params": {"function": "m:f"},
                    **extra} for i, extra in enumerate(declared)],
        "options": options})
    return RunPlan(spec, ledger, partition, run_id, folder, folder / "out", handlers,
                   ahead=ahead)


@contextmanager
def running_daemon(home: Path, env: dict[str, str], log: Path) -> Iterator[None]:
    """A real dagster-daemon for `home` (it launches queued runs), stopped afterwards."""
    import contextlib

    import psutil

    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w",
         str(PROJECT / "workspace.yaml")], cwd=PROJECT, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        yield
    finally:
        # The daemon's code server runs in a session of its own: stop it by name.
        children = psutil.Process(daemon.pid).children(recursive=True)
        os.killpg(daemon.pid, signal.SIGTERM)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.terminate()
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()


def queued_instance_config(postgres_url: str, **runs: Any) -> dict[str, Any]:
    """dagster.yaml of a Postgres instance with the project's run coordinator, dequeuing fast."""
    return {
        "telemetry": {"enabled": False},
        "storage": {"postgres": {"postgres_url": postgres_url}},
        "run_coordinator": {"module": "batch_defs.coordinator", "class": "BatchRunCoordinator",
                            "config": {"dequeue_interval_seconds": 1}},
        "concurrency": {"runs": {
            "max_concurrent_runs": 4,
            "tag_concurrency_limits": [{"key": "batch/name", "limit": 1,
                                        "value": {"applyLimitPerUniqueValue": True}}],
            **runs}},
    }
