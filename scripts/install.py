"""Install the project into a virtualenv with uv, under the pip configuration of this machine.

    python3 scripts/install.py VENV REQUIREMENT [REQUIREMENT ...]

uv installs the same pins as pip some ten times faster (the whole dev install, torch included:
about 10 s against pip's 2 minutes, docs/benchmarks.md), which is most of a clean clone's
`make test` before the first test. uv does not read pip's configuration, so the indexes,
find-links and constraints that pip is configured with here (pip.conf, PIP_* variables) are
passed on, and uv picks the best version across all of them as pip does. Where uv cannot be
had, pip installs as before.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

# pip option -> the uv flag that means the same; each takes whitespace-separated values.
UV_FLAGS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}


# `pip config list` prints SECTION.OPTION='value' lines; PIP_* variables come as `:env:`. For
# `pip install`, [install] overrides [global] and the environment overrides both; within a
# section the later line wins (pip lists its files from global to site). Pip versions differ
# in the order of the sections, hence the ranks.
SECTION_RANK = {"global": 0, "install": 1, ":env:": 2}
PROJECT = Path(__file__).resolve().parent.parent


def pip_options(pip: Path) -> dict[str, list[str]]:
    """The pip options that uv needs, with the values pip would use."""
    listed = subprocess.run([str(pip), "config", "list"], capture_output=True, text=True,
                            check=True).stdout
    found: dict[str, tuple[int, list[str]]] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        section, _, option = key.rpartition(".")
        rank = SECTION_RANK.get(section)
        if rank is None or not value or not (option in UV_FLAGS or option == "cert"):
            continue
        if option not in found or rank >= found[option][0]:
            found[option] = (rank, str(ast.literal_eval(value)).split())
    return {option: values for option, (_, values) in found.items()}


def uv_command(venv: Path, requirements: list[str],
               options: dict[str, list[str]]) -> list[str]:
    # Compiled at install, as pip does: where PYTHONDONTWRITEBYTECODE is set (here, and in
    # CI) every process would otherwise compile each module it imports, every time.
    command = [str(venv / "bin" / "uv"), "pip", "install", "--quiet", "--compile-bytecode",
               "--python", str(venv / "bin" / "python"), "--index-strategy", "unsafe-best-match"]
    for option, values in options.items():
        command += [a for value in values if option in UV_FLAGS for a in (UV_FLAGS[option], value)]
    for requirement in requirements:
        command += ["-e", requirement] if requirement.startswith(".") else [requirement]
    return command


def project_packages() -> list[str]:
    """The packages pyproject.toml installs (`batch_defs*` -> batch_defs)."""
    with (PROJECT / "pyproject.toml").open("rb") as file:
        found = tomllib.load(file)["tool"]["setuptools"]["packages"]["find"]["include"]
    return [pattern.rstrip("*") for pattern in found]


def compile_project(venv: Path) -> int:
    """The project's own modules compiled too: the editable install leaves them as source,
    and with PYTHONDONTWRITEBYTECODE every process compiled them again (about 0.1 s each).
    A module edited since is compiled from source, as before."""
    return subprocess.run([str(venv / "bin" / "python"), "-m", "compileall", "-q", "-j", "0",
                           *project_packages()], cwd=PROJECT).returncode


def main(venv: Path, requirements: list[str]) -> int:
    installed = install(venv, requirements)
    return installed or compile_project(venv)


def install(venv: Path, requirements: list[str]) -> int:
    pip = venv / "bin" / "pip"
    if not pip.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if subprocess.run([str(pip), "install", "--quiet", "uv"]).returncode == 0:
        options = pip_options(pip)
        env = dict(os.environ)
        if options.get("cert"):  # pip's certificate bundle serves uv too
            env.setdefault("SSL_CERT_FILE", options["cert"][0])
        if subprocess.run(uv_command(venv, requirements, options), env=env).returncode == 0:
            return 0
        print("install.py: uv could not install; installing with pip", file=sys.stderr)
    else:
        print("install.py: uv is not available; installing with pip", file=sys.stderr)
    pip_args = [a for r in requirements for a in (["-e", r] if r.startswith(".") else [r])]
    return subprocess.run([str(pip), "install", "--quiet", *pip_args]).returncode


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
