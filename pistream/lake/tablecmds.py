"""``pistream optimize | vacuum | stats | maintenance status | maintenance break-lease --table ...``: table
maintenance by hand, the steps the pipeline's scheduler runs (``pistream.lake.maintenance``), under the same
lease, so they never race it, and the lease's state. ``register(main)`` adds them to the command group. Results
go to stdout (a table, or JSON with ``--json``), logs to stderr. A busy lease exits 75 ("try again later").
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import click

from ..errors import PistreamError
from ..logsetup import configure_logging

F = TypeVar("F", bound=Callable[..., Any])


def _table_options(command: F) -> F:
    command = click.option("--databricks-profile",
                           help="Profile in ~/.databrickscfg for a Unity Catalog --table.")(command)
    command = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                           help="TOML file; its storage_options table is used to reach the table.")(command)
    command = click.option("--table", required=True,
                           help="Delta table: a local folder, an s3:// abfss:// gs:// URI, or a Unity Catalog "
                                "table catalog.schema.table.")(command)
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(command)


def _run(work: Callable[[], Any]) -> Any:
    """Logging as the main command sets it (to stderr); a pistream error as one line and its exit code."""
    ctx = click.get_current_context()
    root = ctx.find_root().params
    configure_logging(root.get("log_format") or "auto", root.get("log_level") or "info")
    try:
        return work()
    except PistreamError as exc:
        click.echo(f"pistream: error: {exc}", err=True)
        ctx.exit(exc.exit_code)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _echo_table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        click.echo("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True))))


def _wait_option(command: F) -> F:
    return click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True,
                        help="If another maintainer holds the table's lease, wait up to SECONDS for it; then (or "
                             "at once with 0) exit 75 (busy: nothing failed, try again later).")(command)


@click.command()
@_table_options
@_wait_option
@click.option("--zorder", is_flag=True,
              help="Z-order by tag and time instead of compacting: the --partition, or every partition whose "
                   "files are not all from one Z-order.")
@click.option("--partition", type=click.DateTime(["%Y-%m-%d"]), help="Only this partition (UTC date).")
def optimize(table: str, config_path: str | None, databricks_profile: str | None, as_json: bool, wait: float,
             zorder: bool, partition: datetime | None) -> None:
    """Compact small files (or Z-order) while pistream keeps appending."""
    from .lease import Lease
    from .optimize import compact, z_order, zorder_candidates
    from .target import open_target

    day = partition.date() if partition is not None else None

    def work() -> list[Any]:
        with open_target(table, config_path=config_path, databricks_profile=databricks_profile) as target:
            options = target.storage_options
            lease = Lease(target.uri, options, role="optimize")
            lease.acquire(wait)
            try:
                if not zorder:
                    return [compact(target.uri, options, day, lease=lease)]
                days = [day] if day is not None else zorder_candidates(target.uri, options)
                return [z_order(target.uri, options, d, lease=lease) for d in days]
            finally:
                lease.release()

    results = _run(work)
    if as_json:
        _echo_json([r.to_dict() for r in results])
        return
    if not results:
        click.echo("nothing to Z-order: every partition's files come from one Z-order")
        return
    _echo_table(["partition", "operation", "files removed", "files added", "rows", "size after", "version",
                 "seconds"],
                [[r.partition or "all", r.operation, r.files_removed, r.files_added, f"{r.rows:,}",
                  _size(r.bytes_added), r.table_version, r.seconds] for r in results])


@click.command(short_help="Delete data files the table no longer references.")
@_table_options
@_wait_option
@click.option("--retention-hours", type=click.IntRange(min=0),
              help="Keep removed files this long.  [default: the table's delta.deletedFileRetentionDuration, "
                   "7 days]")
@click.option("--dry-run", is_flag=True, help="List the files that would be deleted; delete nothing.")
@click.option("--force", is_flag=True,
              help="Allow a retention under 24 hours (only when no pistream writer can have files written "
                   "ahead of a commit).")
def vacuum(table: str, config_path: str | None, databricks_profile: str | None, as_json: bool, wait: float,
           retention_hours: int | None, dry_run: bool, force: bool) -> None:
    """Delete data files the table no longer references (a full vacuum)."""
    from .target import open_target
    from .vacuum import vacuum as run_vacuum

    def work() -> Any:
        with open_target(table, config_path=config_path, databricks_profile=databricks_profile) as target:
            return run_vacuum(target.uri, target.storage_options, retention_hours, dry_run=dry_run, force=force,
                              wait=wait)

    result = _run(work)
    if as_json:
        _echo_json(result.to_dict())
        return
    for path in result.files if dry_run else ():
        click.echo(path)
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {len(result.files)} files older than {result.retention_hours} h "
               f"({result.seconds} s)")


@click.command(short_help="Rows, files and partitions of the table, from its log.")
@_table_options
@click.option("--scan", is_flag=True,
              help="Also read the tag_webid and good columns: distinct tags and the share of good values.")
def stats(table: str, config_path: str | None, databricks_profile: str | None, as_json: bool,
          scan: bool) -> None:
    """Rows, files and partitions of the table from its log (no data read without --scan)."""
    from .tablestats import table_stats
    from .target import open_target

    def work() -> Any:
        with open_target(table, config_path=config_path, databricks_profile=databricks_profile) as target:
            result = table_stats(target.uri, target.storage_options, scan=scan)
            result.table = target.display  # a Unity Catalog table by its name
            return result

    result = _run(work)
    if as_json:
        _echo_json(result.to_dict())
        return
    click.echo(f"table       {result.table}")
    checkpoint = "none" if result.last_checkpoint is None else result.last_checkpoint
    click.echo(f"version     {result.version} (checkpoint {checkpoint}, "
               f"{result.commits_since_checkpoint} commits since)")
    click.echo(f"rows        {result.rows:,} in {result.files:,} files ({result.small_files:,} small), "
               f"{_size(result.bytes)}")
    if scan:
        click.echo(f"tags        {result.distinct_tags:,}, good {_share(result.good_share)}")
    header = ["partition", "files", "small", "rows", "size", "first", "last"]
    if scan:
        header += ["tags", "good"]
    rows = []
    for p in result.partitions:
        row = [p.partition, p.files, p.small_files, f"{p.rows:,}", _size(p.bytes), _time(p.first_timestamp),
               _time(p.last_timestamp)]
        rows.append(row + ([p.distinct_tags, _share(p.good_share)] if scan else []))
    click.echo()
    _echo_table(header, rows)


def _time(moment: datetime | None) -> str | None:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment is not None else None


def _share(share: float | None) -> str:
    return "-" if share is None else f"{share:.2%}"


@click.group(short_help="Who holds the maintenance lease; free it by hand.")
def maintenance() -> None:
    """The table's maintenance lease: who holds it, when each step last ran; free it by hand."""


@maintenance.command()
@_table_options
def status(table: str, config_path: str | None, databricks_profile: str | None, as_json: bool) -> None:
    """Who holds the maintenance lease (since, last renewal, expiry) and when compaction, Z-order and vacuum
    last ran, from the table's log."""
    from .lease import read_state
    from .tableaccess import current_options, translated
    from .target import open_target

    def work() -> tuple[str, dict[str, Any]]:
        with open_target(table, config_path=config_path, databricks_profile=databricks_profile) as target:
            options = current_options(target.uri, target.storage_options)
            with translated("reading the maintenance lease", target.uri, options):
                state = read_state(target.uri, options)
            return target.display, state.to_dict(int(time.time() * 1000))

    display, data = _run(work)
    if as_json:
        _echo_json({"table": display, **data})
        return
    click.echo(f"table        {display}")
    holder = data["holder"] or "unknown holder"
    if data["state"] == "held":
        where = " (its process has ended: the next maintainer takes it over)" if data["holder_gone"] else ""
        click.echo(f"lease        held by {holder}{where}")
        click.echo(f"since        {data['since'] or '-'}")
        click.echo(f"renewed      {data['renewed'] or '-'}")
        click.echo(f"expires      {data['expires']}")
    elif data["expires"] is None:
        click.echo("lease        free (never taken)")
    else:
        verb = "released" if data["state"] == "released" else "expired (not released)"
        click.echo(f"lease        free: {verb} at {data['expires']}, last held by {holder}")
    names = {"compact": "compaction", "z_order": "z-order", "vacuum": "vacuum"}
    for step, when in data["last_runs"].items():
        click.echo(f"{names[step]:<12} {when or 'never (by pistream)'}")


@maintenance.command("break-lease")
@_table_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def break_lease_command(table: str, config_path: str | None, databricks_profile: str | None, as_json: bool,
                        yes: bool) -> None:
    """Free the maintenance lease whoever holds it. Only for a holder that is gone for good on another host
    (one on this host is taken over at once anyway); a holder still running loses the lease and its
    optimize in flight is refused at its commit."""
    from .holder import this_process
    from .lease import break_lease, read_state
    from .tableaccess import current_options, translated
    from .target import open_target

    def work() -> dict[str, Any] | None:
        with open_target(table, config_path=config_path, databricks_profile=databricks_profile) as target:
            options = current_options(target.uri, target.storage_options)
            with translated("reading the maintenance lease", target.uri, options):
                state = read_state(target.uri, options)
            now = int(time.time() * 1000)
            if not state.held(now):
                return None
            data = state.to_dict(now)
            if not yes:
                click.confirm(f"{data['holder'] or 'an unknown holder'} holds the maintenance lease of "
                              f"{target.display} until {data['expires']} (renewed {data['renewed'] or '-'}). "
                              "Break it?", abort=True, err=True)
            break_lease(target.uri, target.storage_options, this_process("break-lease"))
            return data

    broken = _run(work)
    if as_json:
        _echo_json({"broken": broken is not None, "previous": broken})
    elif broken is None:
        click.echo("the maintenance lease is free: nothing to break")
    else:
        click.echo(f"broke the maintenance lease held by {broken['holder'] or 'an unknown holder'}")


def register(group: click.Group) -> None:
    """Add optimize, vacuum, stats and maintenance to ``group`` (the pistream command)."""
    for command in (optimize, vacuum, stats, maintenance):
        group.add_command(command)

