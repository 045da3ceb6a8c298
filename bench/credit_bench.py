"""What prepaid credit adds to a ledger commit: one request at a time (the idle path, where a served request waits
on its own commit), for a ledger without the credit hook, with it for an unlimited key, and with it for a prepaid
key (a debit row and the running-sum update in the same transaction).

    python bench/credit_bench.py                  # SQLite file and a throwaway PostgreSQL, 2000 rows per case
    python bench/credit_bench.py --rows 5000 --sqlite-only

Prints the median and mean time per `Ledger.record` of each case.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_app.accounts.credit.book import CreditBook  # noqa: E402
from serve_app.accounts.credit.guard import CreditGuard  # noqa: E402
from serve_app.accounts.keys import KeyStore  # noqa: E402
from serve_app.accounts.ledger import Ledger, UsageRecord  # noqa: E402
from serve_app.accounts.store import (api_keys, connect, credit_journal, credit_totals, usage_debits,  # noqa: E402
                                      usage_records)
from serve_app.gateway.directory import ModelEntry  # noqa: E402

MODEL = ModelEntry(app_name="reranker", deployed_at=1.0,
                   facts={"name": "reranker", "task": "rerank", "price": {"per_1k_documents": "0.05"}}, handle=None)


def timed_records(ledger: Ledger, key_id: str, tag: str, count: int) -> list[float]:
    async def run():
        times = []
        for n in range(count):
            record = UsageRecord(request_id=f"{tag}-{n}", fingerprint="", key_id=key_id, model="reranker",
                                 route="/v1/rerank", input_tokens=500, documents=8, search_units=1)
            started = time.perf_counter()
            await ledger.record(record)
            times.append(time.perf_counter() - started)
        return times

    return asyncio.run(run())


def measure(url: str, count: int) -> dict[str, list[float]]:
    engine = connect(url)
    with engine.begin() as connection:
        for table in (usage_records, usage_debits, credit_journal, credit_totals, api_keys):
            connection.execute(table.delete())
    store = KeyStore(engine)
    unlimited, _ = store.create("bench-unlimited")
    prepaid, _ = store.create("bench-prepaid", credit="1000")
    guard = CreditGuard(CreditBook(engine))
    guard.load()
    guard.pricing.note(MODEL)
    plain, hooked = Ledger(engine), Ledger(engine, with_rows=guard.with_rows)
    timed_records(plain, unlimited.id, "warm", 200)
    timed_records(hooked, prepaid.id, "warm-prepaid", 200)
    results = {"no credit hook": timed_records(plain, unlimited.id, "plain", count),
               "hook, unlimited key": timed_records(hooked, unlimited.id, "unlimited", count),
               "hook, prepaid key": timed_records(hooked, prepaid.id, "prepaid", count)}
    engine.dispose()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--sqlite-only", action="store_true")
    args = parser.parse_args(argv)
    targets = [("SQLite", f"sqlite:///{tempfile.mkdtemp(prefix='credit-bench-')}/bench.db")]
    server = None
    if not args.sqlite_only:
        from tests.postgres import PostgresServer

        server = PostgresServer().start()
        targets.append(("PostgreSQL", server.url))
    try:
        for name, url in targets:
            for case, times in measure(url, args.rows).items():
                print(f"{name:<10} {case:<20} median {statistics.median(times) * 1000:.3f} ms  "
                      f"mean {statistics.fmean(times) * 1000:.3f} ms  ({len(times)} records)")
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
