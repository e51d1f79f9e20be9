"""`batch-defs migrate`: a NAME.yaml batch file becomes the Dagster component NAME/defs.yaml."""

from __future__ import annotations

from pathlib import Path

from batch_defs.loader import (
    COMPONENT_FILE,
    COMPONENT_TYPE,
    SpecError,
    SpecProblem,
    batch_name_of,
    load_batch,
)


def component_text(text: str, needs_base_dir: bool) -> str:
    """The file's text under `attributes:`: leading comments stay on top, the spec is indented
    as it was (its own comments kept), and `base_dir: ..` keeps its relative paths valid."""
    lines = text.splitlines()
    head: list[str] = []
    while lines and (not lines[0].strip() or lines[0].lstrip().startswith("#")):
        head.append(lines.pop(0))
    if lines and lines[0].strip() == "---":
        lines.pop(0)
    body = ["attributes:"]
    if needs_base_dir:
        body.append("  base_dir: ..  # the folder this batch was written in: paths stay valid")
    body += [f"  {line}" if line.strip() else "" for line in lines]
    return "\n".join([*head, f"type: {COMPONENT_TYPE}", *body]) + "\n"


def migrate_file(path: Path, keep: bool = False) -> Path:
    """Write NAME/defs.yaml beside NAME.yaml (then remove NAME.yaml unless `keep`); the result
    must load to the same batch, or nothing changes."""
    loaded = load_batch(path)  # a file that does not load is not migrated
    name = batch_name_of(path)
    target = path.parent / name / COMPONENT_FILE
    if target.exists():
        raise SpecError([SpecProblem(str(target), None, "", "already exists")])
    target.parent.mkdir(exist_ok=True)
    text = path.read_text(encoding="utf-8")
    target.write_text(component_text(text, loaded.spec.base_dir is None), encoding="utf-8")
    try:
        migrated = load_batch(target)
        if migrated.base_dir != loaded.base_dir or (
                migrated.spec.model_dump(exclude={"base_dir"})
                != loaded.spec.model_dump(exclude={"base_dir"})):
            raise SpecError([SpecProblem(str(target), None, "",
                                         "the migrated file does not load to the same batch")])
    except SpecError:
        target.unlink()
        if not any(target.parent.iterdir()):
            target.parent.rmdir()
        raise
    if not keep:
        path.unlink()
    return target
