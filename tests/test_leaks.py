"""Zero leaks: every secret form planted in targets that echo what they receive, then every
output healthd makes grepped for every form of every secret.

The targets are hostile on purpose. An HTTP server echoes each request (headers, Basic auth,
body, path) in its body and headers; a fake PostgreSQL server asks for the password in clear
text and puts it in its error; a fake Redis server does the same with ``AUTH``. The checks'
conditions quote the echoed body. healthd runs for real (text and JSON logs at debug level),
``/metrics`` is scraped, the status file is read in full and summary modes, and ``check
--json``, ``config show`` and a set of invalid configs that embed the secrets are run too.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import struct
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from healthd.secrets import derived_forms
from tests.daemon import daemon_settings, healthd_cli, running_healthd
from tests.http_target import HttpTarget, Reply

#: Each holds a character some encoding changes: backslash, quote, percent, plus, slash,
#: space, non-ASCII. HTTP header values must be printable ASCII, so those have no space or
#: non-ASCII.
BEARER = 'bEarer-T0k\\en"q%u+o/te'
WEB_PASSWORD = 'web/Pw"x%+y\\z-\u00e9'
LITERAL_HEADER = "lit-Hdr-S3cret+/%"
MLFLOW_USER = "ml-user-4711"
MLFLOW_PASSWORD = 'ml-Pa55\\w"rd%+/\u00fc'
SUPABASE_KEY = 'sb-K3y/with+plus%and\\bs"q'
PG_KEY_VALUE_PASSWORD = "pg kv S\u00e9cret+%/1"
PG_URL_PASSWORD = "pg/url:Secr%et+\u00e9\\"
REDIS_USER = "healthd-leak"
REDIS_PASSWORD = 'redis"Pw\\with%+/\u00fc'

SECRETS = [
    BEARER,
    WEB_PASSWORD,
    LITERAL_HEADER,
    MLFLOW_PASSWORD,
    SUPABASE_KEY,
    PG_KEY_VALUE_PASSWORD,
    PG_URL_PASSWORD,
    REDIS_PASSWORD,
]
PAIRS = [
    ("webuser", WEB_PASSWORD),
    (MLFLOW_USER, MLFLOW_PASSWORD),
    ("leak", PG_URL_PASSWORD),
    ("leak", PG_KEY_VALUE_PASSWORD),
    (REDIS_USER, REDIS_PASSWORD),
]


def _basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def _forbidden() -> dict[str, str]:
    """Every string that must appear in no output, mapped to the secret it gives away."""
    found: dict[str, str] = {}
    for secret in SECRETS:
        for form in derived_forms(secret):
            found[form] = secret
        for start in range(len(secret) - 7):
            found[secret[start : start + 8]] = secret
    for user, password in PAIRS:
        found[_basic(user, password)] = password
    return found


FORBIDDEN = _forbidden()


def _leaks(text: str) -> list[str]:
    return sorted({form for form in FORBIDDEN if form in text})


# --- hostile targets --------------------------------------------------------------------------


class _EchoServer:
    """A TCP server answering each connection with ``respond(socket)`` in its own thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            # A client that gives up mid-handshake is no concern of this server.
            with contextlib.suppress(OSError, struct.error, ValueError):
                self.respond(conn)

    def respond(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._listener.close()


def _exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ValueError("closed")
        data += chunk
    return data


def _confession(password: str) -> str:
    """What a hostile server says back: the password in every form it could think of."""
    escaped = json.dumps(password)
    return f"you sent {password} aka {escaped} aka {quote(password)} aka {password!r}"


class _PostgresEcho(_EchoServer):
    """Asks for the password in clear text, then fails with it in the error message."""

    def respond(self, conn: socket.socket) -> None:
        while True:
            (length,) = struct.unpack("!I", _exactly(conn, 4))
            (code,) = struct.unpack("!I", _exactly(conn, length - 4)[:4])
            if code not in (80877103, 80877104):  # SSLRequest, GSSENCRequest
                break
            conn.sendall(b"N")
        conn.sendall(b"R" + struct.pack("!II", 8, 3))  # AuthenticationCleartextPassword
        assert _exactly(conn, 1) == b"p"
        (length,) = struct.unpack("!I", _exactly(conn, 4))
        password = _exactly(conn, length - 4).rstrip(b"\0")
        self.received.append(password)
        message = _confession(password.decode()).encode()
        fields = b"SFATAL\0VFATAL\0C28P01\0M" + message + b"\0\0"
        conn.sendall(b"E" + struct.pack("!I", len(fields) + 4) + fields)


class _RedisEcho(_EchoServer):
    """Answers ``AUTH user password`` (or ``HELLO ... AUTH``) with an error quoting it."""

    def respond(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        header = reader.readline()
        words = []
        for _ in range(int(header[1:])):
            size = int(reader.readline()[1:])
            words.append(reader.read(size + 2)[:-2])
        self.received.append(b" ".join(words))
        said = " ".join(w.decode() for w in words[1:])
        conn.sendall(f"-WRONGPASS {_confession(said)}\r\n".encode())


@pytest.fixture(scope="module")
def targets() -> Iterator[tuple[HttpTarget, _PostgresEcho, _RedisEcho]]:
    http = HttpTarget()
    http.default = Reply(action="echo")
    postgres, redis = _PostgresEcho("postgres"), _RedisEcho("redis")
    yield http, postgres, redis
    http.close()
    postgres.close()
    redis.close()


def _components(http: HttpTarget, postgres: int, redis: int) -> str:
    web_url = f"http://webuser:{quote(WEB_PASSWORD, safe='')}@127.0.0.1:{http.port}/echo"
    pg_url = f"postgresql://leak:{quote(PG_URL_PASSWORD, safe='')}@127.0.0.1:{postgres}/app"
    return f"""
[components.bearer]
kind = "http"
method = "POST"
url = "{http.url("/echo")}"
body = "token=${{env:LEAK_BEARER}}"
headers.Authorization = "Bearer ${{env:LEAK_BEARER}}"
headers.X-Api-Key = {json.dumps(LITERAL_HEADER)}
# Every other component's reason is appended to this one's (it fails): the grep covers it.
evidence = ["cut", "basic", "tracking", "supa", "pg_kv", "pg_url", "cache", "unit", "machine"]
conditions = [
    {{json = "headers.authorization", equals = "nope"}},
    {{json = "headers.x-api-key", equals = "nope"}},
    {{json = "body", equals = "nope"}},
    {{json = "headers", equals = "nope"}},
]

[components.cut]
kind = "http"
method = "POST"
url = "{http.url("/echo")}"
body = "{"x" * 85} token=${{env:LEAK_BEARER}}"
# The quote of the echoed body (100 characters at most) would be cut short in the middle of
# the secret; it is redacted before the cut, so the cut falls inside "<redacted>" instead.
conditions = [{{json = "body", equals = "nope"}}]

[components.basic]
kind = "http"
url = "{web_url}"
conditions = [{{json = "headers.authorization", equals = "nope"}}]

[components.tracking]
kind = "mlflow"
url = "{http.url()}"
username = "${{file:{{secrets}}/mlflow_user}}"
password = "${{credential:mlflow_password}}"

[components.supa]
kind = "supabase"
url = "{http.url()}"
api_key = "${{env:LEAK_SUPABASE_KEY}}"

[components.pg_kv]
kind = "postgres"
dsn = "host=127.0.0.1 port={postgres} user=leak dbname=app password='{PG_KEY_VALUE_PASSWORD}'"

[components.pg_url]
kind = "postgres"
dsn = {json.dumps(pg_url)}

[components.cache]
kind = "redis"
url = "redis://127.0.0.1:{redis}/0"
username = "{REDIS_USER}"
password = "${{credential:redis_password}}"

[components.unit]
kind = "systemd"
unit = "healthd-leak.service"

[components.machine]
kind = "host"
unhealthy_disk_usage = 0.0001
degraded_disk_usage = 0.0001
"""


def _write_setup(tmp_path: Path, components: str, **daemon: str) -> tuple[Path, dict[str, str]]:
    secrets = tmp_path / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    (secrets / "mlflow_user").write_text(MLFLOW_USER + "\n")
    (secrets / "mlflow_password").write_text(MLFLOW_PASSWORD)
    (secrets / "redis_password").write_text(REDIS_PASSWORD + "\n")
    settings = daemon_settings(tmp_path, interval="1s", timeout="900ms", **daemon)
    lines = ["[daemon]", *(f"{k} = {json.dumps(v)}" for k, v in settings.items())]
    config = tmp_path / "healthd.toml"
    config.write_text("\n".join(lines) + "\n" + components.replace("{secrets}", str(secrets)))
    env = {
        "LEAK_BEARER": BEARER,
        "LEAK_SUPABASE_KEY": SUPABASE_KEY,
        "CREDENTIALS_DIRECTORY": str(secrets),
    }
    return config, env


def _run(tmp_path: Path, config: Path, env: dict[str, str], *args: str) -> dict[str, str]:
    """``healthd run`` until READY; the log, a scrape and the status file, by name."""
    with running_healthd(config, env=env, args=args, ready=True) as daemon:
        text = config.read_text()
        port = text.split('metrics_address = "127.0.0.1:', 1)[1].split('"', 1)[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            metrics = reply.read().decode()
        status = (tmp_path / "status.json").read_text()
        code = daemon.stop()
        log = daemon.log()
    assert code == 0, log
    return {"log": log, "metrics": metrics, "status file": status}


def test_no_secret_in_any_form_reaches_any_output(
    tmp_path: Path, targets: tuple[HttpTarget, _PostgresEcho, _RedisEcho]
) -> None:
    http, postgres, redis = targets
    components = _components(http, postgres.port, redis.port)
    outputs: dict[str, str] = {}

    config, env = _write_setup(tmp_path / "text", components)
    for name, text in _run(tmp_path / "text", config, env, "--log-level", "debug").items():
        outputs[f"run (text logs): {name}"] = text
    # The targets really saw every secret: the test plants what it greps for.
    seen = json.dumps([r.headers for r in http.requests]) + repr(postgres.received + redis.received)
    for sent in ("Bearer ", "Basic ", "apikey"):
        assert sent in seen
    assert PG_KEY_VALUE_PASSWORD.encode() in postgres.received
    assert PG_URL_PASSWORD.encode() in postgres.received
    assert any(REDIS_PASSWORD.encode() in r for r in redis.received)

    config, env = _write_setup(tmp_path / "json", components, status_details="summary")
    run = _run(tmp_path / "json", config, env, "--log-level", "debug", "--log-format", "json")
    for name, text in run.items():
        outputs[f"run (JSON logs, summary): {name}"] = text
    for args in (
        ["check", "--json"],
        ["check"],
        ["config", "show"],
        ["config", "validate"],
        ["maintenance", "list", "--json"],
    ):
        result = healthd_cli("--config", str(config), "--log-level", "debug", *args, env=env)
        outputs[" ".join(args)] = result.stdout + result.stderr

    # The full status file says why each failed: the echoes were read and quoted.
    status = json.loads(outputs["run (text logs): status file"])["components"]
    assert status["bearer"]["reason_code"] == status["basic"]["reason_code"] == "condition_failed"
    assert "(got '<redacted>')" in status["bearer"]["reason"]
    assert "(got 'Basic <redacted>')" in status["basic"]["reason"]
    assert status["cut"]["reason"].endswith(f"(got '{'x' * 85} token=<reda...')")
    for name in ("pg_kv", "pg_url", "cache"):
        assert "you sent " in status[name]["reason"], status[name]
        assert "<redacted>" in status[name]["reason"], status[name]

    leaks = {where: found for where, text in outputs.items() if (found := _leaks(text))}
    assert not leaks, json.dumps(leaks, indent=1, ensure_ascii=False)


#: Invalid configs that carry the secrets, as files or variables: (extra TOML, extra env).
INVALID = {
    "bad_duration_echoing_a_literal_secret": (
        f'[components.x]\nkind = "tcp"\naddress = "127.0.0.1:1"\n'
        f"interval = {json.dumps(PG_KEY_VALUE_PASSWORD)}\n",
        {},
    ),
    "bad_dsn_scheme_with_a_literal_password": (
        f'[components.x]\nkind = "postgres"\n'
        f'dsn = "mysql://u:{quote(PG_URL_PASSWORD, safe="")}@db/app"\n',
        {},
    ),
    "unparsable_dsn_url_with_a_literal_password": (
        f'[components.x]\nkind = "postgres"\n'
        f'dsn = "postgresql://u:{quote(PG_URL_PASSWORD, safe="")}@[::1/app"\n',
        {},
    ),
    "bad_status_range_with_a_secret": (
        f'[components.x]\nkind = "http"\nurl = "http://127.0.0.1:1/"\n'
        f"expected_status = {json.dumps(LITERAL_HEADER)}\n"
        f"headers = {{ X-Api-Key = {json.dumps(LITERAL_HEADER)} }}\n",
        {},
    ),
    "truncated_json_headers_variable": (
        "",
        {"HEALTHD_COMPONENTS__BEARER__HEADERS": json.dumps({"Authorization": BEARER})[:-3]},
    ),
    "password_variable_on_a_kind_without_one": (
        "",
        {"HEALTHD_COMPONENTS__BASIC__PASSWORD": REDIS_PASSWORD},
    ),
    "api_key_with_a_space": (
        f'[components.x]\nkind = "supabase"\nurl = "http://127.0.0.1:1"\n'
        f'api_key = "x {SUPABASE_KEY}"\n',
        {},
    ),
    "literal_secret_as_a_kind": (
        f"[components.x]\nkind = {json.dumps(MLFLOW_PASSWORD)}\n",
        {},
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_config_errors_show_no_secret(
    tmp_path: Path, targets: tuple[HttpTarget, _PostgresEcho, _RedisEcho], case: str
) -> None:
    http, postgres, redis = targets
    extra, extra_env = INVALID[case]
    components = _components(http, postgres.port, redis.port) + "\n" + extra
    config, env = _write_setup(tmp_path, components)
    results = [
        healthd_cli("--config", str(config), *command, env={**env, **extra_env})
        for command in (["config", "validate"], ["check", "--json"], ["run"])
    ]

    for result in results:
        assert result.returncode in (3, 78), result.stderr
        assert "Traceback" not in result.stderr
        assert not _leaks(result.stdout + result.stderr), result.stderr
