"""Secrets in every form: what ``collect_secrets`` finds, what ``Redactor`` scrubs, what
``config show`` and validation errors print, and how secret files are read."""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from healthd.cli import _Formatter
from healthd.config import Config, ConfigError, load
from healthd.secrets import (
    REDACTED,
    SECRET_FILE_MAX_BYTES,
    Redactor,
    SecretTemplated,
    Templated,
    UnreadableFile,
    collect_secrets,
    derived_forms,
    read_capped,
)
from tests.daemon import write_toml

#: Every character that some encoding changes: backslash, quote, percent, plus, slash, space,
#: an apostrophe and non-ASCII.
AWKWARD = "p\\a\"s%s+w/o rd'é-ü"


pytestmark = pytest.mark.usefixtures("no_healthd_environment")


def _loaded(tmp_path: Path, text: str) -> Config:
    return load(write_toml(tmp_path, text))


# --- derived forms --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "encoded",
    [
        AWKWARD,
        quote(AWKWARD, safe=""),
        quote(AWKWARD),
        quote_plus(AWKWARD),
        quote(AWKWARD, safe="").lower(),
        json.dumps(AWKWARD)[1:-1],
        json.dumps(AWKWARD, ensure_ascii=False)[1:-1],
        repr(AWKWARD)[1:-1],
        ascii(AWKWARD)[1:-1],
    ],
    ids=[
        "raw",
        "quote",
        "quote_keeping_slash",
        "quote_plus",
        "lower_case_hex",
        "json_ascii",
        "json_unicode",
        "repr",
        "ascii",
    ],
)
def test_redactor_scrubs_every_encoded_form_of_a_secret(encoded: str) -> None:
    redactor = Redactor([AWKWARD])

    assert redactor.scrub(f"before {encoded} after") == f"before {REDACTED} after"


def test_a_secret_quoted_inside_a_larger_repr_or_json_is_scrubbed() -> None:
    redactor = Redactor([AWKWARD])
    # The quoting of the whole decides how the secret's quotes are escaped.
    for text in (repr({"token": AWKWARD}), repr(f'x"{AWKWARD}'), json.dumps({"t": AWKWARD})):
        assert AWKWARD not in redactor.scrub(text)
        for form in derived_forms(AWKWARD):
            assert form not in redactor.scrub(text), (form, text)


def test_collect_secrets_adds_the_basic_auth_form_of_every_user_password_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEALTHD_TEST_MLFLOW_PW", "mlflow-pw-123")
    config = _loaded(
        tmp_path,
        """
        [components.tracking]
        kind = "mlflow"
        url = "http://127.0.0.1:1"
        username = "admin"
        password = "${env:HEALTHD_TEST_MLFLOW_PW}"

        [components.cache]
        kind = "redis"
        url = "redis://127.0.0.1:1"
        username = "healthd"
        password = "redis-pw-456"

        [components.web]
        kind = "http"
        url = "http://web%40user:p%40ss-789@127.0.0.1:1/"
        """,
    )

    found = config.secrets()

    def basic(user: str, password: str) -> str:
        return base64.b64encode(f"{user}:{password}".encode()).decode()

    assert {"mlflow-pw-123", "redis-pw-456", "p@ss-789", "p%40ss-789"} <= found
    assert {basic("admin", "mlflow-pw-123"), basic("healthd", "redis-pw-456")} <= found
    # URL userinfo is sent decoded, so its pair is encoded from the decoded parts.
    assert basic("web@user", "p@ss-789") in found


# --- key=value DSNs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "password", "shown"),
    [
        ("host=db password=pg-Secret-1 dbname=app", "pg-Secret-1", "password=<redacted>"),
        ("host=db password = 'pg Secret 2' user=x", "pg Secret 2", "password=<redacted>"),
        (r"host=db password='it\'s-a-secret'", "it's-a-secret", "password=<redacted>"),
        ("host=db PASSWORD=pg-Secret-4", "pg-Secret-4", "PASSWORD=<redacted>"),
        ("postgresql://u@db/app?password=pg-Secret-5", "pg-Secret-5", "password=<redacted>"),
    ],
    ids=["plain", "quoted_with_spaces", "escaped_quote", "upper_case_key", "url_query"],
)
def test_dsn_password_is_collected_and_masked(dsn: str, password: str, shown: str) -> None:
    value = Templated(dsn)

    assert password in value.secrets
    assert password not in str(value)
    assert shown in str(value)
    assert value.reveal() == dsn


def test_dsn_password_reference_is_shown_as_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HEALTHD_TEST_PG", "pg-from-env")
    value = Templated("host=db user=probe password=${env:HEALTHD_TEST_PG}")

    assert str(value) == "host=db user=probe password=${env:HEALTHD_TEST_PG}"
    assert value.secrets == ("pg-from-env",)
    assert value.credentials == (("probe", "pg-from-env"),)


def test_config_show_masks_a_key_value_dsn_password(tmp_path: Path) -> None:
    config = _loaded(
        tmp_path,
        """
        [components.db]
        kind = "postgres"
        dsn = "host=127.0.0.1 port=1 user=probe password='pg secret 77'"
        """,
    )

    shown = json.dumps(config.model_dump(mode="json"))

    assert "pg secret 77" not in shown
    assert "password=<redacted>" in shown
    assert "pg secret 77" in config.secrets()


# --- secret fields and headers --------------------------------------------------------------


def test_literal_api_key_and_credential_headers_are_secrets_and_masked(tmp_path: Path) -> None:
    config = _loaded(
        tmp_path,
        """
        [components.supa]
        kind = "supabase"
        url = "http://127.0.0.1:1"
        api_key = "sb-literal-key-0001"

        [components.web]
        kind = "http"
        url = "http://127.0.0.1:1/"
        headers = { Authorization = "Bearer literal-token-0002", Accept = "text/plain" }
        """,
    )

    shown = config.model_dump(mode="json")

    assert shown["components"]["supa"]["api_key"] == REDACTED
    assert shown["components"]["web"]["headers"] == {
        "Authorization": REDACTED,
        "Accept": "text/plain",
    }
    assert {"sb-literal-key-0001", "literal-token-0002"} <= config.secrets()
    assert "text/plain" not in config.secrets()


def test_a_basic_auth_header_yields_its_password_and_pair() -> None:
    token = base64.b64encode(b"robot:basic-pw-0003").decode()

    value = SecretTemplated(f"Basic {token}")

    assert {"basic-pw-0003", token, f"Basic {token}"} <= set(value.secrets)
    assert value.credentials == (("robot", "basic-pw-0003"),)


# --- validation errors ----------------------------------------------------------------------


def test_a_validation_error_that_echoes_a_value_never_shows_a_secret(tmp_path: Path) -> None:
    secret = "pg-Echoed-Secret-42"
    path = write_toml(
        tmp_path,
        f"""
        [components.db]
        kind = "postgres"
        dsn = "host=db password={secret}"
        interval = "{secret}"
        """,
    )

    with pytest.raises(ConfigError) as caught:
        load(path)

    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}:4: components.db.interval: bad duration")
    assert secret not in problem
    assert REDACTED in problem


def test_a_secret_in_a_variable_is_not_echoed_by_an_error_about_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_toml(tmp_path, '[components.db]\nkind = "tcp"\naddress = "127.0.0.1:1"\n')
    monkeypatch.setenv("HEALTHD_COMPONENTS__DB__PASSWORD", "env-Secret-0099")

    with pytest.raises(ConfigError) as caught:
        load(path)

    (problem,) = caught.value.problems
    assert "$HEALTHD_COMPONENTS__DB__PASSWORD: components.db.password: unknown key" in problem
    assert "env-Secret-0099" not in problem


# --- reading secret files -------------------------------------------------------------------


def test_secret_file_over_64_kib_is_refused_after_reading_one_byte_more(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * (10 * SECRET_FILE_MAX_BYTES))

    with pytest.raises(UnreadableFile, match="larger than 65536 bytes"):
        read_capped(big, SECRET_FILE_MAX_BYTES, "secret file")
    exact = tmp_path / "exact"
    exact.write_bytes(b"y" * SECRET_FILE_MAX_BYTES)
    assert len(read_capped(exact, SECRET_FILE_MAX_BYTES, "secret file")) == 65536


def test_secret_fifo_without_a_writer_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            Templated(f"${{file:{fifo}}}")
        except ValueError as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)

    assert not reader.is_alive(), "reading a FIFO without a writer hung"
    assert "not a regular file" in str(outcome[0])


def test_config_may_come_from_a_pipe(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b'[components.db]\nkind = "tcp"\naddress = "127.0.0.1:1"\n')
    os.close(write_fd)
    try:
        config = load(Path(f"/proc/self/fd/{read_fd}"))
    finally:
        os.close(read_fd)

    assert list(config.components) == ["db"]


# --- the log formatter ----------------------------------------------------------------------


def test_json_log_line_scrubs_before_escaping() -> None:
    formatter = _Formatter(Redactor(collect_secrets([Templated(AWKWARD)]) | {AWKWARD}), True)
    record = logging.LogRecord(
        "healthd", logging.WARNING, __file__, 1, "target said %s", (f'{{"k": "{AWKWARD}"}}',), None
    )
    record.reason_code = f"x{AWKWARD}"

    line = formatter.format(record)

    entry = json.loads(line)
    assert entry["message"] == f'target said {{"k": "{REDACTED}"}}'
    assert entry["reason_code"] == f"x{REDACTED}"
    for form in derived_forms(AWKWARD):
        assert form not in line


def test_text_log_line_scrubs_the_exception_too() -> None:
    formatter = _Formatter(Redactor(["exc-Secret-0123"]), False)
    try:
        raise RuntimeError("failed with exc-Secret-0123")
    except RuntimeError:
        import sys

        record = logging.LogRecord(
            "healthd", logging.ERROR, __file__, 1, "oops", (), sys.exc_info()
        )

    line = formatter.format(record)

    assert "exc-Secret-0123" not in line
    assert "RuntimeError: failed with <redacted>" in line


@pytest.mark.parametrize("ellipsis", ["...", "\u2026"])
def test_a_secret_cut_short_before_an_ellipsis_is_scrubbed(ellipsis: str) -> None:
    redactor = Redactor([AWKWARD])
    quoted = repr(f"token={AWKWARD}")

    for cut in range(len("'token=") + 6, len(quoted) - 1):
        line = f"got {quoted[:cut]}{ellipsis} and more"
        scrubbed = redactor.scrub(line)
        assert scrubbed == f"got 'token={REDACTED}{ellipsis} and more", (cut, scrubbed)


def test_text_that_only_looks_like_a_secret_start_is_left_alone() -> None:
    redactor = Redactor(["hunter2-secret"])

    # Five characters give nothing away; a different continuation is not the secret.
    assert redactor.scrub("hunte...") == "hunte..."
    assert redactor.scrub("hunter3...") == "hunter3..."
    assert redactor.scrub("hunter2-s...") == f"{REDACTED}..."


def test_a_secret_inside_a_longer_one_leaves_nothing_of_the_longer_behind() -> None:
    redactor = Redactor(["abcdefgh", "abcdefghijkl", "cdefgh12", "zzzz-secret"])

    assert redactor.scrub("xx abcdefghijkl yy abcdefgh zz abcdefgh12 zzzz-secret") == (
        f"xx {REDACTED} yy {REDACTED} zz {REDACTED}12 {REDACTED}"
    )


def test_many_secrets_scrub_a_line_quickly() -> None:
    secrets = [f"secret-{i:04d}-{'/+%'[i % 3]}{chr(0xE0 + i % 20)}" for i in range(1000)]
    redactor = Redactor(secrets)
    line = "GET /api/v1/health: condition failed: status == 'ok' (got 'degraded') " * 4

    started = time.perf_counter()
    for _ in range(200):
        assert redactor.scrub(line + secrets[500]).endswith(REDACTED)
    # A plain alternation of all 13,000 forms took 8 ms a line; the trie well under 1 ms.
    assert (time.perf_counter() - started) / 200 < 0.005
