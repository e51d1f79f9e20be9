"""Finds or prepares the Dagster instance folder (DAGSTER_HOME) the CLI works against."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

MINIMAL_CONFIG = "telemetry:\n  enabled: false\n"


def ensure_dagster_home(project_dir: Path | None = None) -> Path:
    """DAGSTER_HOME if set; else ./.dagster_home, given the project's dagster.yaml on creation.

    Setting the variable here also stops Dagster from creating .tmp_dagster_home_* folders.
    """
    configured = os.environ.get("DAGSTER_HOME")
    home = Path(configured) if configured else (project_dir or Path.cwd()) / ".dagster_home"
    home = home.expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        project_config = (project_dir or Path.cwd()) / "dagster.yaml"
        if project_config.exists():
            shutil.copyfile(project_config, config)
        else:
            config.write_text(MINIMAL_CONFIG, encoding="utf-8")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


if __name__ == "__main__":
    print(ensure_dagster_home())
