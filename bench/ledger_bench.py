"""Usage-ledger write throughput: group commit (what the gateway does) vs one commit per request, side by side.

    python bench/ledger_bench.py                      # SQLite file and a throwaway PostgreSQL, 4000 rows each
    python bench/ledger_bench.py --rows 20000 --concurrency 512

Each mode writes the same rows from `concurrency` concurrent requests on one event loop (one gateway replica);
the group-commit mode is serve_app.accounts.ledger.Ledger itself. Prints rows/s of both and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_app.accounts.ledger import Ledger, UsageRecord, _insert_ignoring_duplicates  # noqa: E402
from serve_app.accounts.store import connect, usage_records  # noqa: E402


def rows(count: int, tag: str) -> list[UsageRecord]:
    return [UsageRecord(request_id=f"{tag}-{n}", fingerprint="f", key_id="bench", model="m", route="/v1/rerank",
                        input_tokens=500, documents=8, search_units=1) for n in range(count)]


async def concurrently(records, write, concurrency: int) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def one(record):
        async with gate:
            await write(record)

    started = time.perf_counter()
    await asyncio.gather(*(one(record) for record in records))
    return time.perf_counter() - started


def measure(url: str, count: int, concurrency: int) -> dict[str, float]:
    engine = connect(url)
    with engine.begin() as connection:
        connection.execute(usage_records.delete())
    statement = _insert_ignoring_duplicates(engine)

    def commit_one(record):
        with engine.begin() as connection:
            connection.execute(statement, [asdict(record)])

    async def per_row(record):
        await asyncio.to_thread(commit_one, record)

    ledger = Ledger(engine)
    grouped_s = asyncio.run(concurrently(rows(count, "group"), ledger.record, concurrency))
    single_s = asyncio.run(concurrently(rows(count, "single"), per_row, concurrency))
    engine.dispose()
    return {"group_rows_per_s": count / grouped_s, "single_rows_per_s": count / single_s,
            "commits": ledger.commits}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()
    targets = [("sqlite", f"sqlite:///{tempfile.mkdtemp()}/ledger.db")]
    server = None
    if not args.skip_postgres:
        from tests.postgres import PostgresServer, available

        if available():
            server = PostgresServer().start()
            targets.append(("postgresql", server.url))
    try:
        print(f"{args.rows} rows, {args.concurrency} concurrent requests, one event loop")
        for name, url in targets:
            result = measure(url, args.rows, args.concurrency)
            print(f"{name:<11} group commit {result['group_rows_per_s']:9.0f} rows/s ({result['commits']} commits)"
                  f"   one commit per row {result['single_rows_per_s']:8.0f} rows/s"
                  f"   ratio {result['group_rows_per_s'] / result['single_rows_per_s']:.1f}x")
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
