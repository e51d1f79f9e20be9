"""Scale-out: a batch's chunks run on two celery workers (Redis broker, Postgres instance)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from tests.conftest import PROJECT, fresh_pg_database, start_cli, write_batch

# One test process for everything on this machine's Redis: celery workers take any task on
# the queue, and the shared limits' keys are the same in every test.
pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.xdist_group("redis")]
BROKER = "redis://127.0.0.1:6379/14"  # databases of their own on this machine's Redis
BACKEND = "redis://127.0.0.1:6379/15"


@pytest.fixture
def celery_env(tmp_path: Path) -> Iterator[tuple[dict[str, str], str]]:
    batch_dir = tmp_path / "batches"
    batch_dir.mkdir()
    write_batch(batch_dir, {
        "name": "spread",
        "source": {"type": "inline", "key": "id", "items": [{"id": i} for i in range(200)]},
        "phases": [{"name": "fetch", "task": "python",
                    "params": {"function": "tests.handlers:sleep_ms", "ms": 50}},
                   {"name": "store", "task": "python",
                    "params": {"function": "tests.handlers:sleep_ms", "ms": 10}}],
        "options": {"concurrency": 10, "chunk_size": 20, "executor": "celery",
                    "celery": {"broker": BROKER, "backend": BACKEND}},
    })
    # Workers read their broker from this module (dagster_celery looks for it by name).
    config_dir = tmp_path / "celery_config"
    config_dir.mkdir()
    (config_dir / "dagster_celery_config.py").write_text(
        f"broker_url = {BROKER!r}\nresult_backend = {BACKEND!r}\n")
    home = tmp_path / "home"
    home.mkdir()
    with fresh_pg_database() as url:
        (home / "dagster.yaml").write_text(yaml.safe_dump({
            "telemetry": {"enabled": False},
            "storage": {"postgres": {"postgres_url": url}}}))
        env = {**os.environ, "DAGSTER_HOME": str(home), "BATCH_DEFS_PATH": str(batch_dir),
               "PYTHONPATH": os.pathsep.join([str(PROJECT), str(config_dir)]),
               "COLUMNS": "200"}
        subprocess.run([sys.executable, "-m", "celery", "-A", "dagster_celery.app", "purge",
                        "-f", "-Q", "dagster", "-b", BROKER], env=env, cwd=PROJECT,
                       capture_output=True, check=False)
        workers = [subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "dagster_celery.app", "worker", "-Q",
             "dagster", "-n", f"w{n}@%h", "--concurrency", "1", "--prefetch-multiplier", "1",
             "--loglevel", "WARNING"], env=env, cwd=PROJECT, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=(tmp_path / f"worker{n}.log").open("w"))
            for n in (1, 2)]
        try:
            yield env, url
        finally:
            for worker in workers:
                os.killpg(worker.pid, signal.SIGTERM)
            for worker in workers:
                try:
                    worker.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait()


def test_chunks_run_on_both_celery_workers(celery_env: tuple[dict[str, str], str]) -> None:
    env, url = celery_env
    run = start_cli(env, "run", "spread", "--partition", "p1")
    out, err = run.communicate(timeout=240)
    assert run.returncode == 0, out + err
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "select phase, item_key, status, worker from batch_item")).all()
    engine.dispose()
    assert len(rows) == 400 and {status for _, _, status, _ in rows} == {"succeeded"}
    assert {(phase, key) for phase, key, _, _ in rows} == {
        (phase, str(i)) for phase in ("fetch", "store") for i in range(200)}
    workers = {worker for *_, worker in rows}
    assert len(workers) == 2, workers  # two worker processes each ran chunks
    # ...and none of it ran in the process that launched the run.
    assert not any(worker.endswith(f":{run.pid}") for worker in workers)
