r"""``pistream simulate``: run the PI Web API simulator in the foreground until Ctrl+C.

Register with ``cli.add_command(simulate)``. Tags come from ``--tag-count N`` (``\\SIMSRV\SIM000000``...) or a
tags file, read by ``pistream.pi.tags`` exactly as the client reads it (point paths, AF attribute paths, bare
names on ``--server``; blank lines and ``#`` comments skipped).
"""

from __future__ import annotations

import functools
import itertools
import os
import ssl
from pathlib import Path
from typing import Any

import click
import trio

from pistream.errors import TagsFileError
from pistream.pi.tags import read_tags_file
from pistream.sim.faults import Faults
from pistream.sim.model import ALL_KINDS, KINDS, SimModel
from pistream.sim.payloads import Quirks
from pistream.sim.server import Simulator, is_loopback, serve

_SHOWN_TAGS = 5
QUIRKS = ("string-flags", "value-object", "ticks", "utc-offset")


def build_model(
    tag_count: int | None,
    tags_file: Path | None,
    rate: float,
    server: str,
    *,
    all_kinds: bool = False,
    error_values: bool = False,
) -> SimModel:
    if tag_count is not None and tags_file is not None:
        raise click.UsageError("give either --tag-count or --tags-file, not both")
    if tags_file is not None:
        try:
            paths = read_tags_file(tags_file, server).paths
            return SimModel.from_paths(paths, rate, error_values=error_values)
        except (TagsFileError, ValueError) as exc:
            raise click.BadParameter(str(exc), param_hint="--tags-file") from None
    kinds = ALL_KINDS if all_kinds else KINDS
    count = 100 if tag_count is None else tag_count
    return SimModel.generated(count, rate, server=server, kinds=kinds, error_values=error_values)


def _secret(env_var: str, what: str) -> str:
    value = os.environ.get(env_var)
    if value is None:
        raise click.UsageError(f"environment variable {env_var} ({what}) is not set")
    return value


def _ssl_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if cert is None:
        raise click.UsageError("--tls-key needs --tls-cert")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise click.BadParameter(f"cannot load {cert}: {exc}", param_hint="--tls-cert") from None
    return context


@click.command("simulate", short_help="Serve a simulated PI Web API with deterministic values.")
@click.option("--tag-count", "tag_count", type=click.IntRange(min=1), help="Generate N tags (default 100).")
@click.option("--tags", "tag_count_old", type=click.IntRange(min=1), hidden=True,
              help="The former name of --tag-count (the main command's --tags is a file).")
@click.option(
    "--tags-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Serve the tags (PI points or AF attributes) listed in this file instead.",
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
@click.option("--all-kinds", is_flag=True, help="Generated tags also carry bool, array and timestamp values.")
@click.option("--error-values", is_flag=True, help='Some events carry {"Errors": [...]} values.')
@click.option("--basic-user", help="Require HTTP Basic authentication with this user name.")
@click.option("--basic-password-env", metavar="VAR", help="Environment variable holding the Basic password.")
@click.option("--bearer-token-env", metavar="VAR", help="Accept the Bearer token held in this variable.")
@click.option("--oidc-client-id", help="Serve an OIDC client-credentials token endpoint for this client.")
@click.option("--oidc-secret-env", metavar="VAR", help="Environment variable holding the client secret.")
@click.option(
    "--token-lifetime",
    type=click.FloatRange(min=0, min_open=True),
    default=3600.0,
    show_default=True,
    help="Seconds an issued token stays valid.",
)
@click.option(
    "--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Serve HTTPS/WSS."
)
@click.option(
    "--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Key of --tls-cert."
)
@click.option("--rate-limit", type=click.IntRange(min=1), help="Max requests per second per client IP (429).")
@click.option("--disable-channels", is_flag=True, help="Refuse channels (403), as with EnableChannels false.")
@click.option(
    "--max-request-head",
    type=click.IntRange(min=1024),
    default=16384,
    show_default=True,
    help="Bytes of request line + headers (raise for channel URLs with thousands of webIds).",
)
@click.option("--quirk", "quirks", type=click.Choice(QUIRKS), multiple=True, help="Wire quirk (repeatable).")
@click.option("--shuffle", is_flag=True, help="Channel messages list values in random order.")
@click.option(
    "--late-fraction", type=click.FloatRange(0, 1), default=0.0, help="Fraction of values sent one poll late."
)
@click.option(
    "--repeat-last", type=click.FloatRange(0, 1), default=0.0, help="Fraction of streams resending a value."
)
@click.option(
    "--churn",
    type=click.FloatRange(min=0.1),
    help="Every SECONDS create a point CHURNnnnnnn on --server and delete the one created three rounds "
    "before: a site whose points come and go (pistream's masks and rediscovery follow it).",
)
@click.option("--allow-remote", is_flag=True, help="Allow binding a non-loopback address.")
def simulate(
    tag_count: int | None,
    tag_count_old: int | None,
    tags_file: Path | None,
    rate: float,
    host: str,
    port: int,
    poll_interval: float,
    server: str,
    all_kinds: bool,
    error_values: bool,
    basic_user: str | None,
    basic_password_env: str | None,
    bearer_token_env: str | None,
    oidc_client_id: str | None,
    oidc_secret_env: str | None,
    token_lifetime: float,
    tls_cert: Path | None,
    tls_key: Path | None,
    rate_limit: int | None,
    disable_channels: bool,
    max_request_head: int,
    quirks: tuple[str, ...],
    shuffle: bool,
    late_fraction: float,
    repeat_last: float,
    churn: float | None,
    allow_remote: bool,
) -> None:
    """Serve a simulated PI Web API (REST and channels) with deterministic values."""
    tag_count = tag_count if tag_count is not None else tag_count_old
    if not allow_remote and not is_loopback(host):
        raise click.BadParameter(
            f"{host} is not a loopback address; the simulator has no real security, pass --allow-remote "
            "to expose it anyway",
            param_hint="--host",
        )
    options: dict[str, Any] = {
        "poll_interval": poll_interval,
        "token_lifetime": token_lifetime,
        "rate_limit": rate_limit,
        "channels_enabled": not disable_channels,
        "max_request_head": max_request_head,
        "ssl_context": _ssl_context(tls_cert, tls_key),
        "quirks": Quirks(**{name.replace("-", "_"): True for name in quirks}),
        "faults": Faults(shuffle=shuffle, late_fraction=late_fraction, repeat_last=repeat_last),
    }
    if basic_user or basic_password_env:
        if not (basic_user and basic_password_env):
            raise click.UsageError("--basic-user and --basic-password-env go together")
        options["basic_auth"] = (basic_user, _secret(basic_password_env, "the Basic password"))
    if bearer_token_env:
        options["bearer_tokens"] = {_secret(bearer_token_env, "the Bearer token")}
    if oidc_client_id or oidc_secret_env:
        if not (oidc_client_id and oidc_secret_env):
            raise click.UsageError("--oidc-client-id and --oidc-secret-env go together")
        options["oidc_clients"] = {oidc_client_id: _secret(oidc_secret_env, "the OIDC client secret")}
    model = build_model(tag_count, tags_file, rate, server, all_kinds=all_kinds, error_values=error_values)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            run = functools.partial(serve, model, host, port, **options)
            simulator: Simulator = await nursery.start(run)
            click.echo(f"PI Web API simulator at {simulator.url}")
            if "oidc_clients" in options:
                click.echo(f"OIDC token endpoint at {simulator.token_url}")
            click.echo(f"{len(model.tags)} tags at {model.rate:g} events/s each, e.g.:")
            for tag in model.tags[:_SHOWN_TAGS]:
                kind = f"{tag.af_type} attribute" if tag.is_attribute else tag.point_type
                click.echo(f"  {tag.path}  ({kind}, WebId {tag.webid})")
            if churn:
                click.echo(f"Points come and go every {churn:g} s: \\\\{server}\\{CHURN_PREFIX}* (SIGHUP pistream, "
                           "or let its rediscovery find them)")
                nursery.start_soon(churn_points, model, server, churn)
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


CHURN_PREFIX = "CHURN"
CHURN_KEPT = 3  # points created by --churn alive at once


async def churn_points(model: SimModel, server: str, seconds: float) -> None:
    """Create a point every ``seconds`` and delete the one created CHURN_KEPT rounds before."""
    created: list[str] = []
    for n in itertools.count():
        await trio.sleep(seconds)
        tag = model.add(f"\\\\{server}\\{CHURN_PREFIX}{n:06d}")
        created.append(tag.webid)
        click.echo(f"created {tag.path}")
        if len(created) > CHURN_KEPT:
            click.echo(f"deleted {model.remove(created.pop(0)).path}")


def _single_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
