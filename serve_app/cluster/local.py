"""`qwen3-serve CONFIG [serve run options]`, what `make serve` runs: `serve run` on this machine behind the HAProxy
ingress (haproxy.py), with nothing of it left listening once it stops.

`serve run` shuts Serve down on Ctrl-C but dies on the spot on SIGTERM, so this command turns SIGTERM (and SIGHUP)
into the Ctrl-C `serve run` handles. It runs `serve run` in a session of its own, so a terminal's Ctrl-C reaches it
once, from here. Once it has ended, any haproxy it left running is ended by its pid file.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from serve_app.cluster.haproxy import DEFAULT_RUN_DIR, RUN_DIR, enabled, ray_environment, stop_leftovers

# How long `serve run` gets to shut Serve down after Ctrl-C before its process group is killed.
SHUTDOWN_GRACE_S = 60.0


def serve_cli() -> str:
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("serve", path=search)
    if found is None:
        raise FileNotFoundError("Ray Serve's `serve` command is not installed (pip install 'ray[serve]')")
    return found


def default_interrupt() -> None:
    """In the child before exec: Ctrl-C handled again. A shell starts background commands with SIGINT ignored, and
    a Python program that starts with it ignored never raises KeyboardInterrupt, so `serve run` would never stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    environment = {**os.environ, **ray_environment()}
    child = subprocess.Popen([serve_cli(), "run", *argv], env=environment, start_new_session=True,
                             preexec_fn=default_interrupt)
    stop_asked_at: list[float] = []

    def stop_child(signum, _frame):
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
        stop_asked_at.append(time.monotonic())

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop_child)
    try:
        while True:
            try:
                return child.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                if stop_asked_at and time.monotonic() - stop_asked_at[0] > SHUTDOWN_GRACE_S:
                    # serve run did not finish shutting Serve down in time: end it and the Ray it started.
                    os.killpg(child.pid, signal.SIGKILL)
                    return child.wait()
    finally:
        if enabled(environment):
            for pid in stop_leftovers(environment.get(RUN_DIR, DEFAULT_RUN_DIR)):
                print(f"qwen3-serve: ended haproxy pid {pid}, left running by serve run", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
