"""Name masks against the simulator's ``dataservers/{webId}/points``, points created and deleted on the
simulator while it runs, and the tags file watch."""

from __future__ import annotations

import os

import httpx
import pytest
import trio
from structlog.testing import capture_logs

from pistream.errors import ServerError
from pistream.pi.discovery import TagsFileWatch, discover
from pistream.pi.piwebapi import PiWebApi
from pistream.pi.tags import parse_tags
from pistream.pi.webid import path_webid
from pistream.sim.model import SimModel, SimTag
from pistream.sim.server import Simulator


def site(n_fic: int = 2500) -> SimModel:
    tags = [SimTag(f"FIC{i:05d}", "PISRV01", "float", i) for i in range(n_fic)]
    tags += [SimTag(name, "PISRV01", "float", n_fic + j)
             for j, name in enumerate(["TI-101-PV", "TI-150-PV", "TI-1000-PV", "TI-201-PV", "SINUSOID"])]
    return SimModel(tags)


async def test_a_mask_pages_through_2500_points_with_max_count_1000():
    simulator = Simulator(site())
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        with trio.fail_after(60):
            async with PiWebApi(simulator.url) as api:
                before = simulator.requests_served
                found = await api.find_points("\\\\PISRV01\\FIC*", page_size=1000)
                pages = simulator.requests_served - before
                narrow = await api.find_points("\\\\pisrv01\\ti-1??-pv")
        nursery.cancel_scope.cancel()
    assert pages == 3  # 1,000 + 1,000 + 500: the short page ends it
    assert len(found) == 2500 and len(set(found.webids)) == 2500
    assert found.paths[0] == "\\\\PISRV01\\FIC00000" and found.paths[-1] == "\\\\PISRV01\\FIC02499"
    assert found.webids == [path_webid(p) for p in found.paths]
    assert found.uoms[0] == "degC"
    assert narrow.paths == ["\\\\PISRV01\\TI-101-PV", "\\\\PISRV01\\TI-150-PV"]  # ? is one character


async def test_exact_lines_and_masks_subscribe_each_tag_once_and_an_empty_mask_warns():
    simulator = Simulator(site(30))
    tags = parse_tags("\\\\PISRV01\\FIC00003\n\\\\PISRV01\\FIC0000?\n\\\\PISRV01\\FIC*\n\\\\PISRV01\\NOPE*\n"
                      "\\\\PISRV01\\SINUSOID\n")
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        with trio.fail_after(60), capture_logs() as logs:
            async with PiWebApi(simulator.url) as api:
                found = await discover(api, tags)
        nursery.cancel_scope.cancel()
    resolved = found.resolved
    assert len(resolved.webids) == len(set(resolved.webids)) == 31  # 30 FIC + SINUSOID
    assert resolved.paths[:2] == ["\\\\PISRV01\\FIC00003", "\\\\PISRV01\\SINUSOID"]  # exact lines first
    assert found.unmatched == ["\\\\PISRV01\\NOPE*"] and found.unknown == []
    warning = next(e for e in logs if e["event"] == "mask_matched_nothing")
    assert warning["log_level"] == "warning" and warning["masks"] == ["\\\\PISRV01\\NOPE*"]


async def test_keep_filters_exact_lines_and_mask_matches_alike():
    """A process's share of the tags (``--shard K/N`` filters paths): masks' matches are filtered too."""
    simulator = Simulator(site(20))
    tags = parse_tags("\\\\PISRV01\\SINUSOID\n\\\\PISRV01\\FIC00001\n\\\\PISRV01\\FIC*\n")
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        with trio.fail_after(60):
            async with PiWebApi(simulator.url) as api:
                found = await discover(api, tags, keep=lambda path: path.casefold()[-1] in "13579")
        nursery.cancel_scope.cancel()
    odd = [f"\\\\PISRV01\\FIC{i:05d}" for i in range(1, 20, 2)]
    assert found.resolved.paths == odd  # SINUSOID left out; FIC00001 listed and matched: once


async def test_a_mask_on_an_unknown_server_names_the_server_and_the_fix():
    simulator = Simulator(site(3))
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        with trio.fail_after(60):
            async with PiWebApi(simulator.url) as api:
                with pytest.raises(ServerError, match=r"PI Data Archive 'PISRV99' not found .*check the server name"):
                    await api.find_points("\\\\PISRV99\\FIC*")
        nursery.cancel_scope.cancel()


async def test_points_created_and_deleted_through_the_rest_api():
    """``POST dataservers/{webId}/points`` and ``DELETE points/{webId}``, as PI Web API has them: a created
    point is found by path and by mask, a deleted one by neither, and the ground truth still knows it."""
    model = site(2)
    simulator = Simulator(model)
    headers = {"X-Requested-With": "test"}
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        with trio.fail_after(60):
            async with httpx.AsyncClient(base_url=simulator.url + "/") as http, PiWebApi(simulator.url) as api:
                server = (await http.get("dataservers", params={"path": "\\\\PISRV01"})).json()["WebId"]
                created = await http.post(f"dataservers/{server}/points", headers=headers,
                                          json={"Name": "FIC00777", "PointType": "Int32"})
                again = await http.post(f"dataservers/{server}/points", headers=headers, json={"Name": "FIC00777"})
                matched = await api.find_points("\\\\PISRV01\\FIC*")
                webid = path_webid("\\\\PISRV01\\FIC00777")
                deleted = await http.delete(f"points/{webid}", headers=headers)
                gone = await http.get("points", params={"path": "\\\\PISRV01\\FIC00777"})
                after = await api.find_points("\\\\PISRV01\\FIC*")
        nursery.cancel_scope.cancel()
    assert created.status_code == 201 and created.headers["Location"].endswith(f"/points/{webid}")
    assert again.status_code == 409
    assert "\\\\PISRV01\\FIC00777" in matched.paths and len(matched) == 3
    assert deleted.status_code == 204 and gone.status_code == 404
    assert after.paths == ["\\\\PISRV01\\FIC00000", "\\\\PISRV01\\FIC00001"]
    tag = model.find(webid)
    assert tag is not None and tag.kind == "int" and model.lookup(webid) is None


def test_the_tags_file_watch_acts_on_new_content_seen_twice(tmp_path):
    path = tmp_path / "tags.txt"
    path.write_text("\\\\S\\A\n", encoding="utf-8")
    watch = TagsFileWatch(path)
    assert watch.read().paths == ["\\\\S\\A"]
    assert not watch.changed()  # nothing moved: one stat
    os.utime(path, ns=(1, 1))
    assert not watch.changed()  # touched, same content
    path.write_text("\\\\S\\A\n\\\\S\\B\n", encoding="utf-8")
    assert not watch.changed()  # new content seen once: an editor may still be writing
    assert watch.changed()  # the same new content again: act
    assert watch.read().paths == ["\\\\S\\A", "\\\\S\\B"]
    assert not watch.changed()
    path.unlink()
    assert not watch.changed()  # gone (being replaced): the current tags stay
