"""Hostile input, one test per attack, each with bystanders who must not notice.

Every test runs relayd in-process and sends it one kind of abuse (issue 3,
item 6). Each asserts two things:

1. relayd's documented answer to the attack (an HTTP status, a close code, an
   error frame, a log event read with ``structlog.testing.capture_logs``);
2. that a bystander pair, a seed client and a ``relayd.v1`` client from
   another source address, exchanged messages before the attack, throughout
   it (in a task of their own, at least one full round trip while the hostile
   client was at work) and after it; and that a newcomer pair from a third
   address can still connect and talk afterwards.

When the server has stopped, each test also checks that nothing leaked: no
connection left in the gate, none counted against the capacity, no route, one
``connection.close`` for every ``connection.open``, and no ``error`` event (an
internal error is never the right answer to a client, however hostile).

Loopback is 127.0.0.0/8 on Linux: the hostile client connects from
127.0.0.1, bystanders bind 127.0.0.2 and newcomers 127.0.0.3, so per-IP
limits tell them apart. The handshake timeout is also checked over in-memory
streams on trio's autojump clock, where its deadline is exact.

Nothing sleeps to wait for an event. Bystanders and probes pace themselves
with short sleeps (load shaping, so they stay inside the rate limit); every
loop has a count bound and every wait a deadline.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import socket
import struct
from collections.abc import AsyncIterator, Iterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any, Final, cast

import pytest
import structlog
import trio
import trio.testing
from trio_websocket import ConnectionClosed, wrap_client_stream

from relayd.config import LimitsSettings
from relayd.daemon.gate import Gate
from relayd.daemon.server import Server
from relayd.routing.local import LocalRouter
from relayd.telemetry.log import get_logger
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats
from tests import wire
from tests.client import (
    Client,
    connect,
    exchange,
    open_raw,
    read_until_closed,
    read_welcome,
    running,
    send_and_read,
    settings,
)

HOSTILE_IP: Final = "127.0.0.1"
BYSTANDER_IP: Final = "127.0.0.2"
NEWCOMER_IP: Final = "127.0.0.3"

#: One bystander round trip (two messages and an ack). Loopback needs
#: milliseconds; five seconds means relayd stalled for its bystanders.
EXCHANGE_TIMEOUT_S: Final = 5.0
#: Count bound on the bystanders' background loop; at their pace the conftest
#: deadline comes long before it.
MAX_ROUNDS: Final = 100_000
#: Count bound and pace of a probe that waits for relayd to free an id.
MAX_PROBES: Final = 1_000
PROBE_PACE_S: Final = 0.01
#: How long relayd may take to answer a frame it must refuse by its header
#: alone. It needs no more bytes and no timer: anything near this is a stall.
PROMPT_S: Final = 5.0
#: RSS slack for the allocator, the test's own clients and trio's bookkeeping.
#: Every memory bound below is this plus what relayd may legitimately hold.
RSS_SLACK_BYTES: Final = 8 << 20


# -- bystanders ----------------------------------------------------------------------


class Bystanders:
    """A seed client ``a`` and a relayd.v1 client ``b`` who keep talking.

    Args:
        a: the seed client.
        b: the relayd.v1 client.
        pace_s: think time between background rounds, so that the pair stays
            well inside the rate limit (each client sends one message a round).
    """

    def __init__(self, a: Client, b: Client, pace_s: float) -> None:
        assert not a.v1
        assert b.v1
        self.a, self.b = a, b
        self.pace_s = pace_s
        self.rounds = 0

    async def exchange(self) -> None:
        """One round trip in each direction, exact frames, under a deadline."""
        a, b, n = self.a, self.b, self.rounds
        with trio.fail_after(EXCHANGE_TIMEOUT_S):
            await a.send(b.id, f"a->b {n}")
            assert await b.recv_json() == {"type": "message", "from": a.id, "message": f"a->b {n}"}
            await b.send(a.id, f"b->a {n}", ref=n)
            assert await b.recv_json() == {"type": "ack", "ref": n}
            assert await a.recv() == f"b->a {n}"
        self.rounds += 1

    @asynccontextmanager
    async def throughout(self) -> AsyncIterator[None]:
        """Exchange in a background task while the body runs.

        On exit, waits for at least one round that began after the body did,
        then stops the task. A failed round fails the test (it cancels the
        body).
        """
        stop = trio.Event()
        one_round = trio.Event()

        async def keep_talking() -> None:
            for _ in range(MAX_ROUNDS):
                await self.exchange()
                one_round.set()
                with trio.move_on_after(self.pace_s):
                    await stop.wait()
                if stop.is_set():
                    return
            raise AssertionError(f"bystanders ran {MAX_ROUNDS} rounds without being stopped")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_talking)
            yield
            await one_round.wait()
            stop.set()


def _pace(limits: dict[str, Any]) -> float:
    # Half the allowed message rate per client.
    rate = float(limits.get("messages_per_second", LimitsSettings().messages_per_second))
    return max(0.01, 2.0 / rate)


# -- the scene: a server, bystanders, captured logs ------------------------------------


@dataclasses.dataclass
class Scene:
    url: str
    server: Server
    router: LocalRouter
    bystanders: Bystanders
    events: list[MutableMapping[str, Any]]

    def closes(self, client_id: str) -> list[MutableMapping[str, Any]]:
        return [e for e in self.events if e["event"] == "connection.close" and e["id"] == client_id]

    def of(self, event: str) -> list[MutableMapping[str, Any]]:
        return [e for e in self.events if e["event"] == event]


@asynccontextmanager
async def scene(**limits: Any) -> AsyncIterator[Scene]:
    """Relayd on loopback with a bystander pair that has already talked once.

    After the body: the pair talks again, a newcomer pair connects and talks,
    the server stops, and it must have left nothing behind.
    """
    server = Server(settings(**limits))
    router = server.router
    assert isinstance(router, LocalRouter)
    with structlog.testing.capture_logs() as events:
        async with running(server) as url:
            async with (
                connect(url, local_address=BYSTANDER_IP) as a,
                connect(url, v1=True, local_address=BYSTANDER_IP) as b,
            ):
                pair = Bystanders(a, b, _pace(limits))
                await pair.exchange()
                yield Scene(url, server, router, pair, events)
                await pair.exchange()
            with trio.fail_after(EXCHANGE_TIMEOUT_S):
                await exchange(url, local_address=NEWCOMER_IP)
    _assert_nothing_left(server.gate, router, events)


def _assert_nothing_left(
    gate: Gate, router: LocalRouter, events: list[MutableMapping[str, Any]]
) -> None:
    assert gate.connections == set()
    assert gate.capacity.total == 0
    assert gate.handshakes.total == 0
    assert router.routes == 0
    opened = sorted(e["conn"] for e in events if e["event"] == "connection.open")
    closed = sorted(e["conn"] for e in events if e["event"] == "connection.close")
    assert opened == closed
    assert [e for e in events if e["event"] == "error"] == []


# -- small tools -------------------------------------------------------------------------


async def _outcome(sender: Client) -> str:
    """A v1 sender's next reply: "ack" or the error code."""
    reply = await sender.recv_json()
    return "ack" if reply["type"] == "ack" else str(reply["error"])


async def _probe_until_gone(prober: Client, client_id: str) -> int:
    """Send to ``client_id`` until relayd says it is unknown; the number acked before."""
    acked = 0
    for n in range(MAX_PROBES):
        await prober.send(client_id, "anyone there?", ref=f"probe-{n}")
        outcome = await _outcome(prober)
        if outcome == "unknown_recipient":
            return acked
        assert outcome in ("ack", "recipient_busy"), outcome
        acked += outcome == "ack"
        await trio.sleep(PROBE_PACE_S)
    raise AssertionError(f"{client_id} still routable after {MAX_PROBES} probes")


def _proc_status_bytes(key: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, in bytes (Linux /proc)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/self/status")


@contextlib.contextmanager
def _peak_rss_growth() -> Iterator[list[int]]:
    """Measure how far RSS rises above its current level inside the block.

    Resets the kernel's high-water mark (``/proc/self/clear_refs``, "5"), so
    the peak is this block's own; yields a list that holds the growth in
    bytes once the block is done. Before the baseline, free memory is given
    back to the system (``gc.collect``, then glibc's ``malloc_trim``): memory
    earlier tests freed but the allocator kept would otherwise absorb growth
    and hide it.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: measure without it
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = _proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    growth: list[int] = []
    yield growth
    growth.append(_proc_status_bytes("VmHWM") - baseline)


async def _raw_client(url: str) -> tuple[trio.SocketStream, str]:
    """A raw seed-dialect client from the hostile address, past its handshake."""
    stream = await open_raw(url, wire.upgrade_request(), local_address=HOSTILE_IP)
    _, client_id = await read_welcome(stream)
    return stream, client_id


async def _refused(s: Scene, request: bytes, status: int) -> bytes:
    """Send ``request``; the reply must be ``status`` and the connection closed."""
    async with s.bystanders.throughout():
        reply = await send_and_read(s.url, request, local_address=HOSTILE_IP)
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]
    return reply


def _rejected_statuses(s: Scene) -> list[int | None]:
    return [e["status"] for e in s.of("handshake.rejected")]


def _assert_closed_for_a_limit(
    s: Scene, client_id: str, code: int, reason: str, limit: str
) -> None:
    """The server closed ``client_id`` for ``limit``: one ``limit.exceeded``, then its close."""
    [close] = s.closes(client_id)
    assert (close["code"], close["reason"], close["closed_by"]) == (code, reason, "server")
    assert [(e["id"], e["limit"]) for e in s.of("limit.exceeded")] == [(client_id, limit)]


# -- the handshake -----------------------------------------------------------------------


async def test_2000_request_headers_get_431() -> None:
    request = wire.upgrade_request(extra=[(f"X-Header-{i}", "v") for i in range(2000)])
    async with scene() as s:
        await _refused(s, request, 431)
    assert _rejected_statuses(s) == [431]


async def test_a_200kb_header_block_gets_431() -> None:
    request = wire.upgrade_request(extra=[("X-Big", "a" * 200_000)])
    async with scene() as s:
        await _refused(s, request, 431)
    assert _rejected_statuses(s) == [431]


async def test_plain_http_get_gets_400() -> None:
    async with scene() as s:
        await _refused(s, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400)
    assert _rejected_statuses(s) == [400]


async def test_websocket_version_8_gets_426_naming_version_13() -> None:
    async with scene() as s:
        reply = await _refused(s, wire.upgrade_request(version="8"), 426)
    head = reply.partition(b"\r\n\r\n")[0].lower()
    assert b"\r\nsec-websocket-version: 13" in head
    assert _rejected_statuses(s) == [426]


# The trickled handshake, in virtual time first: relayd's Gate over in-memory
# streams on the autojump clock, where the deadline is exact.


@dataclasses.dataclass
class MemoryRelay:
    nursery: trio.Nursery
    gate: Gate
    router: LocalRouter

    def stream(self) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.gate, server)
        return client

    @asynccontextmanager
    async def client(self, *, v1: bool = False) -> AsyncIterator[Client]:
        protocols = ["relayd.v1"] if v1 else []
        async with trio.open_nursery() as nursery:
            # trio-websocket's annotation names socket streams; any Stream works.
            ws = await wrap_client_stream(
                nursery,
                cast(trio.SocketStream, self.stream()),
                "relayd.test",
                "/",
                subprotocols=protocols,
            )
            first = await ws.get_message()
            assert isinstance(first, str)
            yield Client(ws, json.loads(first)["id"] if v1 else first, v1)
            await ws.aclose()


@asynccontextmanager
async def memory_scene(**limits: Any) -> AsyncIterator[tuple[MemoryRelay, Bystanders]]:
    log = get_logger()
    stats = Stats()
    events = MessageEvents(log, stats)
    router = LocalRouter(events, stats)
    gate = Gate(router, LimitsSettings(**limits), log, events=events, stats=stats)
    async with trio.open_nursery() as nursery:
        await nursery.start(router.run)
        relay = MemoryRelay(nursery, gate, router)
        async with relay.client() as a, relay.client(v1=True) as b:
            pair = Bystanders(a, b, _pace(limits))
            await pair.exchange()
            yield relay, pair
            await pair.exchange()
        gate.drain()
        router.close()
    assert not gate.connections
    assert gate.capacity.total == 0
    assert router.routes == 0


async def _trickle(stream: trio.abc.SendStream, data: bytes, delay_s: float) -> None:
    """Send ``data`` a byte at a time, ``delay_s`` apart; stop quietly if refused."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        for i in range(len(data)):
            await stream.send_all(data[i : i + 1])
            await trio.sleep(delay_s)


async def _trickled_reply(
    stream: trio.abc.Stream, request: bytes, delay_s: float, *, complete: bool
) -> tuple[bytes, float]:
    """Trickle ``request``; return the reply and when it ended, in seconds from the start.

    ``complete``: the handshake is expected to succeed, so the reply is read
    up to the id frame only; otherwise until the server closes.
    """
    began = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_trickle, stream, request, delay_s)
        if complete:
            head, client_id = await read_welcome(stream)
            reply = head + client_id.encode()
        else:
            reply = await read_until_closed(stream)
        ended = trio.current_time() - began
        nursery.cancel_scope.cancel()
    return reply, ended


@pytest.mark.parametrize("complete", [True, False], ids=["within-timeout", "outlasts-timeout"])
async def test_a_handshake_trickled_a_byte_at_a_time_in_virtual_time(
    autojump_clock: trio.testing.MockClock, complete: bool
) -> None:
    timeout = 10.0
    request = wire.upgrade_request()
    # Within: the last byte arrives at 90% of the timeout. Outlasts: at 200%.
    delay = timeout * (0.9 if complete else 2.0) / len(request)
    with structlog.testing.capture_logs() as events:
        async with (
            memory_scene(handshake_timeout_s=timeout) as (relay, bystanders),
            bystanders.throughout(),
        ):
            stream = relay.stream()
            reply, ended = await _trickled_reply(stream, request, delay, complete=complete)
            await stream.aclose()
    if complete:
        assert reply.startswith(b"HTTP/1.1 101 ")
        assert ended == pytest.approx((len(request) - 1) * delay)
        assert [e["status"] for e in events if e["event"] == "handshake.rejected"] == []
    else:
        # Refused and closed exactly when the time ran out, not when the client stopped.
        assert reply.startswith(b"HTTP/1.1 408 "), reply
        assert ended == pytest.approx(timeout)
        [rejected] = [e for e in events if e["event"] == "handshake.rejected"]
        assert (rejected["status"], rejected["reason"]) == (
            408,
            "no complete request within handshake_timeout_s",
        )


@pytest.mark.parametrize("complete", [True, False], ids=["within-timeout", "outlasts-timeout"])
async def test_a_handshake_trickled_a_byte_at_a_time_over_loopback(complete: bool) -> None:
    timeout = 4.0 if complete else 0.5
    request = wire.upgrade_request()
    # Within: about 0.4 s of trickling against 4 s. Outlasts: about 4 s against 0.5 s.
    delay = 0.4 / len(request) if complete else 4.0 / len(request)
    async with (
        scene(handshake_timeout_s=timeout) as s,
        s.bystanders.throughout(),
        await open_raw(s.url, local_address=HOSTILE_IP) as stream,
    ):
        reply, ended = await _trickled_reply(stream, request, delay, complete=complete)
    if complete:
        assert reply.startswith(b"HTTP/1.1 101 ")
        assert ended < timeout
        assert _rejected_statuses(s) == []
    else:
        assert reply.startswith(b"HTTP/1.1 408 "), reply
        # Closed when the time ran out (a second of slack for a busy machine),
        # long before the trickle would have finished. The server's clock
        # started at accept, a moment before this client's: 0.1 s of slack below.
        assert timeout - 0.1 <= ended < timeout + 1.0
        assert _rejected_statuses(s) == [408]
        labels = {"status": "408", "reason": "handshake_timeout_s"}
        assert s.server.registry.get_sample_value("relayd_handshakes_rejected_total", labels) == 1


# -- frames ------------------------------------------------------------------------------


@pytest.mark.parametrize("oversized", [False, True], ids=["valid-frames", "then-oversized"])
async def test_frames_sent_with_the_handshake_are_processed_after_it(oversized: bool) -> None:
    limit = 65536
    async with (
        scene(max_message_bytes=limit) as s,
        s.bystanders.throughout(),
        connect(s.url, v1=True, local_address=BYSTANDER_IP) as witness,
    ):
        early = b"".join(
            wire.frame(wire.OP_TEXT, json.dumps({"to": witness.id, "message": n}).encode())
            for n in range(3)
        )
        tail = wire.frame(wire.OP_TEXT, b"x" * (1 << 20)) if oversized else b""
        stream = await open_raw(
            s.url, wire.upgrade_request() + early + tail, local_address=HOSTILE_IP
        )
        async with stream:
            _, hostile_id = await read_welcome(stream)
            for n in range(3):  # in order, after the handshake, from its new id
                assert await witness.recv_json() == {
                    "type": "message",
                    "from": hostile_id,
                    "message": n,
                }
            if oversized:
                rest = await read_until_closed(stream)
                assert wire.close_code(b"\r\n\r\n" + rest) == 1009
            else:  # and the connection goes on like any other
                await stream.send_all(
                    wire.frame(wire.OP_TEXT, json.dumps({"to": witness.id, "message": 3}).encode())
                )
                assert (await witness.recv_json())["message"] == 3
    [close] = s.closes(hostile_id)
    if oversized:
        assert (close["code"], close["closed_by"]) == (1009, "server")
        assert [e["limit"] for e in s.of("limit.exceeded")] == ["max_message_bytes"]
    else:
        assert close["code"] == 1006  # the raw client left without a close frame
    assert close["messages_in"] == 3 + (not oversized)


async def _violation(s: Scene, bad_frame: bytes) -> tuple[str, bytes]:
    """Complete a handshake, then send ``bad_frame``; the id and all relayd sent after."""
    async with s.bystanders.throughout():
        stream, client_id = await _raw_client(s.url)
        async with stream:
            await stream.send_all(bad_frame)
            rest = await read_until_closed(stream)
    return client_id, b"\r\n\r\n" + rest  # as wire.server_frames expects


def _assert_protocol_close(s: Scene, client_id: str, reply: bytes, code: int) -> None:
    assert wire.close_code(reply) == code, wire.server_frames(reply)
    [close] = s.closes(client_id)
    assert (close["code"], close["closed_by"]) == (code, "server")
    assert close["messages_in"] == 0


async def test_an_unmasked_client_frame_is_closed_with_1002() -> None:
    async with scene() as s:
        client_id, reply = await _violation(s, wire.frame(wire.OP_TEXT, b"{}", mask=False))
    _assert_protocol_close(s, client_id, reply, 1002)


@pytest.mark.parametrize(
    "bad_frame",
    [
        pytest.param(wire.frame(0x3, b"{}"), id="opcode-3"),
        pytest.param(wire.frame(0x7, b"{}"), id="opcode-7"),
        pytest.param(wire.frame(0xB, b""), id="control-opcode-11"),
        pytest.param(wire.frame(0xF, b""), id="control-opcode-15"),
        pytest.param(wire.frame(wire.OP_TEXT, b"{}", rsv=4), id="rsv1"),
        pytest.param(wire.frame(wire.OP_TEXT, b"{}", rsv=2), id="rsv2"),
        pytest.param(wire.frame(wire.OP_TEXT, b"{}", rsv=1), id="rsv3"),
    ],
)
async def test_reserved_opcodes_and_rsv_bits_are_closed_with_1002(bad_frame: bytes) -> None:
    async with scene() as s:
        client_id, reply = await _violation(s, bad_frame)
    _assert_protocol_close(s, client_id, reply, 1002)


async def test_invalid_utf8_in_a_text_frame_is_closed_with_1007() -> None:
    async with scene() as s:
        client_id, reply = await _violation(s, wire.frame(wire.OP_TEXT, b'{"to": "\xff\xfe"}'))
    _assert_protocol_close(s, client_id, reply, 1007)


@pytest.mark.parametrize("payload", [False, True], ids=["no-payload", "payload-follows"])
async def test_a_length_field_of_2_63_minus_1_gets_a_close_frame(payload: bool) -> None:
    """The header alone says the frame is over ``max_message_bytes``: refuse it at once.

    The right answer is a close frame (1009, the frame is too big; 1002 would
    do), promptly and without buffering. With ``payload-follows`` the client
    keeps sending the frame's body; relayd must close once it has read
    ``max_message_bytes`` of it at the latest, and hold no more than that.
    """
    limit = 65536
    declared = (1 << 63) - 1
    body = b"x" * (4 << 20) if payload else b""
    frame = wire.frame(wire.OP_TEXT, body, length=declared)
    async with scene(max_message_bytes=limit) as s, s.bystanders.throughout():
        stream, client_id = await _raw_client(s.url)
        received = bytearray(b"\r\n\r\n")
        with _peak_rss_growth() as growth:
            async with stream, trio.open_nursery() as nursery:

                async def send() -> None:
                    with contextlib.suppress(trio.BrokenResourceError):
                        await stream.send_all(frame)

                nursery.start_soon(send)
                with trio.move_on_after(PROMPT_S):
                    received += await read_until_closed(stream)
                nursery.cancel_scope.cancel()
    code = wire.close_code(bytes(received))
    assert code in (1009, 1002), (
        f"no close frame within {PROMPT_S} s of a header declaring {declared} bytes"
        f" ({'with' if payload else 'without'} payload); relayd sent {bytes(received)[4:]!r}"
    )
    assert growth[0] < 4 * limit + RSS_SLACK_BYTES
    [close] = s.closes(client_id)
    assert (close["code"], close["closed_by"]) == (code, "server")


# -- envelopes ---------------------------------------------------------------------------


async def test_100000_nested_brackets_get_invalid_json_and_the_connection_stays_open() -> None:
    depth = 100_000
    frame = '{"to": "x", "message": ' + "[" * depth + "]" * depth + "}"
    async with (
        scene(max_message_bytes=300_000) as s,
        s.bystanders.throughout(),
        connect(s.url, v1=True, local_address=HOSTILE_IP) as hostile,
    ):
        await hostile.ws.send_message(frame)
        reply = await hostile.recv_json()
        assert (reply["type"], reply["error"], reply["ref"]) == ("error", "invalid_json", None)
        await hostile.send(hostile.id, "still open", ref=1)
        assert await hostile.recv_json() == {
            "type": "message",
            "from": hostile.id,
            "message": "still open",
        }
        assert await hostile.recv_json() == {"type": "ack", "ref": 1}
    assert [e["outcome"] for e in s.of("message.relay") if e["from"] == hostile.id] == [
        "invalid_json",
        "delivered",
    ]


async def test_a_10000_character_to_gets_invalid_envelope_with_its_ref() -> None:
    async with (
        scene() as s,
        s.bystanders.throughout(),
        connect(s.url, v1=True, local_address=HOSTILE_IP) as hostile,
    ):
        await hostile.send("x" * 10_000, "hello", ref="long-to")
        reply = await hostile.recv_json()
        assert (reply["type"], reply["error"], reply["ref"]) == (
            "error",
            "invalid_envelope",
            "long-to",
        )
        await hostile.send(hostile.id, "still open", ref="ok")
        assert (await hostile.recv_json())["message"] == "still open"
        assert await hostile.recv_json() == {"type": "ack", "ref": "ok"}
    events = [e for e in s.of("message.relay") if e["from"] == hostile.id]
    assert [(e["outcome"], e["to"]) for e in events] == [
        ("invalid_envelope", None),  # the 10,000 characters are not logged
        ("delivered", hostile.id),
    ]


# -- floods ------------------------------------------------------------------------------


async def test_a_connection_flood_from_one_ip_gets_503_and_spares_other_ips() -> None:
    per_ip = 16
    extra = 48
    async with (
        # Handshakes in progress have their own per-address cap; here it is out of the way.
        scene(
            max_connections_per_ip=per_ip, max_connections=1_000, max_handshakes_per_ip=1_000
        ) as s,
        s.bystanders.throughout(),
        contextlib.AsyncExitStack() as held,
    ):
        for _ in range(per_ip):  # fill the address's quota, one by one
            stream, _ = await _raw_client(s.url)
            await held.enter_async_context(stream)
        replies: list[bytes] = []

        async def one_too_many() -> None:
            replies.append(
                await send_and_read(s.url, wire.upgrade_request(), local_address=HOSTILE_IP)
            )

        async with trio.open_nursery() as flood:  # then all at once
            for _ in range(extra):
                flood.start_soon(one_too_many)
        assert len(replies) == extra
        for reply in replies:
            assert reply.startswith(b"HTTP/1.1 503 "), reply
            assert reply.endswith(b"too many connections from this address")
        # While the flood holds its quota, other addresses still get in.
        with trio.fail_after(EXCHANGE_TIMEOUT_S):
            await exchange(s.url, local_address=NEWCOMER_IP)
    rejected = s.of("handshake.rejected")
    assert [(e["status"], e["reason"]) for e in rejected] == [
        (503, "too many connections from this address")
    ] * extra
    assert {e["peer"].rpartition(":")[0] for e in rejected} == {HOSTILE_IP}


async def test_a_message_flood_gets_rate_limited_then_closed_with_1008() -> None:
    limits = {"messages_per_second": 20, "message_burst": 10}
    async with (
        scene(**limits) as s,
        s.bystanders.throughout(),
        connect(s.url, v1=True, local_address=HOSTILE_IP) as flooder,
    ):
        # One at a time, far faster than 20/s: the burst, then refusals.
        outcomes = []
        for n in range(1_000):
            await flooder.send("nobody", n, ref=n)
            outcomes.append(await _outcome(flooder))
            if outcomes[-1] == "rate_limited":
                break
        assert outcomes[-1] == "rate_limited"
        assert set(outcomes[:-1]) == {"unknown_recipient"}
        assert len(outcomes) - 1 >= limits["message_burst"]

        # Then without waiting for replies, until relayd closes it.
        async def flood() -> None:
            with contextlib.suppress(ConnectionClosed):
                for n in range(10_000):
                    await flooder.send("nobody", n)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            frames, code = await flooder.until_closed()
        assert code == 1008
        assert flooder.ws.closed is not None
        assert flooder.ws.closed.reason == "rate limit exceeded"
        assert {json.loads(f)["error"] for f in frames} <= {"rate_limited", "unknown_recipient"}
    _assert_closed_for_a_limit(s, flooder.id, 1008, "rate limit exceeded", "messages_per_second")
    assert [e["action"] for e in s.of("limit.exceeded")] == ["close"]


async def test_a_recipient_that_never_reads_makes_senders_busy_then_is_closed_with_1013() -> None:
    """Its outbox fills, senders get recipient_busy, it is closed, memory stays bounded.

    Memory: relayd may hold, for the stuck recipient, ``outbox_messages``
    frames plus one in the writer's hands and one in trio-websocket's send
    path, each at most ``max_message_bytes`` plus its envelope; and for each
    sender the frame it is reading (its receive buffer, the text, the decoded
    envelope: a few copies of ``max_message_bytes``). The senders offer 36 MB,
    more than three times that bound plus the slack, so a relayd that queued
    instead of refusing could not pass.
    """
    limits = {
        "outbox_messages": 4,
        "slow_consumer_timeout_s": 1.0,
        "messages_per_second": 10_000,
        "message_burst": 10_000,
        "max_message_bytes": 70_000,
    }
    senders, per_sender, big = 4, 150, "z" * 60_000
    max_bytes = limits["max_message_bytes"]
    bound = (limits["outbox_messages"] + 2) * max_bytes + senders * 4 * max_bytes + RSS_SLACK_BYTES
    assert senders * per_sender * len(big) > 3 * bound
    async with scene(**limits) as s:
        stuck, stuck_id = await _raw_client(s.url)
        outcomes: list[list[str]] = [[] for _ in range(senders)]

        async def send_all_of(i: int, sender: Client) -> None:
            for n in range(per_sender):
                await sender.send(stuck_id, big, ref=n)
                outcomes[i].append(await _outcome(sender))

        with _peak_rss_growth() as growth:
            async with (
                s.bystanders.throughout(),
                connect(s.url, v1=True, local_address=HOSTILE_IP) as s0,
                connect(s.url, v1=True, local_address=HOSTILE_IP) as s1,
                connect(s.url, v1=True, local_address=HOSTILE_IP) as s2,
                connect(s.url, v1=True, local_address=HOSTILE_IP) as s3,
            ):
                async with trio.open_nursery() as nursery:
                    for i, sender in enumerate((s0, s1, s2, s3)):
                        nursery.start_soon(send_all_of, i, sender)
                await _probe_until_gone(s0, stuck_id)
                await stuck.aclose()
    assert growth[0] < bound, f"RSS rose {growth[0]} bytes; bound {bound}"
    everything = [o for per in outcomes for o in per]
    assert "ack" in everything
    assert "recipient_busy" in everything
    for per in outcomes:  # once closed, its id never comes back
        assert set(per) <= {"ack", "recipient_busy", "unknown_recipient"}
        if "unknown_recipient" in per:
            first = per.index("unknown_recipient")
            assert set(per[first:]) == {"unknown_recipient"}
    _assert_closed_for_a_limit(
        s, stuck_id, 1013, "slow consumer: outbox stayed full", "slow_consumer_timeout_s"
    )


@pytest.mark.parametrize("how", ["reset", "fin"])
async def test_a_client_that_vanishes_without_a_close_frame_is_logged_1006_and_freed(
    how: str,
) -> None:
    async with (
        scene() as s,
        s.bystanders.throughout(),
        connect(s.url, v1=True, local_address=BYSTANDER_IP) as prober,
    ):
        stream, gone_id = await _raw_client(s.url)
        await prober.send(gone_id, "last words", ref="last")
        assert await _outcome(prober) == "ack"
        last = wire.frame(wire.OP_TEXT, b"last words", mask=False)
        received = b""
        while len(received) < len(last):  # read it, so that close() sends a FIN
            chunk = await stream.receive_some(len(last) - len(received))
            assert chunk
            received += chunk
        assert received == last
        if how == "reset":
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()
        acked_after = await _probe_until_gone(prober, gone_id)
    [close] = s.closes(gone_id)
    assert (close["code"], close["closed_by"]) == (1006, "client")
    # Every frame relayd accepted for it was written or is counted undelivered.
    written = close["messages_out"] - 1  # less the id frame
    assert written + close["undelivered"] == 1 + acked_after


async def test_silent_and_half_sent_handshakes_from_one_address_do_not_lock_out_another() -> None:
    """Handshakes in progress have their own pool: they never take an established place.

    The hostile address opens 40 connections, alternately sending nothing and
    half a request, and holds them. Four of them are in progress at once (its
    share); every other one is closed at once, unanswered. The newcomers from
    another address still connect: the six established places hold the
    bystanders, the newcomers and room to spare. Before issue 8 the held
    sockets counted against max_connections, and the newcomers got 503.
    """
    share = 4
    limits = {"max_connections": 6, "max_handshakes": 100, "max_handshakes_per_ip": share}
    half = wire.upgrade_request()[:40]
    async with (
        scene(**limits, handshake_timeout_s=3600.0) as s,
        s.bystanders.throughout(),
        contextlib.AsyncExitStack() as held,
    ):
        replies: list[bytes] = []
        for n in range(40):
            stream = await open_raw(s.url, half if n % 2 else b"", local_address=HOSTILE_IP)
            await held.enter_async_context(stream)
            if n >= share:  # over its share: closed, nothing said
                with trio.fail_after(PROMPT_S):
                    replies.append(await read_until_closed(stream))
        assert replies == [b""] * (40 - share)
        assert s.server.gate.handshakes.from_ip(HOSTILE_IP) == share
        with trio.fail_after(EXCHANGE_TIMEOUT_S):
            await exchange(s.url, local_address=NEWCOMER_IP)
    dropped = [e for e in s.of("handshake.rejected") if e["reason"].startswith("too many hand")]
    assert {(e["status"], e["reason"], e["peer"].rpartition(":")[0]) for e in dropped} == {
        (None, "too many handshakes in progress from this address", HOSTILE_IP)
    }
    assert len(dropped) == 40 - share
    assert s.server.stats.dropped == {"max_handshakes_per_ip": 36}
    assert s.server.gate.handshakes.total == 0


# -- frame floods ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flood",
    [
        pytest.param(wire.frame(wire.OP_CONT, b"", fin=False), id="empty-continuations"),
        pytest.param(wire.frame(wire.OP_CONT, b"x", fin=False), id="one-byte-fragments"),
        pytest.param(wire.frame(0x9, b""), id="empty-pings"),
        pytest.param(wire.frame(0xA, b""), id="empty-pongs"),
    ],
)
async def test_a_frame_flood_is_closed_with_1008_too_many_frames(flood: bytes) -> None:
    """Frames are paced, not only messages: 20,000 of them at once pass any frame budget."""
    count = 20_000
    head = wire.frame(wire.OP_TEXT, b"", fin=False) if flood[0] & 0x0F == wire.OP_CONT else b""
    async with scene() as s, s.bystanders.throughout():
        stream, client_id = await _raw_client(s.url)
        async with stream, trio.open_nursery() as nursery:

            async def send() -> None:
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(head + flood * count)

            nursery.start_soon(send)
            with trio.fail_after(PROMPT_S):
                reply = b"\r\n\r\n" + await read_until_closed(stream)
            nursery.cancel_scope.cancel()
    assert wire.close_code(reply) == 1008
    closing = (wire.OP_CLOSE, (1008).to_bytes(2, "big") + b"too many frames")
    assert closing in wire.server_frames(reply)
    _assert_closed_for_a_limit(s, client_id, 1008, "too many frames", "frames_per_second")


async def test_an_unfinished_message_in_524288_fragments_holds_the_message_not_the_frames() -> None:
    """With pacing lifted, 524,288 one-byte fragments: relayd holds about 512 KiB, not 28 MiB.

    A ping after the fragments comes back as a pong once relayd has parsed them
    all; the peak RSS growth is read then, with the message still unfinished.
    """
    limit = 1 << 19
    limits = {"max_message_bytes": limit, "frames_per_second": 1e9, "frame_burst": 10**9}
    fragment = wire.frame(wire.OP_CONT, b"x", fin=False)
    data = wire.frame(wire.OP_BINARY, b"x", fin=False) + fragment * (limit - 1)
    async with scene(**limits) as s, s.bystanders.throughout():
        stream, client_id = await _raw_client(s.url)
        async with stream:
            with _peak_rss_growth() as growth:
                await stream.send_all(data)
                await stream.send_all(wire.frame(0x9, b"all in?"))
                pong = b""
                while len(pong) < 9:
                    pong += await stream.receive_some(9 - len(pong))
            assert wire.server_frames(pong, after_head=False) == [(0xA, b"all in?")]
    assert growth[0] < 4 * limit + RSS_SLACK_BYTES, f"RSS rose {growth[0]} bytes"
    [close] = s.closes(client_id)
    assert close["code"] == 1006
