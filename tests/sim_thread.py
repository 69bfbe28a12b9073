"""A simulator on its own Trio loop in a background thread, for sync tests that drive the CLI in-process
(``CliRunner`` calls ``trio.run``, which cannot nest inside a Trio test), and a trustme certificate authority."""

from __future__ import annotations

import contextlib
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import trio
import trustme

from pistream.sim.server import Simulator


@contextlib.contextmanager
def simulator_thread(simulator: Simulator, *tasks: Callable[[Simulator], Awaitable[object]]
                     ) -> Iterator[Simulator]:
    """Serve ``simulator`` (and run ``tasks(simulator)`` beside it) until the block ends."""
    started = threading.Event()
    loop: dict[str, object] = {}
    failure: list[BaseException] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            loop["token"], loop["scope"] = trio.lowlevel.current_trio_token(), nursery.cancel_scope
            await nursery.start(simulator.run)
            for task in tasks:
                nursery.start_soon(task, simulator)
            started.set()

    def target() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            failure.append(exc)
        finally:
            started.set()

    thread = threading.Thread(target=target, name="simulator", daemon=True)
    thread.start()
    assert started.wait(10) and not failure, failure
    try:
        yield simulator
    finally:
        scope = loop["scope"]
        trio.from_thread.run_sync(scope.cancel, trio_token=loop["token"])  # type: ignore[attr-defined]
        thread.join(10)
        assert not thread.is_alive(), "simulator thread did not stop"
    if failure:
        raise failure[0]


class Site:
    """A private CA, a server certificate for 127.0.0.1 signed by it, and the CA as a PEM file."""

    def __init__(self, directory: Path):
        self.ca = trustme.CA(organization_name="Example Plant Root CA")
        self.server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(self.server_context)
        self.ca_pem = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))
