"""The command line: ``pistream --tags tags.txt ...`` runs the main job; ``pistream simulate`` serves the
built-in PI Web API simulator. Every option can also come from ``--config FILE`` or a PISTREAM_* variable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import click
import cloup
import structlog
import trio

from . import __version__
from .config import SECRET_SETTINGS, Settings, settings_from
from .configfile import unknown_variables
from .errors import ConfigError, PistreamError
from .logsetup import LEVELS, configure_logging
from .stream.columns import DECODER

log = structlog.get_logger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def _first_pistream_error(exc: BaseException) -> PistreamError | None:
    """Trio wraps task errors in exception groups; the user needs the one that explains the stop."""
    if isinstance(exc, PistreamError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_pistream_error(inner)
            if found is not None:
                return found
    return None


def _is_interrupt(exc: BaseException) -> bool:
    if isinstance(exc, KeyboardInterrupt):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_interrupt(e) for e in exc.exceptions)
    return False


def entry() -> None:
    """The console script: run the CLI, then leave without interpreter teardown.

    Native thread pools (Arrow, delta-rs) can abort the process during teardown ("terminate called
    without an active exception", exit 134) after all work is done; the exit code must not lie.
    """
    try:
        main(obj={"hard_exit": True})  # a stop that cannot end exits the process (pipeline's watchdog)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            click.echo(exc.code, err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


CONTEXT_SETTINGS = {"auto_envvar_prefix": "PISTREAM", "help_option_names": ["-h", "--help"],
                    "max_content_width": 110}
ENVIRONMENT_EPILOG = (
    "Every option can also be set as PISTREAM_<OPTION> (PISTREAM_FLUSH_SECONDS=10) or in the --config TOML file "
    "(flush_seconds = 10). Secrets never go on the command line: the Basic password in PISTREAM_PASSWORD, a "
    "bearer token in PISTREAM_TOKEN, the OIDC client secret in PISTREAM_OIDC_CLIENT_SECRET (or the config "
    "file). Before a first start: pistream check.")

# Option groups: --help lists them under these titles (cloup). The main command and ``backfill`` share the
# lists; each command adds its own options to a group.

SOURCE_OPTIONS = [
    click.option("--tags", type=click.Path(dir_okay=False), help="Tags file: one PI point path per line."),
    click.option("--url", help="PI Web API base URL, e.g. https://pisrv01/piwebapi."),
    click.option("--server", help="Default PI Data Archive for bare tag names in the tags file."),
    click.option("--skip-unknown", is_flag=True, default=None, help="Go on without tags the server does not know."),
    click.option("--max-url-length", type=int, help="Longest request URL; more tags open more channels.  "
                                                     "[default: 6000]"),
    click.option("--simulate", is_flag=True, default=None,
                  help="Start the built-in PI Web API simulator on a loopback port for the listed tags and "
                       "stream from it."),
    click.option("--sim-rate", type=float, help="Simulator events per second per tag.  [default: 1]"),
]

SOURCE_TITLE = 'PI Web API source'

AUTH_OPTIONS = [
    click.option("--auth", type=click.Choice(["auto", "none", "basic", "bearer", "oidc", "kerberos"]),
                  help="How to log on to PI Web API; auto picks from the credentials given.  [default: auto]"),
    click.option("--username", help="Basic auth user; the password comes from PISTREAM_PASSWORD, the config "
                                     "file or a prompt, never the command line."),
    click.option("--oidc-issuer", help="OIDC issuer URL for --auth oidc.  [default: the PI Web API origin]"),
    click.option("--oidc-client-id", help="OIDC client id; the secret comes from PISTREAM_OIDC_CLIENT_SECRET."),
    click.option("--oidc-scope", help="OIDC scope to request, if the issuer needs one."),
    click.option("--ca-bundle", type=click.Path(dir_okay=False),
                  help="PEM file of CA certificates to trust besides the operating system's store."),
    click.option("--insecure", is_flag=True, default=None,
                  help="Do not verify TLS certificates (logged loudly; prefer --ca-bundle)."),
]

AUTH_TITLE = 'Authentication and TLS'

TABLE_OPTIONS = [
    click.option("--table", help="Delta table: a local folder, an s3:// abfss:// gs:// URI, or a Unity Catalog "
                                  "table catalog.schema.table.  [default: pistream-data/pi_events]"),
    click.option("--databricks-profile", help="Profile in ~/.databrickscfg for a Unity Catalog --table.  "
                                               "[default: DATABRICKS_CONFIG_PROFILE, then DEFAULT]"),
    click.option("--location", help="Create a missing Unity Catalog --table as an external table here "
                                     "(s3://... or abfss://...)."),
    click.option("--warehouse-id", help="Create the Unity Catalog table through this SQL warehouse "
                                         "(CREATE TABLE) rather than the Unity Catalog API."),
    click.option("--warehouse-wait", type=float, help="How long the SQL warehouse of --warehouse-id may take to "
                                                      "start and run CREATE TABLE, in seconds.  [default: 600]"),
    click.option("--managed-write", type=click.Choice(["copy-into", "zerobus"]),
                 help="How to write a Unity Catalog MANAGED --table: copy-into stages each batch as Parquet in "
                      "--staging-volume and loads it with one COPY INTO through --warehouse-id (exactly once; "
                      "seconds, a running warehouse); zerobus streams records with Zerobus Ingest (AT-LEAST-ONCE: "
                      "a retry after a lost acknowledgement writes rows twice; remove them downstream, see "
                      "README).  [default: copy-into]"),
    click.option("--staging-volume", help="Unity Catalog volume catalog.schema.volume for --managed-write "
                                          "copy-into's staged files (created if missing).  [default: the table's "
                                          "catalog.schema.pistream_staging]"),
    click.option("--zerobus-endpoint", help="Zerobus Ingest endpoint for --managed-write zerobus, e.g. "
                                            "https://<workspace-id>.zerobus.<region>.cloud.databricks.com."),
    click.option("--state-dir", help="Folder for the per-tag floors that make restarts exactly once.  "
                                      "[default: pistream-data/state]"),
]

TABLE_TITLE = 'Table and Unity Catalog'

COMMIT_OPTIONS = [
    click.option("--flush-rows", type=int, help="Commit when this many values are buffered.  [default: 1000000]"),
    click.option("--flush-bytes", type=int, help="Commit when the columns held in memory take this many bytes (at "
                                                  "least 1 MiB; a batch's rows go to data files every 262,144 rows "
                                                  "and then no longer count).  [default: 67108864 = 64 MiB]"),
]

COMMIT_TITLE = 'Commits'

RUN_OPTIONS = [
    click.option("--config", "config_path", type=click.Path(dir_okay=False),
                  help="TOML file with any of these settings (names with underscores)."),
    click.option("--log-format", type=click.Choice(["auto", "console", "json"]),
                  help="Log format; auto is console on a terminal, JSON otherwise."),
    click.option("--log-level", type=click.Choice(LEVELS), help="Least severe log lines written.  [default: info]"),
    click.option("--log-file", help="Write the log to this file (JSON lines), rotated by size, instead of stderr "
                                     "(for a service)."),
    click.option("--log-file-max-mb", type=float, help="Rotate --log-file at this size.  [default: 10]"),
    click.option("--log-file-backups", type=int, help="Rotated --log-file files kept (FILE.1 the newest).  "
                                                       "[default: 5]"),
]

RUN_TITLE = 'Configuration and logs'


@cloup.group(invoke_without_command=True, context_settings=CONTEXT_SETTINGS, epilog=ENVIRONMENT_EPILOG)
@cloup.option_group(
    'PI Web API source',
    *SOURCE_OPTIONS,
    click.option("--rediscover-interval", type=float,
                  help="Resolve the tags file (its masks, its tags) again this often, in seconds, and follow what "
                       "changed without a restart; 0: only when the file changes or on SIGHUP.  [default: 3600]"),
    click.option("--shard", metavar="K/N", help="Stream only shard K (1 to N) of the tags file's tags, split by a "
                                                 "stable hash of each path: N processes share one tags file."),
    click.option("--backfill", metavar="DURATION",
                 help="Also read each tag's history for this long (30d, 12h, 90m, or seconds) before its first live "
                      "value, behind the live stream, exactly once; resumed after a restart (README: History)."),
)
@cloup.option_group(
    AUTH_TITLE,
    *AUTH_OPTIONS,
)
@cloup.option_group(
    'Table and Unity Catalog',
    *TABLE_OPTIONS,
    click.option("--app-id", help="Delta transaction app id of this writer; one live process per app id and table.  "
                                  "[default: pistream-HOSTNAME-<hash of the tags file's path>[-sK-of-N]]"),
)
@cloup.option_group(
    'Commits',
    *COMMIT_OPTIONS,
    click.option("--flush-seconds", type=float, help="Commit when the oldest buffered value is this old.  "
                                                      "[default: 5]"),
    click.option("--flush-idle-seconds", type=float,
                  help="Commit a batch of 65,536 values or more once no value arrived for this long (a burst "
                       "or backlog that ended); 0: only size and age.  [default: 1]"),
    click.option("--maintenance-interval", type=float,
                  help="Compact today's partition, Z-order closed ones and vacuum daily, every this many seconds; "
                       "0 turns table maintenance off.  [default: 600]"),
)
@cloup.option_group(
    'Resilience',
    click.option("--heartbeat-rate", type=int, help="Channel heartbeat, in server polls; 0 disables.  "
                                                     "[default: 5]"),
    click.option("--silence-seconds", type=float, help="With heartbeats on, reconnect a channel that sent nothing "
                                                       "for this long (a dead socket).  [default: 30]"),
    click.option("--stall-seconds", type=float, help="Close a channel whose values the pipeline could not take "
                                                     "for this long (storage down); reconnect and read the pause "
                                                     "back later.  [default: 30]"),
    click.option("--reread-seconds", type=float, help="After a reconnect, also read back this far before each "
                                                      "tag's newest value, for values a server delivers late.  "
                                                      "[default: 2]"),
    click.option("--max-message-mb", type=float,
                  help="Largest channel message accepted, in MiB; a larger one closes the channel (it reconnects "
                       "and reads the gap back).  [default: 16 KiB per tag on the channel, at least 1 MiB]"),
    click.option("--duration", type=float, help="Stop after this many seconds (flushing everything)."),
    click.option("--stop-timeout", type=float,
                  help="At a stop (Ctrl+C, SIGTERM, --duration), give the last commit this long; then exit 1 saying "
                       "how many values were not committed (the next start reads them back).  [default: 30]"),
)
@cloup.option_group(
    'Monitoring',
    click.option("--stats-interval", type=float, help="Log stream statistics every this many seconds; 0: only at "
                                                       "the stop.  [default: 60]"),
    click.option("--metrics-port", type=click.IntRange(0, 65535),
                  help="Serve Prometheus /metrics and /healthz on --metrics-host:PORT (off by default)."),
    click.option("--metrics-host", help="Address for --metrics-port.  [default: 127.0.0.1]"),
)
@cloup.option_group(
    RUN_TITLE,
    *RUN_OPTIONS,
)
@click.version_option(__version__, prog_name="pistream",
                      message=f"%(prog)s %(version)s (frame decoder: {DECODER})")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, **options: Any) -> None:
    """Stream PI System tag values from PI Web API channels into a Delta Lake table until stopped.

    Quick start, against the built-in simulator, into a local table:

        pistream --tags examples/tags.txt --simulate --duration 30
    """
    if ctx.invoked_subcommand is not None:
        return
    settings = _settings(ctx, config_path, options)
    warn_unknown_variables(ctx.command)
    from .pipeline import run_pipeline

    hard_exit = bool(isinstance(ctx.obj, dict) and ctx.obj.get("hard_exit"))  # not in-process (tests)
    _run(ctx, partial(run_pipeline, stop_watchdog=hard_exit), settings)


def _settings(ctx: click.Context, config_path: str | None, options: dict[str, Any]) -> Settings:
    """The settings from the config file, the environment and the options; logging configured by them.
    A bad setting ends the command with its one-line message (exit 2)."""
    try:
        settings = settings_from(config_path, options)
    except ConfigError as exc:
        configure_logging(options.get("log_format") or "auto", "error")
        click.echo(f"pistream: error: {exc}", err=True)
        ctx.exit(exc.exit_code)
    try:
        configure_logging(settings.log_format, settings.log_level, log_file=settings.log_file,
                          max_bytes=int(settings.log_file_max_mb * (1 << 20)), backups=settings.log_file_backups)
    except OSError as exc:
        click.echo(f"pistream: error: cannot write the log file {settings.log_file}: {exc.strerror or exc}; "
                   "--log-file must name a file this account may create and write", err=True)
        ctx.exit(ConfigError.exit_code)
    return settings


def _run(ctx: click.Context, job: Callable[[Settings], Awaitable[T]], settings: Settings) -> T:
    """Run ``job`` under trio; a PistreamError becomes its one-line message and exit code."""
    try:
        return trio.run(job, settings)
    except BaseException as exc:  # noqa: BLE001 - the one place errors become exit codes
        error = _first_pistream_error(exc)
        if error is not None:
            if settings.log_file:  # on a console the one line below is the message; a log file gets it too
                log.error("pistream_failed", error=str(error), error_type=type(error).__name__)
            click.echo(f"pistream: error: {error}", err=True)
            ctx.exit(error.exit_code)
        if _is_interrupt(exc):
            ctx.exit(130)
        raise


def known_variables(command: click.Command) -> set[str]:
    """The PISTREAM_* variables a command reads: its options' (click's automatic names) and the secrets."""
    names = {param.name for param in command.params if isinstance(param, click.Option) and param.name}
    return {f"PISTREAM_{name.upper()}" for name in names | set(SECRET_SETTINGS)}


def warn_unknown_variables(command: click.Command) -> None:
    """A misspelt PISTREAM_* variable is ignored by click without a word: say so at the start."""
    unknown = unknown_variables(os.environ, known_variables(command))
    if unknown:
        log.warning("environment_unknown", variables=unknown,
                    note="these PISTREAM_* variables match no setting and are ignored")


@main.command("backfill", short_help="Read the tags' recorded history for a time range into the table.")
@cloup.option_group(
    SOURCE_TITLE,
    *SOURCE_OPTIONS,
)
@cloup.option_group(AUTH_TITLE, *AUTH_OPTIONS)
@cloup.option_group(
    "History",
    click.option("--start", help="Start of the range: PI time (*-30d, t, y) or ISO 8601 (2024-01-01, "
                                 "2024-01-01T06:00:00Z); UTC unless the time says otherwise."),
    click.option("--end", help="End of the range (included), in the same syntax.  [default: *, now]"),
    click.option("--concurrency", type=click.IntRange(1, 32),
                 help="Recorded-values calls at a time; keep it low on a production PI Web API.  [default: 4]"),
)
@cloup.option_group(
    TABLE_TITLE,
    *TABLE_OPTIONS,
    click.option("--app-id", help="Delta transaction app id of this backfill.  [default: pistream-backfill- and "
                                  "a digest of --start, --end and the tags]"),
)
@cloup.option_group(COMMIT_TITLE, *COMMIT_OPTIONS)
@cloup.option_group(RUN_TITLE, *RUN_OPTIONS)
@click.pass_context
def backfill(ctx: click.Context, config_path: str | None, **options: Any) -> None:
    """Read the recorded history of the tags from --start to --end into the table, exactly once.

    Runs until the range is read; stopped or killed, the same command resumes where the table stands.
    Each tag's range ends before its first value in the table (a live pistream's, or an earlier
    backfill's), so a backfill beside a live stream writes no value twice.

        pistream backfill --tags tags.txt --url https://pisrv01/piwebapi --start *-30d
    """
    settings = _settings(ctx, config_path, options)
    from .backfill import run_backfill, summary_text

    summary = _run(ctx, run_backfill, settings)
    click.echo(summary_text(summary))
    if summary.failed:
        click.echo(f"pistream: error: {len(summary.failed)} tags could not be read completely (see above); run "
                   "the same command again to resume them", err=True)
        ctx.exit(1)


def _register_commands() -> None:
    from .check import check_command
    from .lake.tablecmds import register
    from .sim.command import simulate

    main.add_command(simulate, name="simulate")
    main.add_command(check_command(main), name="check")
    register(main)


_register_commands()
