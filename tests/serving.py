"""A real Ray Serve instance on 127.0.0.1 running configs/tiny.yaml, for the HTTP tests.

Apps are deployed the way `serve run configs/x.yaml` and `serve deploy` do it: the file is checked by our own
schema, parsed by Serve's `ServeDeploySchema` and applied declaratively by the controller (applications left out
of a new config are removed). Ray is started and shut down by the fixture that owns this object.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve_app.cluster import haproxy
from serve_app.config import ServeConfigFile

REPO = Path(__file__).resolve().parent.parent
RERANKER = "qwen3-reranker-tiny"
EMBEDDER = "qwen3-embedding-tiny"
# A reranker that takes one request at a time and queues one more: overload tests fill it on purpose.
NARROW_RERANKER = "qwen3-reranker-narrow"
TEST_MAX_BODY_BYTES = 1 << 20
TEST_MAX_BATCH_FILE_BYTES = 2 << 20
TEST_MAX_BATCH_LINES = 2000
TEST_MAX_BATCH_EMBEDDING_INPUTS = 2500
# Written as YAML numbers are read (floats): the models' prices must still be these decimals exactly. Batch API
# lines cost half (the embedder) or the full price (the reranker).
TEST_PRICES = {RERANKER: {"per_1k_documents": 0.05}, EMBEDDER: {"per_1m_tokens": 0.02, "batch_factor": 0.5}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def calibration_path(embedder_path: Path) -> Path:
    """Where the tiny embedder's calibration file lives (made from the shipped corpus on first use)."""
    return embedder_path.with_name(f"{embedder_path.name}.calibration.npz")


def application(config: dict, name: str) -> dict:
    return next(app for app in config["applications"] if app["name"] == name)


def batch_test_settings(files_dir: Path) -> dict[str, Any]:
    """The gateway's `batches` in the tests: files in the session's temporary directory, small limits, frequent
    checkpoints, and a runner that polls often and whose leases run out in seconds (the kill test waits for one)."""
    return {"storage": {"kind": "local", "path": str(files_dir)},
            "max_file_bytes": TEST_MAX_BATCH_FILE_BYTES, "max_file_lines": TEST_MAX_BATCH_LINES,
            "max_embedding_inputs": TEST_MAX_BATCH_EMBEDDING_INPUTS, "max_in_flight_per_model": 2,
            "checkpoint_lines": 8, "checkpoint_s": 1.0, "lease_s": 3.0, "poll_s": 0.5, "line_retry_s": 30,
            "runner": {"num_cpus": 0.1, "num_replicas": 1, "health_check_period_s": 1, "health_check_timeout_s": 10}}


def tiny_test_config(port: int, reranker_path: Path, embedder_path: Path, database_url: str,
                     batch_files_dir: Path | None = None) -> dict[str, Any]:
    """configs/tiny.yaml with the test's port and checkpoints, auth on (keys in `database_url`), a smaller body
    limit, prices (what prepaid keys are debited), a logical-GPU embedder and a narrow reranker (which splits long
    documents into 2 windows by default); batch files in `batch_files_dir`."""
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    gateway = application(config, "gateway")["args"]
    gateway.update(max_body_bytes=TEST_MAX_BODY_BYTES, database_url=database_url,
                   auth={"enabled": True, "key_refresh_s": 0.5})
    if batch_files_dir is not None:
        gateway["batches"] = batch_test_settings(batch_files_dir)
    # Two gateway replicas: keys, revocation and rate limits must hold across replicas.
    gateway["deployment"]["num_replicas"] = 2
    application(config, RERANKER)["args"].update(source=str(reranker_path), price=TEST_PRICES[RERANKER])
    embedder = application(config, EMBEDDER)["args"]
    embedder.update(source=str(embedder_path), price=TEST_PRICES[EMBEDDER],
                    calibration=str(calibration_path(embedder_path)))
    # Ray hands out a logical GPU here; the replica must still start, on CPU, with a warning.
    embedder["device"] = "auto"
    embedder["deployment"]["num_gpus"] = 0.5
    narrow = copy.deepcopy(application(config, RERANKER))
    narrow["name"] = narrow["args"]["name"] = NARROW_RERANKER
    narrow["args"]["aliases"] = []
    narrow["args"]["deployment"].update(max_ongoing_requests=1, max_queued_requests=1)
    narrow["args"]["max_chunks_per_doc"] = 2
    config["applications"].append(narrow)
    return config


HAPROXY_FILES = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
                 "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
                 "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock"}


def discard_ingress(ingress: dict[str, str]) -> list[int]:
    """After its Ray has stopped: end the haproxy processes Ray left running (by their pid files) and remove the
    instance's run directory. Returns the pids it had to end (tests assert there were none where that is their
    point)."""
    run_dir = ingress.get(haproxy.RUN_DIR)
    if not run_dir:
        return []
    leftovers = haproxy.stop_leftovers(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    return leftovers


def use_ingress(haproxy_on: bool = True) -> dict[str, str]:
    """Set, in this process's environment, what the next Ray started from it needs for its ingress: Ray Serve's
    HAProxy (the default, as `make serve` and the cluster files run it) or Serve's Python proxy. Each instance gets
    its own haproxy pid directory and its own stats, exporter and fallback-proxy ports, so Serve instances on one
    machine (the multi-node cluster, parallel runs) never share them. Returns what it set."""
    # Short: haproxy's socket paths go under it, as <run dir>/<56-character node id>/admin.sock, and haproxy takes
    # at most 97 characters.
    run_dir = tempfile.mkdtemp(prefix="q3h-", dir="/tmp")
    environment = {
        haproxy.SWITCH: "1" if haproxy_on else "0",
        haproxy.RUN_DIR: run_dir,
        # Ray keeps each node's haproxy config, sockets and state in <base>/<node id>/ (default /tmp/haproxy-serve,
        # never removed); under the run dir they go with it (discard_ingress).
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": run_dir,
        **{variable: f"{run_dir}/{name}" for variable, name in HAPROXY_FILES.items()},
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
        # A stopping ingress replica waits this long for load balancers to stop sending to it (Ray: 30 s). Here
        # the controller tells haproxy within a second and haproxy retries refused connections, while the suite
        # restarts gateway and model replicas dozens of times: 30 s each was most of the suite's time under HAProxy.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }
    environment.update(haproxy.ray_environment(environment))
    os.environ.update(environment)
    return environment


class ServeInstance:
    def __init__(self, port: int, metrics_port: int | None = None, ingress: dict[str, str] | None = None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None
        self.headers: dict[str, str] = {}  # Authorization for the readiness checks when auth is on
        self.ingress = ingress or {}  # what use_ingress set for this instance's Ray
        self.leftovers: list[int] = []  # haproxy pids still running after stop() (and then ended by it)

    @property
    def on_haproxy(self) -> bool:
        return self.ingress.get(haproxy.SWITCH) == "1"

    @classmethod
    def start_on(cls, port: int, num_cpus: int = 8, num_gpus: int = 1, haproxy_on: bool = True) -> "ServeInstance":
        import ray
        from ray import serve

        ingress = use_ingress(haproxy_on)
        # Logical resources: the machine has 2 cores and no GPU; Ray schedules by these numbers only.
        metrics_port = free_port()
        # Metrics reach the node's export port every second instead of every 10 (the metrics tests wait on it).
        # address="local": always a new cluster of its own, never one another process on this machine started.
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"RAY_SERVE_LOG_TO_STDERR": "0"}}, _metrics_export_port=metrics_port,
                 _system_config={"metrics_report_interval_ms": 1000})
        instance = cls(port, metrics_port, ingress)
        serve.start(http_options={"host": "127.0.0.1", "port": instance.port})
        return instance

    @classmethod
    def start_on_cluster(cls, port: int, address: str, ingress: dict[str, str] | None = None,
                         host: str = "127.0.0.1") -> "ServeInstance":
        """Serve on a running (multi-node) Ray cluster, as a driver connected to `address`. `ingress`: what
        use_ingress set before the cluster's nodes started."""
        import ray
        from ray import serve

        ray.init(address=address, log_to_driver=False)
        instance = cls(port, ingress=ingress)
        instance.url = f"http://{host}:{port}"
        serve.start(http_options={"host": host, "port": port})
        return instance

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        self.end_leftovers()

    def end_leftovers(self) -> None:
        """End the haproxy processes Ray left running (tests assert there were none where that is their point)."""
        self.leftovers = discard_ingress(self.ingress)

    def deploy(self, config: dict[str, Any], timeout_s: float = 180, wait: bool = True,
               unchecked_applications: list[dict] = ()) -> None:
        """Apply a whole config as `serve deploy` does, then (with `wait`) wait until the gateway serves exactly
        its models. `unchecked_applications` (not ours, e.g. the benchmarks' floor app) are deployed beside it,
        past our schema."""
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        checked = ServeConfigFile.model_validate(config)
        config = {**config, "applications": [*config["applications"], *unchecked_applications]}
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
        if not wait:
            return
        expected = {model.name for model in checked.model_configs()}
        deadline = time.monotonic() + timeout_s
        served: set[str] = set()
        agreeing = 0  # consecutive listings that match: each may come from a different gateway replica
        while time.monotonic() < deadline:
            try:
                response = httpx.get(f"{self.url}/v1/models", headers=self.headers, timeout=10)
                served = {card["id"] for card in response.json()["data"]} if response.status_code == 200 else set()
            except httpx.HTTPError:
                served = set()
            agreeing = agreeing + 1 if served == expected and self._all_running(config) else 0
            if agreeing == 4:
                return
            time.sleep(0.2)  # agreement is counted in listings (which replica answers), not in seconds
        raise TimeoutError(f"deploy did not converge: gateway serves {served}, expected {expected}; "
                           f"{self.details_text()}")

    @contextlib.contextmanager
    def gateway_changed(self, config: dict[str, Any], **changes):
        """The gateway redeployed with some args changed (its replicas restart), and put back afterwards."""
        changed = copy.deepcopy(config)
        application(changed, "gateway")["args"].update(changes)
        self.deploy(changed)
        try:
            yield
        finally:
            self.deploy(config)

    @contextlib.contextmanager
    def gateway_on_postgres(self, config: dict[str, Any], key_database: str, postgres_url: str):
        """The gateway redeployed onto a PostgreSQL database, with the API keys of `key_database` copied over (so
        the session's keys keep working), and put back afterwards."""
        from sqlalchemy import insert, select

        from serve_app.accounts.store import api_keys, connect

        with connect(key_database).connect() as source:
            keys = [dict(row._mapping) for row in source.execute(select(api_keys))]
        with connect(postgres_url).begin() as target:
            target.execute(api_keys.delete())
            target.execute(insert(api_keys), keys)
        with self.gateway_changed(config, database_url=postgres_url):
            yield

    def gateway_database(self, request, config: dict[str, Any], key_database: str):
        """Body of the tests' parametrized database fixtures (`request.param` "sqlite" or "postgresql"): yields the
        gateway's database URL, the session's SQLite file as it is or PostgreSQL via gateway_on_postgres."""
        if request.param == "sqlite":
            yield key_database
            return
        postgres_url = request.getfixturevalue("postgres_url")
        with self.gateway_on_postgres(config, key_database, postgres_url):
            yield postgres_url

    def _all_running(self, config: dict) -> bool:
        from ray.serve.context import _get_global_client

        # The controller's plain details dict: serve.status() validates it into pydantic models, which costs this
        # process tens of milliseconds of CPU per call on the machine the replicas start on.
        status = _get_global_client().get_serve_details().get("applications", {})
        return all(status.get(app["name"], {}).get("status") == "RUNNING" for app in config["applications"])

    def replicas(self) -> dict[str, set[str]]:
        """{application: replica ids of its deployments}: a restart changes the ids."""
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
        return {name: {replica["replica_id"] for deployment in app["deployments"].values()
                       for replica in deployment["replicas"] if replica["state"] == "RUNNING"}
                for name, app in details["applications"].items()}

    def details_text(self) -> str:
        from ray import serve

        return "; ".join(f"{name}: {app.status} {app.message[:300]}"
                         for name, app in serve.status().applications.items())

    def model_handle(self, name: str):
        from ray import serve

        return serve.get_app_handle(name)


def start_command(config: Path, cwd: Path, haproxy_on: bool, **extra_env: str) -> tuple[subprocess.Popen, dict]:
    """`qwen3-serve CONFIG` (make serve) in a process of its own, on the ingress asked for with its own ports and pid
    directory (use_ingress, kept out of this process's environment), its ledger in `cwd`. Returns the process and
    the environment it got."""
    saved = dict(os.environ)
    try:
        ingress = use_ingress(haproxy_on)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    environment = {**os.environ, **ingress, "QWEN3_SERVE_DB": f"sqlite:///{cwd / 'serve.db'}", "PYTHONPATH": str(REPO),
                   **extra_env}
    command = subprocess.Popen([sys.executable, "-m", "serve_app.cluster.local", str(config)], env=environment,
                               cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return command, environment


def wait_until_serving(command: subprocess.Popen, url: str, timeout_s: float = 180) -> None:
    """Wait until `qwen3-serve` (running as `command`) answers GET /ready with 200; fail with the end of its stderr
    if it exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert command.poll() is None, f"qwen3-serve exited: {command.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "qwen3-serve did not become ready"
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def stop_command(command: subprocess.Popen, environment: dict[str, str], timeout_s: float = 150) -> None:
    """Stop a `qwen3-serve` still running as an operator would (SIGTERM: serve run shuts Serve down), then harder;
    then end any haproxy it left and remove its run directory (discard_ingress; `environment`: start_command's)."""
    try:
        if command.poll() is None:
            command.send_signal(signal.SIGTERM)
            try:
                command.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                command.kill()
                command.wait()
    finally:
        discard_ingress(environment)
