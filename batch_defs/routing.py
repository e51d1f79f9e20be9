"""Routes: a phase that runs each item through one of several task configurations."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from batch_defs.expressions import Expression
from batch_defs.spec import PhaseSpec

DEFAULT = "default"  # the branch of items whose value has no case


@dataclass(frozen=True)
class Router:
    """A routed phase's handler: `by` picks the branch, each branch has its own handler."""

    by: Expression
    handlers: Mapping[str, Callable[..., Any]]  # branch -> handler, with DEFAULT
    params: Mapping[str, Mapping[str, Any]]  # branch -> its params (what ctx.params shows)

    def branch(self, variables: Mapping[str, Any]) -> str:
        """The case for these variables (ExpressionError if `by` cannot be evaluated)."""
        value = self.by.evaluate(variables)
        text = str(value).lower() if isinstance(value, bool) else str(value)
        return text if value is not None and text in self.handlers else DEFAULT

    def __call__(self, item: dict[str, Any], ctx: Any) -> Any:
        from batch_defs.expressions import item_variables

        variables = item_variables(item, ctx.key, ctx.batch, ctx.partition, ctx.phase)
        branch = self.branch(variables)
        ctx.params = self.params[branch]
        return self.handlers[branch](item, ctx)


def build_router(phase: PhaseSpec, build: Callable[[str, dict[str, Any]], Any]) -> Router:
    """The router of a phase with `route:`, its handlers made by `build(task, params)`."""
    configs = phase.route_configs()
    if phase.route is None or not configs:
        raise ValueError(f"phase {phase.name!r} has no route")
    return Router(Expression(phase.route.by, templates=True),
                  {branch: build(task, params) for branch, (task, params) in configs.items()},
                  {branch: params for branch, (_, params) in configs.items()})
