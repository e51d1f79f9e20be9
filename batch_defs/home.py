"""DAGSTER_HOME's files as the batch engine reads them: where the home is, its settings
(batch_defs.yaml) and where its ledger lives, without opening the Dagster instance.

Opening an instance imports Dagster (about 0.7 s of a CLI command); `batch-defs status` of a
live run needs only the ledger, so it finds it here when the home's files say where it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from batch_defs.env import expand_env

SETTINGS_FILE = "batch_defs.yaml"  # beside dagster.yaml in DAGSTER_HOME
LEDGER_FILE = "batch_ledger.db"  # the embedded ledger of a home with SQLite storage
SET_UP_MARK = ".batch_defs_set_up"  # written once a home's storage and ledger exist
# dagster.yaml keys that put Dagster's storage (and so the default ledger) where only
# Dagster's own reading of them can say.
DAGSTER_STORAGE_KEYS = ("storage", "run_storage", "event_log_storage", "schedule_storage")


def home_path(project_dir: Path | None = None) -> Path:
    """DAGSTER_HOME if set, else ./.dagster_home (or the project's), resolved."""
    configured = os.environ.get("DAGSTER_HOME")
    home = Path(configured) if configured else (project_dir or Path.cwd()) / ".dagster_home"
    return home.expanduser().resolve()


def home_settings(root: Path) -> dict[str, Any]:
    """The batch engine's own settings of a home: DAGSTER_HOME/batch_defs.yaml.

    Instance-level, so ops, the CLI, sensors and reports all read the same (run config could
    not reach the CLI or the sensors)."""
    path = root / SETTINGS_FILE
    if not path.exists():
        return {}
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping such as `ledger_url: ...`")
    return loaded


def configured_ledger_url(root: Path) -> str | None:
    """`ledger_url` of the home's settings, ${env:NAME} expanded; None when not set."""
    configured = home_settings(root).get("ledger_url")
    return expand_env(str(configured)) if configured else None


def sqlite_ledger_url(root: Path) -> str:
    return f"sqlite:///{root.resolve() / LEDGER_FILE}"


def ledger_url_without_instance(root: Path) -> str | None:
    """The home's ledger when its files say where it is without Dagster: a configured
    `ledger_url`, or the SQLite ledger of a home whose dagster.yaml names no storage. None
    for a home not set up yet, or one whose ledger is in Dagster's configured storage."""
    if not (root / SET_UP_MARK).exists():
        return None
    configured = configured_ledger_url(root)
    if configured:
        return configured
    config_file = root / "dagster.yaml"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    if not isinstance(config, dict) or any(key in config for key in DAGSTER_STORAGE_KEYS):
        return None
    return sqlite_ledger_url(root)
