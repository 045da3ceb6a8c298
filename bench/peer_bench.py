"""Our stack against Infinity 0.0.78, a single-process embedding server, on the same checkpoints with one client.

The servers run one after the other, each serving one embedding checkpoint at a time (ours redeploys its model
application, Infinity starts a process per checkpoint), and this process drives both with the same aiohttp client
code and the same request bodies (OpenAI `/v1/embeddings`, base64 vectors):

  tiny checkpoint, `--tiny-threads` torch threads (default 1, what configs/tiny.yaml gives its models)
    latency   sequential one-text requests: p50 and p90
    rate      `--concurrency` (32) closed-loop clients of one-text requests: requests/s, and the CPU seconds the
              server's processes spent per 1,000 requests meanwhile (from /proc, the client's own excluded: unlike
              the rate, that figure does not depend on the client sharing the cores). With `--floor` (default), the
              same for Ray Serve's own floor in our Ray instance (bench/floor_app.py: ingress -> handle -> constants,
              no model, no auth, no ledger, same ingress): what any two-hop Ray Serve design costs at the least
  shape-true 0.6B widths, 4 layers, `--wide-threads` torch threads (default: every core)
    texts     4 clients x 8 texts (20-80 words) per request: texts/s, and the server's CPU seconds per 1,000 texts

Before measuring, both servers embed the same few texts, and the cosines between their vectors are printed (and the
run stops if they differ): Infinity is given the checkpoint as a sentence-transformers directory (a copy of ours
with symlinked weights, last-token pooling and normalization, as Qwen3-Embedding publishes it), so both compute the
same vectors. Targets (issue 25): ours p50 at most Infinity's, requests/s at least Infinity's, texts/s at least 2.5x.

    python bench/peer_bench.py                                   # tiny + 0.6B widths, auth off, SQLite ledger
    python bench/peer_bench.py --auth                            # a real API key (Infinity: --api-key) and the ledger
    python bench/peer_bench.py --auth --database postgres        # the ledger in a throwaway PostgreSQL
    python bench/peer_bench.py --no-haproxy                      # ours on Serve's Python proxy
    python bench/peer_bench.py --phases latency rate --latency-samples 50 --rate-requests 300  # a quick look

Ours starts as the other benchmarks start it (serve_bench.start_serve): behind HAProxy, the project's default, unless
QWEN3_SERVE_HAPROXY=0 is in the environment; `--haproxy` / `--no-haproxy` set that switch (which sets
RAY_SERVE_ENABLE_HA_PROXY for our Ray instance) for this run. Infinity runs from its own virtualenv
(`--infinity-venv`, default .peers/infinity in the repository, git-ignored), never from the project's; install it
once with

    python3 -m venv .peers/infinity && .peers/infinity/bin/pip install torch==2.13.0 'infinity-emb[server,torch]==0.0.78'

Both get the same torch threads (ours: the model replica's num_cpus; Infinity: OMP_NUM_THREADS). The load generator
runs in this process, on the same cores as the servers; each server's line prints the load average around its
measurement, as the servers run at different times.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import process_cpu  # noqa: E402
from bench.engine_bench import make_texts  # noqa: E402
from bench.serve_bench import (ONE_DOCUMENT, local_serve, model_application, percentile, stack_config,  # noqa: E402
                               stop_on_sigterm)
from models.base import DEFAULT_MAX_LENGTH  # noqa: E402
from models.checkpoints import build_checkpoint, checkpoint_name  # noqa: E402
from serve_app.cluster import haproxy  # noqa: E402

WORKLOADS = {"tiny": ("latency", "rate"), "wide": ("texts",)}  # checkpoint -> the phases measured on it
PHASES = ("latency", "rate", "texts")
ROUTE = "/v1/embeddings"
# Texts of different lengths, sent in one request: padding inside a batch must not change a vector either. None
# starts or ends with white space: sentence-transformers strips it before tokenizing, we embed the text as sent.
CHECK_TEXTS = ["hello", "The garbage collector frees objects once no reference to them is left.",
               " ".join(["Embeddings map text to vectors;"] * 12)]
SAME_VECTORS_COSINE = 0.9999


@dataclass
class Server:
    """What the client needs of a running server."""
    name: str
    url: str
    headers: dict
    model: str  # its name in requests
    # The server's processes in a /proc snapshot, by what they do ("gateway", "ingress", "model" ...)
    processes: Callable[[dict], dict[str, list[process_cpu.Process]]]
    route: str = ROUTE
    computes: bool = True  # returns real vectors (the floor answers constants)


# ---- the two servers ------------------------------------------------------------------------------------

# Each yields serve(checkpoint, threads) -> Server: that checkpoint's model alone, with `threads` torch threads.

@contextlib.contextmanager
def our_servers(database_url: str, secret: str | None, database_marker: str | None,
                max_threads: int, floor: bool = False) -> Iterator[Callable[[Path, int], Server]]:
    """Our gateway in a Ray instance of this run's own (local_serve: the start the other benchmarks use; the ingress
    follows the environment, QWEN3_SERVE_HAPROXY), and the checkpoint's model application deployed beside it, in
    place of the one before (one Ray start per run). With `floor`, Ray Serve's floor app is deployed beside them and
    `serve.floor` is its Server."""
    from bench.floor_bench import floor_application
    from tests.serving import free_port

    port = free_port()

    def processes(table: dict, of_floor: bool = False) -> dict[str, list[process_cpu.Process]]:
        """Our processes (or the floor's) in the Ray instance and the database, by role: "gateway" (the gateway app
        also holds the batch runner), "model" or "floor" for replicas, "ingress", "ray"; the other's replicas, idle
        meanwhile, are left out."""
        database = process_cpu.marked(database_marker, table)
        roles: dict[str, list[process_cpu.Process]] = {"database": database} if database and not of_floor else {}
        for process in process_cpu.descendants(os.getpid(), table):  # the Ray instance
            if process in database:
                continue
            role = process_cpu.serve_role(process)
            if role.startswith("replica:"):
                if (role == "replica:floor") != of_floor:
                    continue
                role = "floor" if of_floor else "gateway" if role == "replica:gateway" else "model"
            roles.setdefault(role, []).append(process)
        return roles

    with local_serve(port, num_cpus=max(8, max_threads + 2)) as instance:
        instance.headers = {"Authorization": f"Bearer {secret}"} if secret else {}

        def serve(checkpoint: Path, threads: int) -> Server:
            instance.deploy(stack_config(port, [model_application(checkpoint.name, "embed", checkpoint, threads)],
                                         auth=secret is not None, database_url=database_url),
                            unchecked_applications=[floor_application()] if floor else [])
            ingresses = processes(process_cpu.snapshot()).get("ingress", [])
            ingress = "HAProxy" if any(p.name == "haproxy" for p in ingresses) else "Serve's Python proxy"
            return Server(f"ours ({ingress})", instance.url, instance.headers, checkpoint.name, processes)

        serve.floor = Server("Ray Serve's floor (no model)", instance.url, {}, "floor",
                             lambda table: processes(table, of_floor=True),
                             route="/floor" + ROUTE, computes=False)
        yield serve


def sentence_transformers_copy(checkpoint: Path, out: Path) -> Path:
    """`checkpoint` as the sentence-transformers directory Qwen3-Embedding publishes (Transformer -> last-token
    pooling -> Normalize), its files symlinked. config.json gets `rope_theta` too: the checkpoint is written by our
    transformers (5.x, `rope_parameters`) and Infinity's (4.x) reads only `rope_theta`, defaulting to 10000."""
    out.mkdir(parents=True)
    for item in checkpoint.iterdir():
        if item.name != "config.json":
            (out / item.name).symlink_to(item.resolve())
    config = json.loads((checkpoint / "config.json").read_text())
    config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 1000000.0))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": DEFAULT_MAX_LENGTH,
                                                               "do_lower_case": False}))
    (out / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {}, "default_prompt_name": None,
                                                                       "similarity_fn_name": "cosine"}))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": config["hidden_size"], "pooling_mode_lasttoken": True, "include_prompt": True,
        "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False}))
    (out / "2_Normalize").mkdir()
    return out


@contextlib.contextmanager
def infinity_server(checkpoint: Path, threads: int, venv: str, workdir: Path,
                    secret: str | None) -> Iterator[Server]:
    from tests.serving import free_port

    executable = Path(venv) / "bin" / "infinity_emb"
    if not executable.exists():
        raise SystemExit(f"{executable} not found: install Infinity into its own virtualenv (see this script's help)")
    version = subprocess.run([str(executable.with_name("python")), "-c", "import importlib.metadata as m; "
                              "print(m.version('infinity_emb'))"], capture_output=True, text=True).stdout.strip()
    port = free_port()
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    command = [str(executable), "v2", "--host", "127.0.0.1", "--port", str(port), "--url-prefix", "/v1",
               "--engine", "torch", "--device", "cpu", "--log-level", "warning",
               "--model-id", str(sentence_transformers_copy(checkpoint, workdir / f"st-{checkpoint.name}")),
               "--served-model-name", checkpoint.name]
    if secret:
        command += ["--api-key", secret]
    # Its own environment: none of our PYTHONPATH or Ray settings; offline; the same torch threads as ours.
    env = {name: value for name, value in os.environ.items() if not name.startswith(("PYTHON", "RAY_", "VIRTUAL_ENV"))}
    env.update(OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", INFINITY_ANONYMOUS_USAGE_STATS="0",
               DO_NOT_TRACK="1")
    log = workdir / f"infinity-{checkpoint.name}.log"
    with log.open("wb") as output:
        server = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/v1/models", checkpoint.name, server, log, headers)

        def processes(table: dict) -> dict[str, list[process_cpu.Process]]:
            return {"server": [p for p in table.values() if p.pid == server.pid]
                    + process_cpu.descendants(server.pid, table)}

        yield Server(f"Infinity {version}", f"http://127.0.0.1:{port}", headers, checkpoint.name, processes)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # its own process group: it and anything it started
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@contextlib.contextmanager
def infinity_servers(venv: str, workdir: Path, secret: str | None) -> Iterator[Callable[[Path, int], Server]]:
    """One Infinity process per checkpoint, stopped when the next starts (its thread count is per process)."""
    with contextlib.ExitStack() as running:
        def serve(checkpoint: Path, threads: int) -> Server:
            running.close()
            return running.enter_context(infinity_server(checkpoint, threads, venv, workdir, secret))

        yield serve


def wait_until_serving(url: str, name: str, server: subprocess.Popen, log: Path, headers: dict,
                       timeout_s: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"Infinity exited ({server.returncode}) while starting:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            response = httpx.get(url, headers=headers, timeout=5)
            if name in {model["id"] for model in response.json()["data"]}:
                return
        time.sleep(1)
    raise TimeoutError(f"Infinity did not serve {name} within {timeout_s} s:\n{log.read_text()[-3000:]}")


# ---- one client for both ----------------------------------------------------------------------------------

def payload(model: str, texts: list[str]) -> dict:
    return {"model": model, "input": texts, "encoding_format": "base64"}


async def post(session, server: Server, body: dict) -> bytes:
    async with session.post(server.route, json=body, headers=server.headers) as response:
        content = await response.read()
        if response.status != 200:
            raise RuntimeError(f"{server.name}: HTTP {response.status}: {content[:500]!r}")
        return content


async def vectors(session, server: Server, texts: list[str]) -> np.ndarray:
    data = json.loads(await post(session, server, payload(server.model, texts)))["data"]
    return np.stack([np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
                     for item in sorted(data, key=lambda item: item["index"])])


async def sequential(session, server: Server, body: dict, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        await post(session, server, body)
        times.append(time.perf_counter() - start)
    return times


async def closed_loop(session, server: Server, bodies: list[dict], clients: int, total: int) -> float:
    """Seconds `clients` closed-loop clients take to send `total` requests, the bodies in turn."""
    sent = 0

    async def client():
        nonlocal sent
        while sent < total:
            body, sent = bodies[sent % len(bodies)], sent + 1
            await post(session, server, body)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - start


async def measure(server: Server, phases: list[str], args) -> dict:
    results: dict = {}
    one_text = payload(server.model, ONE_DOCUMENT)
    async with aiohttp.ClientSession(server.url, connector=aiohttp.TCPConnector(limit=args.concurrency)) as session:
        if server.computes:
            results["vectors"] = await vectors(session, server, CHECK_TEXTS)
        if "latency" in phases:
            await sequential(session, server, one_text, 20)
            results["latency"] = await sequential(session, server, one_text, args.latency_samples)
        if "rate" in phases:
            await closed_loop(session, server, [one_text], args.concurrency, 2 * args.concurrency)
            seconds, results["rate_cpu"] = await with_cpu(server, args.rate_requests, closed_loop(
                session, server, [one_text], args.concurrency, args.rate_requests))
            results["rate"] = args.rate_requests / seconds
        if "texts" in phases:
            texts = make_texts(args.texts_requests * args.texts_per_request, 20, 80, seed=1)
            bodies = [payload(server.model, texts[i:i + args.texts_per_request])
                      for i in range(0, len(texts), args.texts_per_request)]
            await closed_loop(session, server, bodies, args.texts_clients, args.texts_clients)
            seconds, results["texts_cpu"] = await with_cpu(server, len(texts), closed_loop(
                session, server, bodies, args.texts_clients, args.texts_requests))
            results["texts"] = len(texts) / seconds
    return results


async def with_cpu(server: Server, items: int, load) -> tuple[float, dict[str, float]]:
    """What `load` returns (its seconds), and the CPU seconds the server's processes spent meanwhile per 1,000 of
    the `items` it sent, by role."""
    before = process_cpu.snapshot()
    seconds = await load
    after = process_cpu.snapshot()
    return seconds, {role: 1000 * process_cpu.cpu_seconds(before, after, [p.key for p in group]) / items
                     for role, group in server.processes(after).items()}


# ---- report ---------------------------------------------------------------------------------------------

def check_same_vectors(checkpoint: str, ours: np.ndarray, theirs: np.ndarray) -> None:
    """Cosine between our vector and Infinity's for each check text; stops the run when they are not the same."""
    cosines = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(ours, theirs)]
    print(f"same vectors, {checkpoint}: cosine ours / Infinity per text " + " ".join(f"{c:.7f}" for c in cosines),
          flush=True)
    if min(cosines) < SAME_VECTORS_COSINE:
        raise SystemExit(f"the servers compute different vectors (cosine {min(cosines):.5f}): the comparison is void")


def report(ours: dict, theirs: dict, args, floor: dict | None = None) -> None:
    print(f"\n{'metric':<44} {'ours':>10} {'Infinity':>10} {'ours/Inf.':>10}  target")
    rows = []
    if "latency" in ours:
        for name, q in (("p50", 0.5), ("p90", 0.9)):
            a, b = (percentile(r["latency"], q) * 1e3 for r in (ours, theirs))
            rows.append((f"{name} one text, sequential (ms)", a, b, ("<=", 1.0) if name == "p50" else None))
    if "rate" in ours:
        rows.append((f"requests/s, {args.concurrency} clients, one text", ours["rate"], theirs["rate"], (">=", 1.0)))
        rows.append(("server CPU s per 1,000 of those requests", sum(ours["rate_cpu"].values()),
                     sum(theirs["rate_cpu"].values()), None))
    if "texts" in ours:
        rows.append((f"texts/s, 0.6b {args.layers}l, {args.texts_clients} x {args.texts_per_request} texts",
                     ours["texts"], theirs["texts"], (">=", 2.5)))
        rows.append(("server CPU s per 1,000 of those texts", sum(ours["texts_cpu"].values()),
                     sum(theirs["texts_cpu"].values()), None))
    if floor:
        rows.append(("Ray Serve's floor (no model): requests/s", floor["rate"], theirs["rate"], None))
        rows.append(("Ray Serve's floor: CPU s per 1,000 requests", sum(floor["rate_cpu"].values()),
                     sum(theirs["rate_cpu"].values()), None))
    for label, a, b, target in rows:
        verdict = ""
        if target:
            sign, bound = target
            met = a / b <= bound if sign == "<=" else a / b >= bound
            verdict = f"{sign} {bound:.2f}x  {'met' if met else 'missed'}"
        print(f"{label:<44} {a:>10.2f} {b:>10.2f} {a / b:>9.2f}x  {verdict}")
    for phase, unit in (("rate", "requests"), ("texts", "texts")):
        if phase in ours:
            print(f"ours' CPU s per 1,000 {unit} by process: " + ", ".join(
                f"{role} {seconds:.2f}" for role, seconds in sorted(ours[f"{phase}_cpu"].items())))
    if floor:
        print("Ray Serve's floor's CPU s per 1,000 requests by process: " + ", ".join(
            f"{role} {seconds:.2f}" for role, seconds in sorted(floor["rate_cpu"].items())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--auth", action="store_true", help="auth on with a real key (Infinity: the same key)")
    parser.add_argument("--database", default="sqlite", choices=["sqlite", "postgres"], help="our keys and ledger")
    parser.add_argument("--haproxy", action=argparse.BooleanOptionalAction, default=None,
                        help="our ingress: QWEN3_SERVE_HAPROXY=1 / 0 for this run (default: the environment's; on)")
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure Ray Serve's floor app's request rate, in our Ray instance (rate phase)")
    parser.add_argument("--infinity-venv", default=str(REPO / ".peers" / "infinity"))
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate-requests", type=int, default=2000, help="requests of the timed saturation run")
    parser.add_argument("--layers", type=int, default=4, help="layers of the shape-true 0.6B checkpoint")
    parser.add_argument("--texts-clients", type=int, default=4)
    parser.add_argument("--texts-per-request", type=int, default=8)
    parser.add_argument("--texts-requests", type=int, default=32, help="requests of the timed texts/s run")
    parser.add_argument("--tiny-threads", type=int, default=1, help="torch threads of each server, tiny checkpoint")
    parser.add_argument("--wide-threads", type=int, default=os.cpu_count() or 2,
                        help="torch threads of each server, 0.6B widths (default: every core)")
    parser.add_argument("--checkpoints", default=str(REPO / "checkpoints"))
    args = parser.parse_args()
    if args.haproxy is not None:  # read when our Ray instance starts
        os.environ[haproxy.SWITCH] = "1" if args.haproxy else "0"
    stop_on_sigterm()

    folder = Path(args.checkpoints).resolve()
    workloads = {kind: [phase for phase in phases if phase in args.phases] for kind, phases in WORKLOADS.items()}
    shapes = {"tiny": ("tiny", None), "wide": ("0.6b", args.layers)}
    threads = {"tiny": args.tiny_threads, "wide": args.wide_threads}
    print(f"phases {' '.join(args.phases)}; auth {'on' if args.auth else 'off'}, {args.database} ledger; "
          f"ours behind {'HAProxy' if haproxy.enabled() else 'the Python proxy'}; torch threads "
          f"{args.tiny_threads} (tiny) / {args.wide_threads} (0.6b); {args.latency_samples} sequential, "
          f"{args.concurrency} clients x {args.rate_requests} requests, {args.texts_clients} clients x "
          f"{args.texts_requests} requests of {args.texts_per_request} texts", flush=True)

    from serve_app.accounts.keys import KeyStore
    from serve_app.accounts.store import connect
    from tests.postgres import PostgresServer

    checkpoints = {kind: build_checkpoint(folder / checkpoint_name("embed", *shapes[kind]), "embed", *shapes[kind])
                   for kind, phases in workloads.items() if phases}
    results: dict[str, dict] = {"ours": {}, "Infinity": {}}
    floor: dict | None = None
    vectors: dict[str, list[np.ndarray]] = {kind: [] for kind in checkpoints}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="peer-bench-")))
        database_url, database_marker = f"sqlite:///{workdir / 'bench.db'}", None
        if args.database == "postgres":
            postgres = PostgresServer().start()
            stack.callback(postgres.stop)
            database_url, database_marker = postgres.url, str(postgres.root)
        secret = KeyStore(connect(database_url)).create("peer-bench")[1] if args.auth else None

        for label, servers in (
                ("ours", lambda: our_servers(database_url, secret, database_marker, max(threads.values()),
                                             floor=args.floor and "rate" in args.phases)),
                ("Infinity", lambda: infinity_servers(args.infinity_venv, workdir, secret))):
            with servers() as serve:
                for kind, checkpoint in checkpoints.items():
                    server = serve(checkpoint, threads[kind])
                    # The servers run at different times on shared cores: the load average says how comparable
                    load = os.getloadavg()[0]
                    print(f"{server.name}, {checkpoint.name}: measuring {' '.join(workloads[kind])}", flush=True)
                    measured = asyncio.run(measure(server, workloads[kind], args))
                    print(f"  load average {load:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
                    vectors[kind].append(measured.pop("vectors"))
                    results[label].update(measured)
                    if label == "ours" and "rate" in workloads[kind] and getattr(serve, "floor", None) is not None:
                        print(f"{serve.floor.name}: measuring rate", flush=True)
                        floor = asyncio.run(measure(serve.floor, ["rate"], args))
    for kind, (ours, theirs) in vectors.items():
        check_same_vectors(checkpoints[kind].name, ours, theirs)
    report(results["ours"], results["Infinity"], args, floor)


if __name__ == "__main__":
    main()
