"""Live changes to a running batch (`batch-defs set RUN KEY=VALUE`): what may change, checked.

They are stored in the run's ledger row (batch_run.settings) as dotted keys with their values;
the run's engine reads them every second and applies them without a restart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from batch_defs.spec import BatchSpec, OptionsSpec, Rate

CHANGEABLE = ("options.concurrency", "options.tolerated_failures", "phases.NAME.rate")
_PHASE_RATE = re.compile(r"phases(?:\.([a-z][a-z0-9_]*)|\[(\d+)\])\.rate")


class SettingsError(ValueError):
    """A change that cannot be made to a running batch; the message says why."""


class LiveSettings(BaseModel):
    """The changes in force for a run, each None (or absent) when unchanged."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int | None = Field(default=None, ge=1, le=50)
    tolerated_failures: int | str | None = None
    rates: dict[str, Rate] = Field(default_factory=dict)  # phase name -> rate

    @field_validator("tolerated_failures")
    @classmethod
    def _tolerance(cls, value: int | str | None) -> int | str | None:
        if value is None:
            return None
        return OptionsSpec.model_validate({"tolerated_failures": value}).tolerated_failures

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> LiveSettings:
        """From the stored dotted keys (batch_run.settings `values`)."""
        rates = {key.split(".")[1]: value for key, value in values.items()
                 if key.startswith("phases.") and key.endswith(".rate")}
        return cls(concurrency=values.get("options.concurrency"),
                   tolerated_failures=values.get("options.tolerated_failures"), rates=rates)

    def options(self, options: OptionsSpec) -> OptionsSpec:
        """The batch's options with these changes applied."""
        changed = {k: v for k, v in (("concurrency", self.concurrency),
                                     ("tolerated_failures", self.tolerated_failures))
                   if v is not None}
        return options.model_copy(update=changed) if changed else options


def parse_changes(assignments: Sequence[str], spec: BatchSpec | None) -> dict[str, Any]:
    """KEY=VALUE assignments as dotted keys and checked values; SettingsError names what is
    wrong. `spec` (the run's batch) resolves `phases[0]` to a phase name and checks names."""
    values: dict[str, Any] = {}
    for assignment in assignments:
        dotted, sep, text = assignment.partition("=")
        dotted = dotted.strip()
        if not sep or not dotted:
            raise SettingsError(f"{assignment!r}: expected KEY=VALUE, e.g. "
                                "options.concurrency=20")
        key = _key(dotted, spec)
        values[key] = yaml.safe_load(text) if text.strip() else None
    try:
        LiveSettings.from_values(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"]]
        where = f"phases.{loc[1]}.rate" if loc[0] == "rates" else f"options.{loc[0]}"
        raise SettingsError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from exc
    if spec is not None and spec.options.mode == "sequential" and "options.concurrency" in values:
        raise SettingsError("options.concurrency: this batch runs sequentially (one item at "
                            "a time)")
    return values


def _key(dotted: str, spec: BatchSpec | None) -> str:
    if dotted in ("options.concurrency", "options.tolerated_failures"):
        return dotted
    match = _PHASE_RATE.fullmatch(dotted)
    if match is None:
        raise SettingsError(f"{dotted}: cannot be changed while the batch runs (these can: "
                            f"{', '.join(CHANGEABLE)})")
    name, index = match.groups()
    if spec is None:
        if name is None:
            raise SettingsError(f"{dotted}: name the phase (phases.NAME.rate)")
        return f"phases.{name}.rate"
    names = [phase.name for phase in spec.phases]
    if index is not None:
        if int(index) >= len(names):
            raise SettingsError(f"{dotted}: the batch has {len(names)} phases")
        name = names[int(index)]
    if name not in names:
        raise SettingsError(f"{dotted}: no phase {name!r} (phases: {', '.join(names)})")
    return f"phases.{name}.rate"
