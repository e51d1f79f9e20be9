"""Item schema validation: `schema:` type names in a spec become a pydantic model."""

from __future__ import annotations

import datetime as dt
import re
from enum import Enum
from typing import Any

from pydantic import AnyUrl, BaseModel, ConfigDict, EmailStr, ValidationError, create_model

SCALARS: dict[str, Any] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "date": dt.date,
    "datetime": dt.datetime,
    "email": EmailStr,
    "url": AnyUrl,
    "any": Any,
}
_ENUM = re.compile(r"^enum\((.+)\)$")


def parse_type(expr: str) -> tuple[Any, bool]:
    """`int`, `email?`, `enum(a,b,c)` -> (python type, optional)."""
    text = expr.strip()
    optional = text.endswith("?")
    text = text.rstrip("?").strip()
    match = _ENUM.match(text)
    if match:
        values = [v.strip() for v in match.group(1).split(",") if v.strip()]
        return Enum("Choice", {f"v{i}": v for i, v in enumerate(values)}, type=str), optional
    if text not in SCALARS:
        known = ", ".join(SCALARS)
        raise ValueError(f"unknown type {expr!r} (known: {known}, enum(a,b), with ? for optional)")
    return SCALARS[text], optional


def build_item_model(schema: dict[str, str]) -> type[BaseModel]:
    fields: dict[str, Any] = {}
    for name, expr in schema.items():
        python_type, optional = parse_type(expr)
        fields[name] = (python_type | None, None) if optional else (python_type, ...)
    # Fields outside the schema pass through untouched: the schema checks, it does not filter.
    return create_model("Item", __config__=ConfigDict(extra="allow"), **fields)


def _blank_to_none(data: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    # CSV gives "" for a missing value; an optional field treats it as absent.
    out = dict(data)
    for name, field in model.model_fields.items():
        if out.get(name) == "" and not field.is_required():
            out[name] = None
    return out


def validate_item(model: type[BaseModel],
                  data: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(coerced item, None) or (original item, reason naming each failing field)."""
    try:
        item = model.model_validate(_blank_to_none(data, model))
    except ValidationError as exc:
        reasons = []
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"])
            reasons.append(f"{field}: {error['msg']}")
        return data, "; ".join(reasons)
    values = item.model_dump(mode="json")
    return values, None
