"""Handlers of the data_migration batch: the record transform and the count check after it."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from batch_defs.env import resolve_url


def to_customer(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """A legacy record as a row of migrated_customers."""
    return {
        "id": int(item["cust_no"]),
        "full_name": f"{item['fname'].strip()} {item['lname'].strip().title()}",
        "email": item["email_addr"].strip().lower(),
        "country": item["country_code"].strip().upper(),
        "signed_up": datetime.strptime(item["signup_dmy"], "%d/%m/%Y").date().isoformat(),
        "balance": round(int(item["balance_cents"]) / 100, 2),
        "active": item["status"] == "A",
    }


def database_url(url: str, base_dir: Path) -> str:
    """${env:NAME} expanded; a relative SQLite path is beside the batch file."""
    return resolve_url(url, base_dir)


def count_rows(url: str, table: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(
                sa.table(table))).scalar() or 0)
    finally:
        engine.dispose()


def verify_counts(rows: Any, ctx: Any) -> dict[str, Any]:
    """After sql_commit: the target holds as many customers as the source. A mismatch fails
    the step (and the run) with both counts."""
    params = ctx.params
    source = count_rows(database_url(params["source_url"], ctx.base_dir), params["source_table"])
    target = count_rows(database_url(params["target_url"], ctx.base_dir), params["target_table"])
    if source != target:
        raise ValueError(f"count mismatch: {source} records in {params['source_table']}, "
                         f"{target} rows in {params['target_table']}")
    ctx.log.info(f"verified: {target} rows in {params['target_table']}")
    return {"source_rows": source, "target_rows": target}
