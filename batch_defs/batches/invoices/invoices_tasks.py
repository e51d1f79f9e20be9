"""Checks of the invoices batch: plain Python, called by its `validate` phase."""

from __future__ import annotations

from typing import Any


def net_amount(item: dict[str, Any]) -> float:
    return round(float(item["seats"]) * float(item["unit_price"]), 2)


def total_adds_up(value: Any, item: dict[str, Any]) -> bool | str:
    """The stated total must be seats x unit price plus VAT, to the cent."""
    expected = round(net_amount(item) * (1 + float(item["vat_rate"])), 2)
    if abs(float(value) - expected) > 0.005:
        return f"stated {float(value):.2f}, lines add up to {expected:.2f}"
    return True
