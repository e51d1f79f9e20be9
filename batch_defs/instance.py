"""Finds or prepares the Dagster instance folder (DAGSTER_HOME) the CLI works against."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg
from filelock import FileLock

from batch_defs.home import SET_UP_MARK, home_path

MINIMAL_CONFIG = "telemetry:\n  enabled: false\n"
SETUP_LOCK = ".batch_defs_setup.lock"


def ensure_dagster_home(project_dir: Path | None = None) -> Path:
    """DAGSTER_HOME if set; else ./.dagster_home, given the project's dagster.yaml on creation.

    Setting the variable here also stops Dagster from creating .tmp_dagster_home_* folders.
    The first use of a fresh home creates Dagster's storage (its schema migrations race when
    several processes start at once): one process does it, under a file lock, the others wait.
    """
    home = home_path(project_dir)
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    if (home / SET_UP_MARK).exists():
        return home
    with FileLock(str(home / SETUP_LOCK)):
        if not (home / SET_UP_MARK).exists():
            set_up(home, project_dir or Path.cwd())
    return home


def set_up(home: Path, project_dir: Path) -> None:
    config = home / "dagster.yaml"
    if not config.exists():
        project_config = project_dir / "dagster.yaml"
        if project_config.exists():
            shutil.copyfile(project_config, config)
        else:
            config.write_text(MINIMAL_CONFIG, encoding="utf-8")
    # Opening the instance creates and migrates its storage, and the ledger's schema with it.
    from resources.storage import open_ledger

    with dg.DagsterInstance.from_config(str(home)) as instance:
        open_ledger(instance).close()
    (home / SET_UP_MARK).touch()


if __name__ == "__main__":
    print(ensure_dagster_home())
