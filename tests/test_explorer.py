"""The swarm explorer without a browser: the announcement format, what a round makes of hostile
DHT entries and slow peers (a real DHT node and real gRPC servers on 127.0.0.1), the page's
escaping, and the HTTP server's bounds. The browser test is tests/test_explorer_browser.py."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from html.parser import HTMLParser
from typing import Any

import grpc
import pytest
from helpers import ROOT

from services.common.announcements import (
    GRIDS_KEY,
    TRAINERS_KEY,
    GridAnnouncement,
    TrainerAnnouncement,
    parse_grid,
    parse_trainer,
)
from services.common.identity import Identity
from services.common.rejections import Rejections
from services.dht.client import DHTClient
from services.dht.server import start_node
from services.explorer import render
from services.explorer.collect import Collector, Limits
from services.explorer.http import Body, HttpServer
from services.explorer.peers import Peers
from services.explorer.rows import Grid, Replica, layout
from services.proto import expert_pb2, expert_pb2_grpc

# ---------------------------------------------------------------- the announcement format


def test_announcements_round_trip() -> None:
    grid = GridAnnouncement("ffn", (4, 8), "10.0.0.5:31340", version="0.1.0", tls=True,
                            experts=6, queued=3, samples_per_s=12.5)  # fmt: skip
    assert parse_grid(b"ffn", grid.encode()) == (grid, "")
    trainer = TrainerAnnouncement("ffn-mlp-h64-4x4", "trainer-1:31350", model="mlp",
                                  grid=(4, 4), extra={"averaging_key": "ffn.avg"})  # fmt: skip
    assert parse_trainer(b"ffn-mlp-h64-4x4", trainer.encode()) == (trainer, "")


@pytest.mark.parametrize(
    ("subkey", "value", "reason"),
    [
        (b"ffn", b"x" * 5000, "too_large"),
        (b"ffn", b"\xff\xfe", "not_json"),
        (b"ffn", b"[" * 3000 + b"]" * 3000, "too_large"),
        (b"ffn", b"[" * 2000 + b"]" * 2000, "not_json"),  # nested deeper than json allows
        (b"ffn", b"[1, 2]", "not_an_object"),
        (b"ffn", b'{"prefix": "ffn.", "shape": [4], "address": "a:1"}', "bad_prefix"),
        (b"ffn", b'{"prefix": "<b>", "shape": [4], "address": "a:1"}', "bad_prefix"),
        (b"other", b'{"prefix": "ffn", "shape": [4], "address": "a:1"}', "prefix_not_subkey"),
        (b"ffn", b'{"prefix": "ffn", "shape": [0], "address": "a:1"}', "bad_shape"),
        (b"ffn", b'{"prefix": "ffn", "shape": [1048577], "address": "a:1"}', "bad_shape"),
        (b"ffn", b'{"prefix": "ffn", "shape": [true], "address": "a:1"}', "bad_shape"),
        (b"ffn", b'{"prefix": "ffn", "shape": [4.0], "address": "a:1"}', "bad_shape"),
        (b"ffn", b'{"prefix": "ffn", "shape": [1,1,1,1,1,1,1,1,1], "address": "a:1"}',
         "bad_shape"),
        (b"ffn", b'{"prefix": "ffn", "shape": [4], "address": "unix:/run/docker.sock"}',
         "bad_address"),
        (b"ffn", b'{"prefix": "ffn", "shape": [4], "address": "0.0.0.0:1"}', "bad_address"),
    ],
)  # fmt: skip
def test_grid_announcements_refuse_what_is_not_one(subkey: bytes, value: bytes, reason: str):
    assert parse_grid(subkey, value) == (None, reason)


def test_announcement_numbers_and_texts_are_bounded() -> None:
    value = json.dumps({
        "prefix": "ffn", "shape": [4, 4], "address": "a:1", "version": "v" * 10_00,
        "experts": -3, "queued": float("nan"), "samples_per_s": "fast",
        "tls": "yes", "max_batch_size": True,
    }).encode()  # fmt: skip
    grid, _ = parse_grid(b"ffn", value)
    assert grid is not None
    assert len(grid.version) == 64 and grid.experts is None and grid.queued is None
    assert grid.samples_per_s is None and grid.tls is False and grid.max_batch_size is None
    trainer = {"run_id": "a b", "address": "a:1"}
    assert parse_trainer(b"a b", json.dumps(trainer).encode()) == (None, "bad_run_id")


def test_expert_grid_shapes_cover_patterns_and_hosted_uids() -> None:
    from services.expert.grid_declaration import grid_shapes

    patterns = ["ffn.[0:4].[2:8]", "ffn.1.3", "att.[0:2]", "odd.[0:2]", "odd.[0:2].[0:2]"]
    shapes = grid_shapes(patterns, ["ffn.1.3", "att.5"])
    assert shapes == {"ffn": (4, 8), "att": (6,), "odd": (2,)}


# ---------------------------------------------------------------- a round against hostile peers


class FakeExpert(expert_pb2_grpc.ExpertServicer):
    """An expert server as far as Info goes: answers with its public key, or never (slow)."""

    def __init__(
        self, public_key: bytes, hang: bool = False, fail: frozenset[str] = frozenset()
    ) -> None:
        self.public_key, self.hang, self.fail = public_key, hang, fail

    async def Info(self, request: Any, context: Any) -> expert_pb2.InfoResponse:
        if self.hang:
            await asyncio.sleep(3600)
        if request.uid in self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "overloaded")
        if self.fail:
            await asyncio.sleep(0.5)  # the others are still in flight when one fails
        return expert_pb2.InfoResponse(uid=request.uid, expert_class="<b>ffn</b>",
                                       optimizer_steps=7, public_key=self.public_key)  # fmt: skip


async def fake_expert(servicer: FakeExpert) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    expert_pb2_grpc.add_ExpertServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def uid_items(uid: str, address: str, expiration: float) -> list[tuple[str, str, bytes, float]]:
    from services.common.expert_keys import declaration_items

    return declaration_items([uid], address, expiration)


def test_a_round_skips_hostile_entries_bounds_grids_and_times_out_slow_servers() -> None:
    async def scenario() -> None:
        node = await start_node()
        owner, stranger, slowpoke = Identity.generate(), Identity.generate(), Identity.generate()
        honest, honest_address = await fake_expert(FakeExpert(owner.public_key))
        slow, slow_address = await fake_expert(FakeExpert(slowpoke.public_key, hang=True))
        try:

            async def put(identity: Identity | None, items: list, owned: bool = True) -> None:
                async with DHTClient([node.address], identity=identity) as client:
                    assert all(await client.put(items, owned=owned))

            async with DHTClient([node.address]) as probe:
                await probe.get(["x"])
                t = probe.now() + 300
            big = GridAnnouncement("big", (1 << 20, 1 << 20), honest_address)
            await put(owner, [
                *uid_items("ffn.0.0", honest_address, t),
                *uid_items("ffn.0.1", slow_address, t),
                *uid_items("big.5.7", honest_address, t),
                (GRIDS_KEY, "ffn", GridAnnouncement("ffn", (2, 2), honest_address).encode(), t),
                (GRIDS_KEY, "big", big.encode(), t),
            ])  # fmt: skip
            # a stranger: claims a uid at the honest server's address, writes junk subkeys,
            # junk announcements and an address gRPC must never dial
            await put(stranger, [
                *uid_items("ffn.1.1", honest_address, t),
                ("ffn.", "x", b"1.2.3.4:5", t), ("ffn.", "007", b"1.2.3.4:5", t),
                ("ffn.0.", "9", b"unix:/var/run/docker.sock", t),
                (GRIDS_KEY, "junk", b"{not json", t),
                (TRAINERS_KEY, "run", b'{"run_id": "run", "address": "nowhere"}', t),
            ])  # fmt: skip
            await put(None, [("ffn.1.", "0", honest_address.encode(), t)], owned=False)

            rejections = Rejections("explorer", None, logging.getLogger("test"))
            peers = Peers(timeout=0.5, concurrency=4)
            async with DHTClient([node.address], timeout=5) as dht:
                collector = Collector(dht, peers, [node.address], ["ffn"],
                                      Limits(max_cells=64), rejections, 1.0)  # fmt: skip
                snapshot = await asyncio.wait_for(collector.round(), 60)
                await peers.close()
        finally:
            await honest.stop(0)
            await slow.stop(0)
            await node.stop()

        experts = {e["uid"]: e for e in snapshot["experts"]}
        assert experts["ffn.0.0"]["alive"] and experts["ffn.0.0"]["servers"] == [honest_address]
        assert not experts["ffn.0.1"]["alive"]  # the slow server timed out
        assert experts["ffn.0.1"]["unreachable"] == [slow_address]
        assert not experts["ffn.1.1"]["alive"]  # the stranger's claim: not the server's key
        assert not experts["ffn.1.0"]["alive"]  # unowned
        assert set(experts) >= {"ffn.0.0", "ffn.0.1", "ffn.1.0", "ffn.1.1", "big.5.7"}
        assert not any("9" in uid.split(".") or "x" in uid for uid in experts)
        grids = {g["prefix"]: g for g in snapshot["grids"]}
        assert grids["ffn"]["complete"] and grids["ffn"]["cells"] == 4
        assert not grids["big"]["complete"] and grids["big"]["cells"] == 1  # drawn sparse
        assert experts["big.5.7"]["alive"]
        servers = {s["address"]: s for s in snapshot["servers"]}
        assert servers[honest_address]["foreign_declarations"] == 1
        assert servers[slow_address]["error"].startswith("DEADLINE_EXCEEDED")
        assert snapshot["trainers"] == []
        counted = {r for r in ("bad_coordinate", "bad_address", "unowned", "not_json")
                   if rejections.count(r) > 0}  # fmt: skip
        assert counted == {"bad_coordinate", "bad_address", "unowned", "not_json"}
        json.dumps(snapshot)

    asyncio.run(scenario())


def test_a_declared_grid_of_a_trillion_cells_is_not_allocated() -> None:
    grid = Grid("ffn", (1 << 20, 1 << 20))
    grid.uids = {"ffn.3.14": [Replica("a:1", b"k", 0.0)], "ffn.0.2": [Replica("a:1", b"k", 0.0)]}
    cells = layout(grid, 4096)
    assert not cells["complete"] and cells["uids"] == ["ffn.0.2", "ffn.3.14"]
    assert layout(Grid("ffn", (4, 4)), 16)["complete"]
    assert not layout(Grid("ffn", (4, 5)), 16)["complete"]


# ---------------------------------------------------------------- the page


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.handlers: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.handlers += [name for name, _v in attrs if name.startswith("on")]


def test_every_peer_string_is_escaped_in_the_page() -> None:
    evil = '<script>alert(1)</script><img src=x onerror="alert(2)">"\'&'
    snapshot = {
        "updated": 1.0, "round": 1, "period": 5.0, "errors": [evil],
        "grids": [{"prefix": "ffn", "shape": [1, 2], "declared_shape": [1, 2],
                   "complete": True, "truncated": False, "cells": 2, "alive": 1, "dead": 1,
                   "rows": [{"label": "ffn.0.", "cells": ["ffn.0.0", "ffn.0.1"]}]}],
        "experts": [
            {"uid": "ffn.0.0", "grid": "ffn", "alive": True, "servers": [evil],
             "unreachable": [], "steps": 3, "steps_per_s": 1.0},
            {"uid": "ffn.0.1", "grid": "ffn", "alive": False, "servers": [],
             "unreachable": [evil], "steps": None, "steps_per_s": None},
        ],
        "servers": [{"address": evil, "reachable": False, "error": evil, "fingerprint": evil,
                     "experts": [evil], "num_experts": 1, "expert_class": evil,
                     "version": evil, "tls": True, "queued": 1, "max_queue_samples": 2}],
        "trainers": [{"run_id": evil, "address": evil, "fingerprint": evil, "model": evil,
                      "dataset": evil, "reachable": True, "verified": False, "state": evil,
                      "announced": {evil: evil}, "more": {"last_round": evil, evil: evil}}],
        "dht_nodes": [{"address": evil, "reachable": True, "node_id": evil, "error": evil}],
    }  # fmt: skip
    page = render.page(snapshot)
    parser = Tags()
    parser.feed(page)
    assert page.count("<script") == 1  # only the page's own app.js, in <head>
    assert "img" not in parser.tags and not parser.handlers
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


# ---------------------------------------------------------------- the HTTP server


async def http(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return reply


def test_http_server_answers_get_and_head_only_and_bounds_request_heads() -> None:
    counted: list[tuple[str, int]] = []

    async def scenario() -> None:
        pages = {"/": Body(b"<p>hi</p>", "text/html")}
        server = HttpServer(pages.get, lambda route, code: counted.append((route, code)))
        port = await server.start("127.0.0.1", 0)
        try:
            ok = await http(port, b"GET /?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
            assert ok.startswith(b"HTTP/1.1 200 ") and ok.endswith(b"<p>hi</p>")
            assert b"Content-Security-Policy: default-src 'none'; script-src 'self'" in ok
            head = await http(port, b"HEAD / HTTP/1.1\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
            assert (await http(port, b"GET /nope HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
            post = await http(port, b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            assert post.startswith(b"HTTP/1.1 405")
            huge = b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n"
            assert (await http(port, huge)).startswith(b"HTTP/1.1 431")
            assert (await http(port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
            ok = await http(port, b"GET / HTTP/1.1\r\n\r\n")  # still serving
            assert ok.startswith(b"HTTP/1.1 200 ")
        finally:
            await server.stop()

    asyncio.run(scenario())
    assert ("/", 200) in counted and ("bad", 431) in counted and ("other", 404) in counted


# ---------------------------------------------------------------- the command


def test_command_line_needs_peers_refuses_bad_prefixes_and_imports_no_torch() -> None:
    from services.explorer.__main__ import build_parser, config_from

    args = build_parser().parse_args(["--initial-peers", "a:1", "--prefixes", "ffn,ffn1."])
    assert config_from(args).prefixes == ["ffn", "ffn1"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--prefixes", "<b>"])
    run = [sys.executable, "-m", "services.explorer"]
    missing = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--initial-peers" in missing.stderr
    code = ("import sys, services.explorer.__main__, services.explorer.service; "
            "assert 'torch' not in sys.modules")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0


# ---------------------------------------------------------------- the announcers


def test_expert_servers_and_trainers_announce_themselves_in_owned_slots() -> None:
    from services.expert.server import ExpertConfig, ExpertServer
    from services.trainer.announce import TrainerAnnouncer

    async def scenario() -> None:
        node = await start_node()
        config = ExpertConfig(experts=["ffn.[0:2].[0:3]"], hidden_dim=8, dht_peers=[node.address],
                              update_period=1.0, compute_threads=1, torch_threads=1)  # fmt: skip
        server = await ExpertServer(config).start()
        trainer_key = Identity.generate()
        try:
            async with DHTClient([node.address], identity=trainer_key) as client:
                run_id = "ffn-1a2b3c4d5e6f"
                announcer = TrainerAnnouncer(
                    client, TrainerAnnouncement(run_id, "127.0.0.1:31350", model="mlp"), 1.0
                )
                await announcer.start()

                async def announced() -> dict[str, Any] | None:
                    found = await client.get([GRIDS_KEY, TRAINERS_KEY], latest=True)
                    if isinstance(found[GRIDS_KEY], dict) and isinstance(found[TRAINERS_KEY], dict):
                        return found  # type: ignore[return-value]
                    return None

                found = None
                for _ in range(600):  # bounds a hang only: 60 s
                    if found := await announced():
                        break
                    await asyncio.sleep(0.1)
                assert found is not None
                await announcer.stop()
        finally:
            await server.stop(0.5)
            await node.stop()
        (grid_entry,) = found[GRIDS_KEY][b"ffn"]
        assert grid_entry.owner == server.identity.public_key
        grid, problem = parse_grid(b"ffn", grid_entry.value)
        assert grid is not None, problem
        assert (grid.shape, grid.address, grid.experts) == ((2, 3), server.address, 6)
        assert grid.max_batch_size == config.max_batch_size and grid.queued == 0
        (trainer_entry,) = found[TRAINERS_KEY][run_id.encode()]
        assert trainer_entry.owner == trainer_key.public_key
        trainer, _ = parse_trainer(run_id.encode(), trainer_entry.value)
        assert trainer is not None and trainer.address == "127.0.0.1:31350"

    asyncio.run(scenario())


def test_with_trusted_keys_only_their_declarations_count() -> None:
    async def scenario() -> dict[str, Any]:
        node = await start_node()
        owner, stranger = Identity.generate(), Identity.generate()
        server, address = await fake_expert(FakeExpert(stranger.public_key))
        try:
            async with DHTClient([node.address]) as probe:
                await probe.get(["x"])
                t = probe.now() + 300
            for identity, uid in ((owner, "ffn.0.0"), (stranger, "ffn.0.1")):
                async with DHTClient([node.address], identity=identity) as client:
                    assert all(await client.put(uid_items(uid, address, t), owned=True))
            rejections = Rejections("explorer", None, logging.getLogger("test"))
            peers = Peers(timeout=2.0, concurrency=4)
            trusted = frozenset({owner.public_key})
            async with DHTClient([node.address], trusted=trusted) as dht:
                collector = Collector(dht, peers, [node.address], ["ffn"], Limits(), rejections,
                                      1.0)  # fmt: skip
                snapshot = await asyncio.wait_for(collector.round(), 60)
                await peers.close()
            return snapshot
        finally:
            await server.stop(0)
            await node.stop()

    snapshot = asyncio.run(scenario())
    experts = {e["uid"]: e for e in snapshot["experts"]}
    # the stranger's uid is not even declared as far as the explorer sees; the owner's entry
    # points at a server answering with another key: not alive either
    assert set(experts) == {"ffn.0.0"} and not experts["ffn.0.0"]["alive"]


def test_an_unreadable_trusted_keys_file_stops_the_explorer_at_start(tmp_path) -> None:
    run = [sys.executable, "-m", "services.explorer", "--initial-peers", "127.0.0.1:1",
           "--trusted-keys", str(tmp_path / "no"), "--metrics-port", "-1"]  # fmt: skip
    done = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cannot start" in done.stderr


def test_one_failed_call_does_not_cancel_the_others_on_the_same_channel() -> None:
    """A failed call sets its channel aside; closing it at once cancelled the calls still on
    it, and the cancellation escaped the round and stopped the explorer's loop for good."""

    async def scenario() -> dict[str, Any]:
        node = await start_node()
        owner = Identity.generate()
        server, address = await fake_expert(FakeExpert(owner.public_key, fail=frozenset({"ffn.0"})))
        try:
            async with DHTClient([node.address], identity=owner) as client:
                items = [
                    i
                    for u in ("ffn.0", "ffn.1", "ffn.2")
                    for i in uid_items(u, address, client.now() + 300)
                ]
                assert all(await client.put(items, owned=True))
            rejections = Rejections("explorer", None, logging.getLogger("test"))
            peers = Peers(timeout=5.0, concurrency=8)
            async with DHTClient([node.address]) as dht:
                collector = Collector(
                    dht, peers, [node.address], ["ffn"], Limits(), rejections, 1.0
                )
                snapshot = await asyncio.wait_for(collector.round(), 60)
                await peers.close()
            return snapshot
        finally:
            await server.stop(0)
            await node.stop()

    experts = {e["uid"]: e["alive"] for e in asyncio.run(scenario())["experts"]}
    assert experts == {"ffn.0": False, "ffn.1": True, "ffn.2": True}
