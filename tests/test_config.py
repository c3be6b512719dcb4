"""Loading real TOML files: defaults, durations, errors that name file/key/line, env overrides,
secret references and the redactor."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import ValidationError

from healthd.config import (
    CheckConfig,
    Config,
    ConfigError,
    HttpCheck,
    TcpCheck,
    load,
    parse_address,
    parse_duration,
    resolve_path,
)
from healthd.secrets import REDACTED, Redactor, Templated
from tests.daemon import write_toml as write

SECRET = "hunter2-s3cret"


pytestmark = pytest.mark.usefixtures("no_healthd_environment")


def problems(path: Path) -> list[str]:
    """The problems ``load`` reports for ``path`` (it must fail)."""
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# --- a good file ----------------------------------------------------------------------------


def test_valid_file_loads_typed_components_with_inherited_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [daemon]
        interval = "30s"
        timeout = "4s"

        [components.api]
        kind = "http"
        url = "http://api.internal:8000/api/v1/health"
        critical = true
        expected_status = ["2xx", 304]
        depends_on = ["db"]

        [[components.api.conditions]]
        json = "status"
        equals = "ok"
        severity = "degraded"

        [components.db]
        kind = "tcp"
        address = "db.internal:5432"
        interval = "2s"

        [components.cache]
        kind = "tcp"
        address = "cache.internal:6379"
        timeout = "500ms"
        """,
    )

    config = load(path)

    api, db, cache = (config.components[n] for n in ("api", "db", "cache"))
    assert isinstance(api, HttpCheck)
    assert isinstance(db, TcpCheck)
    assert (api.interval_seconds, api.timeout_seconds) == (30.0, 4.0)
    # An inherited timeout never exceeds the component's own interval.
    assert (db.interval_seconds, db.timeout_seconds) == (2.0, 2.0)
    assert (cache.interval_seconds, cache.timeout_seconds) == (30.0, 0.5)
    assert api.critical
    assert not db.critical
    assert api.expected_status == ((200, 299), (304, 304))
    assert api.depends_on == ("db",)
    assert api.conditions[0].json_path == "status"
    assert api.conditions[0].severity == "degraded"
    assert config.daemon.metrics_address == "127.0.0.1:9469"


@pytest.mark.parametrize("text", ["", "[daemon]\ninterval = '30s'\n", "[components]\n"])
def test_config_without_components_is_an_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)

    (problem,) = problems(path)
    assert problem.startswith(str(path))
    assert "components: no components: healthd would have nothing to check" in problem


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("15s", 15.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        (" 10 s ", 10.0),
        ("7", 7.0),
        (3, 3.0),
        (0.25, 0.25),
    ],
)
def test_duration_parses_units_and_plain_seconds(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", ["10 parsecs", "-5s", "0", 0, -1, "0ms", "", "1d", True, None, "s", "1e3s"]
)
def test_bad_duration_is_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("db:5432", ("db", 5432)),
        ("[::1]:6379", ("::1", 6379)),
        ("10.0.0.1:1", ("10.0.0.1", 1)),
    ],
)
def test_address_splits_host_and_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["db", "db:", ":5432", "db:0", "db:65536", "db:http"])
def test_bad_address_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="address"):
        parse_address(text)


# --- errors name file, key and line ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            """
            [daemon]
            interval = "10s"

            [components.api]
            kind = "http"
            url = "http://api/"
            colour = "red"
            """,
            "{path}:7: components.api.colour: unknown key",
            id="unknown-component-key",
        ),
        pytest.param(
            """
            [daemon]
            intervall = "10s"
            """,
            "{path}:2: daemon.intervall: unknown key",
            id="unknown-daemon-key",
        ),
        pytest.param(
            """
            [deamon]
            interval = "10s"
            """,
            "{path}:1: deamon: unknown key",
            id="unknown-table",
        ),
        pytest.param(
            """
            [components.api]
            url = "http://api/"
            kind = "htttp"
            """,
            "{path}:1: components.api: unknown kind 'htttp'; known kinds: ",
            id="unknown-kind",
        ),
        pytest.param(
            """
            [components.api]
            url = "http://api/"
            """,
            "{path}:1: components.api: missing 'kind'; known kinds: ",
            id="missing-kind",
        ),
        pytest.param(
            """
            [components.api]
            kind = "http"
            interval = "10 parsecs"
            url = "http://api/"
            """,
            "{path}:3: components.api.interval: bad duration '10 parsecs'",
            id="bad-duration",
        ),
        pytest.param(
            """
            [components.api]
            kind = "http"
            critical = true
            """,
            "{path}:1: components.api.url: required key is missing",
            id="missing-url",
        ),
        pytest.param(
            """
            [components.db]
            kind = "tcp"
            """,
            "{path}:1: components.db.address: required key is missing",
            id="missing-address",
        ),
        pytest.param(
            """
            [components.api]
            kind = "http"
            url = "http://api/"
            depends_on = ["db"]
            """,
            "{path}:4: components.api.depends_on: no component named 'db'",
            id="unknown-dependency",
        ),
        pytest.param(
            """
            [components.a]
            kind = "tcp"
            address = "a:1"
            depends_on = ["b"]

            [components.b]
            kind = "tcp"
            address = "b:1"
            depends_on = ["a"]
            """,
            "{path}:4: components.a.depends_on: ",
            id="dependency-cycle",
        ),
        pytest.param(
            """
            [daemon]
            interval = "-5s"
            """,
            "{path}:2: daemon.interval: bad duration '-5s'",
            id="negative-interval",
        ),
        pytest.param(
            """
            [components.db]
            kind = "tcp"
            address = "db:5432"
            interval = 0
            """,
            "{path}:4: components.db.interval: duration 0 must be greater than zero",
            id="zero-interval",
        ),
        pytest.param(
            """
            [components.db]
            kind = "tcp"
            address = "db:5432"
            timeout = "10s"
            interval = "5s"
            """,
            "{path}:4: components.db.timeout: ",
            id="timeout-longer-than-interval",
        ),
        pytest.param(
            """
            [daemon]
            interval = "5s"

            [components.db]
            kind = "tcp"
            address = "db:5432"
            timeout = "6s"
            """,
            "{path}:7: components.db.timeout: ",
            id="timeout-longer-than-inherited-interval",
        ),
        pytest.param(
            """
            [components.api]
            kind = "http"
            url = "http://api/"
            headers = { Authorization = "${file:/nonexistent/healthd/token}" }
            """,
            "{path}:4: components.api.headers.Authorization: cannot read secret file "
            "'/nonexistent/healthd/token': No such file or directory",
            id="unreadable-secret-file",
        ),
        pytest.param(
            """
            [components.api]
            kind = "http"
            url = "http://api/?key=${env:HEALTHD_TEST_UNSET_VARIABLE}"
            """,
            "{path}:3: components.api.url: environment variable HEALTHD_TEST_UNSET_VARIABLE "
            "is not set",
            id="unset-environment-variable",
        ),
        pytest.param(
            """
            [components.api]
            kind = "http"
            url = "http://api/"

            [[components.api.conditions]]
            json = "status"
            equals = "ok"

            [[components.api.conditions]]
            json = "lag"
            mini = 3
            """,
            "{path}:11: components.api.conditions.1.mini: unknown key",
            id="key-in-second-array-table",
        ),
        pytest.param(
            """
            [components.api]
            kind = "http"
            url = "http://api/"
            conditions = [{ json = "status", regex = "ok" }]
            """,
            "{path}:4: components.api.conditions.0: a condition needs exactly one of 'json' or "
            "'regex'",
            id="condition-with-two-tests",
        ),
        pytest.param(
            """
            [components.api]
            kind = "http"
            url = "http://api/"
            conditions = [{ regex = "([unclosed" }]
            """,
            "{path}:4: components.api.conditions.0: bad regex '([unclosed'",
            id="bad-regex",
        ),
        pytest.param(
            """
            [components.api]
            kind = "http"
            url = "http://api/"
            expected_status = ["2xx", "600"]
            """,
            "{path}:4: components.api.expected_status: bad status '600'",
            id="bad-expected-status",
        ),
        pytest.param(
            """
            [components.api]
            kind = "http"
            url = "ftp://api/"
            """,
            "{path}:3: components.api.url: url 'ftp://api/' must start with http:// or https://",
            id="not-http-url",
        ),
        pytest.param(
            """
            [components.api]
            kind = "http"
            url = "http://api:99999/health"
            """,
            "{path}:3: components.api.url: url 'http://api:99999/health' is not valid",
            id="port-out-of-range",
        ),
        pytest.param(
            """
            [components.api]
            kind = "http"
            url = "http:///health"
            """,
            "{path}:3: components.api.url: url 'http:///health' has no host",
            id="url-without-host",
        ),
        pytest.param(
            """
            [components.api]
            kind = "http"
            url = "https://api/"
            ca_file = "/nonexistent/ca.pem"
            """,
            "{path}:4: components.api.ca_file: CA file '/nonexistent/ca.pem' is not readable",
            id="unreadable-ca-file",
        ),
        pytest.param(
            """
            components.db = { kind = "tcp", address = "db" }
            """,
            "{path}:1: components.db.address: address 'db' must be host:port",
            id="inline-table",
        ),
        pytest.param(
            """
            [components."api.v1"]
            kind = "http"
            url = "http://api/"
            retries = 3
            """,
            "{path}:4: components.api.v1.retries: unknown key",
            id="quoted-dotted-component-name",
        ),
        pytest.param(
            """
            [components.api]
            kind = "http"
            url = "http://api/"
            flap_window = -1
            """,
            "{path}:4: components.api.flap_window: Input should be greater than or equal to 0",
            id="negative-flap-window",
        ),
        pytest.param(
            """
            [components.api]
            kind = "http"
            url = "http://api/"
            flap_threshold = 1.5
            """,
            "{path}:4: components.api.flap_threshold: Input should be less than or equal to 1",
            id="flap-threshold-above-one",
        ),
    ],
)
def test_bad_config_names_file_key_and_line(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)

    found = problems(path)

    assert len(found) == 1, found
    assert found[0].startswith(expected.format(path=path)), found[0]


def test_every_problem_is_reported_not_just_the_first(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [daemon]
        interval = "soon"

        [components.db]
        kind = "tcp"
        address = "db"
        colour = "red"
        """,
    )

    found = problems(path)

    assert [line.split(": ")[0:2] for line in found] == [
        [f"{path}:2", "daemon.interval"],
        [f"{path}:6", "components.db.address"],
        [f"{path}:7", "components.db.colour"],
    ]


def test_malformed_toml_names_file_and_position(tmp_path: Path) -> None:
    path = write(tmp_path, '[components.api\nkind = "http"\n')

    (problem,) = problems(path)

    assert problem.startswith(f"{path}:1: malformed TOML: ")
    assert "line 1, column 16" in problem


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path / "absent.toml")

    assert problem == f"{tmp_path / 'absent.toml'}: cannot read config: No such file or directory"


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[daemon]\nstatus_file = "/tmp/caf\xe9"\n')

    (problem,) = problems(path)

    assert problem.startswith(f"{path}: config is not UTF-8")


def test_bad_component_name_is_rejected(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [components."two words"]
        kind = "tcp"
        address = "db:1"
        """,
    )

    (problem,) = problems(path)

    assert "component name 'two words'" in problem


# --- environment overrides ------------------------------------------------------------------

BASE = """
[daemon]
interval = "30s"

[components.api]
kind = "http"
url = "http://api/"
timeout = "2s"

[components.db]
kind = "tcp"
address = "db:5432"
"""


def test_env_overrides_daemon_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEALTHD_DAEMON__INTERVAL", "10s")

    config = load(write(tmp_path, BASE))

    assert config.daemon.interval == 10.0
    # The file's other daemon keys and the components' inheritance are kept.
    assert config.components["db"].interval_seconds == 10.0
    assert config.components["api"].timeout_seconds == 2.0


def test_env_overrides_one_component_key_and_keeps_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEALTHD_COMPONENTS__API__TIMEOUT", "1s")
    monkeypatch.setenv("HEALTHD_COMPONENTS__DB__ADDRESS", "db2:6543")

    config = load(write(tmp_path, BASE))

    api, db = config.components["api"], config.components["db"]
    assert isinstance(api, HttpCheck)
    assert isinstance(db, TcpCheck)
    assert api.timeout_seconds == 1.0
    assert str(api.url) == "http://api/"
    assert db.address == "db2:6543"
    assert config.daemon.interval == 30.0


_UPPER_API = '[components.API]\nkind = "http"\nurl = "http://api/"\n'
_TIMEOUT = "HEALTHD_COMPONENTS__API__TIMEOUT"


@pytest.mark.parametrize(
    ("variable", "value", "toml", "expected"),
    [
        pytest.param(
            _TIMEOUT,
            "soon",
            BASE,
            f"{{path}}: ${_TIMEOUT}: components.api.timeout: bad duration 'soon'",
            id="bad-value-names-the-variable-not-a-file-line",
        ),
        pytest.param(
            _TIMEOUT,
            "45s",
            BASE,
            f"{{path}}: ${_TIMEOUT}: components.api.timeout: timeout 45s is longer than "
            "interval 30s",
            id="broken-cross-check-names-the-variable",
        ),
        pytest.param(
            _TIMEOUT,
            "1s",
            BASE.replace('address = "db:5432"', 'address = "db"'),
            "{path}:11: components.db.address: address 'db' must be host:port",
            id="file-error-keeps-its-line-while-another-key-is-overridden",
        ),
        # Variable names are case-insensitive: this makes a new component "api", not "API".
        pytest.param(
            _TIMEOUT,
            "1s",
            _UPPER_API,
            f"{{path}}: ${_TIMEOUT}: components.api: ",
            id="component-made-by-a-case-mismatch-is-blamed-on-it",
        ),
        pytest.param(
            "HEALTHD_COMPONENTS__NEW__KIND",
            "http",
            _UPPER_API,
            "{path}: $HEALTHD_COMPONENTS__NEW__KIND: components.new.url: ",
            id="component-made-by-an-env-only-table-is-blamed-on-it",
        ),
    ],
)
def test_an_error_under_env_overrides_names_where_it_came_from(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    toml: str,
    expected: str,
) -> None:
    monkeypatch.setenv(variable, value)
    path = write(tmp_path, toml)

    (problem,) = problems(path)

    assert problem.startswith(expected.format(path=path))


def test_healthd_config_variable_is_not_taken_for_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEALTHD_CONFIG", str(tmp_path / "healthd.toml"))

    config = load(write(tmp_path, BASE))

    assert set(config.components) == {"api", "db"}
    assert resolve_path(None) == tmp_path / "healthd.toml"
    assert resolve_path("/etc/other.toml") == Path("/etc/other.toml")


# --- secrets --------------------------------------------------------------------------------


def test_header_secret_from_env_is_resolved_but_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("API_TOKEN", SECRET)
    path = write(
        tmp_path,
        """
        [components.api]
        kind = "http"
        url = "http://api/"
        headers = { Authorization = "Bearer ${env:API_TOKEN}" }
        """,
    )

    config = load(path)

    api = config.components["api"]
    assert isinstance(api, HttpCheck)
    header = api.headers["Authorization"]
    assert header.reveal() == f"Bearer {SECRET}"
    assert str(header) == repr(header) == "Bearer ${env:API_TOKEN}"
    # The header is a credential: the token, and the whole value with its scheme.
    assert config.secrets() == {SECRET, f"Bearer {SECRET}"}
    shown = json.dumps(config.model_dump(mode="json"))
    assert SECRET not in shown
    assert "${env:API_TOKEN}" in shown
    assert SECRET not in repr(config)


def test_secret_file_is_read_without_its_trailing_newline(tmp_path: Path) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text(SECRET + "\n")

    value = Templated(f"${{file:{secret_file}}}")

    assert value.reveal() == SECRET
    assert value.secrets == (SECRET,)
    assert str(value) == f"${{file:{secret_file}}}"


def test_systemd_credential_is_read_from_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "db-password").write_text(SECRET)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    path = write(
        tmp_path,
        """
        [components.api]
        kind = "http"
        url = "https://healthd:${credential:db-password}@api.internal/health"
        """,
    )

    config = load(path)

    url = config.components["api"].url  # type: ignore[attr-defined]
    assert url.reveal() == f"https://healthd:{SECRET}@api.internal/health"
    assert SECRET not in str(url)
    # With the user name, the password makes a Basic-auth pair, which may show base64-encoded.
    basic = base64.b64encode(f"healthd:{SECRET}".encode()).decode()
    assert config.secrets() == {SECRET, basic}


def test_credential_without_credentials_directory_is_an_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [components.api]
        kind = "http"
        url = "http://api/"
        headers = { X-Key = "${credential:api-key}" }
        """,
    )

    (problem,) = problems(path)

    assert problem.startswith(f"{path}:4: components.api.headers.X-Key: credential 'api-key'")
    assert "CREDENTIALS_DIRECTORY" in problem


@pytest.mark.parametrize("name", ["../etc/passwd", "sub/key"])
def test_credential_name_cannot_leave_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))

    with pytest.raises(ValueError, match="must not contain '/'"):
        Templated(f"${{credential:{name}}}")


def test_unreadable_secret_file_is_an_error(tmp_path: Path) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text(SECRET)
    secret_file.chmod(0)
    if os.access(secret_file, os.R_OK):
        pytest.skip("running as a user who can read any file (root)")

    with pytest.raises(ValueError, match="cannot read secret file"):
        Templated(f"${{file:{secret_file}}}")


def test_secret_file_that_is_a_directory_is_an_error(tmp_path: Path) -> None:
    # Unlike a mode-000 file this fails for root too.
    with pytest.raises(ValueError, match="cannot read secret file"):
        Templated(f"${{file:{tmp_path}}}")


def test_literal_url_password_is_masked_and_collected() -> None:
    value = Templated(f"redis://default:{SECRET}@cache:6379/0")

    assert str(value) == f"redis://default:{REDACTED}@cache:6379/0"
    assert value.secrets == (SECRET,)
    assert value.reveal() == f"redis://default:{SECRET}@cache:6379/0"


def test_invalid_header_value_from_a_secret_is_rejected_without_showing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("API_TOKEN", f"{SECRET}\r\nX-Injected: 1")

    with pytest.raises(ValidationError) as caught:
        HttpCheck(url="http://api/", headers={"Authorization": "${env:API_TOKEN}"})

    assert "header 'Authorization'" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_url_error_shows_the_template_not_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_TOKEN", SECRET)

    with pytest.raises(ValidationError) as caught:
        HttpCheck(url="ftp://api/?key=${env:API_TOKEN}")

    assert "${env:API_TOKEN}" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_templated_values_compare_by_resolved_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("A", "same-value")
    monkeypatch.setenv("B", "same-value")

    assert Templated("${env:A}") == Templated("${env:B}")
    assert Templated("${env:A}") != Templated("other")
    assert len({Templated("${env:A}"), Templated("${env:B}")}) == 1


def test_config_from_init_kwargs_matches_config_from_file(tmp_path: Path) -> None:
    from_file = load(write(tmp_path, BASE))
    from_kwargs = Config(
        daemon={"interval": "30s"},
        components={
            "api": {"kind": "http", "url": "http://api/", "timeout": "2s"},
            "db": {"kind": "tcp", "address": "db:5432"},
        },
    )

    assert from_kwargs == from_file


# --- redactor -------------------------------------------------------------------------------


def test_redactor_scrubs_every_secret_longest_first() -> None:
    redactor = Redactor(["abcd", "abcdefgh", SECRET])

    text = f"token={SECRET} key=abcdefgh short=abcd"

    assert redactor.scrub(text) == f"token={REDACTED} key={REDACTED} short={REDACTED}"


def test_redactor_ignores_secrets_too_short_to_scrub_safely() -> None:
    assert Redactor(["ab", ""]).scrub("a cab drove by") == "a cab drove by"


def test_redactor_scrubs_keys_and_values_of_nested_trees() -> None:
    redactor = Redactor([SECRET])
    tree = {"reason": f"GET /x?k={SECRET}", SECRET: [1, {"nested": SECRET}, None], "n": 2}

    assert redactor.scrub_tree(tree) == {
        "reason": f"GET /x?k={REDACTED}",
        REDACTED: [1, {"nested": REDACTED}, None],
        "n": 2,
    }


def test_redactor_treats_regex_characters_literally() -> None:
    redactor = Redactor(["p@ss.w*rd(1)"])

    assert redactor.scrub("pw=p@ss.w*rd(1) other=p@ssXwwrd1") == f"pw={REDACTED} other=p@ssXwwrd1"


def test_redactor_without_secrets_changes_nothing() -> None:
    tree = {"a": ["b"]}

    assert Redactor().scrub("anything") == "anything"
    assert Redactor().scrub_tree(tree) is tree


def test_config_kinds_and_the_probe_table_are_the_same_set() -> None:
    from healthd.probes import PROBES

    union = get_args(get_args(CheckConfig)[0])
    kinds = {model.__pydantic_fields__["kind"].default for model in union}
    # A kind without a probe would pass validate and then crash run; a probe without a kind
    # could never be configured.
    assert kinds == set(PROBES)


def test_every_kind_validates_its_fields_in_the_order_declared() -> None:
    # Validators read earlier fields (an unhealthy threshold its degraded one); pydantic
    # validates a dataclass's ``Field(...)`` defaults first unless they are keyword-only.
    import dataclasses

    from pydantic import TypeAdapter

    def validated_order(schema: Any) -> list[str] | None:
        if isinstance(schema, dict):
            if schema.get("type") == "dataclass-args":
                return [field["name"] for field in schema["fields"]]
            children: Iterable[Any] = schema.values()
        elif isinstance(schema, list):
            children = schema
        else:
            return None
        for child in children:
            if (found := validated_order(child)) is not None:
                return found
        return None

    for model in get_args(get_args(CheckConfig)[0]):
        declared = [field.name for field in dataclasses.fields(model)]
        assert validated_order(TypeAdapter(model).core_schema) == declared, model.__name__


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("body = 5", "components.api.body: must be a string"),
        ('[[components.api.conditions]]\njson = "a"\nequals = []', "equals takes a string"),
    ],
    ids=["templated_not_a_string", "condition_equals_a_list"],
)
def test_a_value_of_the_wrong_type_is_one_problem_not_one_per_union_member(
    tmp_path: Path, extra: str, expected: str
) -> None:
    path = write(tmp_path, f'[components.api]\nkind = "http"\nurl = "http://x/"\n{extra}\n')

    (problem,) = problems(path)

    assert expected in problem


_HEARTBEAT = 'kind = "heartbeat"\nperiod = "1h"'
_TCP = 'kind = "tcp"\naddress = "127.0.0.1:80"'


@pytest.mark.parametrize(
    ("metrics", "push", "component", "clash"),
    [
        ("127.0.0.1:9469", "127.0.0.1:9469", _HEARTBEAT, True),
        ("0.0.0.0:9469", "127.0.0.1:9469", _HEARTBEAT, True),
        ("[::]:9469", "127.0.0.1:9469", _HEARTBEAT, True),
        ("localhost:9469", "127.0.0.1:9469", _HEARTBEAT, True),
        ("127.0.0.1:9469", "127.0.0.1:9470", _HEARTBEAT, False),
        ("127.0.0.1:9469", "[::1]:9469", _HEARTBEAT, False),
        # No heartbeat, no push listener: the address is never bound.
        ("127.0.0.1:9469", "127.0.0.1:9469", _TCP, False),
    ],
)
def test_heartbeats_need_a_port_of_their_own(
    tmp_path: Path, metrics: str, push: str, component: str, clash: bool
) -> None:
    path = tmp_path / "healthd.toml"
    path.write_text(
        f'[daemon]\nmetrics_address = "{metrics}"\npush_address = "{push}"\n\n'
        f"[components.job]\n{component}\n"
    )
    if clash:
        assert problems(path) == [
            f"{path}:3: daemon.push_address: {push} takes the port of metrics_address "
            f"{metrics}; heartbeats need a port of their own"
        ]
    else:
        assert load(path).daemon.push_address == push
