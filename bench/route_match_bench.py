"""What finding a request's route costs the gateway, in the route table's order against the order before the Gateway's
own routes were moved first (route modules first, Gateway last), side by side in one process.

Starlette tries the table's entries in order (`Route.matches` on each, inside included routers too) until one
matches, on every request; this times exactly that loop for a few paths.

    python bench/route_match_bench.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from starlette.routing import Match  # noqa: E402

from serve_app.gateway.ingress import api  # noqa: E402

PATHS = [("POST", "/v1/embeddings"), ("POST", "/v1/rerank"), ("POST", "/v2/embed"), ("POST", "/tei/m/embed"),
         ("GET", "/health"), ("POST", "/v1/batches")]


def first_match(routes: list, scope: dict) -> int:
    for index, entry in enumerate(routes):
        if entry.matches(scope)[0] == Match.FULL:
            return index
    return -1


def microseconds(routes: list, scope: dict, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        first_match(routes, scope)
    return (time.perf_counter() - started) / repeats * 1e6


def main() -> None:
    table = list(api.router.routes)
    # The Gateway's own routes: the entry that serves its embeddings route.
    gateway = first_match(table, {"type": "http", "method": "POST", "path": "/v1/embeddings", "root_path": "",
                                  "headers": [], "query_string": b""})
    before = table[:gateway] + table[gateway + 1:] + [table[gateway]]
    print(f"{'route':<22} {'now us':>8} {'before us':>10} {'before/now':>10}")
    for method, path in PATHS:
        scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": [], "query_string": b""}
        now, then = microseconds(table, scope, 5000), microseconds(before, scope, 5000)
        print(f"{method + ' ' + path:<22} {now:>8.1f} {then:>10.1f} {then / now:>9.2f}x")


if __name__ == "__main__":
    main()
