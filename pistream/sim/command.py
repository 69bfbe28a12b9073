r"""``pistream simulate``: run the PI Web API simulator in the foreground until Ctrl+C.

Register with ``cli.add_command(simulate)``. Tags come from ``--tags N`` (``\\SIMSRV\SIM000000``...) or a
tags file (one ``\\SERVER\NAME`` per line; a bare name gets ``--server``; blank lines and ``#`` comments
are skipped).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import click
import trio

from pistream.sim.model import SimModel
from pistream.sim.server import Simulator, is_loopback, serve

_SHOWN_TAGS = 5


def read_tags_file(path: Path, server: str) -> list[str]:
    """Tag paths from a tags file; a line without ``\\\\`` is a name on ``server``."""
    paths = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        paths.append(text if text.startswith("\\\\") else f"\\\\{server}\\{text}")
    return paths


def build_model(tag_count: int | None, tags_file: Path | None, rate: float, server: str) -> SimModel:
    if tag_count is not None and tags_file is not None:
        raise click.UsageError("give either --tags or --tags-file, not both")
    if tags_file is not None:
        try:
            model = SimModel.from_paths(read_tags_file(tags_file, server), rate)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--tags-file") from None
        if not model.tags:
            raise click.BadParameter(f"no tags in {tags_file}", param_hint="--tags-file")
        return model
    return SimModel.generated(100 if tag_count is None else tag_count, rate, server=server)


@click.command("simulate")
@click.option("--tags", "tag_count", type=click.IntRange(min=1), help="Generate N tags (default 100).")
@click.option(
    "--tags-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Serve the tags listed in this file instead.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Events per second per tag.",
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless --allow-remote)."
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="Port; 0 picks a free one."
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.001),
    default=0.25,
    show_default=True,
    help="Seconds between channel messages.",
)
@click.option("--server", default="SIMSRV", show_default=True, help="PI Data Archive name of generated tags.")
@click.option("--basic-user", help="Require HTTP Basic authentication with this user name.")
@click.option("--basic-password-env", metavar="VAR", help="Environment variable holding the Basic password.")
@click.option("--allow-remote", is_flag=True, help="Allow binding a non-loopback address.")
def simulate(
    tag_count: int | None,
    tags_file: Path | None,
    rate: float,
    host: str,
    port: int,
    poll_interval: float,
    server: str,
    basic_user: str | None,
    basic_password_env: str | None,
    allow_remote: bool,
) -> None:
    """Serve a simulated PI Web API (REST and channels) with deterministic values."""
    if not allow_remote and not is_loopback(host):
        raise click.BadParameter(
            f"{host} is not a loopback address; the simulator has no real security, pass --allow-remote "
            "to expose it anyway",
            param_hint="--host",
        )
    basic_auth = None
    if basic_user or basic_password_env:
        if not (basic_user and basic_password_env):
            raise click.UsageError("--basic-user and --basic-password-env go together")
        password = os.environ.get(basic_password_env)
        if password is None:
            raise click.UsageError(
                f"environment variable {basic_password_env} (the Basic password) is not set"
            )
        basic_auth = (basic_user, password)
    model = build_model(tag_count, tags_file, rate, server)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            run = functools.partial(
                serve, model, host, port, poll_interval=poll_interval, basic_auth=basic_auth
            )
            simulator: Simulator = await nursery.start(run)
            click.echo(f"PI Web API simulator at {simulator.url}")
            click.echo(f"{len(model.tags)} tags at {model.rate:g} events/s each, e.g.:")
            for tag in model.tags[:_SHOWN_TAGS]:
                click.echo(f"  {tag.path}  ({tag.point_type}, WebId {tag.webid})")
            click.echo("Press Ctrl+C to stop.")

    try:
        trio.run(main)
    except BaseException as exc:  # Trio wraps what escapes a nursery in exception groups
        leaf = _single_leaf(exc)
        if isinstance(leaf, KeyboardInterrupt):
            click.echo("Simulator stopped.")
            return
        if isinstance(leaf, OSError):
            raise click.ClickException(f"cannot serve on {host}:{port}: {leaf}") from None
        raise


def _single_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
