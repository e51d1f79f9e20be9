"""scripts/install.py hands uv the indexes, find-links and constraints pip is configured with."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import PROJECT

pytestmark = pytest.mark.unit


def install_script():
    spec = importlib.util.spec_from_file_location("install", PROJECT / "scripts" / "install.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_uv_gets_pips_indexes_find_links_and_constraints_with_pips_precedence(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "pip.conf"
    config.write_text("[global]\n"
                      "extra-index-url = https://a.example/simple https://b.example/simple\n"
                      "find-links = /from/file\n"
                      f"constraint = {tmp_path / 'caps.txt'}\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    monkeypatch.setenv("PIP_FIND_LINKS", "/from/env")  # the environment wins over a file
    install = install_script()
    venv = PROJECT / ".venv"
    options = install.pip_options(venv / "bin" / "pip")
    command = install.uv_command(venv, [".[dev]", "prefect>=3"], options)

    def values(flag: str) -> list[str]:
        return [command[i + 1] for i, arg in enumerate(command) if arg == flag]

    assert values("--extra-index-url") == ["https://a.example/simple",
                                           "https://b.example/simple"]
    assert values("--find-links") == ["/from/env"]
    assert values("--constraint") == [str(tmp_path / "caps.txt")]
    assert command[command.index("--index-strategy") + 1] == "unsafe-best-match"
    assert "--compile-bytecode" in command  # as pip does; PYTHONDONTWRITEBYTECODE is set here
    assert command[-3:] == ["-e", ".[dev]", "prefect>=3"]  # the project editable, others not


def test_the_projects_own_modules_are_compiled_even_where_bytecode_is_not_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The editable install leaves them as source; PYTHONDONTWRITEBYTECODE (set here and in
    # CI) would have every process compile them again.
    install = install_script()
    packages = install.project_packages()
    assert packages == ["batch_defs", "assets", "resources", "sensors"]  # what is installed
    (tmp_path / "pyproject.toml").write_text((PROJECT / "pyproject.toml").read_text())
    for package in packages:
        (tmp_path / package / "inner").mkdir(parents=True)
        (tmp_path / package / "inner" / "module.py").write_text("VALUE = 1\n")
    monkeypatch.setattr(install, "PROJECT", tmp_path)
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    assert install.compile_project(PROJECT / ".venv") == 0
    for package in packages:
        source = tmp_path / package / "inner" / "module.py"
        assert Path(importlib.util.cache_from_source(str(source))).is_file(), package
