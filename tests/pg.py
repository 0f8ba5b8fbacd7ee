"""A real PostgreSQL server for the tests: one per pytest session, one database per test.

The server comes from Debian's ``postgresql`` package (``make test-tools``
installs it when running as root). ``initdb`` refuses to run as root, so as
root the server runs as the unprivileged ``postgres`` user the package
creates; otherwise as the user running the tests. It listens on 127.0.0.1
on a free port (and a unix socket in its own folder), with fsync off.

Two roles: ``warden`` (superuser, trusted over the unix socket only: the
fixtures create databases with it) and ``warden_app``, which Warden connects
as over TCP with a SCRAM password kept in a file (``state.password_file``),
so the tests exercise the password path a fleet uses. Each test's database
is created from ``template0`` and owned by ``warden_app``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from warden.config import StateConfig

APP_USER = "warden_app"
APP_PASSWORD = "app-pw-7d1c9e"  # a test secret; tests check it never reaches logs
SUPERUSER = "warden"
_counter = itertools.count(1)


def find_bin() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``, newest version first."""
    env = os.environ.get("WARDEN_TEST_PG_BIN")
    if env:
        return Path(env)
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
        reverse=True,
    )
    return versions[0].parent if versions else None


@dataclass(frozen=True, slots=True)
class PgServer:
    """A running test server."""

    base: Path
    bindir: Path
    port: int
    run_as: str | None
    password_file: Path

    def url(self, dbname: str) -> str:
        """A URL Warden connects with (as the app role, password from the file)."""
        return f"postgresql://{APP_USER}@127.0.0.1:{self.port}/{dbname}"

    def admin(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """A superuser connection over the unix socket (autocommit)."""
        return psycopg.connect(
            host=str(self.base), port=self.port, user=SUPERUSER, dbname=dbname, autocommit=True
        )

    def create_database(self) -> str:
        """A new, empty database owned by the app role."""
        name = f"t{os.getpid()}_{next(_counter)}"
        with self.admin() as conn:
            conn.execute(
                f'CREATE DATABASE "{name}" OWNER {APP_USER} TEMPLATE template0 STRATEGY FILE_COPY'
            )
        return name

    def drop_database(self, name: str) -> None:
        """Drop a test database, whoever is still connected."""
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def pg_ctl(self, *args: str) -> None:
        """Run ``pg_ctl`` on this server (as its user)."""
        _run(self.run_as, [str(self.bindir / "pg_ctl"), "-D", str(self.base / "data"), *args])

    def stop(self) -> None:
        """Stop the server now and remove its files."""
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            self.pg_ctl("-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)


def _run(user: str | None, argv: Sequence[str]) -> None:
    cmd = ["runuser", "-u", user, "--", *argv] if user else list(argv)
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start() -> PgServer | str:
    """Start a server; a string says why there is none (the tests then skip with it)."""
    bindir = find_bin()
    if bindir is None or not (bindir / "initdb").exists():
        return "PostgreSQL is not installed (make test-tools installs Debian's postgresql as root)"
    run_as: str | None = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing"
        run_as = "postgres"
    base = Path(tempfile.mkdtemp(prefix="warden-pg-"))
    try:
        base.chmod(0o755)
        if run_as is not None:
            os.chown(base, owner.pw_uid, owner.pw_gid)
        pwfile = base / "superuser.pw"
        pwfile.write_text("unused-superuser-pw\n")
        if run_as is not None:
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        _run(
            run_as,
            [
                str(bindir / "initdb"),
                "-D",
                str(base / "data"),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
        )
        last = ""
        for _ in range(3):
            port = _free_port()
            options = (
                f"-k {base} -c listen_addresses=127.0.0.1 -p {port} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
            )
            try:
                _run(
                    run_as,
                    [
                        str(bindir / "pg_ctl"),
                        "-D",
                        str(base / "data"),
                        "-o",
                        options,
                        "-l",
                        str(base / "server.log"),
                        "-w",
                        "-t",
                        "20",
                        "start",
                    ],
                )
                break
            except subprocess.CalledProcessError as exc:
                last = (exc.stderr or b"").decode(errors="replace")[-500:]
        else:
            raise RuntimeError(f"pg_ctl start failed: {last}")
        server = PgServer(base, bindir, port, run_as, base / "app.pw")
        server.password_file.write_text(APP_PASSWORD + "\n")
        with server.admin() as conn:
            conn.execute(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'")
        return server
    except (OSError, subprocess.SubprocessError, RuntimeError, psycopg.Error) as exc:
        detail = (
            exc.stderr.decode(errors="replace")[-300:]
            if isinstance(exc, subprocess.CalledProcessError) and exc.stderr
            else str(exc)
        )
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _run(
                run_as,
                [str(bindir / "pg_ctl"), "-D", str(base / "data"), "-m", "immediate", "stop"],
            )
        shutil.rmtree(base, ignore_errors=True)
        return f"could not start PostgreSQL: {detail}"


@contextlib.contextmanager
def database(server: PgServer) -> Iterator[str]:
    """A fresh database for one test, dropped afterwards."""
    name = server.create_database()
    try:
        yield name
    finally:
        server.drop_database(name)


def state_config(request: pytest.FixtureRequest, tmp_path: Path) -> StateConfig:
    """The state store a backend-parametrised fixture names: SQLite in ``tmp_path``, or a
    fresh database on the session's PostgreSQL (``request.param`` is the backend)."""
    if request.param == "sqlite":
        return StateConfig(url=f"sqlite:///{tmp_path}/state.db")
    server: PgServer = request.getfixturevalue("pg_server")
    url = request.getfixturevalue("pg_url")
    return StateConfig(url=url, password_file=str(server.password_file))
