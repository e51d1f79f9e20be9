"""`batch-defs`: validate, list, run and inspect batches from the command line."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from batch_defs.loader import SpecError, batch_files, find_batch, load_batch, with_overrides

DEFINITIONS = "batch_defs.definitions"
console = Console(stderr=True)
out = Console()


def fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    sys.exit(code)


def instance() -> Any:
    import dagster as dg

    from batch_defs.instance import ensure_dagster_home

    ensure_dagster_home()
    return dg.DagsterInstance.get()


def ledger_for(inst: Any) -> Any:
    from resources.storage import BatchStorageResource

    return BatchStorageResource().ledger(inst)


def partition_key(data: str | None) -> str:
    """A stable key from the data file's name (customers_2026_11.csv -> customers_2026_11),
    else the launch time."""
    if data:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data).stem)
    return datetime.now().strftime("%Y%m%d-%H%M%S")


@click.group()
def main() -> None:
    """Batches described in YAML, run as partitioned Dagster jobs with an item ledger."""


@main.command()
@click.argument("targets", nargs=-1)
@click.option("--data", type=click.Path(exists=True, dir_okay=False),
              help="Check every item of this file against the batch (no phase runs).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Spec overrides, as for run.")
@click.option("--items", "check_items", is_flag=True,
              help="Also read each batch's source and check every item.")
def validate(targets: tuple[str, ...], data: str | None, sets: tuple[str, ...],
             check_items: bool) -> None:
    """Validate batch files, folders or batch NAMEs (default: all in BATCH_DEFS_PATH).

    With --data or --items, every item of the source is keyed and checked against the
    schema, and each invalid item is listed with its row number and reason.
    """
    loaded_batches, problems = [], 0
    paths = [Path(t) if Path(t).exists() else None for t in targets]
    try:
        files = batch_files([p for p in paths if p] if targets else None)
        named = [find_batch(t) for t, p in zip(targets, paths, strict=True) if p is None]
    except SpecError as exc:
        fail(str(exc), 1)
    if not files and not named:
        fail("no batch files found", 1)
    for file in files:
        try:
            loaded_batches.append(load_batch(file))
        except SpecError as exc:
            problems += len(exc.problems)
            for problem in exc.problems:
                console.print(f"[red]{problem}[/red]", highlight=False)
    for loaded in [*loaded_batches, *named]:
        out.print(f"ok {loaded.path} ({loaded.spec.name}: {len(loaded.spec.phases)} phases)",
                  highlight=False)
        if data or sets or check_items:
            problems += check_source(loaded, data, sets)
    if problems:
        fail(f"{problems} problem(s)", 1)


def check_source(loaded: Any, data: str | None, sets: tuple[str, ...]) -> int:
    """Read the batch's source and report invalid items; the number of problems found."""
    from batch_defs.items import InvalidRow, check_records
    from batch_defs.sources import SourceError, read_source

    try:
        spec = with_overrides(loaded.spec, data, sets)
        valid = invalid = 0
        for entry in check_records(read_source(spec.source, loaded.base_dir), spec.source.key,
                                   spec.source.schema_, spec.options.max_items):
            if isinstance(entry, InvalidRow):
                invalid += 1
                console.print(f"[red]{spec.name}: item {entry.key} {entry.error}[/red]",
                              highlight=False)
            else:
                valid += 1
    except (SpecError, SourceError) as exc:
        console.print(f"[red]{loaded.spec.name}: source {loaded.spec.source.type}: {exc}[/red]",
                      highlight=False)
        return 1
    out.print(f"  {valid} valid items, {invalid} invalid", highlight=False)
    return invalid


@main.command("list")
@click.option("--partitions", "per_partition", is_flag=True,
              help="One line per partition with its latest run and status.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_batches(per_partition: bool, as_json: bool) -> None:
    """The batches, their partitions and the status of their last run."""
    import dagster as dg

    from batch_defs.loader import load_batches

    inst = instance()
    rows = []
    for name, loaded in sorted(load_batches().items()):
        partitions = inst.get_dynamic_partitions(name)
        runs = inst.get_runs(filters=dg.RunsFilter(job_name=name), limit=1)
        last = runs[0] if runs else None
        rows.append({
            "name": name, "description": loaded.spec.description,
            "phases": [p.name for p in loaded.spec.phases], "partitions": partitions,
            "last_run_id": last.run_id if last else None,
            "last_status": last.status.value if last else None,
            "last_partition": last.tags.get("dagster/partition") if last else None,
        })
        if per_partition:
            rows[-1]["partition_runs"] = partition_runs(inst, name, partitions)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    if per_partition:
        out.print(partition_table(rows))
        return
    table = Table("batch", "phases", "partitions", "last run", "status")
    for row in rows:
        partitions = ", ".join(row["partitions"][-3:]) + (" ..." if len(row["partitions"]) > 3
                                                           else "")
        table.add_row(row["name"], " -> ".join(row["phases"]),
                      f"{len(row['partitions'])}: {partitions}" if row["partitions"] else "-",
                      (row["last_run_id"] or "-")[:8], row["last_status"] or "-")
    out.print(table)


def partition_runs(inst: Any, name: str, partitions: list[str]) -> list[dict[str, Any]]:
    """Each partition (newest first) with its latest run, from one query over the job's runs."""
    import dagster as dg

    latest = {data.partition: data for data in
              inst.get_run_partition_data(dg.RunsFilter(job_name=name))}
    found = []
    for key in reversed(partitions):
        data = latest.get(key)
        found.append({
            "partition": key, "run_id": data.run_id if data else None,
            "status": data.status.value if data else None,
            "started_at": data.start_time if data else None,
            "finished_at": data.end_time if data else None,
        })
    return found


def partition_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("batch", "partition", "latest run", "status", "started", "duration")
    for row in rows:
        for entry in row["partition_runs"] or [{"partition": "-", "run_id": None,
                                                 "status": None, "started_at": None}]:
            started, ended = entry["started_at"], entry.get("finished_at")
            table.add_row(
                row["name"], entry["partition"], (entry["run_id"] or "-")[:8],
                entry["status"] or "never run",
                datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M:%S") if started else "-",
                f"{ended - started:.1f}s" if started and ended else "-")
    return table


def _run_config(data: str | None, sets: tuple[str, ...], verbose: bool) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if data or sets:
        overrides: dict[str, Any] = {"overrides": list(sets)}
        if data:
            overrides["data"] = str(Path(data).expanduser().resolve())
        config["resources"] = {"run_overrides": {"config": overrides}}
    # The live progress bar replaces Dagster's step logs on the console; the event log in the
    # instance keeps every event either way.
    config["loggers"] = {"console": {"config": {"log_level": "INFO" if verbose else "WARNING"}}}
    return config


def launch_options(command: Callable[..., None]) -> Callable[..., None]:
    """The arguments `run` and `submit` share: which batch, which partition, what changes."""
    for option in reversed([
        click.argument("name"),
        click.option("--partition",
                     help="Partition key (default: from --data's file name, or time)."),
        click.option("--data", type=click.Path(exists=True, dir_okay=False),
                     help="File replacing the spec's source.path for this run."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override a spec field for this run, e.g. options.concurrency=4."),
    ]):
        command = option(command)
    return command


def prepare_launch(name: str, partition: str | None, data: str | None,
                   sets: tuple[str, ...]) -> tuple[Any, str]:
    """Check the batch and its overrides before anything starts; add the partition."""
    try:
        loaded = find_batch(name)
        with_overrides(loaded.spec, data, sets)
    except SpecError as exc:
        fail(str(exc))
    inst = instance()
    key = partition or partition_key(data)
    if not inst.has_dynamic_partition(name, key):
        inst.add_dynamic_partitions(name, [key])
    return inst, key


@main.command()
@launch_options
@click.option("--verbose", is_flag=True, help="Show Dagster's step logs too.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def run(name: str, partition: str | None, data: str | None, sets: tuple[str, ...],
        verbose: bool, as_json: bool) -> None:
    """Run batch NAME in this process against the instance in DAGSTER_HOME."""
    inst, key = prepare_launch(name, partition, data, sets)
    execute(inst, name, key, _run_config(data, sets, verbose), {}, None, as_json)


def execute(inst: Any, name: str, key: str, run_config: dict[str, Any], tags: dict[str, str],
            reexecution: Any, as_json: bool) -> NoReturn:
    """Execute the batch's job in this process with live progress; exit with its outcome."""
    import dagster as dg
    from dagster._core.definitions.reconstruct import build_reconstructable_job

    from batch_defs.watch import watch_run

    job = build_reconstructable_job(DEFINITIONS, "get_job",
                                    reconstructable_args=(name,))
    launched = time.time()
    done = threading.Event()
    watcher = threading.Thread(
        target=watch_run, args=(ledger_for(inst), name, key, launched, done, console),
        daemon=True)
    if not as_json:
        watcher.start()
    # Who runs it, so that `resume` can tell a live run from one whose process was killed.
    tags = {"dagster/partition": key, "batch/launched_by": "cli", "batch/pid": str(os.getpid()),
            "batch/host": socket.gethostname(), **tags}
    try:
        result = dg.execute_job(job, instance=inst, run_config=run_config, tags=tags,
                                reexecution_options=reexecution)
    finally:
        done.set()
        if watcher.is_alive():
            watcher.join()
    print_summary(inst, result.run_id, as_json)
    sys.exit(0 if result.success else 1)


@main.command()
@launch_options
@click.option("--watch", is_flag=True, help="Show live progress until the run ends.")
def submit(name: str, partition: str | None, data: str | None, sets: tuple[str, ...],
           watch: bool) -> None:
    """Queue batch NAME through the run coordinator (the daemon launches it) and print the
    run id. Run limits in dagster.yaml (concurrency: runs:) apply."""
    from dagster._cli.job import execute_launch_command
    from dagster_shared.cli import WorkspaceOpts

    inst, key = prepare_launch(name, partition, data, sets)
    config = _run_config(data, sets, verbose=True)
    tags = {"dagster/partition": key, "batch/launched_by": "cli-submit"}
    # The same code location name as workspace.yaml's, so the daemon can launch the run.
    with stdout_to_stderr():
        run = execute_launch_command(instance=inst,
                                     workspace_opts=WorkspaceOpts(module_name=(DEFINITIONS,)),
                                     config_json=json.dumps(config), tags=json.dumps(tags),
                                     job_name=name)
    out.print(run.run_id, highlight=False)
    if watch:
        from batch_defs.watch import follow_run

        follow_run(inst, ledger_for(inst), run.run_id, console)
        print_summary(inst, run.run_id, False)


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send file descriptor 1 to stderr meanwhile, so the code server Dagster starts (and
    that outlives this block) logs there and stdout stays just the run id for scripts."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def print_summary(inst: Any, run_id: str, as_json: bool) -> None:
    from batch_defs.watch import run_report

    report = run_report(inst, ledger_for(inst), run_id)
    if as_json:
        out.print_json(json.dumps(report, default=str))
        return
    from batch_defs.watch import render_report

    out.print(render_report(report))


@main.command()
@click.argument("run_id")
@click.option("--watch", is_flag=True, help="Live progress bars until the run ends.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(run_id: str, watch: bool, as_json: bool) -> None:
    """Counts per phase and status, throughput and ETA of a run."""
    from batch_defs.watch import follow_run

    inst = instance()
    run_id = resolve_run_id(inst, run_id)
    if watch:
        follow_run(inst, ledger_for(inst), run_id, console)
    print_summary(inst, run_id, as_json)


def resolve_run_id(inst: Any, prefix: str) -> str:
    """Full run id from a unique prefix (the UI and `list` show the first 8 characters)."""
    if inst.get_run_by_id(prefix):
        return prefix
    import dagster as dg

    matches = [r.run_id for r in inst.get_runs(filters=dg.RunsFilter(), limit=500)
               if r.run_id.startswith(prefix)]
    if len(matches) != 1:
        fail(f"no run {prefix!r}" if not matches else f"run id {prefix!r} is ambiguous")
    return matches[0]


def worker_alive(run: Any) -> bool | None:
    """Whether the process executing a run still exists: None when we cannot tell (another
    host, or a run launched by the daemon, which Dagster's run monitoring watches)."""
    pid, host = run.tags.get("batch/pid"), run.tags.get("batch/host")
    if not pid or host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _active_run(inst: Any, run_id: str) -> Any:
    run = inst.get_run_by_id(resolve_run_id(inst, run_id))
    if run.is_finished:
        fail(f"run {run.run_id} has already ended ({run.status.value})", 1)
    return run


@main.command()
@click.argument("run_id")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Spec overrides for the resumed run, e.g. options.budget.max_cost=10.")
@click.option("--verbose", is_flag=True, help="Show Dagster's step logs too.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def resume(run_id: str, sets: tuple[str, ...], verbose: bool, as_json: bool) -> None:
    """Continue a failed, paused, canceled or killed run: only items not yet succeeded run.

    The run is re-executed as a whole; the item ledger skips every item already done and
    passes its stored outputs on, so no finished work is repeated.
    """
    import dagster as dg

    inst = instance()
    run = inst.get_run_by_id(resolve_run_id(inst, run_id))
    if not run.is_finished:
        alive = worker_alive(run)
        if alive is not False:
            fail(f"run {run.run_id} is {run.status.value}"
                 + (" and its process is alive" if alive else "")
                 + "; pause or cancel it first", 1)
        inst.report_run_failed(run, f"process {run.tags['batch/pid']} is gone; "
                                    "marked failed by batch-defs resume")
        run = inst.get_run_by_id(run.run_id)
    partition = run.tags.get("dagster/partition")
    if not partition:
        fail(f"run {run.run_id} has no partition")
    run_config = dict(run.run_config)
    if sets:
        config = run_config.setdefault("resources", {}).setdefault(
            "run_overrides", {}).setdefault("config", {})
        config["overrides"] = [*config.get("overrides", []), *sets]
        try:
            loaded = find_batch(run.job_name)
            with_overrides(loaded.spec, config.get("data"), config["overrides"])
        except SpecError as exc:
            fail(str(exc))
    run_config["loggers"] = {"console": {"config": {"log_level":
                                                    "INFO" if verbose else "WARNING"}}}
    # Every step again, as a re-execution of the run: the ledger makes finished items free,
    # and it avoids Dagster's step-level re-execution from failure, which can lose outputs of
    # dynamic steps (dagster #20925, #30077) and refuses canceled runs (#17754).
    reexecution = dg.ReexecutionOptions(parent_run_id=run.run_id)
    execute(inst, run.job_name, partition, run_config, {"batch/resumed_from": run.run_id},
            reexecution, as_json)


@main.command()
@click.argument("run_id")
@click.option("--wait/--no-wait", default=True, help="Wait until the run has stopped.")
def pause(run_id: str, wait: bool) -> None:
    """Stop starting items; in-flight items finish and are recorded; resume continues."""
    from batch_defs.watch import follow_run

    inst = instance()
    run = _active_run(inst, run_id)
    ledger_for(inst).request_stop(run.run_id, "paused: requested with batch-defs pause")
    out.print(f"pausing {run.run_id}: no new items start; resume with "
              f"batch-defs resume {run.run_id[:8]}", highlight=False)
    if wait:
        follow_run(inst, ledger_for(inst), run.run_id, console)


@main.command()
@click.argument("run_id")
@click.option("--grace", default=30.0, show_default=True,
              help="Seconds for in-flight items to finish before the run is killed.")
def cancel(run_id: str, grace: float) -> None:
    """Terminate a run: stop starting items, give in-flight ones GRACE seconds, then kill."""
    import dagster as dg

    inst = instance()
    run = _active_run(inst, run_id)
    if run.status == dg.DagsterRunStatus.QUEUED:
        inst.run_coordinator.cancel_run(run.run_id)
        out.print(f"canceled queued run {run.run_id}")
        return
    ledger = ledger_for(inst)
    ledger.request_stop(run.run_id, "canceled: requested with batch-defs cancel")
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not inst.get_run_by_id(run.run_id).is_finished:
        time.sleep(0.5)
    run = inst.get_run_by_id(run.run_id)
    if not run.is_finished:
        if worker_alive(run):
            os.kill(int(run.tags["batch/pid"]), signal.SIGKILL)
        elif inst.run_launcher.terminate(run.run_id):
            pass
        run = inst.get_run_by_id(run.run_id)
    if run.status != dg.DagsterRunStatus.CANCELED:
        inst.report_run_canceled(run, "canceled with batch-defs cancel")
    ledger.set_status(run.run_id, "canceled")
    inst.add_run_tags(run.run_id, {"batch/state": "canceled"})
    out.print(f"canceled {run.run_id}", highlight=False)


RESULT_COLUMNS = ["item_key", "phase", "status", "attempts", "error", "duration_s", "cost",
                  "tokens", "reused_from", "input", "output"]


@main.command()
@click.argument("run_id")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "jsonl"]),
              default="table")
@click.option("--status", "status_filter",
              help="Only rows with these statuses, comma separated (e.g. failed,invalid).")
@click.option("--phase", help="Only rows of this phase.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
def results(run_id: str, fmt: str, status_filter: str | None, phase: str | None,
            as_json: bool) -> None:
    """Per-item rows of a run from the ledger."""
    inst = instance()
    run_id = resolve_run_id(inst, run_id)
    rows = ledger_for(inst).rows(run_id, phase=phase)
    if status_filter:
        rows = rows[rows["status"].isin(status_filter.split(","))]
    rows = rows[RESULT_COLUMNS]
    fmt = "json" if as_json else fmt
    if fmt == "csv":
        click.echo(rows.to_csv(index=False), nl=False)
    elif fmt in ("json", "jsonl"):
        records = [{k: _decode(k, v) for k, v in r.items()} for r in rows.to_dict("records")]
        if fmt == "json":
            click.echo(json.dumps(records, indent=2, default=str))
        else:
            for record in records:
                click.echo(json.dumps(record, default=str))
    else:
        table = Table("item", "phase", "status", "attempts", "duration", "error")
        for r in rows.itertuples():
            table.add_row(str(r.item_key), str(r.phase), str(r.status), str(r.attempts),
                          f"{r.duration_s:.3f}s" if r.duration_s == r.duration_s and
                          r.duration_s is not None else "-", str(r.error or ""))
        out.print(table)


@main.command()
@click.argument("run_id")
@click.option("--format", "fmt", type=click.Choice(["html", "md", "csv", "json"]),
              default="html", show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to this file (md: charts as PNG files beside it); default: stdout.")
def report(run_id: str, fmt: str, out_path: Path | None) -> None:
    """A run's report: summary, per-phase analytics, slowest and failed items, charts."""
    from batch_defs.report import build_report, render, write_report

    inst = instance()
    data = build_report(inst, ledger_for(inst), resolve_run_id(inst, run_id))
    if out_path is None:
        click.echo(render(data, fmt), nl=False)
        return
    console.print(f"wrote {write_report(data, fmt, out_path)}", highlight=False)


def _decode(column: str, value: Any) -> Any:
    if column in ("input", "output") and isinstance(value, str):
        return json.loads(value)
    if isinstance(value, float) and value != value:  # NaN from pandas for missing numbers
        return None
    return value


if __name__ == "__main__":
    main()
