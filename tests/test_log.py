"""The log contract of DESIGN §4 and docs/logging.md: event names, their fields, the renderer.

The events are captured with ``structlog.testing.capture_logs()`` around an in-process
server on loopback (port 0), driven by real WebSocket clients; every field set is pinned
exactly, so a field added, dropped or renamed fails here first. The renderer tests call
:func:`relayd.telemetry.log.configure` on a string stream; a fixture restores structlog's defaults
after them so that other tests' ``capture_logs`` still see every event.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator, MutableMapping
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pytest
import structlog
import trio
import trio.testing
from trio_websocket import wrap_client_stream

import relayd
from relayd.config import LogSettings, Settings
from relayd.daemon.closing import CLOSE_TIMEOUT_S
from relayd.daemon.server import Server
from relayd.telemetry.line_sink import FLUSH_DELAY_S, batched, flush_held_lines
from relayd.telemetry.log import (
    THROTTLED,
    configure,
    get_logger,
    info_line,
    internal_errors,
    line_writer,
    report_suppressed_lines,
)
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats
from relayd.telemetry.throttle import BURST
from tests import wire
from tests.client import Client, connect, running, settings

Event = MutableMapping[str, Any]

#: Every captured event has these besides its own fields.
COMMON: Final = {"event", "log_level"}

OPEN_FIELDS: Final = COMMON | {"conn", "id", "peer", "origin", "dialect", "user_agent"}
RELAY_FIELDS: Final = COMMON | {"from", "to", "bytes", "outcome"}
CLOSE_FIELDS: Final = COMMON | {
    "conn",
    "id",
    "code",
    "reason",
    "closed_by",
    "duration_s",
    "messages_in",
    "messages_out",
    "bytes_in",
    "bytes_out",
    "undelivered",
}
REJECTED_FIELDS: Final = COMMON | {"conn", "peer", "status", "reason"}


def named(events: list[Event], name: str) -> list[Event]:
    return [e for e in events if e["event"] == name]


def with_log(**log: Any) -> Settings:
    """The test settings (loopback, port 0) with some ``[log]`` keys changed."""
    return settings().model_copy(update={"log": LogSettings(**log)})


def utf8(text: str) -> int:
    return len(text.encode())


@asynccontextmanager
async def client(
    url: str, *, v1: bool = False, headers: list[tuple[bytes, bytes]] | None = None
) -> AsyncIterator[tuple[Client, str]]:
    """Like :func:`tests.client.connect`, with request headers; also yields ``host:port``."""
    host, port = url.removeprefix("ws://").rstrip("/").rsplit(":", 1)
    async with (
        await trio.open_tcp_stream(host, int(port)) as stream,
        trio.open_nursery() as nursery,
    ):
        local_host, local_port, *_ = stream.socket.getsockname()
        ws = await wrap_client_stream(
            nursery,
            stream,
            host,
            "/",
            subprotocols=["relayd.v1"] if v1 else [],
            extra_headers=headers,
        )
        try:
            first = await ws.get_message()
            assert isinstance(first, str)
            client_id = json.loads(first)["id"] if v1 else first
            yield Client(ws, client_id, v1), f"{local_host}:{local_port}"
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await ws.aclose()
            nursery.cancel_scope.cancel()


def wire_size(payload_bytes: int, *, masked: bool) -> int:
    """The size on the wire of a frame with that payload (RFC 6455 §5.2)."""
    length_field = 0 if payload_bytes < 126 else 2 if payload_bytes < 65536 else 8
    return 2 + length_field + (4 if masked else 0) + payload_bytes


async def send_frame(sender: Client, envelope: dict[str, Any]) -> str:
    """Send ``envelope`` as one text frame (UTF-8, not ASCII-escaped); return the frame."""
    frame = json.dumps(envelope, ensure_ascii=False)
    await sender.ws.send_message(frame)
    return frame


# -- events from a running server ----------------------------------------------------


async def test_server_start_ready_and_stop() -> None:
    server = Server(settings())
    with structlog.testing.capture_logs() as events:
        async with running(server) as url:
            port = int(url.rstrip("/").rsplit(":", 1)[1])
            assert server.admin_address is not None
            admin_host, admin_port = server.admin_address
    assert [e["event"] for e in events] == ["server.start", "server.ready", "server.stop"]
    start, ready, stop = events
    assert start == {
        "event": "server.start",
        "log_level": "info",
        "version": relayd.__version__,
        "pid": os.getpid(),
        "host": "127.0.0.1",
        "port": 0,
        "sockets": "bound",
        "config": None,
    }
    assert ready == {
        "event": "server.ready",
        "log_level": "info",
        "listeners": [f"127.0.0.1:{port}"],
        "port": port,
        "admin": f"{admin_host}:{admin_port}",
    }
    assert set(stop) == COMMON | {"reason", "forced", "duration_s"}
    assert (stop["reason"], stop["forced"]) == ("test finished", False)
    assert isinstance(stop["duration_s"], float)
    assert 0 <= stop["duration_s"] < 30


async def test_connection_open_names_peer_origin_dialect_and_user_agent() -> None:
    headers = [(b"Origin", b"https://app.example"), (b"User-Agent", b"relayd-tests/1.0")]
    with structlog.testing.capture_logs() as events:
        async with (
            running(Server(settings())) as url,
            client(url) as (plain, plain_peer),
            client(url, v1=True, headers=headers) as (browser, browser_peer),
        ):
            pass
    opens = named(events, "connection.open")
    assert len(opens) == 2
    for event in opens:
        assert set(event) == OPEN_FIELDS, event
    assert opens[0] == {
        "event": "connection.open",
        "log_level": "info",
        "conn": 1,
        "id": plain.id,
        "peer": plain_peer,
        "origin": None,
        "dialect": "seed",
        "user_agent": None,
    }
    assert opens[1] == {
        "event": "connection.open",
        "log_level": "info",
        "conn": 2,
        "id": browser.id,
        "peer": browser_peer,
        "origin": "https://app.example",
        "dialect": "relayd.v1",
        "user_agent": "relayd-tests/1.0",
    }


async def test_message_relay_for_each_outcome() -> None:
    with structlog.testing.capture_logs() as events:
        async with running(Server(settings())) as url, connect(url) as a, connect(url) as b:
            text = "h\N{LATIN SMALL LETTER E WITH ACUTE}llo \N{CHECK MARK}"
            delivered = await send_frame(a, {"to": b.id, "message": text})
            await b.recv()
            unknown = await send_frame(a, {"to": "nobody-at-all", "message": {"n": 1}})
            assert json.loads(await a.recv())["error"] == "unknown_recipient"
    relays = named(events, "message.relay")
    assert relays == [
        {
            "event": "message.relay",
            "log_level": "info",
            "from": a.id,
            "to": b.id,
            "bytes": utf8(delivered),
            "outcome": "delivered",
        },
        {
            "event": "message.relay",
            "log_level": "info",
            "from": a.id,
            "to": "nobody-at-all",
            "bytes": utf8(unknown),
            "outcome": "unknown_recipient",
        },
    ]
    assert utf8(delivered) > len(delivered)  # the count is in bytes, not characters


async def test_message_relay_for_frames_refused_before_routing() -> None:
    # Three tokens and next to no refill: the fourth frame is rate limited.
    # (message_too_large needs a reload: tests/test_server.py.)
    limits = {"max_message_bytes": 1000, "message_burst": 3, "messages_per_second": 0.001}
    frames: list[str | bytes] = [
        b"\x00\x01\x02",
        "not json",
        json.dumps({"to": 5, "message": 1}),
        json.dumps({"to": "anyone", "message": 1}),
    ]
    with structlog.testing.capture_logs() as events:
        async with running(Server(settings(**limits))) as url, connect(url) as a:
            for frame in frames:
                await a.ws.send_message(frame)
                await a.recv()
    relays = named(events, "message.relay")
    assert relays == [
        {
            "event": "message.relay",
            "log_level": "info",
            "from": a.id,
            "to": None,
            "bytes": len(frame) if isinstance(frame, bytes) else utf8(frame),
            "outcome": outcome,
        }
        for frame, outcome in zip(
            frames,
            [
                "unsupported_data",
                "invalid_json",
                "invalid_envelope",
                "rate_limited",
            ],
            strict=True,
        )
    ]


async def test_connection_close_after_the_client_closed() -> None:
    with structlog.testing.capture_logs() as events:
        async with (
            running(Server(settings())) as url,
            client(url) as (a, _),
            client(url, v1=True) as (b, _),
        ):
            sent = [
                await send_frame(a, {"to": b.id, "message": "\N{SNOWMAN} one"}),
                await send_frame(a, {"to": "nobody", "message": 2}),
            ]
            await a.ws.send_message("not json")
            sent.append("not json")
            await b.recv()
            await send_frame(b, {"to": a.id, "message": {"back": True}, "ref": 1})
            received = [await a.recv() for _ in range(3)]  # error, error, delivery
            assert sorted(json.loads(f).get("error", "") for f in received) == [
                "",
                "invalid_json",
                "unknown_recipient",
            ]
            await a.ws.aclose(1000, "bye now")
            # The server has seen the close once nothing is left to run.
            await trio.testing.wait_all_tasks_blocked()
    closes = {e["id"]: e for e in named(events, "connection.close")}
    assert set(closes) == {a.id, b.id}
    close = closes[a.id]
    assert set(close) == CLOSE_FIELDS, close
    opened = next(e for e in named(events, "connection.open") if e["id"] == a.id)
    assert close["conn"] == opened["conn"]
    assert isinstance(close["duration_s"], float)
    assert 0 <= close["duration_s"] < 30
    assert {k: v for k, v in close.items() if k != "duration_s"} == {
        "event": "connection.close",
        "log_level": "info",
        "conn": opened["conn"],
        "id": a.id,
        "code": 1000,
        "reason": "bye now",
        "closed_by": "client",
        "messages_in": 3,
        # Every message written to the client: its id (the seed welcome), then the rest.
        "messages_out": 1 + 3,
        # WebSocket bytes after the handshake, frame headers and the close frames
        # ("bye now" from the client, its echo without the reason) included.
        "bytes_out": sum(wire_size(utf8(f), masked=False) for f in [a.id, *received])
        + wire_size(2, masked=False),
        "bytes_in": sum(wire_size(utf8(f), masked=True) for f in sent)
        + wire_size(2 + len("bye now"), masked=True),
        "undelivered": 0,
    }
    # b sent one message; it got its welcome, a's delivery and its ack.
    assert (closes[b.id]["messages_in"], closes[b.id]["messages_out"]) == (1, 3)


async def test_handshake_rejected_at_capacity() -> None:
    with structlog.testing.capture_logs() as events:
        async with running(Server(settings(max_connections=1))) as url, connect(url):
            host, port = url.removeprefix("ws://").rstrip("/").rsplit(":", 1)
            async with await trio.open_tcp_stream(host, int(port)) as stream:
                local_host, local_port, *_ = stream.socket.getsockname()
                await stream.send_all(wire.upgrade_request())
                reply = b""
                while chunk := await stream.receive_some(65536):
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 503 ")
    rejected = named(events, "handshake.rejected")
    assert rejected == [
        {
            "event": "handshake.rejected",
            "log_level": "info",
            "conn": 2,
            "peer": f"{local_host}:{local_port}",
            "status": 503,
            "reason": "server at capacity",
        }
    ]
    assert set(rejected[0]) == REJECTED_FIELDS
    assert len(named(events, "connection.open")) == 1  # none for the refused one


# -- message bodies --------------------------------------------------------------------


async def _traffic_carrying(secret: str, url: str) -> tuple[str, str]:
    """Send ``secret`` every way a client can; return the two clients' ids."""
    async with connect(url) as a, connect(url, v1=True) as b:
        await a.send(b.id, secret)
        await b.recv()
        await b.send(a.id, {"nested": [secret]}, ref=secret)
        assert await b.recv_json() == {"type": "ack", "ref": secret}
        await a.recv()
        await b.send("nobody", secret, ref=1)
        assert (await b.recv_json())["error"] == "unknown_recipient"
        for bad in (
            json.dumps({"to": 5, "message": secret}),  # invalid_envelope
            f'{{"to": "{a.id}", "message": "{secret}"',  # invalid_json
        ):
            await a.ws.send_message(bad)
            assert "error" in json.loads(await a.recv())
        return a.id, b.id


async def test_bodies_are_never_logged_by_default() -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    with structlog.testing.capture_logs() as events:
        async with running(Server(settings())) as url:
            await _traffic_carrying(secret, url)
    routed = [e for e in named(events, "message.relay") if e["to"] is not None]
    assert len(routed) == 3  # the secret did go through the router
    for event in events:
        assert "body" not in event
        assert secret not in repr(event), event


async def test_bodies_are_logged_when_turned_on() -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    with structlog.testing.capture_logs() as events:
        async with running(Server(with_log(bodies=True))) as url:
            a_id, b_id = await _traffic_carrying(secret, url)
    relays = [e for e in named(events, "message.relay") if e["to"] is not None]
    assert [(e["from"], e["outcome"]) for e in relays] == [
        (a_id, "delivered"),
        (b_id, "delivered"),
        (b_id, "unknown_recipient"),
    ]
    for event in relays:
        assert set(event) == RELAY_FIELDS | {"body"}, event
    # The body is the message as JSON text: a string message appears quoted.
    assert [e["body"] for e in relays] == [
        json.dumps(secret),
        json.dumps({"nested": [secret]}),
        json.dumps(secret),
    ]
    others = [e for e in events if e["event"] != "message.relay"]
    assert all(secret not in repr(e) for e in others)


async def test_no_message_relay_events_when_messages_are_off() -> None:
    with structlog.testing.capture_logs() as events:
        async with (
            running(Server(with_log(messages="off"))) as url,
            connect(url) as a,
            connect(url) as b,
        ):
            await a.send(b.id, "hello")
            assert await b.recv() == "hello"
            await a.send("nobody", "hello")
            assert json.loads(await a.recv())["error"] == "unknown_recipient"
            await a.ws.send_message("not json")
            assert json.loads(await a.recv())["error"] == "invalid_json"
    assert named(events, "message.relay") == []
    assert len(named(events, "connection.open")) == 2
    closes = named(events, "connection.close")
    assert sorted(e["messages_in"] for e in closes) == [0, 3]


@pytest.mark.parametrize("messages", ["refusals", "sampled"])
async def test_refusals_only_or_sampled_logs_every_refusal_and_counts_every_message(
    messages: str,
) -> None:
    # sampled at 0: none of the deliveries is drawn, so the lines are the same as refusals'.
    server = Server(with_log(messages=messages, messages_sample=0.0))
    with structlog.testing.capture_logs() as events:
        async with running(server) as url, connect(url) as a, connect(url) as b:
            for n in range(5):
                await a.send(b.id, n)
                assert await b.recv() == str(n)
            await a.send("nobody", "hello")
            assert json.loads(await a.recv())["error"] == "unknown_recipient"
            await a.ws.send_message("not json")
            assert json.loads(await a.recv())["error"] == "invalid_json"
    logged = [e["outcome"] for e in named(events, "message.relay")]
    assert sorted(logged) == ["invalid_json", "unknown_recipient"]
    assert server.stats.messages == {"delivered": 5, "unknown_recipient": 1, "invalid_json": 1}


async def test_sampled_at_one_logs_every_delivery() -> None:
    with structlog.testing.capture_logs() as events:
        async with (
            running(Server(with_log(messages="sampled", messages_sample=1.0))) as url,
            connect(url) as a,
            connect(url) as b,
        ):
            for n in range(5):
                await a.send(b.id, n)
                assert await b.recv() == str(n)
    assert [e["outcome"] for e in named(events, "message.relay")] == ["delivered"] * 5


def test_a_sample_logs_about_its_fraction_of_deliveries() -> None:
    # 10,000 draws at 0.2: 2,000 expected, and outside 1,700..2,300 with a probability
    # under 1e-12 (the binomial's standard deviation is 40).
    stats = Stats()
    events = MessageEvents(structlog.get_logger(), stats, messages="sampled", sample=0.2)
    with structlog.testing.capture_logs() as logged:
        record = events.recorder()
        for _ in range(10_000):
            record("a", "b", 1, "delivered")
        record("a", "b", 1, "recipient_busy")
    outcomes = [e["outcome"] for e in logged]
    assert 1_700 <= outcomes.count("delivered") <= 2_300
    assert outcomes.count("recipient_busy") == 1
    assert stats.messages == {"delivered": 10_000, "recipient_busy": 1}


async def test_a_reload_changes_which_messages_are_logged() -> None:
    server = Server(settings())
    with structlog.testing.capture_logs() as events:
        async with running(server) as url, connect(url) as a, connect(url) as b:
            await a.send(b.id, 1)
            assert await b.recv() == "1"
            server.reload(with_log(messages="refusals"), None)
            await a.send(b.id, 2)
            assert await b.recv() == "2"
            await a.send("nobody", 3)
            assert json.loads(await a.recv())["error"] == "unknown_recipient"
    logged = [e["outcome"] for e in named(events, "message.relay")]
    assert logged == ["delivered", "unknown_recipient"]


@pytest.mark.parametrize(("spelling", "mode"), [(True, "all"), (False, "off")])
def test_the_old_switch_still_reads(spelling: bool, mode: str) -> None:
    assert LogSettings(messages=spelling).messages == mode  # type: ignore[arg-type]


# -- the renderer ------------------------------------------------------------------


@pytest.fixture
def configured() -> Iterator[io.StringIO]:
    """A stream for :func:`configure` to write to; structlog's defaults come back after."""
    structlog.reset_defaults()
    try:
        yield io.StringIO()
    finally:
        structlog.reset_defaults()


def lines_of(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_json_lines_start_with_ts_level_event(configured: io.StringIO) -> None:
    configure(LogSettings(format="json"), stream=configured)
    get_logger().info("x.y", a=1, where=Path("/srv/relayd"))
    [line] = lines_of(configured)
    record = json.loads(line)
    assert list(record)[:3] == ["ts", "level", "event"]
    assert record == {
        "ts": record["ts"],
        "level": "info",
        "event": "x.y",
        "a": 1,
        "where": "/srv/relayd",  # a type JSON lacks is written as its str()
    }
    assert record["ts"].endswith("Z")
    stamp = datetime.fromisoformat(record["ts"].removesuffix("Z") + "+00:00")
    assert stamp.utcoffset() == timedelta(0)


def _fail(text: str) -> None:
    raise ValueError(text)


def test_json_exception_is_a_traceback_string(configured: io.StringIO) -> None:
    configure(LogSettings(format="json"), stream=configured)
    try:
        _fail("kaboom")
    except ValueError as exc:
        get_logger().error("error", conn=7, exc_info=exc)
    [line] = lines_of(configured)
    record = json.loads(line)
    assert list(record)[:3] == ["ts", "level", "event"]
    assert (record["level"], record["event"], record["conn"]) == ("error", "error", 7)
    assert "exc_info" not in record
    exception = record["exception"]
    assert isinstance(exception, str)
    assert exception.startswith("Traceback (most recent call last):")
    assert "ValueError: kaboom" in exception
    assert "in _fail" in exception  # the frames, not only the message


def test_console_format_is_a_human_line(configured: io.StringIO) -> None:
    configure(LogSettings(format="console"), stream=configured)
    get_logger().info("x.y", a=1)
    [line] = lines_of(configured)
    assert "x.y" in line
    assert "a=1" in line
    assert "\x1b[" not in line  # no colours on a stream that is not a terminal
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        ("debug", ["debug", "info", "warning", "error"]),
        ("info", ["info", "warning", "error"]),
        ("warning", ["warning", "error"]),
        ("error", ["error"]),
    ],
)
def test_level_filters_lower_levels(configured: io.StringIO, level: Any, shown: list[str]) -> None:
    configure(LogSettings(level=level), stream=configured)
    log = get_logger()
    log.debug("at.debug")
    log.info("at.info")
    log.warning("at.warning")
    log.error("at.error")
    assert [json.loads(line)["level"] for line in lines_of(configured)] == shown


def test_configure_then_reset_leaves_capture_logs_working(configured: io.StringIO) -> None:
    configure(LogSettings(level="error"), stream=configured)
    structlog.reset_defaults()
    with structlog.testing.capture_logs() as events:
        get_logger().info("x.y", a=1)
    assert events == [{"event": "x.y", "log_level": "info", "a": 1}]
    assert configured.getvalue() == ""


async def test_batched_lines_are_written_at_once_when_sparse_else_held_briefly_in_order(
    configured: io.StringIO, autojump_clock: trio.testing.MockClock
) -> None:
    configure(LogSettings(format="json"), stream=configured)
    log = get_logger()

    def events() -> list[str]:
        return [json.loads(line)["event"] for line in lines_of(configured)]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flush_held_lines)
        await trio.testing.wait_all_tasks_blocked()
        with batched():
            log.info("in.batch", n=1)
            write = line_writer("message.relay")
            assert write is not None  # the JSON processors are configured
            write({"from": "a", "to": "b", "bytes": 3, "outcome": "delivered"})
        # Nothing was written lately: the batch goes out as it ends.
        assert events() == ["in.batch", "message.relay"]
        await trio.sleep(FLUSH_DELAY_S / 2)
        with batched():
            log.info("soon.after", n=2)
        assert events()[2:] == []  # held: a batch was written less than FLUSH_DELAY_S ago
        await trio.sleep(FLUSH_DELAY_S / 2)  # FLUSH_DELAY_S after the first write
        await trio.testing.wait_all_tasks_blocked()
        assert events()[2:] == []  # no batch ended since: the flusher waits until it is due
        await trio.sleep(FLUSH_DELAY_S / 2)  # FLUSH_DELAY_S after it was held
        await trio.testing.wait_all_tasks_blocked()
        assert events()[2:] == ["soon.after"]
        with batched():
            log.info("held.first", n=3)
        log.info("outside", n=4)  # a line outside a batch takes the held ones with it
        assert events()[3:] == ["held.first", "outside"]
        await trio.sleep(FLUSH_DELAY_S)
        with batched():
            log.info("later", n=5)  # quiet again: written at once
        assert events()[5:] == ["later"]
        await trio.sleep(FLUSH_DELAY_S / 2)
        with batched():
            log.info("held.again", n=6)
        await trio.sleep(FLUSH_DELAY_S / 2)
        with batched():
            # FLUSH_DELAY_S after the last write: this batch writes the held line with its own.
            log.info("takes.them", n=7)
        assert events()[6:] == ["held.again", "takes.them"]
        await trio.sleep(FLUSH_DELAY_S / 4)
        with batched():
            log.info("held.last", n=8)
        # The flusher's wake-up for "held.again", FLUSH_DELAY_S / 4 from now, was called
        # off with the write: this line waits its own due, FLUSH_DELAY_S from now.
        await trio.sleep(FLUSH_DELAY_S * 0.9)
        await trio.testing.wait_all_tasks_blocked()
        assert events()[8:] == []
        await trio.sleep(FLUSH_DELAY_S * 0.1)
        await trio.testing.wait_all_tasks_blocked()
        assert events()[8:] == ["held.last"]
        nursery.cancel_scope.cancel()


def test_the_fast_line_is_the_line_structlog_writes(configured: io.StringIO) -> None:
    configure(LogSettings(format="json"), stream=configured)
    fields = {"from": 'a"b', "to": "\u00e9", "bytes": 3, "outcome": "delivered", "body": [1, {}]}
    get_logger().info("message.relay", **fields)
    with batched():
        write = line_writer("message.relay")
        assert write is not None
        write(fields)
    slow, fast = (json.loads(line) for line in lines_of(configured))
    assert list(fast) == list(slow)  # ts, level, event first, then the fields in order
    assert {**fast, "ts": None} == {**slow, "ts": None}


def test_a_batchs_lines_carry_its_first_lines_time_and_a_lone_line_its_own(
    configured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer is made once, not per batch: it stamps a batch's lines with the time
    # of the first (a batch does not await), a line outside a batch with its own, and
    # held lines keep the order they were logged in.
    configure(LogSettings(format="json"), stream=configured)
    log = get_logger()
    wall = iter([1_800_000_000.25, 1_800_000_000.75, 1_800_000_001.5, 1_800_000_002.0])
    monkeypatch.setattr("time.time", lambda: next(wall))
    write = line_writer("message.relay")
    assert write is not None
    with batched():
        write({"n": 1})
        log.info("between", n=2)  # through structlog: its own time
        write({"n": 3})
        assert configured.getvalue() == ""
    write({"n": 4})  # a batch of its own
    with batched():
        write({"n": 5})  # a new batch: a new time
    lines = [json.loads(line) for line in lines_of(configured)]
    assert [line["n"] for line in lines] == [1, 2, 3, 4, 5]
    assert [line["ts"] for line in lines] == [
        "2027-01-15T08:00:00.250000Z",
        "2027-01-15T08:00:00.750000Z",
        "2027-01-15T08:00:00.250000Z",
        "2027-01-15T08:00:01.500000Z",
        "2027-01-15T08:00:02.000000Z",
    ]


def test_the_recorder_follows_the_log_configuration(configured: io.StringIO) -> None:
    # The default recorder is made once, not per batch: it must still follow a new
    # configuration (another stream), and capture_logs in tests.
    configure(LogSettings(format="json"), stream=configured)
    events = MessageEvents(get_logger(), Stats())
    with batched():
        events.recorder()("a", "b", 3, "delivered")
    other = io.StringIO()
    configure(LogSettings(format="json"), stream=other)
    with batched():
        events.recorder()("a", "c", 4, "delivered")
    with structlog.testing.capture_logs() as captured, batched():
        events.recorder()("a", "d", 5, "delivered")
    assert [json.loads(line)["to"] for line in lines_of(configured)] == ["b"]
    assert [json.loads(line)["to"] for line in lines_of(other)] == ["c"]
    assert [event["to"] for event in captured] == ["d"]


def test_a_connections_line_is_the_line_structlog_writes_and_bound_context_is_kept(
    configured: io.StringIO,
) -> None:
    configure(LogSettings(format="json"), stream=configured)
    fields = {"conn": 1, "id": 'x"\u00e9', "origin": None, "user_agent": "ua\x1b[31m"}
    get_logger().info("connection.open", **fields)
    info_line(get_logger(), "connection.open", **fields)
    info_line(get_logger().bind(node="n1"), "connection.open", **fields)  # structlog's way
    slow, fast, bound = (json.loads(line) for line in lines_of(configured))
    assert list(fast) == list(slow)  # ts, level, event first, then the fields in order
    assert {**fast, "ts": None} == {**slow, "ts": None}
    assert {**bound, "ts": None} == {**slow, "ts": None, "node": "n1"}
    with structlog.testing.capture_logs() as captured:
        info_line(get_logger(), "connection.open", **fields)
    assert captured == [{"event": "connection.open", "log_level": "info", **fields}]


def test_no_fast_line_under_capture_logs_or_above_info(configured: io.StringIO) -> None:
    configure(LogSettings(level="warning"), stream=configured)
    assert line_writer("message.relay") is None
    configure(LogSettings(), stream=configured)
    with structlog.testing.capture_logs():
        assert line_writer("message.relay") is None
    configure(LogSettings(format="console"), stream=configured)
    assert line_writer("message.relay") is None


def test_lines_carry_their_priority_when_stdout_is_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    structlog.reset_defaults()
    try:
        with (tmp_path / "journal").open("w", encoding="utf-8") as journal:
            status = os.fstat(journal.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
            configure(LogSettings(), stream=journal)
            get_logger().info("at.info")
            get_logger().error("at.error")
            with batched():
                write = line_writer("message.relay")
                assert write is not None
                write({"outcome": "delivered"})
        lines = (tmp_path / "journal").read_text(encoding="utf-8").splitlines()
        # journald reads <N> as the priority and strips it (SyslogLevelPrefix=yes).
        assert [line[:3] for line in lines] == ["<6>", "<3>", "<6>"]
        assert [json.loads(line[3:])["event"] for line in lines] == [
            "at.info",
            "at.error",
            "message.relay",
        ]
        monkeypatch.setenv("JOURNAL_STREAM", "0:0")  # another stream is the journal
        with (tmp_path / "other").open("w", encoding="utf-8") as other:
            configure(LogSettings(), stream=other)
            get_logger().error("plain")
        assert json.loads((tmp_path / "other").read_text(encoding="utf-8"))["event"] == "plain"
    finally:
        structlog.reset_defaults()


def test_a_librarys_log_record_becomes_a_json_line(configured: io.StringIO) -> None:
    import logging

    configure(LogSettings(), stream=configured)
    emfile = OSError(24, "Too many open files")
    logging.getLogger("trio.serve_listeners").error(
        "accept returned EMFILE", exc_info=(OSError, emfile, None)
    )
    logging.getLogger("quiet.library").info("below warning: not written")
    [line] = lines_of(configured)
    record = json.loads(line)
    assert (record["level"], record["event"], record["logger"], record["message"]) == (
        "error",
        "library.log",
        "trio.serve_listeners",
        "accept returned EMFILE",
    )
    assert "OSError: [Errno 24] Too many open files" in record["exception"]


# -- what a client can make relayd write ------------------------------------------------


@pytest.mark.parametrize(
    ("event", "fields"),
    [
        ("handshake.rejected", {"status": 503, "reason": "server at capacity"}),
        ("limit.exceeded", {"limit": "frames_per_second", "action": "close"}),
        ("library.log", {"logger": "trio.serve_listeners", "message": "accept returned EMFILE"}),
        ("error", {"summary": "RuntimeError: x"}),
        # A backend's, not a client's: one per server API request.
        ("api.request", {"route": "/api/publish", "method": "POST", "status": 200}),
    ],
)
def test_a_flood_of_an_event_a_client_causes_is_cut_to_its_budget_and_counted(
    configured: io.StringIO, event: str, fields: dict[str, Any]
) -> None:
    configure(LogSettings(), stream=configured)
    log = get_logger()
    for _ in range(1000):
        log.error(event, **fields)
    log.info("connection.open", conn=1)  # another event is not held back
    events = [json.loads(line)["event"] for line in lines_of(configured)]
    assert events.count(event) <= BURST + 1  # and at most a line a second more
    assert events[-1] == "connection.open"

    async def one_interval() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(report_suppressed_lines, 10.0)
            await trio.sleep(10.5)
            nursery.cancel_scope.cancel()

    trio.run(one_interval, clock=trio.testing.MockClock(autojump_threshold=0))
    [summary] = [json.loads(line) for line in lines_of(configured) if "log.suppressed" in line]
    kind_field = THROTTLED[event]
    assert summary == {
        "ts": summary["ts"],
        "level": "warning",
        "event": "log.suppressed",
        "suppressed": event,
        "kind": None if kind_field is None else fields[kind_field],
        "count": 1000 - events.count(event),
        "interval_s": 10.0,
    }


def test_the_console_format_escapes_what_a_client_chose(configured: io.StringIO) -> None:
    configure(LogSettings(format="console"), stream=configured)
    hostile = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\r\u202eevil\u2028x\x9b"
    get_logger().info("connection.open", user_agent=hostile, origin=[hostile], reason="ok")
    [line] = lines_of(configured)
    for char in "\x1b\x07\r\u202e\u2028\x9b":
        assert char not in line
    assert "\\x1b]0;owned\\x07\\x1b[2J" in line
    assert "\\u202eevil" in line


def test_every_error_event_is_counted_written_or_left_out(configured: io.StringIO) -> None:
    # relayd_internal_errors_total: an operator alerts on relayd's own bugs by it,
    # and a burst of them must count whole though the line budget leaves lines out.
    configure(LogSettings(format="json"), stream=configured)
    before = internal_errors()
    for n in range(100):
        get_logger().error("error", summary=f"RuntimeError: {n}")
    get_logger().warning("limit.exceeded", limit="rate", id="x")  # not an error event
    written = [line for line in lines_of(configured) if '"event":"error"' in line]
    assert 0 < len(written) < 100  # the budget left some out
    assert internal_errors() - before == 100


#: What an event's name looks like: ``section.event``, or ``error``.
_EVENT_NAME: Final = re.compile(r"[a-z]+\.[a-z_]+|error")
#: docs/logging.md.
LOGGING_MD: Final = Path(relayd.__file__).parents[1] / "docs" / "logging.md"
#: Its "Events" part, and what follows it (the jq recipes, the fields that may be null).
_EVENTS_MD, _, _AFTER_EVENTS_MD = (
    LOGGING_MD.read_text().partition("\n## Events\n")[2].partition("\n## jq recipes\n")
)
#: Each event's field table: (the field cell, the type cell) of each row.
_FIELD_ROWS: Final = {
    section.partition("\n")[0].strip(): [
        (row.split("|")[1], row.split("|")[2])
        for table in re.findall(r"^\| Field \| Type \| Meaning \|\n((?:\|.*\n)+)", section, re.M)
        for row in table.splitlines()[1:]
    ]
    for section in re.split(r"^### ", _EVENTS_MD, flags=re.M)[1:]
}
#: docs/logging.md's events, each with the fields its table names, in the table's order.
DOCUMENTED: Final = {
    event: [field for name, _kind in rows for field in re.findall(r"`([a-z_]+)`", name)]
    for event, rows in _FIELD_ROWS.items()
}


def logged_fields() -> dict[str, list[list[str]]]:
    """Every event relayd's code logs with keyword fields, and each call's, read from its source.

    An event is a call whose first or second argument is the event's name (``log.info(name,
    ...)``, ``info_line(log, name, ...)``); ``exc_info`` is written as ``exception``.
    """
    found: dict[str, list[list[str]]] = {}
    for path in Path(relayd.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            keywords = [keyword.arg for keyword in getattr(node, "keywords", [])]
            if not isinstance(node, ast.Call) or not keywords or None in keywords:
                continue  # no fields, or fields not named here (``**fields``)
            for argument in node.args[:2]:
                choices = (
                    [argument.body, argument.orelse]
                    if isinstance(argument, ast.IfExp)
                    else [argument]
                )
                for choice in choices:
                    name = choice.value if isinstance(choice, ast.Constant) else None
                    if isinstance(name, str) and _EVENT_NAME.fullmatch(name):
                        found.setdefault(name, []).append(
                            ["exception" if key == "exc_info" else str(key) for key in keywords]
                        )
    return found


def test_logging_md_documents_every_event_and_exactly_its_fields() -> None:
    # The events whose fields the code passes by name are read from the source, each
    # call's in its order (a line's order: logging.md says its tables show it); the
    # others' are written here: message.relay's pinned above against a running server,
    # library.log's from relayd.telemetry.log._LibraryLogs (an exception only when the
    # record has one).
    calls = logged_fields()
    calls["message.relay"] = [["from", "to", "bytes", "outcome", "body"]]
    calls["library.log"] = [["logger", "message", "exception"]]
    assert set(calls["message.relay"][0]) == RELAY_FIELDS - COMMON | {"body"}
    assert len(DOCUMENTED) >= 20
    assert set(DOCUMENTED) == set(calls)
    for event, fields in calls.items():
        table = DOCUMENTED[event]
        assert set(table) == {field for call in fields for field in call}, event
        for call in fields:
            assert [field for field in table if field in call] == call, event


def test_every_log_line_the_docs_show_has_its_events_fields_in_order() -> None:
    # The captured lines in README and docs/: each names a documented event, and has only
    # that event's fields, in its table's order. A line with another event's field at null
    # is the output of a jq recipe that picks the same fields from every line, not relayd's.
    root = Path(relayd.__file__).parents[1]
    shown = 0
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for line in re.findall(r'\{"ts":"[^"]+","level":.*\}', path.read_text()):
            event = json.loads(line)
            _ts, _level, name, *fields = event
            assert name == "event", line
            table = DOCUMENTED[event["event"]]
            if any(event[field] is None and field not in table for field in fields):
                continue
            assert [field for field in table if field in fields] == fields, (path.name, line)
            shown += 1
    assert shown >= 100


def test_logging_md_lists_every_field_that_may_be_null() -> None:
    # Its "Fields that may be null" table says every other field is never null: each
    # field whose type in its event's table says "or null" is listed there.
    nullable = {
        (event, field)
        for event, rows in _FIELD_ROWS.items()
        for name, kind in rows
        if "null" in kind
        for field in re.findall(r"`([a-z_]+)`", name)
    }
    listed = set(re.findall(r"^\| `([a-z_.]+)` \| `([a-z_]+)` \|", _AFTER_EVENTS_MD, re.M))
    assert len(nullable) >= 8
    assert nullable <= listed
