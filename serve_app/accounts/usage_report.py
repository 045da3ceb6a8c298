"""Usage report from the ledger: `python -m serve_app.usage` (also installed as `qwen3-serve-usage`).

Totals of served requests per key, model and UTC day: requests, input tokens, rerank documents, Cohere search
units, embeddings. With --config, models that have a `price` there also get the amount owed (per 1,000 documents
for rerankers, per 1M input tokens for embedders; exact decimals; Batch API usage times the price's `batch_factor`).
`--by batch` splits online from batch usage. With --credit, the prepaid keys instead: the balance now, the credit
added and the amount used (debited) in the period. The database is chosen as for `serve_app.keys`.

    python -m serve_app.usage --config configs/prod.yaml --since 2026-11-01 --until 2026-11-30
    python -m serve_app.usage --by key --format csv > november.csv
    python -m serve_app.usage --key 3f2a9c1e --format json
    python -m serve_app.usage --credit --since 2026-11-01
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from datetime import date
from decimal import Decimal
from typing import Any

from serve_app.accounts.credit.amounts import decimal_text
from serve_app.accounts.credit.book import CreditBook
from serve_app.accounts.keys import KeyStore
from serve_app.accounts.ledger import usage_totals
from serve_app.accounts.store import open_database

GROUPS = ("key", "model", "day", "batch")
COUNTS = ("requests", "input_tokens", "documents", "search_units", "embeddings")
AMOUNTS = ("amount", "balance", "credit_added", "used")  # exact decimal text, right-aligned in tables


def report_rows(totals: list[dict[str, Any]], by: tuple[str, ...], key_names: dict[str, str],
                prices: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Ledger totals (per key, model and day) regrouped by `by`, with key names and, given prices, amounts.
    Amounts are priced per model before regrouping, so a per-key report still prices each model right."""
    grouped: dict[tuple, dict[str, Any]] = {}
    for row in totals:
        fields = {"key": row["key_id"] or "-", "model": row["model"], "day": row["day"], "batch": row["batch"]}
        group = tuple(fields[name] for name in by)
        if group not in grouped:
            labels: dict[str, Any] = {}
            for name in by:
                labels[name] = fields[name]
                if name == "key":
                    labels["key_name"] = key_names.get(row["key_id"], "-")
            grouped[group] = {**labels, **{name: 0 for name in COUNTS}}
        out = grouped[group]
        for name in COUNTS:
            out[name] += row[name]
        if prices is not None:
            price = prices.get(row["model"])
            out.setdefault("amount", Decimal(0))
            if price is not None:
                out["amount"] += price.cost(row)
    report = list(grouped.values())
    for out in report:
        if "amount" in out:
            out["amount"] = decimal_text(out["amount"])  # exact, in every format
    return report


def credit_rows(book: CreditBook, key: str | None, since: date | None, until: date | None,
                key_names: dict[str, str]) -> list[dict[str, Any]]:
    """Per prepaid key: its balance now, the credit added and the amount used in the period (as GET /v1/usage)."""
    return [{"key": row["key_id"], "key_name": key_names.get(row["key_id"], "-"),
             **{name: row[name] for name in ("balance", "credit_added", "used")}}
            for row in book.summaries(key, since, until)]


def as_table(rows: list[dict[str, Any]], empty: str = "no usage recorded in this period") -> str:
    if not rows:
        return empty
    columns = list(rows[0])
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    numeric = [isinstance(rows[0][c], int) or c in AMOUNTS for c in columns]

    def line(values):
        return "  ".join(v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric))

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(values) for values in cells)])


def as_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.usage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", help="database URL, e.g. postgresql+psycopg://user@host/db")
    parser.add_argument("--config", help="a configs/*.yaml file: its gateway's database_url and its models' prices")
    parser.add_argument("--since", type=date.fromisoformat, help="first UTC day, YYYY-MM-DD (default: all)")
    parser.add_argument("--until", type=date.fromisoformat, help="last UTC day, inclusive (default: all)")
    parser.add_argument("--key", help="only this key id")
    parser.add_argument("--by", default="key,model,day",
                        help="comma-separated grouping, any of key, model, day, batch (default: key,model,day)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--credit", action="store_true",
                        help="report prepaid credit instead: per key with a balance, the balance now and the credit "
                             "added and used in the period")
    args = parser.parse_args(argv)
    by = tuple(part.strip() for part in args.by.split(",") if part.strip())
    if not by or any(part not in GROUPS for part in by):
        parser.error(f"--by takes a comma-separated subset of {', '.join(GROUPS)}")

    engine = open_database(args.db, args.config)
    key_names = {key.id: key.name for key in KeyStore(engine).list()}
    if args.credit:
        rows = credit_rows(CreditBook(engine), args.key, args.since, args.until, key_names)
        print_rows(rows, args.format, "no key has a credit balance")
        return 0
    prices = None
    if args.config:
        from serve_app.config import load_config_file

        priced = {model.name: model.price for model in load_config_file(args.config).model_configs() if model.price}
        prices = priced or None
    totals = usage_totals(engine, key_id=args.key, since=args.since, until=args.until)
    print_rows(report_rows(totals, by, key_names, prices), args.format)
    return 0


def print_rows(rows: list[dict[str, Any]], form: str, empty: str = "no usage recorded in this period") -> None:
    if form == "json":
        print(json.dumps(rows, indent=2))
    elif form == "csv":
        sys.stdout.write(as_csv(rows))
    else:
        print(as_table(rows, empty))


if __name__ == "__main__":
    sys.exit(main())
