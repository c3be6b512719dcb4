"""The command line: ``run``, ``check``, ``config validate``, ``config show``, ``history``,
``web install``, ``ping``.

Exit codes follow sysexits for the daemon (78 for bad config, 75 for a busy metrics address,
which may be transient) and the monitoring-plugin convention for ``check`` (0 healthy,
1 degraded, 2 unhealthy, 3 healthd itself could not run).
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from healthd import __version__, control
from healthd import config as config_module
from healthd import shard as shard_module
from healthd.config import Config, ConfigError
from healthd.control import MAX_WINDOW_SECONDS, WINDOWS_FILE_NAME, AdHocWindows
from healthd.exporters import status_file
from healthd.log_routing import OncePerKind, route_asyncio_to_logging, route_to_logging
from healthd.model import Status
from healthd.secrets import Redactor
from healthd.state import StateStore

if TYPE_CHECKING:
    from healthd.heartbeats import PingTarget

EX_OK = 0
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_NOINPUT = 66
EX_CANTCREAT = 73
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_CONFIG = 78
#: ``healthd check``: the monitoring-plugin exit code for "could not check".
CHECK_UNKNOWN = 3

log = logging.getLogger("healthd")


class _Formatter(logging.Formatter):
    """Readable or JSON log lines, always with secrets scrubbed."""

    _EXTRAS = ("component", "status", "previous_status", "reason_code")

    def __init__(self, redactor: Redactor, json_lines: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._redactor = redactor
        self._json = json_lines

    def format(self, record: logging.LogRecord) -> str:
        if not self._json:
            return self._redactor.scrub(super().format(record))
        entry: dict[str, Any] = {
            "time": status_file.iso_timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: getattr(record, k) for k in self._EXTRAS if hasattr(record, k)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # Scrub each raw value before escaping (an escaped secret no longer matches itself),
        # then the line, which also holds every escaped form the redactor knows.
        entry = {k: self._redactor.scrub(v) if isinstance(v, str) else v for k, v in entry.items()}
        return self._redactor.scrub(json.dumps(entry, ensure_ascii=False))


def _setup_logging(redactor: Redactor, fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(redactor, json_lines=fmt == "json"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    route_to_logging(OncePerKind())
    # httpx logs every request at INFO: thousands of lines a minute and URLs that may hold secrets.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help=f"config file (default: $HEALTHD_CONFIG or {config_module.DEFAULT_CONFIG_PATH})",
    )
    common.add_argument("--log-format", choices=["text", "json"], default=argparse.SUPPRESS)
    common.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default=argparse.SUPPRESS
    )
    parser = argparse.ArgumentParser(
        prog="healthd", description="Health aggregation daemon.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"healthd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("run", parents=[common], help="run the daemon")
    check = commands.add_parser("check", parents=[common], help="run every check once")
    check.add_argument("--json", action="store_true", help="print the status document")
    config = commands.add_parser("config", help="validate or show the config")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_commands.add_parser("validate", parents=[common], help="exit 0 or 78 with errors")
    show = config_commands.add_parser(
        "show", parents=[common], help="the effective config, redacted"
    )
    show.add_argument(
        "--shards",
        nargs="?",
        const=0,
        type=_shard_count,
        metavar="N",
        help="print each component's shard instead: of the config's N, or of N to plan",
    )
    history = commands.add_parser("history", parents=[common], help="transitions and uptime")
    history.add_argument("component", nargs="?", help="only this component")
    history.add_argument("--since", default="24h", help="how far back: 30m, 24h, 7d, 2w")
    history.add_argument("--json", action="store_true", help="print JSON")
    web = commands.add_parser("web", help="the static status page")
    web_commands = web.add_subparsers(dest="web_command", required=True)
    install = web_commands.add_parser("install", help="copy the page into DIR")
    install.add_argument("directory", type=Path, metavar="DIR")
    ping = commands.add_parser(
        "ping",
        parents=[common],
        help="report a job's heartbeat to the running daemon",
        usage="healthd ping NAME [--start | --fail [--exit-code N]]\n"
        "       healthd ping NAME -- COMMAND [ARGS...]",
    )
    ping.add_argument("name", metavar="NAME", help="the heartbeat component")
    which = ping.add_mutually_exclusive_group()
    which.add_argument("--start", action="store_true", help="the job has started")
    which.add_argument("--fail", action="store_true", help="the job has failed")
    ping.add_argument("--exit-code", type=int, help="the failed job's exit code")
    planned = commands.add_parser(
        "maintenance", help="ad hoc maintenance windows, through the running daemon"
    )
    planned_commands = planned.add_subparsers(dest="maintenance_command", required=True)
    begin = planned_commands.add_parser(
        "start", parents=[common], help="put components in maintenance"
    )
    begin.add_argument("components", nargs="+", metavar="COMPONENT")
    begin.add_argument(
        "--for", dest="duration", required=True, help="how long: 30m, 2h (at most 30 days)"
    )
    begin.add_argument("--reason", required=True, help="why, for the status file and alerts")
    finish = planned_commands.add_parser(
        "end", parents=[common], help="end components' ad hoc maintenance"
    )
    finish.add_argument("components", nargs="+", metavar="COMPONENT")
    listing = planned_commands.add_parser("list", parents=[common], help="the windows running now")
    listing.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # ``healthd ping NAME -- COMMAND ARGS...``: everything after ``--`` is the job's.
    job: list[str] | None = None
    if "--" in argv and "ping" in argv[: argv.index("--")]:
        job, argv = argv[argv.index("--") + 1 :], argv[: argv.index("--")]
    args = _parser().parse_args(argv)
    path = config_module.resolve_path(getattr(args, "config", None))
    redactor = Redactor()
    _setup_logging(
        redactor, getattr(args, "log_format", "text"), getattr(args, "log_level", "info")
    )
    faulthandler.enable()
    if args.command == "web":
        return _web_install(args.directory)
    if args.command == "ping":
        return _ping(args, job, path, redactor)
    try:
        config = config_module.load(path)
    except ConfigError as exc:
        _config_problems(exc.problems, getattr(args, "log_format", "text"))
        return CHECK_UNKNOWN if args.command == "check" else EX_CONFIG
    redactor.replace(config.secrets())
    if args.command == "config":
        if getattr(args, "shards", None) is not None:
            return _show_shards(config, args.shards)
        return _config_command(args.config_command, path, config, redactor)
    if args.command == "check":
        return _check(config, redactor, as_json=args.json)
    if args.command == "history":
        return _history(args, config, redactor)
    if args.command == "maintenance":
        return _maintenance(args, config)
    return _run(path, config, redactor)


def _config_problems(problems: list[str], log_format: str) -> None:
    """One line per problem: plain ``healthd: file:line: key: message`` for people, or a log
    line through the formatter under ``--log-format json``, so that stderr stays all JSON."""
    for problem in problems:
        if log_format == "json":
            log.error("%s", problem)
        else:
            print(f"healthd: {problem}", file=sys.stderr)


def _config_command(command: str, path: Path, config: Config, redactor: Redactor) -> int:
    if command == "validate":
        print(f"{path}: OK, {len(config.components)} components")
        return EX_OK
    # Templates mask literal passwords; the redactor catches what sits in any other key.
    shown = redactor.scrub_tree(config.model_dump(mode="json", by_alias=True))
    print(redactor.scrub(json.dumps(shown, indent=2, sort_keys=False)))
    return EX_OK


def _shard_count(value: str) -> int:
    try:
        return shard_module.parse(f"1/{value}")[1]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"N must be a whole number from 1 to {shard_module.MAX_SHARDS}"
        ) from None


def _show_shards(config: Config, shards: int) -> int:
    """One line per component, ``shard<TAB>component``, by shard then name; ``shards`` 0 takes
    N from the config's own ``[daemon] shard``."""
    shards = shards or config.daemon.shard_numbers()[1]
    assignment = shard_module.assign(config.components, shards)
    for name, shard in sorted(assignment.items(), key=lambda item: (item[1], item[0])):
        print(f"{shard}/{shards}\t{name}")
    return EX_OK


def loop_options() -> dict[str, Any]:
    """anyio's asyncio backend on uvloop where it is installed (about 8% less CPU per probe:
    docs/performance.md, "uvloop against asyncio's own loop"); ``HEALTHD_NO_UVLOOP=1`` keeps
    asyncio's own loop."""
    wanted = os.environ.get("HEALTHD_NO_UVLOOP", "") in ("", "0")
    return {"use_uvloop": wanted and importlib.util.find_spec("uvloop") is not None}


def _check(config: Config, redactor: Redactor, *, as_json: bool) -> int:
    from healthd.heartbeats import PingStore, heartbeat_tokens, pings_path
    from healthd.probes import SharedResources
    from healthd.scheduler import Scheduler

    store = StateStore()
    # Heartbeats are judged from the pings the daemon saved; nothing is written here.
    shared = SharedResources()
    shared.heartbeats = PingStore(pings_path(config))
    shared.heartbeats.load()
    shared.heartbeats.watch(heartbeat_tokens(config))
    # The config's windows and the daemon's ad hoc ones (read from its file, never written).
    adhoc = AdHocWindows(config.daemon.status_file.with_name(WINDOWS_FILE_NAME))
    adhoc.load()
    store.set_windows(config.windows() + adhoc.windows())
    scheduler = Scheduler(store, max_concurrency=config.daemon.max_concurrency, shared=shared)
    try:
        anyio.run(scheduler.run_round, config, backend_options=loop_options())
    except Exception:
        log.exception("the checks could not run")
        return CHECK_UNKNOWN
    snapshot = store.snapshot()
    doc = status_file.document(snapshot, redactor)
    if as_json:
        print(redactor.scrub(json.dumps(doc, indent=2, ensure_ascii=False)))
    else:
        print(redactor.scrub(_table(doc, snapshot.summary_text())))
    return {Status.HEALTHY: 0, Status.DEGRADED: 1, Status.UNHEALTHY: 2}[snapshot.overall]


def _table(doc: dict[str, Any], summary: str) -> str:
    rows = [("COMPONENT", "KIND", "STATUS", "LATENCY", "REASON")]
    for name, entry in doc["components"].items():
        latency = f"{entry['latency_ms']:.1f} ms"
        status, reason = entry["status"], entry["reason"]
        if planned := entry.get("maintenance"):
            status += " (maintenance)"
            reason += (
                f" [maintenance until {planned['until'] or 'further notice'}: {planned['reason']}]"
            )
        rows.append((name, entry["kind"], status, latency, reason))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[4]
             for row in rows]  # fmt: skip
    lines.append(f"\noverall: {doc['status']} ({summary})")
    return "\n".join(lines)


def _maintenance(args: argparse.Namespace, config: Config) -> int:
    socket_path = config.daemon.control_socket
    message: dict[str, Any] = {"op": args.maintenance_command}
    if args.maintenance_command != "list":
        message["components"] = args.components
    if args.maintenance_command == "start":
        try:
            message["seconds"] = config_module.parse_duration(
                args.duration, max_seconds=MAX_WINDOW_SECONDS
            )
        except ValueError as exc:
            log.error("--for: %s", exc)
            return EX_USAGE
        message["reason"] = args.reason
    try:
        reply = control.request(socket_path, message)
    except control.ControlError as exc:
        log.error("maintenance %s: %s", args.maintenance_command, exc)
        return EX_UNAVAILABLE
    if args.maintenance_command == "end":
        ended = reply.get("ended") or []
        print(f"ended: {', '.join(ended)}" if ended else "no ad hoc window to end")
        return EX_OK
    rows = reply.get("maintenance") or []
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    elif not rows:
        print("no component is in maintenance")
    else:
        for row in rows:
            until = row["until"] or "further notice"
            print(f"{row['component']}\tuntil {until}\t{row['source']}\t{row['reason']}")
    return EX_OK


def _history(args: argparse.Namespace, config: Config, redactor: Redactor) -> int:
    import sqlite3

    from healthd import history

    try:
        since = history.parse_since(args.since)
    except ValueError as exc:
        log.error("%s", exc)
        return EX_USAGE
    path = history.history_path(config)
    try:
        print(
            history.command(
                path, redactor, component=args.component, since_seconds=since, as_json=args.json
            )
        )
    except (OSError, sqlite3.Error) as exc:
        log.error("cannot read history %s: %s", path, exc)
        return EX_NOINPUT
    return EX_OK


def _ping(args: argparse.Namespace, job: list[str] | None, path: Path, redactor: Redactor) -> int:
    from healthd import heartbeats

    try:
        target = heartbeats.ping_target(path, args.name)
    except ConfigError as exc:
        _config_problems(exc.problems, getattr(args, "log_format", "text"))
        return EX_CONFIG
    except KeyError:
        log.error("%s: no heartbeat component named %r", path, args.name)
        return EX_USAGE
    redactor.replace([target.token] if target.token else [])
    if args.exit_code is not None and not args.fail:
        log.error("--exit-code goes with --fail")
        return EX_USAGE
    if job is None:
        event: heartbeats.Event = "start" if args.start else "fail" if args.fail else "success"
        try:
            heartbeats.send_ping(target, args.name, event, args.exit_code)
        except heartbeats.PingNotDelivered as exc:
            log.error("ping %s: %s", args.name, exc)
            return EX_UNAVAILABLE
        return EX_OK
    if not job or args.start or args.fail:
        log.error("ping NAME -- COMMAND takes a command, and no --start or --fail")
        return EX_USAGE
    return _ping_job(target, args.name, job)


def _ping_job(target: PingTarget, name: str, job: list[str]) -> int:
    """Ping start, run the job, ping its outcome; exit with the job's code. A ping that
    cannot be delivered is logged, and never stops the job from running."""
    import subprocess
    import time

    from healthd import heartbeats
    from healthd.probes.heartbeat import human_seconds

    try:
        heartbeats.send_ping(target, name, "start")
    except heartbeats.PingNotDelivered as exc:
        log.warning("ping %s --start: %s; running the job anyway", name, exc)
    started = time.monotonic()
    try:
        code = subprocess.run(job, check=False).returncode
    except OSError as exc:
        log.error("cannot run %s: %s", job[0], exc.strerror or exc)
        code = 127 if isinstance(exc, FileNotFoundError) else 126
    # Killed by a signal: the shell's convention, 128 + the signal's number.
    code = 128 - code if code < 0 else code
    took = human_seconds(time.monotonic() - started)
    if code == 0:
        log.info("job %s succeeded in %s", name, took)
    else:
        log.warning("job %s failed with exit code %d after %s", name, code, took)
    try:
        if code == 0:
            heartbeats.send_ping(target, name, "success")
        else:
            heartbeats.send_ping(target, name, "fail", code)
    except heartbeats.PingNotDelivered as exc:
        log.error("ping %s: %s", name, exc)
    return code


def _web_install(directory: Path) -> int:
    from healthd import web

    try:
        installed = web.install(directory)
    except OSError as exc:
        log.error("cannot install the status page in %s: %s", directory, exc)
        return EX_CANTCREAT
    print(f"installed {', '.join(p.name for p in installed)} in {directory}")
    return EX_OK


def _run(path: Path, config: Config, redactor: Redactor) -> int:
    from healthd.daemon import (
        Daemon,
        MetricsAddressInUse,
        raise_descriptor_limit,
        return_large_buffers,
        stall_file_from_env,
    )

    return_large_buffers()

    async def run() -> None:
        route_asyncio_to_logging(OncePerKind())
        daemon = Daemon(path, config, redactor, stall_file=stall_file_from_env())
        raise_descriptor_limit()
        await daemon.run()

    try:
        anyio.run(run, backend_options=loop_options())
    except MetricsAddressInUse as exc:
        log.error("%s", exc)
        return EX_TEMPFAIL
    except KeyboardInterrupt:
        return EX_OK
    except Exception:
        log.exception("healthd stopped on an unexpected error")
        return EX_SOFTWARE
    log.info("stopped")
    return EX_OK
