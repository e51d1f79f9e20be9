"""Writes the shipped batches' data files (seeded, so every run writes the same files)."""

from __future__ import annotations

import argparse
import csv
import json
import random
import sqlite3
from datetime import date, timedelta
from pathlib import Path

BATCHES = Path(__file__).resolve().parent.parent / "batch_defs" / "batches"
FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Dennis", "Ken",
         "Frances", "John", "Radia", "Tim", "Hedy", "Linus", "Guido", "Sophie", "Niklaus"]
LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Hamilton", "Ritchie",
        "Thompson", "Allen", "Backus", "Perlman", "Berners-Lee", "Lamarr", "Torvalds", "Wirth"]
VAT = {"NO": 0.25, "SE": 0.25, "DE": 0.19, "FR": 0.20, "GB": 0.20, "NL": 0.21, "US": 0.0}
PLANS = {"starter": 9.0, "team": 29.0, "business": 79.0}
# Invoices whose stated total is wrong: the `check` phase rejects them (within tolerance).
WRONG_TOTALS = {137, 402, 733}


def person(rng: random.Random, n: int) -> tuple[str, str, str]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    return first, last, f"{first}.{last}{n}@example.com".lower().replace("-", "")


def write_invoices(rng: random.Random, path: Path, count: int = 1000) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["invoice_no", "customer_id", "name", "email", "country", "plan",
                         "seats", "unit_price", "vat_rate", "total"])
        for n in range(1, count + 1):
            first, last, email = person(rng, n)
            country = rng.choice(list(VAT))
            plan = rng.choice(list(PLANS))
            seats = rng.randint(1, 40)
            net = round(seats * PLANS[plan], 2)
            total = round(net * (1 + VAT[country]), 2)
            if n in WRONG_TOTALS:
                total = round(total + 10, 2)
            writer.writerow([f"INV-2026-{n:04d}", n, f"{first} {last}", email, country, plan,
                             seats, f"{PLANS[plan]:.2f}", VAT[country], f"{total:.2f}"])


def write_users(rng: random.Random, path: Path, count: int = 200) -> None:
    path.unlink(missing_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute("""create table users (
            id integer primary key, email text not null unique, first_name text not null,
            last_name text not null, locale text not null, plan text not null,
            opted_in integer not null, signed_up text not null)""")
        for n in range(1, count + 1):
            first, last, email = person(rng, n)
            signed_up = date(2024, 1, 1) + timedelta(days=rng.randint(0, 700))
            conn.execute("insert into users values (?, ?, ?, ?, ?, ?, ?, ?)",
                         (n, email, first, last, rng.choice(["en", "nb", "de", "fr"]),
                          rng.choice(list(PLANS)), int(n % 10 != 0), signed_up.isoformat()))
    conn.close()


def write_legacy(rng: random.Random, path: Path, count: int = 1000) -> None:
    path.unlink(missing_ok=True)
    with sqlite3.connect(path) as conn:
        # The old system's shape: split names, day-first dates as text, money in cents.
        conn.execute("""create table legacy_customers (
            cust_no integer primary key, fname text, lname text, email_addr text,
            country_code text, signup_dmy text, balance_cents integer, status text)""")
        for n in range(1, count + 1):
            first, last, email = person(rng, n)
            signed_up = date(2015, 1, 1) + timedelta(days=rng.randint(0, 3000))
            conn.execute("insert into legacy_customers values (?, ?, ?, ?, ?, ?, ?, ?)",
                         (n, f" {first}", last.upper(), f" {email.upper()} ",
                          rng.choice(list(VAT)).lower(), signed_up.strftime("%d/%m/%Y"),
                          rng.randint(-5000, 250000), rng.choice("AAAAI")))
    conn.close()


PACKAGES = [  # name, dependencies: a small monorepo's build graph
    ("core", []), ("logging", []), ("config", ["core"]), ("db", ["core", "config"]),
    ("http", ["core", "logging"]), ("auth", ["db", "http"]), ("cache", ["core"]),
    ("api", ["auth", "http", "cache"]), ("worker", ["db", "logging", "cache"]),
    ("cli", ["config", "logging"]), ("web", ["api"]), ("admin", ["api", "auth"]),
    ("docs", ["cli", "api", "web"]),
]


def write_packages(path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for index, (name, depends_on) in enumerate(PACKAGES):
            record = {"name": name, "version": f"1.{index}.0", "depends_on": depends_on}
            handle.write(json.dumps(record) + "\n")


TOPICS = {
    "batteries": "Grid-scale batteries store surplus solar power for the evening peak. Prices "
                 "of lithium iron phosphate cells fell again this year. Operators now bid "
                 "storage into frequency markets.",
    "rivers": "Salmon returned to the upper river after the old dam was removed. Volunteers "
              "counted spawning pits along twelve kilometres. The county plans two more "
              "removals upstream.",
    "compilers": "The new compiler release speeds up incremental builds. It caches type "
                 "information between runs and checks only changed modules. Large projects "
                 "report builds three times faster.",
    "bread": "Sourdough relies on wild yeast and lactic acid bacteria. A long cold proof "
             "deepens the flavour of the crumb. Bakers feed the starter daily with flour and "
             "water.",
    "satellites": "A constellation of small satellites maps methane leaks from orbit. Each "
                  "pass covers a strip two hundred kilometres wide. Regulators use the maps "
                  "to direct inspections.",
    "chess": "The endgame study shows a king and pawn winning against a lone king. Opposition "
             "decides the result in most lines. Engines confirm the analysis to the end.",
}


def write_documents(path: Path, copies: int = 4) -> None:
    with path.open("w", encoding="utf-8") as handle:
        n = 0
        for round_ in range(copies):
            for topic, text in TOPICS.items():
                n += 1
                title = f"{topic.capitalize()} report {round_ + 1}"
                handle.write(json.dumps({"doc_id": f"doc-{n:03d}", "title": title,
                                         "text": text}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=BATCHES, help="folder of the batch "
                        "folders to write into (default: the shipped batches')")
    out = parser.parse_args().out
    writers = {"invoices/data/invoices.csv": lambda p: write_invoices(random.Random(1), p),
               "bulk_email/data/users.db": lambda p: write_users(random.Random(2), p),
               "data_migration/data/legacy.db": lambda p: write_legacy(random.Random(3), p),
               "package_build/data/packages.jsonl": write_packages,
               "document_pipeline/data/documents.jsonl": write_documents}
    for relative, write in writers.items():
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        write(out / relative)
    print(f"wrote {', '.join(writers)} under {out}")


if __name__ == "__main__":
    main()
