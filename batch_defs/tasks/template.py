"""`template` task: renders a sandboxed Jinja2 template per item to a file in the output folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from pydantic import model_validator

from batch_defs.tasks.base import Handler, TaskContext, TaskParams
from batch_defs.tasks.templating import render, template_env, template_vars


class TemplateParams(TaskParams):
    template: str | None = None  # file, relative to the batch file's folder
    source: str | None = None  # or the template text itself
    output: str = "{partition}/{key}.txt"  # relative to the batch's output folder
    field: str | None = None  # item field receiving the written path (default: <phase>_path)

    @model_validator(mode="after")
    def _one_template(self) -> TemplateParams:
        if (self.template is None) == (self.source is None):
            raise ValueError("give exactly one of 'template' (a file) or 'source' (the text)")
        return self


def confined_path(root: Path, relative: str) -> Path:
    """root/relative, refusing any path that escapes root (.., absolute paths, odd keys)."""
    root = root.resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise PermissionError(f"output path {relative!r} is outside the output folder {root}")
    return target


def make_handler(params: TemplateParams, base_dir: Path) -> Handler:
    env = template_env(loader=jinja2.FileSystemLoader(base_dir),
                       autoescape=jinja2.select_autoescape(["html", "htm", "xml"]),
                       keep_trailing_newline=True)
    try:
        template = (env.get_template(params.template) if params.template
                    else env.from_string(params.source or ""))
    except jinja2.TemplateError as exc:
        raise ValueError(f"template {params.template or 'source'}: {exc}") from exc

    def write(item: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        text = render(template, template_vars(item, ctx), params.template or "source")
        relative = params.output.format(partition=ctx.partition, key=ctx.key, phase=ctx.phase)
        path = confined_path(ctx.output_dir, relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return {params.field or f"{ctx.phase}_path": str(path)}

    return write
