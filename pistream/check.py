"""``pistream check``: a preflight that says what would fail before a stream is started.

It takes the main command's options (the same ``Option`` objects, so the same names, defaults, config file
and ``PISTREAM_*`` variables) and checks, one line each, ✓ or ✗ with the fix:

    config          the config file and the options parse into settings
    tags file       the tags file reads
    PI Web API      the URL answers and the credentials are accepted
    tags            every listed tag resolves (the unknown ones are listed)
    channels        one channel opens and closes (``EnableChannels``)
    table           a local folder that takes files; a cloud URI; or, for a Unity Catalog name, the
                    workspace's credentials, the table (found, or to be created at --location) and the
                    credentials UC vends
    storage         a test object is written and deleted in the table's folder (not a commit)
    state folder    the state folder (or where it will be created) takes files
    metrics port    --metrics-host:--metrics-port is free

A check that needs an earlier one that failed is skipped; so is the storage check of a Unity Catalog table
that the first start will create (UC vends credentials only for a table that exists). Exit 0 only if no
check failed; 2 if the settings do not parse, else 1. ``--json`` prints the results as JSON for automation.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import click
import structlog
import trio

from .config import Settings, auth_kind, settings_from
from .errors import ConfigError, PistreamError
from .logsetup import configure_logging

if TYPE_CHECKING:
    from .lake.target import CatalogTarget
    from .pi.tags import TagList

log = structlog.get_logger(__name__)

CHECKS = ("config", "tags file", "PI Web API", "tags", "channels", "table", "storage", "state folder",
          "metrics port")
SHOWN_UNKNOWN = 10  # unknown tags named on the text line (--json lists all)


@dataclass
class Result:
    check: str
    status: str  # pass, fail, skip
    detail: str
    unknown_tags: list[str] | None = None


class Report:
    """The results so far, and the first failure each later check depends on."""

    def __init__(self) -> None:
        self.results: list[Result] = []

    def passed(self, check: str, detail: str, **extra: Any) -> None:
        self.results.append(Result(check, "pass", detail, **extra))

    def failed(self, check: str, detail: str, **extra: Any) -> None:
        self.results.append(Result(check, "fail", detail, **extra))

    def skipped(self, check: str, because: str) -> None:
        self.results.append(Result(check, "skip", f"not checked: {because}"))

    def run(self, check: str, step: Callable[[], str]) -> bool:
        """One check whose failures are pistream errors; True if it passed."""
        try:
            self.passed(check, step())
        except PistreamError as exc:
            self.failed(check, str(exc))
            return False
        return True

    @property
    def ok(self) -> bool:
        """No check failed (a check is only skipped after a failure, or when it cannot be made yet)."""
        return not any(r.status == "fail" for r in self.results)


async def run_checks(settings: Settings) -> Report:
    """Every check, in the order a start meets them (PI Web API, then the table, then the rest)."""
    from .pi.tags import TagList, read_tags_file

    report = Report()
    assert settings.tags is not None
    paths: list[str] = []
    masks: list[str] = []

    def tags_file() -> str:
        tag_list = read_tags_file(settings.tags or "", settings.server)
        paths.extend(tag_list.paths)
        masks.extend(tag_list.masks)
        repeated = f" ({len(tag_list.duplicates)} repeated lines ignored)" if tag_list.duplicates else ""
        listed = f" and {len(masks)} name masks" if masks else ""
        return f"{len(tag_list.paths)} tags{listed} in {settings.tags}{repeated}"

    if report.run("tags file", tags_file):
        async with trio.open_nursery() as nursery:
            await _check_pi(report, settings, TagList(paths, masks=masks), nursery)
            nursery.cancel_scope.cancel()  # the simulator, if one was started
    else:
        for check in ("PI Web API", "tags", "channels"):
            report.skipped(check, "the tags file must read first")
    await trio.to_thread.run_sync(_check_table, report, settings)
    report.run("state folder", lambda: _state_folder(settings))
    report.run("metrics port", lambda: _metrics_port(settings))
    return report


async def _check_pi(report: Report, settings: Settings, tag_list: TagList, nursery: trio.Nursery) -> None:
    from .pi.channel import ChannelReader
    from .pi.discovery import discover
    from .pi.piwebapi import PiWebApi
    from .pi.tls import client_context
    from .pipeline import AUTH_HINTS, make_auth

    url = settings.url
    paths = tag_list.paths
    if settings.simulate:
        from .sim.model import SimModel
        from .sim.server import Simulator

        basic = (settings.username, settings.password) if settings.username and settings.password else None
        simulator = Simulator(SimModel.from_paths(paths, rate=settings.sim_rate), basic_auth=basic)
        await nursery.start(simulator.run)
        url = simulator.url
    assert url is not None
    hint = AUTH_HINTS[auth_kind(settings)]
    try:
        tls = client_context(settings.ca_bundle, settings.insecure) if url.startswith("https") else None
        auth = make_auth(settings, url, tls)
        async with PiWebApi(url, auth=auth, verify=tls or True, max_url_length=settings.max_url_length,
                            auth_hint=hint) as api:
            await api.check_root()
            report.passed("PI Web API", f"{url} answered and accepted the credentials (auth {auth_kind(settings)})")
            found = await discover(api, tag_list)  # masks too
            resolved, unknown = found.resolved, found.unknown
    except PistreamError as exc:
        report.failed("PI Web API", str(exc))
        for check in ("tags", "channels"):
            report.skipped(check, "PI Web API must answer first")
        return
    if unknown:
        shown = ", ".join(unknown[:SHOWN_UNKNOWN]) + (f" and {len(unknown) - SHOWN_UNKNOWN} more"
                                                      if len(unknown) > SHOWN_UNKNOWN else "")
        text = (f"{len(unknown)} of {len(paths)} tags are not known to PI Web API: {shown}; fix or remove them "
                "in the tags file (or pass --skip-unknown to go on without them)")
        if settings.skip_unknown and len(resolved):
            report.passed("tags", f"{text.split(';')[0]}; --skip-unknown: a run goes on without them",
                          unknown_tags=unknown)
        else:
            report.failed("tags", text, unknown_tags=unknown)
    else:
        matched = (f" ({len(tag_list.masks)} masks; {len(found.unmatched)} match nothing yet: "
                   f"{', '.join(found.unmatched[:SHOWN_UNKNOWN])})" if found.unmatched else "")
        report.passed("tags", f"all {len(resolved)} tags resolve{matched}")
    if not len(resolved):
        report.skipped("channels", "no tag resolved to open a channel with")
        return
    send, receive = trio.open_memory_channel[Any](1)
    async with send, receive:
        reader = ChannelReader("check", url, resolved.webids[:1], send, auth=auth, ssl_context=tls, auth_hint=hint)
        try:
            await reader.probe()
        except PistreamError as exc:
            report.failed("channels", str(exc))
            return
    report.passed("channels", "a channel opened and closed (channels are enabled)")


def _check_table(report: Report, settings: Settings) -> None:
    """Blocking: the table target, then a test object in its folder."""
    from .lake.preflight import probe_folder
    from .lake.storage import is_remote
    from .lake.target import CatalogTarget, dotted_local_name, make_target

    try:
        target = make_target(settings.table, storage_options=settings.storage_options,
                             databricks_profile=settings.databricks_profile, warehouse_id=settings.warehouse_id,
                             location=settings.location)
    except PistreamError as exc:
        report.failed("table", str(exc))
        report.skipped("storage", "the table must be found first")
        return
    with target:
        if isinstance(target, CatalogTarget):
            _check_catalog(report, target)
            return
        note = dotted_local_name(settings.table)
        kind = "in object storage" if is_remote(target.uri) else "a local folder"
        report.passed("table", f"{target.display}: {kind}" + (f" ({note})" if note else ""))
        report.run("storage", lambda: probe_folder(target.uri, target.storage_options()))


def _check_catalog(report: Report, target: CatalogTarget) -> None:
    from .lake.preflight import check_catalog_table, check_credentials, check_workspace, probe_folder

    try:
        catalog, table, workspace = check_workspace(target)
        found = check_catalog_table(catalog, target, table)
    except PistreamError as exc:
        report.failed("table", str(exc))
        report.skipped("storage", "the table must be found first")
        return
    if table is None:  # to be created at the first start: nothing to vend for yet
        report.passed("table", f"{workspace}; {found}")
        report.skipped("storage", "the table does not exist yet, so Unity Catalog cannot vend credentials for it")
        return
    try:
        expires_in = check_credentials(catalog, target, table)
    except PistreamError as exc:
        report.failed("table", f"{workspace}; {found}; but no credentials: {exc}")
        report.skipped("storage", "Unity Catalog must vend credentials first")
        return
    report.passed("table", f"{workspace}; {found}; READ_WRITE credentials vended (valid {expires_in / 60:.0f} min)")
    report.run("storage", lambda: probe_folder(target.uri, target.storage_options()))


def _state_folder(settings: Settings) -> str:
    from .lake.preflight import nearest_writable

    return nearest_writable(settings.state_dir)


def _metrics_port(settings: Settings) -> str:
    if settings.metrics_port is None:
        return "off (no --metrics-port)"
    if settings.metrics_port == 0:
        return f"port 0: a free port on {settings.metrics_host} is picked at the start (logged as metrics_served)"
    where = f"{settings.metrics_host}:{settings.metrics_port}"
    try:
        infos = socket.getaddrinfo(settings.metrics_host, settings.metrics_port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(address)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {where} ({exc.strerror or exc}): another program (another "
                          "pistream?) holds the port; choose another --metrics-port, or --metrics-host") from None
    return f"{where} is free"


# -- the command ------------------------------------------------------------------------------------------

def _marks() -> tuple[str, str, str]:
    """✓ ✗ – where the output can show them (a redirected Windows console may be cp1252), else ASCII."""
    try:
        "✓✗–".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "OK  ", "FAIL", "--  "
    return "✓", "✗", "–"


def render(report: Report) -> Iterator[str]:
    passed, failed, skipped = _marks()
    mark = {"pass": passed, "fail": failed, "skip": skipped}
    for result in report.results:
        detail = result.detail
        yield f"{mark[result.status]} {result.check}: {detail}"
    failed_count = sum(r.status == "fail" for r in report.results)
    skipped_count = sum(r.status == "skip" for r in report.results)
    unchecked = f", {skipped_count} not checked" if skipped_count else ""
    yield (f"no check failed{unchecked}: pistream can start" if not failed_count
           else f"{failed_count} failed{unchecked}: fix the first failure, then run pistream check again")


def check_command(main: click.Command) -> click.Command:
    """``check``, with the main command's options (the same objects: one definition) and ``--json``."""
    options = [p for p in main.params if p.name not in ("version", "help")]
    as_json = click.Option(["--json", "as_json"], is_flag=True, help="Print the results as JSON.")
    return click.Command(
        "check", params=[*options, as_json], callback=click.pass_context(_check),
        context_settings={"auto_envvar_prefix": "PISTREAM", "help_option_names": ["-h", "--help"]},
        help="Check the settings, PI Web API, the tags, the table and the ports without streaming: one line "
             "per check, exit 0 only if all pass. Takes the same options as the main command.",
        short_help="Check settings, PI Web API, tags and table without streaming.")


def _check(ctx: click.Context, config_path: str | None, as_json: bool, **options: Any) -> None:
    root = ctx.find_root().params  # options given before `check` count too
    config_path = config_path or root.get("config_path")
    options = {k: (v if v is not None else root.get(k)) for k, v in options.items()}
    # The lines below report every finding; the log adds only errors (or everything, with --log-level debug).
    configure_logging(options.get("log_format") or "auto", "debug" if options.get("log_level") == "debug"
                      else "error")
    report = Report()
    try:
        settings = settings_from(config_path, options)
    except ConfigError as exc:
        report.failed("config", str(exc))
        for check in CHECKS[1:]:
            report.skipped(check, "the settings must parse first")
    else:
        report.passed("config", f"{config_path or 'no config file'}: settings parse"
                      + (f"; {note}" if (note := _environment_note(ctx)) else ""))
        report.results.extend(trio.run(run_checks, settings).results)
    if as_json:
        click.echo(json.dumps({"ok": report.ok, "checks": [
            {k: v for k, v in asdict(r).items() if v is not None} for r in report.results]}, indent=2))
    else:
        for line in render(report):
            click.echo(line)
    if not report.ok:
        ctx.exit(2 if report.results[0].status == "fail" else 1)


def _environment_note(ctx: click.Context) -> str:
    import os

    from .cli import known_variables
    from .configfile import unknown_variables

    unknown = unknown_variables(os.environ, known_variables(ctx.command))
    return f"ignored unknown variables {', '.join(unknown)}" if unknown else ""

