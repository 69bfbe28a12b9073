r"""Which tags the tags file stands for now, and following that set while pistream runs.

``discover`` resolves the file's exact lines in bulk (``PiWebApi.resolve``) and each name mask
(``\\PISRV01\FIC*``) by paging through ``dataservers/{webId}/points?nameFilter=`` (``PiWebApi.find_points``);
a tag listed and matched, or matched by two masks, is subscribed once. A mask that matches nothing is a
warning: points may be created later.

``Rediscovery`` resolves again every ``interval`` seconds, when the tags file's content changes (a stat every
few seconds; the file is read and hashed only when its size or time moved, and acted on once the new
content was the same at two checks in a row, so an editor writing it in pieces is not read half-way), and
on SIGHUP where there is one. The difference goes to ``Subscriptions.change``: added tags are described to
the buffer first, then subscribed on new channels; removed ones (no longer listed or matched, or deleted on
the server) are unsubscribed, closing only the channels that held them. A failure (PI Web API down, a tags
file that does not parse) keeps the current set and tries again with backoff; it never stops the stream.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from ..backoff import Backoff
from ..errors import PistreamError
from .piwebapi import PiWebApi, ResolvedTags
from .subscriptions import Subscriptions
from .tags import TagList, decode_tags, read_tags_bytes
from .webid import path_from_webid

log = structlog.get_logger(__name__)

FILE_CHECK_SECONDS = 2.0  # how often the tags file is looked at (a stat)
MASK_CONCURRENCY = 4  # masks searched at once
RETRY_SECONDS = 5.0  # a failed rediscovery is tried again after 2.5-5 s, then longer, up to MAX_RETRY_SECONDS
MAX_RETRY_SECONDS = 300.0
SHOWN = 5  # names in a log line


@dataclass
class Discovered:
    """The tags to subscribe (exact lines first, then each mask's matches, each tag once), the exact paths the
    server does not know, and the masks that matched nothing."""

    resolved: ResolvedTags
    unknown: list[str]
    unmatched: list[str]


async def discover(api: PiWebApi, tag_list: TagList, concurrency: int = MASK_CONCURRENCY,
                   keep: Callable[[str], bool] | None = None) -> Discovered:
    """Resolve a tags file's exact lines and masks; see the module docstring. ``keep(path)``: only the
    tags it accepts, exact lines and masks' matches alike (a process's share of the tags)."""
    paths = tag_list.paths if keep is None else [p for p in tag_list.paths if keep(p)]
    resolved, unknown = await api.resolve(paths)
    matches: list[ResolvedTags | None] = [None] * len(tag_list.masks)
    limiter = trio.CapacityLimiter(concurrency)

    async def search(i: int, mask: str) -> None:
        async with limiter:
            matches[i] = await api.find_points(mask)

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for i, mask in enumerate(tag_list.masks):
            nursery.start_soon(search, i, mask)
    seen = set(resolved.webids)
    unmatched = []
    for mask, found in zip(tag_list.masks, matches, strict=True):
        assert found is not None
        if not len(found):
            unmatched.append(mask)
        for path, webid, uom in zip(found.paths, found.webids, found.uoms, strict=True):
            if webid not in seen and (keep is None or keep(path)):
                seen.add(webid)
                resolved.paths.append(path)
                resolved.webids.append(webid)
                resolved.uoms.append(uom)
    if tag_list.masks:
        log.info("masks_resolved", masks=len(tag_list.masks), points=sum(len(m or ()) for m in matches),
                 seconds=round(time.monotonic() - started, 3))
    if unmatched:
        log.warning("mask_matched_nothing", count=len(unmatched), masks=unmatched[:SHOWN],
                    note="no point of the server matches it now; rediscovery will pick up points created later")
    return Discovered(resolved, unknown, unmatched)


class TagsFileWatch:
    """Tells when the tags file's content changed since it was last read (see the module docstring)."""

    def __init__(self, path: str | Path, default_server: str | None = None):
        self.path = Path(path)
        self.default_server = default_server
        self._stat: tuple[int, int] | None = None
        self._digest: bytes | None = None
        self._pending: bytes | None = None  # new content seen once, acted on when seen again

    def read(self) -> TagList:
        """Read and parse the file (TagsFileError if it does not); what was read counts as seen."""
        self._stat = self._stat_key()
        data = read_tags_bytes(self.path)
        self._digest, self._pending = hashlib.sha256(data).digest(), None
        return decode_tags(data, self.path, self.default_server)

    def _stat_key(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:  # being replaced, or gone: the current tags stay
            return None
        return st.st_mtime_ns, st.st_size

    def changed(self) -> bool:
        """Cheap unless the file moved: True once new content was the same at two checks in a row."""
        key = self._stat_key()
        if key is None or (key == self._stat and self._pending is None):
            return False
        self._stat = key
        try:
            digest = hashlib.sha256(self.path.read_bytes()).digest()
        except OSError:
            return False
        if digest == self._digest:  # touched, or saved unchanged
            self._pending = None
            return False
        if digest != self._pending:
            self._pending = digest
            return False
        return True


def _first_leaf(group: BaseExceptionGroup[PistreamError]) -> PistreamError:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, PistreamError)
    return exc


def _names(webids: list[str]) -> list[str]:
    return [path_from_webid(w) for w in webids[:SHOWN]]


class Rediscovery:
    """Follows the tags file and the server's points while the channels stream; see the module docstring.

    ``describe(tags)`` tells the buffer the added tags' paths and units before any of their values can
    arrive. ``keep``: as for ``discover``. ``sighup``: also on SIGHUP (where the platform has it; the composition root asks only when it
    handles signals)."""

    def __init__(self, api: PiWebApi, watch: TagsFileWatch, subscriptions: Subscriptions,
                 describe: Callable[[ResolvedTags], None], *, interval: float, sighup: bool = False,
                 check_seconds: float | None = None, retry: Backoff | None = None,
                 keep: Callable[[str], bool] | None = None):
        self.api = api
        self.watch = watch
        self.subscriptions = subscriptions
        self.describe = describe
        self.interval = interval  # 0: no periodic rediscovery
        self.sighup = sighup and hasattr(signal, "SIGHUP")
        self.check_seconds = check_seconds or FILE_CHECK_SECONDS
        self.keep = keep  # as for ``discover``
        self.backoff = retry or Backoff(initial=RETRY_SECONDS, maximum=MAX_RETRY_SECONDS)
        self.rediscoveries = 0  # that changed or confirmed the set
        self.failures = 0
        self._reason: str | None = None
        self._wakeup = trio.Event()
        self._finished = trio.Event()  # set when a rediscovery ends, then replaced
        subscriptions.on_refused = self._after_refusal

    def request(self, reason: str) -> None:
        """Rediscover as soon as the one running (if any) is done."""
        self._reason = self._reason or reason
        self._wakeup.set()

    async def _after_refusal(self) -> None:
        """A channel was refused: rediscover now and return once that is done."""
        finished = self._finished
        self.request("channel_refused")
        await finished.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_file)
            if self.sighup:
                await nursery.start(self._watch_sighup)
            task_status.started()
            due = self._next_interval()
            while True:
                with trio.move_on_at(due):
                    await self._wakeup.wait()
                reason = self._reason or "interval"
                self._reason, self._wakeup = None, trio.Event()
                finished, self._finished = self._finished, trio.Event()
                if await self.rediscover(reason):
                    self.backoff.reset()
                    due = self._next_interval()
                else:
                    due = trio.current_time() + self.backoff.next_delay()
                finished.set()

    def _next_interval(self) -> float:
        return trio.current_time() + self.interval if self.interval > 0 else math.inf

    async def _watch_file(self) -> None:
        while True:
            await trio.sleep(self.check_seconds)
            if await trio.to_thread.run_sync(self.watch.changed):
                self.request("tags_file")

    async def _watch_sighup(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            task_status.started()
            async for _ in signals:
                log.info("rediscovery_requested", signal="SIGHUP")
                self.request("sighup")

    async def _resolve(self) -> Discovered | PistreamError:
        """The tags file read and resolved, or what failed (the lookups run in nurseries: their errors come
        in exception groups)."""
        failure: PistreamError | None = None
        try:
            tag_list = await trio.to_thread.run_sync(self.watch.read)
            return await discover(self.api, tag_list, keep=self.keep)
        except* PistreamError as group:
            failure = _first_leaf(group)
        return failure

    async def rediscover(self, reason: str) -> bool:
        """Resolve again and apply the difference; False (logged, set unchanged) if resolution failed."""
        started = time.monotonic()
        found = await self._resolve()
        if isinstance(found, PistreamError):
            self.failures += 1
            log.warning("rediscovery_failed", reason=reason, error=str(found), tags=self.subscriptions.tag_count,
                        note="the current tags keep streaming; retrying")
            return False
        current = self.subscriptions.webids()
        new = found.resolved
        if current and not len(new):
            self.failures += 1
            log.warning("rediscovery_failed", reason=reason, tags=self.subscriptions.tag_count,
                        error=f"resolution found none of the {len(current)} subscribed tags (is the PI Data Archive "
                              "connected to PI Web API?)", note="the current tags keep streaming; retrying")
            return False
        if found.unknown:
            log.warning("tags_unknown", count=len(found.unknown), first=found.unknown[:SHOWN],
                        note="listed but not known to PI Web API: not subscribed")
        added = [i for i, w in enumerate(new.webids) if w not in current]
        removed = current.difference(new.webids)
        if added:
            self.describe(ResolvedTags([new.paths[i] for i in added], [new.webids[i] for i in added],
                                       [new.uoms[i] for i in added]))
        opened, closed = await self.subscriptions.change([new.webids[i] for i in added], removed)
        self.rediscoveries += 1
        if added:
            log.info("tags_added", count=len(added), first=[new.paths[i] for i in added[:SHOWN]], reason=reason,
                     channels_opened=opened)
        if removed:
            log.info("tags_removed", count=len(removed), first=_names(sorted(removed)), reason=reason,
                     channels_closed=closed)
        log.info("tags_rediscovered", reason=reason, tags=self.subscriptions.tag_count, added=len(added),
                 removed=len(removed), channels=len(self.subscriptions.readers),
                 seconds=round(time.monotonic() - started, 3))
        return True
