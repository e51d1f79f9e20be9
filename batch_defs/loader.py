"""Reads batch YAML files into BatchSpec models, with errors that name file, line and field."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from batch_defs import yamlio
from batch_defs.spec import BatchSpec

PACKAGE_BATCHES = Path(__file__).parent / "batches"


@dataclass(frozen=True)
class SpecProblem:
    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where} {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class SpecError(ValueError):
    """One or more problems in batch YAML files; str() lists each as file:line field: message."""

    def __init__(self, problems: Sequence[SpecProblem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True, eq=False)  # hashed by identity: cached effective specs key on it
class LoadedBatch:
    spec: BatchSpec
    path: Path

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def batch_folders() -> list[Path]:
    """Folders of batch YAML: BATCH_DEFS_PATH (os.pathsep separated) or the shipped examples."""
    configured = os.environ.get("BATCH_DEFS_PATH", "")
    if configured.strip():
        return [Path(p).expanduser().resolve() for p in configured.split(os.pathsep) if p]
    return [PACKAGE_BATCHES]


def batch_files(paths: Iterable[Path] | None = None) -> list[Path]:
    files: list[Path] = []
    for path in paths if paths is not None else batch_folders():
        path = Path(path)
        if path.is_dir():
            files.extend(sorted(p for p in path.glob("*.y*ml") if p.suffix in (".yaml", ".yml")))
        else:
            files.append(path)
    return files


def format_loc(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_of(node: yaml.Node | None, loc: Sequence[str | int]) -> int | None:
    """Line (1-based) of the YAML node at loc, or of its nearest existing ancestor."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == part:
                    child = value_node
                    break
        elif (isinstance(node, yaml.SequenceNode) and isinstance(part, int)
              and 0 <= part < len(node.value)):
            child = node.value[part]
        if child is None:
            # Discriminator tags (e.g. "csv") and missing fields are not in the document.
            continue
        node, line = child, child.start_mark.line + 1
    return line


def _clean_loc(loc: Sequence[str | int]) -> list[str | int]:
    # pydantic inserts the union member's tag ("csv", "int", "function-after[...]") into loc.
    return [p for p in loc if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]


_UNION_TAGS = {"csv", "json", "jsonl", "parquet", "sql", "http", "inline", "int", "str"}


def _message(error: Any) -> str:
    message = str(error["msg"])
    message = re.sub(r"^Value error, ", "", message)
    if error["type"] == "greater_than_equal":
        return f"must be >= {error['ctx']['ge']}"
    if error["type"] == "less_than_equal":
        return f"must be <= {error['ctx']['le']}"
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "missing":
        return "field required"
    return message


def parse_batch(text: str, path: Path) -> BatchSpec:
    """Parse YAML text of one batch; raise SpecError naming file, line and field."""
    display = path.name
    try:
        data, root = yamlio.load(text)
    except yamlio.YamlError as exc:
        raise SpecError([SpecProblem(display, p.line, format_loc(p.loc), p.message)
                         for p in exc.problems]) from exc
    if not isinstance(data, dict):
        raise SpecError([SpecProblem(display, 1, "", "a batch file must be a YAML mapping")])
    try:
        spec = BatchSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = _clean_loc(error["loc"])
            line = _line_of(root, loc)
            problems.append(SpecProblem(display, line, format_loc(loc), _message(error)))
        raise SpecError(problems) from exc
    problems = []
    if spec.name != path.stem:
        problems.append(
            SpecProblem(display, _line_of(root, ["name"]), "name",
                        f"must equal the file name {path.stem!r}")
        )
    from batch_defs.tasks import check_spec_tasks  # tasks import the loader's types
    from batch_defs.validation import schema_problems

    found = [(["source", "schema", *loc], message)
             for loc, message in schema_problems(spec.source.schema_)]
    for loc, message in found + check_spec_tasks(spec, path.parent):
        problems.append(SpecProblem(display, _line_of(root, loc), format_loc(loc), message))
    if problems:
        raise SpecError(problems)
    return spec


def load_batch(path: Path) -> LoadedBatch:
    path = Path(path).resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([SpecProblem(str(path), None, "", f"cannot read: {exc.strerror}")]) from exc
    return LoadedBatch(parse_batch(text, path), path)


def load_batches(paths: Iterable[Path] | None = None) -> dict[str, LoadedBatch]:
    """Load every batch file; collect the problems of all files into one SpecError."""
    batches: dict[str, LoadedBatch] = {}
    problems: list[SpecProblem] = []
    for file in batch_files(paths):
        try:
            loaded = load_batch(file)
        except SpecError as exc:
            problems.extend(exc.problems)
            continue
        if loaded.spec.name in batches:
            problems.append(SpecProblem(file.name, None, "name",
                                        f"batch {loaded.spec.name!r} is defined twice"))
        batches[loaded.spec.name] = loaded
    if problems:
        raise SpecError(problems)
    return batches


def find_batch(name: str) -> LoadedBatch:
    for file in batch_files():
        if file.stem == name:
            return load_batch(file)
    folders = ", ".join(str(f) for f in batch_folders())
    raise SpecError([SpecProblem(name, None, "", f"no batch named {name!r} in {folders}")])


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts: list[str | int] = [int(p) if p.isdigit() else p
                              for p in re.split(r"\.|\[(\d+)\]", dotted) if p]
    target: Any = data
    for part in parts[:-1]:
        target = target[int(part)] if isinstance(target, list) else target.setdefault(part, {})
    last = parts[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value


FILE_TYPES = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".parquet": "parquet"}


def source_for_file(source: dict[str, Any], path: Path) -> dict[str, Any]:
    """The spec's source pointed at another file; a file of another format (say, a dead-letter
    .jsonl for a CSV batch) gets a source of that type with the same key and schema."""
    file_type = FILE_TYPES.get(path.suffix.lower())
    if file_type is None or file_type == source["type"]:
        return {**source, "path": str(path)}
    new: dict[str, Any] = {"type": file_type, "path": str(path)}
    new.update({k: source[k] for k in ("key", "schema") if k in source})
    if file_type == "jsonl" and _is_dead_letter(path):
        new["field"] = "input"
    return new


def _is_dead_letter(path: Path) -> bool:
    """A results file (`batch-defs results --format jsonl`): rows with item_key and input."""
    try:
        with path.open(encoding="utf-8") as handle:
            first = json.loads(handle.readline() or "{}")
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and {"item_key", "input"} <= first.keys()


def with_overrides(spec: BatchSpec, data: str | Path | None = None,
                   sets: Sequence[str] = (), *, base_dir: Path | None = None) -> BatchSpec:
    """The spec with --data (replaces source.path) and --set key=value overrides applied and
    checked like the file itself, task types and params included; each problem names the
    change it comes from. base_dir is the batch file's folder, where task params' relative
    paths resolve (default: the folder of the batch file named like the spec, else the cwd)."""
    if not data and not sets:
        return spec
    raw = spec.model_dump(by_alias=True, exclude_unset=True)
    changes = yamlio.Changes()
    if data:
        raw["source"] = source_for_file(raw["source"], Path(data).expanduser().resolve())
        changes.add(f"--data {data}", ("source",))
    for text in sets:
        try:
            assignment = yamlio.parse_assignment(text)
            yamlio.apply_assignment(raw, assignment)
        except yamlio.YamlError as exc:
            raise SpecError([SpecProblem(f"--set {text}", None, format_loc(p.loc), p.message)
                             for p in exc.problems]) from exc
        changes.add(f"--set {text}", assignment.loc)
    try:
        changed = BatchSpec.model_validate(raw)
    except ValidationError as exc:
        found = [(_clean_loc(e["loc"]), _message(e)) for e in exc.errors()]
        blamed = changes.blame(found)
        raise SpecError([SpecProblem(who, None, format_loc(field), message)
                         for who, field, message in blamed]) from exc
    from batch_defs.tasks import check_spec_tasks
    from batch_defs.validation import schema_problems

    found = [(["source", "schema", *loc], message)
             for loc, message in schema_problems(changed.source.schema_)]
    if changed.name != spec.name:
        found.append((["name"], f"must equal the file name {spec.name!r}"))
    blamed = changes.blame(found)
    if not blamed and changes.touch("phases", "after"):
        folder = base_dir or next((f.parent for f in batch_files() if f.stem == spec.name),
                                  Path.cwd())
        blamed = changes.blame(check_spec_tasks(changed, folder), new_only=True)
    if blamed:
        raise SpecError([SpecProblem(who, None, format_loc(field), message)
                         for who, field, message in blamed])
    return changed
