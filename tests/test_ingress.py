"""The HTTP ingress: Ray Serve's HAProxy by default, Serve's Python proxy when switched off.

The suite's shared instance (`served`) runs on HAProxy, as `make serve` and the cluster files do, so every HTTP test
exercises the default path; `qwen3-serve` runs here end to end on both ingresses, and is stopped the ways an
operator stops it, after which nothing of it may still listen.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from serve_app.cluster import haproxy
from tests.reference import ModelCardReranker
from tests.serving import REPO, RERANKER, application, free_port, start_command, stop_command, wait_until_serving

# What Ray 2.60 renders for haproxy's stats page and exporter (ray/serve/_private/haproxy_templates.py), around
# the frontend that must stay as it is.
RAY_RENDERED = """global
    stats socket /tmp/x/admin.sock mode 666 level admin expose-fd listeners
frontend prometheus
    bind :9101
    mode http
    no log
frontend http_frontend
    bind 127.0.0.1:8000
    mode http
listen stats
  bind *:8404
  stats enable
  stats uri /stats
"""


def listening(pid: int) -> set[tuple[str, int]]:
    """The TCP (IPv4) addresses process `pid` listens on, read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and inode in inodes:  # 0A: LISTEN
            address, port = local.split(":")
            found.add((socket.inet_ntoa(bytes.fromhex(address)[::-1]), int(port, 16)))
    return found


def port_is_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_the_admin_sections_are_rebound_and_nothing_else():
    rebound = haproxy.bind_admin_sections(RAY_RENDERED, "127.0.0.1")
    assert "    bind 127.0.0.1:9101\n" in rebound and "  bind 127.0.0.1:8404\n" in rebound
    assert rebound.replace("127.0.0.1:9101", ":9101").replace("127.0.0.1:8404", "*:8404") == RAY_RENDERED
    dropped = haproxy.bind_admin_sections(RAY_RENDERED, "off")
    assert "prometheus" not in dropped and "listen stats" not in dropped
    assert "frontend http_frontend\n    bind 127.0.0.1:8000\n" in dropped and "stats socket" in dropped


def test_splicing_is_turned_off_once_in_the_global_section():
    prepared = haproxy.prepare_config(RAY_RENDERED + "defaults\n    option splice-request\n", "127.0.0.1")
    assert prepared.startswith("global\n    nosplice\n    stats socket")
    assert haproxy.prepare_config(prepared, "127.0.0.1") == prepared  # a reload prepares the same file again
    assert haproxy.without_splicing("defaults\n    mode http\n") == "global\n    nosplice\ndefaults\n    mode http\n"


def test_the_shared_instance_serves_through_haproxy_with_its_admin_ports_on_loopback(served, http):
    assert served.on_haproxy
    assert http.get("/health").status_code == 200
    running = haproxy.recorded_haproxies(served.ingress[haproxy.RUN_DIR])
    assert running, "no haproxy started by the launcher"
    addresses = set().union(*(listening(pid) for pid in running))
    admin_ports = {int(served.ingress["RAY_SERVE_HAPROXY_STATS_PORT"]),
                   int(served.ingress["RAY_SERVE_HAPROXY_METRICS_PORT"])}
    assert ("127.0.0.1", served.port) in addresses
    assert {port for _, port in addresses} >= admin_ports
    assert all(host == "127.0.0.1" for host, _ in addresses), addresses


def test_leftovers_are_ended_by_pid_file_and_nothing_else(tmp_path):
    """A real haproxy started through the launcher is recorded and ended; a pid file naming another program (a
    reused pid) is dropped without touching that program."""
    config = tmp_path / "haproxy.cfg"
    port = free_port()
    config.write_text(f"global\n    stats socket {tmp_path}/admin.sock mode 600 level admin\n"
                      "defaults\n    mode http\n    timeout connect 5s\n    timeout client 5s\n    timeout server 5s\n"
                      f"frontend http_frontend\n    bind 127.0.0.1:{port}\n"
                      "    http-request return status 200 content-type text/plain string ok\n"
                      f"listen stats\n  bind *:{free_port()}\n  stats enable\n")
    run_dir = tmp_path / "run"
    environment = {**os.environ, haproxy.RUN_DIR: str(run_dir), haproxy.ADMIN_HOST: "127.0.0.1"}
    launched = subprocess.Popen([sys.executable, "-c", "from serve_app.cluster.haproxy import launch; launch()",
                                 "-db", "-f", str(config)], env=environment, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.monotonic() + 30
        while not port_is_open(port):
            assert time.monotonic() < deadline and launched.poll() is None, "haproxy did not start"
            time.sleep(0.05)
        assert all(host == "127.0.0.1" for host, _ in listening(launched.pid))
        (run_dir / f"{bystander.pid}.pid").write_text(str(config))
        assert haproxy.stop_leftovers(run_dir) == [launched.pid]
        assert launched.wait(timeout=10) is not None and not port_is_open(port)
        assert bystander.poll() is None and list(run_dir.iterdir()) == []
    finally:
        for process in (launched, bystander):
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def reference(tiny_reranker_path):
    return ModelCardReranker(str(tiny_reranker_path))


@pytest.fixture(scope="module")
def serve_command_config(tmp_path_factory, tiny_reranker_path):
    """configs/tiny.yaml's gateway and reranker on the test checkpoint, auth off: what `qwen3-serve` serves here."""
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config["applications"] = [application(config, "gateway"), application(config, RERANKER)]
    application(config, RERANKER)["args"]["source"] = str(tiny_reranker_path)
    path = tmp_path_factory.mktemp("serve-command") / "serve.yaml"
    return config, path


# Both signals reach `serve run` as the Ctrl-C it handles, so each ingress is stopped one way (a run costs ~30 s).
@pytest.mark.parametrize("ingress, stop", [("haproxy", signal.SIGINT), ("python-proxy", signal.SIGTERM)],
                         ids=["haproxy-ctrl-c", "python-proxy-sigterm"])
def test_qwen3_serve_answers_and_leaves_nothing_listening(serve_command_config, reference, tmp_path, ingress, stop):
    """`qwen3-serve CONFIG` (make serve) on either ingress: the reranker answers as the model card does, with Serve's
    request id; after SIGTERM or Ctrl-C (serve run then calls serve.shutdown()) the command exits and neither the
    HTTP port nor any haproxy it started is left."""
    config, path = serve_command_config
    port = free_port()
    config["http_options"]["port"] = port
    path.write_text(yaml.safe_dump(config))
    command, environment = start_command(path, tmp_path, haproxy_on=ingress == "haproxy")
    run_dir = environment[haproxy.RUN_DIR]
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(command, url)
        documents = ["Pandas eat bamboo.", "Paris is in France."]
        response = httpx.post(f"{url}/v1/rerank", json={"model": RERANKER, "query": "what do pandas eat?",
                                                         "documents": documents}, timeout=60)
        assert response.status_code == 200, response.text
        scores = {result["index"]: result["relevance_score"] for result in response.json()["results"]}
        assert [scores[i] for i in range(2)] == pytest.approx(reference.scores("what do pandas eat?", documents),
                                                               abs=1e-5)
        assert response.headers.get("x-request-id")
        assert bool(haproxy.recorded_haproxies(run_dir)) == (ingress == "haproxy")
        command.send_signal(stop)
        # serve run gets local.SHUTDOWN_GRACE_S (60 s) to shut Serve down before its process group is killed.
        assert command.wait(timeout=150) == 0, command.stderr.read()[-3000:]
        assert not port_is_open(port)
        assert haproxy.recorded_haproxies(run_dir) == {}
    finally:
        stop_command(command, environment)  # after a failed assertion above
