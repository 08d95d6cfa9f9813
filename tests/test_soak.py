"""Soak with churn: many clients connect, talk, leave and misbehave at random; nothing is lost.

``CLIENTS`` client slots run against one in-process relayd over loopback for
``SOAK_SECONDS`` (environment, default 20; at most 60 when ``CI`` is set). Each
slot, with its own seeded random generator, opens a ``relayd.v1`` connection,
sends messages with refs to random live ids (now and then to a gone or
unknown id, or in a burst), sends invalid JSON or a binary frame now and then,
and ends the connection in one of four ways: a graceful close, vanishing
(the socket reset, no close frame), a frame over ``max_message_bytes`` (1009),
or a flood (1008). Then it reconnects, with a new id, until time is up.

The clients are written on wsproto rather than trio-websocket: trio-websocket
discards whatever arrives after its own close frame, and the reconciliation
needs every frame relayd wrote up to relayd's close frame.

**The reconciliation** (every figure must hold exactly; a failure lists the
first offences):

Per message (the client ledger; every relay message carries a unique ref and
a unique token in its body):

1. Replies are matched in order against what the sender sent (docs/protocol.md,
   "Matching replies"): each message gets exactly one ``ack`` or ``error``, or
   its sender's connection ended first; the latter are counted as *in flight
   at disconnect*. A reply out of order, twice, or to nothing is an offence.
2. A message is received at most once, by the connection it was addressed
   to, with ``from`` naming its sender, in per-pair send order, and never if
   its sender was told an error.
3. An acked message was received, unless its recipient's connection ended
   first: *acked, recipient left*. Per recipient, those must be covered by
   what relayd's ``connection.close`` says it did not deliver: its
   ``undelivered`` plus, for a client that vanished, the frames relayd wrote
   that the client never read (``messages_out`` less frames received).
   Anything else is *lost*, and lost must be 0.

Per connection (the client ledger against relayd's log):

4. One ``connection.open`` and one ``connection.close`` per id, with the
   expected code and closer (1000 client, 1006 client, 1009 server, 1008
   server).
5. A client that read to relayd's close frame received exactly
   ``messages_out`` frames; one that vanished, at most that many.
6. ``message.relay`` events from the id: one per frame relayd read (but the
   frame that got it closed for flooding), so equal to the replies the client
   got plus replies to frames in flight at disconnect (at most that many).
7. ``message.relay`` events delivered to the id: equal to the messages it
   received, plus at most ``undelivered`` (+ unread frames if it vanished).
8. relayd's own ledger, for a connection that closed gracefully with nothing
   in flight: ``messages_out + undelivered == 1 (welcome) + delivered to it +
   replies to it``; every frame accepted into its outbox was written or is
   counted undelivered. For the others, the shortfall is at most the replies
   to frames in flight (their sender's outbox was already closed).

Afterwards, once every ``connection.close`` is logged: the gate holds no
connection, the capacity counts none, the router has no route; and RSS is
back within ``RSS_BOUND_BYTES`` of the baseline taken after a warm-up.

This test is synchronous and runs its own ``trio.run`` under its own
``trio.fail_after``: the conftest deadline (30 s, applied to every async test)
is shorter than a soak.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import gc
import json
import logging
import os
import random
import socket
import struct
from collections.abc import MutableMapping, Sequence
from typing import Any, Final, NoReturn, cast

import structlog
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from relayd.daemon.server import Server
from relayd.routing.local import LocalRouter
from tests.client import running, settings, split_url

_CI: Final = bool(os.environ.get("CI"))
#: Seconds of churn (the drain and the checks come on top).
SOAK_SECONDS: Final = min(float(os.environ.get("SOAK_SECONDS", "20")), 60.0 if _CI else 3600.0)
CLIENTS: Final = int(os.environ.get("SOAK_CLIENTS", "50"))
SEED: Final = int(os.environ.get("SOAK_SEED", "1729"))
#: The whole test, churn included: warm-up, drain and checks take seconds.
DEADLINE_S: Final = SOAK_SECONDS + 60.0
#: A warm-up before the RSS baseline, so lazy imports and caches are in it.
WARMUP_SECONDS: Final = 2.0

LIMITS: Final[dict[str, Any]] = {
    "max_message_bytes": 8192,
    "messages_per_second": 40.0,
    "message_burst": 40,
    # Every simulated user comes from 127.0.0.1, and sends its request only when this
    # one event loop runs it: relayd, which accepts a whole backlog at once, would find
    # more than the default 16 handshakes from "one address" waiting for their requests
    # and drop the rest (handshake.rejected), which users on their own addresses never see.
    "max_handshakes_per_ip": CLIENTS,
}
#: A burst's messages: over the message bucket (its burst, 40), so some are refused
#: ``rate_limited``; under it and the abuse bucket together (80), so relayd never closes
#: the connection for it, however fast the burst goes out. One burst per connection at
#: most: two or three close together could empty both buckets on a fast idle machine
#: (relayd then closes 1008, as documented, and the ledger expected another ending).
BURST: Final = 50
#: A message body's padding, in characters; with the envelope well under 8192.
MAX_PAD: Final = 2000
#: relayd answers a reply in milliseconds; a graceful leaver waits this long
#: for its outstanding replies, and any client this long for relayd's close.
REPLY_WAIT_S: Final = 10.0
CLOSE_WAIT_S: Final = 15.0  # relayd's CLOSE_TIMEOUT_S (5) + LINGER_S (2) + margin
#: Count bounds: sessions per slot, actions per session, frames in a flood.
MAX_SESSIONS: Final = 10_000
MAX_ACTIONS: Final = 1_000
FLOOD_FRAMES: Final = 2_000
FLOOD_BATCH: Final = 50
#: RSS after the soak, all clients gone, against the baseline after warm-up.
#: Churning a few thousand connections: a leak of one 4 KiB object per
#: connection, or of every message body, passes this line; relayd's
#: per-connection state (trio-websocket, wsproto, a 64 KiB receive buffer,
#: the outbox) leaked for each connection would be tens of MB.
RSS_BOUND_BYTES: Final = 16 << 20

Ending = str  # "graceful" | "vanish" | "oversize" | "flood"
EXPECTED_CLOSE: Final[dict[Ending, tuple[int, str]]] = {
    "graceful": (1000, "client"),
    "vanish": (1006, "client"),
    "oversize": (1009, "server"),
    "flood": (1008, "server"),
}


# -- relayd's side: its log, tallied ------------------------------------------------------


class LogTally:
    """A structlog processor that counts relayd's events instead of keeping them.

    Keeping every ``message.relay`` event (tens of thousands) would itself
    move RSS; counters per id do not, much.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start counting afresh (at a moment when no connection is open)."""
        self.relay_from: collections.Counter[str] = collections.Counter()
        self.delivered_to: collections.Counter[str] = collections.Counter()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.opens: collections.Counter[str] = collections.Counter()
        self.closes: dict[str, list[MutableMapping[str, Any]]] = collections.defaultdict(list)
        self.limits: collections.Counter[str] = collections.Counter()
        self.others: list[MutableMapping[str, Any]] = []  # error, handshake.rejected, ...
        self.open_now = 0
        self.quiet = trio.Event()  # set whenever no connection is open
        self.quiet.set()

    def __call__(self, _logger: object, _method: str, event: MutableMapping[str, Any]) -> NoReturn:
        name = event["event"]
        if name == "message.relay":
            self.relay_from[event["from"]] += 1
            self.outcomes[event["outcome"]] += 1
            if event["outcome"] == "delivered":
                self.delivered_to[event["to"]] += 1
        elif name == "connection.open":
            self.opens[event["id"]] += 1
            self.open_now += 1
            if self.quiet.is_set():
                self.quiet = trio.Event()
        elif name == "connection.close":
            self.closes[event["id"]].append(event)
            self.open_now -= 1
            if self.open_now == 0:
                self.quiet.set()
        elif name == "limit.exceeded":
            self.limits[event["limit"]] += 1
        elif name not in ("server.start", "server.ready", "server.stop"):
            self.others.append(event)
        raise structlog.DropEvent

    def logger(self) -> structlog.typing.FilteringBoundLogger:
        return cast(
            structlog.typing.FilteringBoundLogger,
            structlog.wrap_logger(
                structlog.PrintLogger(),
                processors=[self],
                wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
            ),
        )


# -- the clients' side: the ledger --------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Sent:
    """One relay message: who sent it where, and what became of it."""

    sender: str
    to: str
    outcome: str | None = None  # "ack", an error code, or "in_flight"
    received: bool = False


@dataclasses.dataclass(slots=True)
class Conn:
    """One connection as its client saw it."""

    id: str
    ending: Ending = "graceful"
    pending: collections.deque[tuple[str, int | None]] = dataclasses.field(
        default_factory=collections.deque
    )  # (expected error code or "msg", message number) in send order
    frames: int = 1  # the welcome
    messages: int = 0
    replies: int = 0
    sent_frames: int = 0
    in_flight: int = 0  # replies still owed when the connection ended
    read_to_close: bool = False  # read every frame up to relayd's close frame
    close_code: int | None = None
    drained: trio.Event = dataclasses.field(default_factory=trio.Event)


class Ledger:
    """Everything every client sent and received, and what it saw wrong at once."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.conns: dict[str, Conn] = {}
        self.live: list[str] = []  # ids whose clients are still sending
        self.gone: collections.deque[str] = collections.deque(maxlen=50)
        self.last_seen: dict[tuple[str, str], int] = {}
        self.offences: list[str] = []
        self.sessions = 0
        self.dropped = 0  # replies relayd owed a connection that was still open

    def offence(self, text: str) -> None:
        self.offences.append(text)

    def on_message(self, conn: Conn, frame: dict[str, Any]) -> None:
        conn.messages += 1
        body = frame["message"]
        number = int(str(body).partition("|")[0]) if isinstance(body, str) else -1
        if not 0 <= number < len(self.sent):
            self.offence(f"{conn.id} received a message nobody sent: {str(body)[:60]}")
            return
        sent = self.sent[number]
        if (sent.to, sent.sender) != (conn.id, frame["from"]):
            self.offence(f"message {number} for {sent.to} from {sent.sender} reached {conn.id}")
        if sent.received:
            self.offence(f"message {number} received twice")
        if sent.outcome not in (None, "ack", "in_flight", "dropped"):
            self.offence(f"message {number} received although its sender got {sent.outcome}")
        sent.received = True
        pair = (sent.sender, sent.to)
        if self.last_seen.get(pair, -1) > number:
            self.offence(f"message {number} from {sent.sender} to {sent.to} out of order")
        self.last_seen[pair] = number

    def on_reply(self, conn: Conn, frame: dict[str, Any]) -> None:
        conn.replies += 1
        if not conn.pending:
            self.offence(f"{conn.id} got a reply to nothing: {frame}")
            return
        kind = "ack" if frame["type"] == "ack" else frame.get("error")
        ref = frame.get("ref")
        later = [n for e, n in conn.pending if e == "msg" and n is not None]
        if isinstance(ref, int) and ref in later and conn.pending[0][1] != ref:
            # Replies come in order, so the ones before this were never sent.
            while conn.pending[0][1] != ref:
                expected, number = conn.pending.popleft()
                self.dropped += 1
                self.offence(f"{conn.id}: no reply to {expected} {number}; relayd dropped it")
                if number is not None and expected == "msg":
                    self.sent[number].outcome = "dropped"
        expected, number = conn.pending.popleft()
        if not conn.pending:
            conn.drained.set()
        if expected == "msg":
            assert number is not None
            sent = self.sent[number]
            # Every reply to a message carries its ref, a refusal for its rate too.
            ok = ref == number and kind in (
                "ack",
                "unknown_recipient",
                "recipient_busy",
                "rate_limited",
            )
            if not ok:
                self.offence(f"{conn.id}: reply {frame} to message {number}")
            if sent.outcome is not None:
                self.offence(f"message {number} answered twice")
            sent.outcome = str(kind)
            if kind != "ack" and sent.received:
                self.offence(f"message {number} was received but its sender got {kind}")
        elif ref is not None or kind not in (expected, "rate_limited"):
            self.offence(f"{conn.id}: reply {frame} to a frame expecting {expected}")

    def ended(self, conn: Conn) -> None:
        """The connection is over: what it still waited for was in flight."""
        conn.in_flight = len(conn.pending)
        for expected, number in conn.pending:
            if expected == "msg" and number is not None:
                self.sent[number].outcome = "in_flight"
        conn.pending.clear()
        conn.drained.set()


# -- a relayd.v1 client on wsproto -----------------------------------------------------------


class SoakClient:
    """One connection: a reader task that feeds the ledger, and sends from the owner.

    Resource handling: :meth:`session` owns the TCP stream and closes it.
    """

    def __init__(self, stream: trio.SocketStream, ledger: Ledger) -> None:
        self.stream = stream
        self.ledger = ledger
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.lock = trio.Lock()
        self.conn: Conn | None = None
        self.welcomed = trio.Event()
        self.finished = trio.Event()

    @property
    def can_send(self) -> bool:
        return self.ws.state is ConnectionState.OPEN

    async def send_event(self, event: Event) -> None:
        data = self.ws.send(event)
        async with self.lock:
            await self.stream.send_all(data)

    async def send_frame(self, text: str | bytes, expect: str, number: int | None) -> bool:
        """Send one frame expecting ``expect`` in reply; False once it cannot be sent."""
        return await self.send_frames([(text, expect, number)])

    async def send_frames(self, frames: Sequence[tuple[str | bytes, str, int | None]]) -> bool:
        """Send frames in one write, each expecting its reply; False once they cannot be sent."""
        assert self.conn is not None
        if not self.can_send:
            return False
        data = b""
        for text, expect, number in frames:
            event: Event = (
                TextMessage(data=text) if isinstance(text, str) else BytesMessage(data=text)
            )
            data += self.ws.send(event)
            self.conn.sent_frames += 1
            if expect:
                self.conn.pending.append((expect, number))
                self.conn.drained = trio.Event()
        try:
            async with self.lock:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def read(self, host: str) -> None:
        """Handshake, then read to the end; every frame goes to the ledger at once."""
        parts: list[str] = []
        try:
            await self.send_event(Request(host=host, target="/", subprotocols=["relayd.v1"]))
            while True:
                for event in self.ws.events():
                    if isinstance(event, AcceptConnection):
                        continue
                    if isinstance(event, RejectConnection):
                        self.ledger.offence(f"handshake refused: {event.status_code}")
                        return
                    if isinstance(event, Ping):
                        if self.ws.state is ConnectionState.OPEN:
                            await self.send_event(event.response())
                    elif isinstance(event, CloseConnection):
                        await self._closed(event)
                        return
                    elif isinstance(event, TextMessage):
                        parts.append(event.data)
                        if event.message_finished:
                            self._frame("".join(parts))
                            parts.clear()
                    else:
                        self.ledger.offence(f"unexpected event {event!r}")
                data = await self.stream.receive_some(65536)
                self.ws.receive_data(data or None)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # our own reset, or relayd's reset of a vanishing client
        finally:
            self.finished.set()

    async def _closed(self, event: CloseConnection) -> None:
        assert self.conn is not None
        self.conn.close_code = event.code
        self.conn.read_to_close = event.code != 1006
        if self.ws.state is ConnectionState.REMOTE_CLOSING:
            await self.send_event(event.response())

    def _frame(self, text: str) -> None:
        frame = json.loads(text)
        if self.conn is None:
            assert frame["type"] == "welcome", frame
            self.conn = Conn(id=frame["id"])
            self.ledger.conns[self.conn.id] = self.conn
            self.welcomed.set()
            return
        self.conn.frames += 1
        if frame["type"] == "message":
            self.ledger.on_message(self.conn, frame)
        else:
            self.ledger.on_reply(self.conn, frame)


# -- one slot: sessions until time is up -----------------------------------------------------


class Slot:
    """One simulated user: connects, talks, leaves somehow, reconnects, until ``end``."""

    def __init__(self, url: str, ledger: Ledger, rng: random.Random, end: float) -> None:
        self.url = url
        self.ledger = ledger
        self.rng = rng
        self.end = end

    async def run(self) -> None:
        for _ in range(MAX_SESSIONS):
            if trio.current_time() >= self.end:
                return
            await self.session()
            await trio.sleep(self.rng.uniform(0, 0.05))  # think time between sessions
        self.ledger.offence(f"a slot ran {MAX_SESSIONS} sessions")

    async def session(self) -> None:
        host, port, _ = split_url(self.url)
        stream = await trio.open_tcp_stream(host, port)
        client = SoakClient(stream, self.ledger)
        self.ledger.sessions += 1
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(client.read, host)
            with trio.fail_after(REPLY_WAIT_S):
                await client.welcomed.wait()
            conn = client.conn
            assert conn is not None
            self.ledger.live.append(conn.id)
            try:
                conn.ending = await self.talk(client)
            finally:
                self.ledger.live.remove(conn.id)
                self.ledger.gone.append(conn.id)
            await self.leave(client, conn, stream)
            nursery.cancel_scope.cancel()
        self.ledger.ended(conn)

    async def talk(self, client: SoakClient) -> Ending:
        """Send for a while; return how this connection is going to end."""
        rng = self.rng
        session_end = min(self.end, trio.current_time() + rng.uniform(0.2, 4.0))
        burst = True  # one left
        for _ in range(MAX_ACTIONS):
            if trio.current_time() >= session_end or not client.can_send:
                break
            roll = rng.random()
            if roll < 0.04:
                await client.send_frame("{not json", "invalid_json", None)
            elif roll < 0.08:
                await client.send_frame(b"\x00binary", "unsupported_data", None)
            elif roll < 0.10 and burst:
                burst = False
                for _ in range(BURST):  # a burst over the rate limit, once
                    await self.send_message(client)
            else:
                await self.send_message(client)
            await trio.sleep(rng.uniform(0.005, 0.08))
        if trio.current_time() >= self.end:
            return "graceful"  # time is up: everyone leaves properly
        return rng.choices(["graceful", "vanish", "oversize", "flood"], [70, 12, 10, 8])[0]

    async def send_message(self, client: SoakClient, to: str | None = None) -> bool:
        if not client.can_send:
            return False
        return await client.send_frames([self.message(client, to)])

    def message(self, client: SoakClient, to: str | None = None) -> tuple[str, str, int]:
        """A new relay message, entered in the ledger: ``(frame, "msg", number)``."""
        ledger, rng = self.ledger, self.rng
        assert client.conn is not None
        if to is None:
            roll = rng.random()
            if roll < 0.03 and ledger.gone:
                to = rng.choice(ledger.gone)
            elif roll < 0.05:
                to = "nobody-" + str(rng.randrange(1000))
            else:
                to = rng.choice(ledger.live)
        number = len(ledger.sent)
        ledger.sent.append(Sent(sender=client.conn.id, to=to))
        body = f"{number}|" + "x" * rng.randrange(MAX_PAD)
        envelope = json.dumps({"to": to, "message": body, "ref": number})
        return envelope, "msg", number

    async def leave(self, client: SoakClient, conn: Conn, stream: trio.SocketStream) -> None:
        if conn.ending == "vanish":
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()
            return
        if conn.ending == "graceful":
            with trio.move_on_after(REPLY_WAIT_S):
                await conn.drained.wait()
            if conn.pending:
                self.ledger.offence(f"{conn.id}: {len(conn.pending)} replies never came")
            if client.can_send:
                await client.send_event(CloseConnection(code=1000))
        elif conn.ending == "oversize":
            await client.send_frame("x" * (LIMITS["max_message_bytes"] + 1), "", None)
        else:  # flood "nobody" without waiting, until relayd closes it
            # FLOOD_BATCH frames per write: a flood outruns the rate limit
            # however slowly this shared event loop goes round.
            for _ in range(FLOOD_FRAMES // FLOOD_BATCH):
                if client.finished.is_set() or not client.can_send:
                    break
                batch = [self.message(client, to="nobody") for _ in range(FLOOD_BATCH)]
                if not await client.send_frames(batch):
                    break
        with trio.move_on_after(CLOSE_WAIT_S):
            await client.finished.wait()
        if not client.finished.is_set():
            self.ledger.offence(f"{conn.id} ({conn.ending}): relayd never closed")


# -- the soak ---------------------------------------------------------------------------------


def _rss_bytes(key: str = "VmRSS") -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Make the kernel's RSS high-water mark (VmHWM) start again from now."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _settle_memory() -> int:
    """RSS after giving free memory back to the system (gc, then glibc's malloc_trim)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: measure without it
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _rss_bytes()


@dataclasses.dataclass
class Figures:
    clients: int = CLIENTS
    seconds: float = 0.0
    sessions: int = 0
    messages: int = 0
    acks: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    in_flight: int = 0
    received: int = 0
    acked_recipient_left: int = 0
    replies_dropped: int = 0
    lost: int = 0
    endings: dict[str, int] = dataclasses.field(default_factory=dict)
    rss_baseline: int = 0
    rss_peak: int = 0
    rss_after: int = 0


async def _churn(url: str, ledger: Ledger, seconds: float, seed: int) -> None:
    end = trio.current_time() + seconds
    async with trio.open_nursery() as nursery:
        for i in range(CLIENTS):
            nursery.start_soon(Slot(url, ledger, random.Random(seed * 1000 + i), end).run)


async def _soak() -> tuple[Figures, list[str]]:
    figures = Figures()
    tally = LogTally()
    log = tally.logger()
    server = Server(settings(**LIMITS), log=log)
    router = server.router
    assert isinstance(router, LocalRouter)
    async with running(server) as url:
        await _churn(url, Ledger(), WARMUP_SECONDS, SEED - 1)
        await _quiesce(tally)
        figures.rss_baseline = _settle_memory()
        _reset_peak_rss()
        tally.reset()  # count the soak alone
        ledger = Ledger()
        began = trio.current_time()
        await _churn(url, ledger, SOAK_SECONDS, SEED)
        await _quiesce(tally)
        figures.seconds = round(trio.current_time() - began, 1)
        figures.rss_peak = _rss_bytes("VmHWM")
        assert server.gate.connections == set()
        assert server.gate.capacity.total == 0
        assert router.routes == 0
        offences = _reconcile(ledger, tally, figures)
        del ledger
        figures.rss_after = _settle_memory()
    return figures, offences


async def _quiesce(tally: LogTally) -> None:
    """Wait until relayd has logged the close of every connection, and settled."""
    with trio.fail_after(CLOSE_WAIT_S):
        await tally.quiet.wait()
    await trio.testing.wait_all_tasks_blocked()


def _reconcile(ledger: Ledger, tally: LogTally, figures: Figures) -> list[str]:
    """Check the ledger against relayd's log; fill in ``figures``; return the offences."""
    offences = ledger.offences
    figures.sessions = ledger.sessions
    figures.replies_dropped = ledger.dropped
    figures.messages = len(ledger.sent)
    outcomes = collections.Counter(s.outcome or "unanswered" for s in ledger.sent)
    figures.acks = outcomes.pop("ack", 0)
    figures.in_flight = outcomes.pop("in_flight", 0)
    if "unanswered" in outcomes:
        offences.append(f"{outcomes.pop('unanswered')} messages neither answered nor in flight")
    figures.errors = dict(outcomes)
    figures.received = sum(s.received for s in ledger.sent)
    figures.endings = dict(collections.Counter(c.ending for c in ledger.conns.values()))

    # 3. acked, never received: its recipient must have left, and relayd must say so.
    unreceived: collections.Counter[str] = collections.Counter(
        s.to for s in ledger.sent if s.outcome == "ack" and not s.received
    )
    figures.acked_recipient_left = sum(unreceived.values())
    for to, count in unreceived.items():
        conn = ledger.conns.get(to)
        closes = tally.closes.get(to, [])
        if conn is None or len(closes) != 1:
            figures.lost += count
            offences.append(f"{count} acked messages to {to}, which never had one connection")
            continue
        close = closes[0]
        unread = close["messages_out"] - conn.frames if conn.ending == "vanish" else 0
        if count > close["undelivered"] + unread:
            figures.lost += count - close["undelivered"] - unread
            offences.append(
                f"{count} acked messages to {to} ({conn.ending}) never arrived; relayd logged"
                f" undelivered={close['undelivered']}, unread={unread}"
            )

    # 4-8. each connection against relayd's log.
    for conn in ledger.conns.values():
        closes = tally.closes.get(conn.id, [])
        if tally.opens[conn.id] != 1 or len(closes) != 1:
            offences.append(f"{conn.id}: {tally.opens[conn.id]} opens, {len(closes)} closes")
            continue
        close = closes[0]
        where = f"{conn.id} ({conn.ending})"
        if (close["code"], close["closed_by"]) != EXPECTED_CLOSE[conn.ending]:
            offences.append(f"{where}: closed {close['code']} by {close['closed_by']}")
        out, undelivered = close["messages_out"], close["undelivered"]
        if conn.ending == "vanish":
            if conn.frames > out:
                offences.append(f"{where}: received {conn.frames} frames, relayd wrote {out}")
        elif conn.frames != out or not conn.read_to_close:
            offences.append(f"{where}: received {conn.frames} frames, relayd wrote {out}")
        relayed = tally.relay_from[conn.id]
        if not conn.replies <= relayed <= conn.replies + conn.in_flight:
            offences.append(
                f"{where}: {relayed} message.relay events from it, {conn.replies} replies"
                f" received, {conn.in_flight} in flight"
            )
        delivered = tally.delivered_to[conn.id]
        unread = out - conn.frames if conn.ending == "vanish" else 0
        if not conn.messages <= delivered <= conn.messages + undelivered + unread:
            offences.append(
                f"{where}: {delivered} delivered to it, {conn.messages} received,"
                f" undelivered={undelivered}, unread={unread}"
            )
        accepted = 1 + delivered + relayed  # welcome, deliveries, replies
        shortfall = accepted - (out + undelivered)
        allowed = 0 if conn.ending == "graceful" else conn.in_flight
        if not 0 <= shortfall <= allowed:
            offences.append(
                f"{where}: accepted into its outbox {accepted}, written {out} + undelivered"
                f" {undelivered}: {shortfall} frames unaccounted for"
            )
    if tally.others:  # no internal error, no refused handshake
        offences.append(f"unexpected events: {tally.others[:5]}")
    return offences


def test_soak_with_churn_loses_nothing_and_leaves_nothing_behind() -> None:
    async def main() -> tuple[Figures, list[str]]:
        with trio.fail_after(DEADLINE_S):
            return await _soak()

    figures, offences = trio.run(main)
    print(f"soak figures: {figures}")  # shown with -s or -rA
    assert not offences, f"{len(offences)} offences; the first: {offences[:12]}; {figures}"
    assert figures.lost == 0
    assert figures.messages > 0
    assert figures.acks > 0
    assert figures.errors.get("rate_limited", 0) > 0  # the bursts went over the limit
    growth = figures.rss_after - figures.rss_baseline
    assert growth < RSS_BOUND_BYTES, f"RSS grew {growth} bytes over the soak: {figures}"
