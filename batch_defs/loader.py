"""Reads batch YAML files into BatchSpec models, with errors that name file, line and field."""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
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


COMPONENT_FILE = "defs.yaml"  # a batch as a Dagster component: NAME/defs.yaml
COMPONENT_TYPE = "batch_defs.components.Batch"


@dataclass(frozen=True, eq=False)  # hashed by identity: cached effective specs key on it
class LoadedBatch:
    spec: BatchSpec
    path: Path  # NAME.yaml, or NAME/defs.yaml for a batch written as a component
    # What the batch needs but this installation lacks (an optional extra): it loads, shows
    # why, and fails when it runs.
    notices: tuple[SpecProblem, ...] = ()

    @property
    def base_dir(self) -> Path:
        """Relative paths in the spec resolve against this folder."""
        return (self.path.parent / self.spec.base_dir).resolve() if self.spec.base_dir \
            else self.path.parent


@dataclass(frozen=True)
class BrokenBatch:
    """A batch file that does not load, and why; every other batch loads without it."""

    name: str  # from its file (or folder) name
    path: Path
    problems: tuple[SpecProblem, ...]

    def describe(self) -> str:
        return "; ".join(str(p) for p in self.problems)


@dataclass
class Catalog:
    """Every batch file found: those that load, and those that do not."""

    batches: dict[str, LoadedBatch] = field(default_factory=dict)
    broken: list[BrokenBatch] = field(default_factory=list)


def batch_name_of(path: Path) -> str:
    """A batch's name as its file says it: NAME.yaml, or NAME/defs.yaml."""
    return path.parent.name if path.name == COMPONENT_FILE else path.stem


def batch_folders() -> list[Path]:
    """Folders of batch YAML: BATCH_DEFS_PATH (os.pathsep separated) or the shipped examples."""
    configured = os.environ.get("BATCH_DEFS_PATH", "")
    if configured.strip():
        return [Path(p).expanduser().resolve() for p in configured.split(os.pathsep) if p]
    return [PACKAGE_BATCHES]


def batch_files(paths: Iterable[Path] | None = None) -> list[Path]:
    """Batch files in the given files and folders: NAME.yaml (or .yml), and NAME/defs.yaml
    (a batch written as a Dagster component), sorted by batch name."""
    files: list[Path] = []
    for path in paths if paths is not None else batch_folders():
        path = Path(path)
        if path.is_dir():
            found = [p for p in path.glob("*.y*ml") if p.suffix in (".yaml", ".yml")]
            found += list(path.glob(f"*/{COMPONENT_FILE}"))
            files.extend(sorted(found, key=lambda p: (batch_name_of(p), str(p))))
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
    return parse_batch_file(text, path)[0]


def parse_batch_file(text: str, path: Path) -> tuple[BatchSpec, list[SpecProblem]]:
    """(spec, notices) of a batch file of either shape; SpecError naming file, line and
    field for what is wrong."""
    display = path.name if path.name != COMPONENT_FILE else f"{path.parent.name}/{path.name}"
    root, data = _parse_yaml(text, display)
    if path.name == COMPONENT_FILE:
        root, data = _component_attributes(root, data, display)
    return validate_batch_data(data, root, path, display)


def _parse_yaml(text: str, display: str) -> tuple[yaml.Node | None, Any]:
    try:
        data, root = yamlio.load(text)
    except yamlio.YamlError as exc:
        raise SpecError([SpecProblem(display, p.line, format_loc(p.loc), p.message)
                         for p in exc.problems]) from exc
    return root, data


def _component_attributes(root: yaml.Node | None, data: Any,
                          display: str) -> tuple[yaml.Node | None, Any]:
    """The batch spec inside a component file (`type:` + `attributes:`)."""
    if not isinstance(data, dict):
        raise SpecError([SpecProblem(display, 1, "", "a defs.yaml must be a YAML mapping with "
                                                     f"type: {COMPONENT_TYPE} and attributes")])
    problems = []
    if data.get("type") != COMPONENT_TYPE:
        problems.append(SpecProblem(display, _line_of(root, ["type"]), "type",
                                    f"must be {COMPONENT_TYPE}"))
    unknown = sorted(set(data) - {"type", "attributes"})
    problems += [SpecProblem(display, _line_of(root, [key]), key, "unknown field")
                 for key in unknown]
    if not isinstance(data.get("attributes"), dict):
        problems.append(SpecProblem(display, _line_of(root, ["attributes"]), "attributes",
                                    "must be a mapping: the batch spec"))
    if problems:
        raise SpecError(problems)
    node = None
    if isinstance(root, yaml.MappingNode):
        node = next((v for k, v in root.value if k.value == "attributes"), None)
    return node, data["attributes"]


def validate_batch_data(data: Any, root: yaml.Node | None, path: Path,
                        display: str | None = None) -> tuple[BatchSpec, list[SpecProblem]]:
    """A batch spec from parsed YAML data: (spec, notices); SpecError for what is wrong."""
    display = display or path.name
    name = batch_name_of(path)
    if not isinstance(data, dict):
        raise SpecError([SpecProblem(display, 1, "", "a batch file must be a YAML mapping")])
    if path.name == COMPONENT_FILE:
        data = {"name": name, **data}  # a component's name is its folder's
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
    if spec.name != name:
        what = "folder" if path.name == COMPONENT_FILE else "file"
        problems.append(
            SpecProblem(display, _line_of(root, ["name"]), "name",
                        f"must equal the {what} name {name!r}")
        )
    from batch_defs.tasks import check_spec_tasks  # tasks import the loader's types
    from batch_defs.validation import schema_problems

    base_dir = (path.parent / spec.base_dir).resolve() if spec.base_dir else path.parent
    checked = check_spec_tasks(spec, base_dir)
    found = [(["source", "schema", *loc], message)
             for loc, message in schema_problems(spec.source.schema_)]
    for loc, message in found + checked.problems:
        problems.append(SpecProblem(display, _line_of(root, loc), format_loc(loc), message))
    if problems:
        raise SpecError(problems)
    notices = [SpecProblem(display, _line_of(root, loc), format_loc(loc), message)
               for loc, message in checked.notices]
    return spec, notices


def load_batch(path: Path) -> LoadedBatch:
    path = Path(path).resolve()
    try:
        text = yamlio.read_text(path)
    except OSError as exc:
        raise SpecError([SpecProblem(str(path), None, "", f"cannot read: {exc.strerror}")]
                        ) from exc
    except yamlio.YamlError as exc:
        raise SpecError([SpecProblem(path.name, p.line, "", p.message)
                         for p in exc.problems]) from exc
    return _loaded(path, text)


@functools.lru_cache(maxsize=16)
def _loaded(path: Path, text: str) -> LoadedBatch:
    """A batch file's text parsed and checked once per process: `batch-defs run` finds the
    batch, then builds its job from it, and a large inline source costs one parse, not two
    (a changed file is parsed again: its text is the key)."""
    spec, notices = parse_batch_file(text, path)
    return LoadedBatch(spec, path, tuple(notices))


def load_catalog(paths: Iterable[Path] | None = None) -> Catalog:
    """Every batch file: a bad one (invalid YAML, a wrong field, a name used twice) is kept
    with its problems and never stops the others from loading."""
    catalog = Catalog()
    for file in batch_files(paths):
        try:
            loaded = load_batch(file)
        except SpecError as exc:
            catalog.broken.append(BrokenBatch(batch_name_of(file), file, tuple(exc.problems)))
            continue
        name = loaded.spec.name
        if name in catalog.batches:
            first = catalog.batches[name].path
            catalog.broken.append(BrokenBatch(name, file, (SpecProblem(
                file.name, None, "name", f"batch {name!r} is defined twice (first in {first})"),)))
            continue
        catalog.batches[name] = loaded
    return catalog


def load_batches(paths: Iterable[Path] | None = None) -> dict[str, LoadedBatch]:
    """Every batch file; SpecError listing the problems of every file that does not load."""
    catalog = load_catalog(paths)
    if catalog.broken:
        raise SpecError([p for broken in catalog.broken for p in broken.problems])
    return catalog.batches


def find_batch(name: str) -> LoadedBatch:
    for file in batch_files():
        if batch_name_of(file) == name:
            return load_batch(file)
    folders = ", ".join(str(f) for f in batch_folders())
    raise SpecError([SpecProblem(name, None, "", f"no batch named {name!r} in {folders}")])


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
        folder = base_dir or next((f.parent for f in batch_files()
                                   if batch_name_of(f) == spec.name), Path.cwd())
        blamed = changes.blame(check_spec_tasks(changed, folder).problems, new_only=True)
    if blamed:
        raise SpecError([SpecProblem(who, None, format_loc(field), message)
                         for who, field, message in blamed])
    return changed
