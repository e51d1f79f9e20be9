"""`python` task: calls a plain function `module:function` importable on the code location."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field

from batch_defs.tasks.base import AfterHandler, Handler, TaskParams


class PythonParams(TaskParams):
    # Extra keys are the handler's own parameters, read through ctx.params.
    model_config = ConfigDict(extra="allow")

    function: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def import_function(reference: str, base_dir: Path) -> Callable[..., Any]:
    """Import `module:function`, looking beside the batch file too, so local modules work."""
    module_name, _, attr = reference.partition(":")
    if str(base_dir) not in sys.path:
        sys.path.append(str(base_dir))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r}: {exc}") from exc
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"module {module_name!r} has no function {attr!r}")
    return function


def make_handler(params: PythonParams, base_dir: Path) -> Handler:
    return import_function(params.function, base_dir)


def make_after_handler(params: PythonParams, base_dir: Path) -> AfterHandler:
    """An after step in Python: called with (ledger rows as a DataFrame, AfterContext)."""
    return import_function(params.function, base_dir)
