"""A throwaway PostgreSQL server for tests, from the installed server binaries (initdb, pg_ctl).

PostgreSQL refuses to run as root; when the tests run as root (CI containers) the server runs as the `postgres`
system user through runuser. It listens on a Unix socket in its own temporary directory only (no TCP port).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path


def available() -> bool:
    return shutil.which("initdb") is not None and shutil.which("pg_ctl") is not None


class PostgresServer:
    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="qwen3-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *command: str) -> None:
        subprocess.run([*self.as_user, *command], check=True, capture_output=True, text=True)

    def start(self) -> "PostgresServer":
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-k {self.socket_dir} -c listen_addresses='' -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-w", "-l", str(self.root / "log"), "start")
        return self

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@/postgres?host={self.socket_dir}"
