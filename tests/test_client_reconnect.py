"""``relayd.client`` reconnecting: after a restart of an in-process relayd and of a real one.

A relayd that restarts closes its clients with 1001; a client with ``reconnect=Backoff(...)``
connects again, gets a new id (reported by ``Client.ids()``), and its program goes on
sending and iterating. What cannot pass (1008, a 401) is raised, never retried. The real
relayd is the installed ``relayd`` command, started and stopped as an operator would
(tests/e2e/harness.py). Nothing sleeps: each wait is on the client or on relayd's log.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import pytest
import trio
import trio.testing
import trustme
from pydantic import SecretStr

import relayd.client.backoff
from relayd.client import (
    Backoff,
    Client,
    ConnectError,
    ConnectionLost,
    ConnectTimeout,
    HandshakeRefused,
    PolicyViolation,
    ServerShuttingDown,
    connect,
)
from relayd.config import AuthSettings, ServerSettings, Settings
from relayd.daemon.credentials import load_authenticator
from relayd.daemon.server import Server
from relayd.wire.frames import OP_TEXT, FrameParser
from relayd.wire.handshake import refusal_response
from relayd.wire.server_frames import close_frame
from tests.client import running, settings
from tests.e2e.harness import RelaydProcess, relayd_command, relayd_env
from tests.test_client import accept_v1, serve_tcp

#: A static token: relayd refuses them under 16 characters.
ALICE: Final = "alice-token-0123456789"
#: Quick retries: the restarts here take milliseconds (in-process) to a second or two.
QUICK: Final = Backoff(first_s=0.05, max_s=0.5)


class Served:
    """One in-process relayd run in a nursery: its URL, and an event set once it stopped."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.url = ""
        self.stopped = trio.Event()

    async def run(
        self,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await self.server.run(task_status=task_status)
        finally:
            self.stopped.set()

    async def stop(self) -> None:
        self.server.shutdown("restart")
        await self.stopped.wait()


def on_port(base: Settings, url: str) -> Settings:
    """``base`` listening on the port of ``url`` (a restart on the same address)."""
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    return base.model_copy(
        update={"server": ServerSettings(host="127.0.0.1", port=port, shutdown_grace_s=5.0)}
    )


async def serve(nursery: trio.Nursery, server: Server) -> Served:
    """Start ``server`` in ``nursery``; once it listens, what the test needs of it."""
    served = Served(server)
    host, port = (await nursery.start(served.run))[0]
    served.url = f"ws://{host}:{port}/"
    return served


async def test_a_restart_gives_a_new_id_and_the_program_goes_on() -> None:
    async with trio.open_nursery() as servers:
        first = await serve(servers, Server(settings()))
        async with connect(first.url, reconnect=QUICK) as client:
            ids = aiter(client.ids())
            first_id = await anext(ids)
            assert first_id == client.id
            await client.send(client.id, "before")
            await first.stop()  # 1001 to the client, which starts reconnecting
            second = await serve(servers, Server(on_port(settings(), first.url)))
            second_id = await anext(ids)
            assert second_id != first_id
            assert client.id == second_id
            await client.send(second_id, "after")
            received = [(await client.receive()).text for _ in range(2)]
            await second.stop()
        assert received == ["before", "after"]  # one iteration across both connections


async def test_sends_made_while_reconnecting_go_out_in_the_order_they_were_made() -> None:
    # Found by a tester: the sends waiting for the new connection were woken together,
    # and submitted in an order of trio's choosing, another one on each run.
    auth = AuthSettings(mode="token", tokens={"alice": SecretStr(ALICE)})
    base = settings().model_copy(update={"auth": auth})  # alice keeps her id across restarts
    async with trio.open_nursery() as servers:
        first = await serve(servers, Server(base, authenticator=load_authenticator(auth)))
        async with connect(first.url, reconnect=QUICK, token=ALICE) as alice:
            await first.stop()  # 1001: alice reconnects, refused until the restart
            assert alice.closed is not None
            async with trio.open_nursery() as sends:
                for n in range(16):  # in this order: each send waits before the next starts
                    sends.start_soon(alice.send, "alice", n)
                    await trio.testing.wait_all_tasks_blocked()
                restarted = Server(on_port(base, first.url), authenticator=load_authenticator(auth))
                second = await serve(servers, restarted)
            received = [(await alice.receive()).data for _ in range(16)]
            await second.stop()
    assert received == list(range(16))


async def test_reconnecting_gives_up_after_its_attempts_and_says_why() -> None:
    async with trio.open_nursery() as servers:
        only = await serve(servers, Server(settings()))
        async with connect(only.url, reconnect=Backoff(first_s=0.01, attempts=3)) as client:
            await only.stop()
            with pytest.raises(ServerShuttingDown) as closed:
                await client.receive()
            with pytest.raises(ServerShuttingDown):
                await client.send(client.id, "nowhere to go")
            assert [i async for i in client.ids()] == [client.id]  # no new id; it ended
    assert isinstance(closed.value.__cause__, ConnectError)
    assert "Connection refused" in str(closed.value.__cause__)


async def test_a_refusal_that_cannot_pass_is_not_retried() -> None:
    auth = AuthSettings(mode="token", tokens={"alice": SecretStr("alice-token-0123456789")})
    with_auth = settings().model_copy(update={"auth": auth})
    async with trio.open_nursery() as servers:
        first = await serve(servers, Server(settings()))
        async with connect(first.url, reconnect=Backoff(first_s=0.01)) as client:
            await first.stop()
            # It comes back requiring a token this client does not have: 401, for good.
            await serve(
                servers,
                Server(on_port(with_auth, first.url), authenticator=load_authenticator(auth)),
            )
            with pytest.raises(ServerShuttingDown) as closed:
                await client.receive()
        servers.cancel_scope.cancel()
    refused = closed.value.__cause__
    assert isinstance(refused, HandshakeRefused)
    assert (refused.status, refused.retryable) == (401, False)


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
async def test_an_attempt_closed_before_any_answer_is_retried(tls: bool) -> None:
    """An attempt closed before any answer may pass: reconnecting goes on.

    relayd sheds a handshake over its limits so (and a restarting relayd's kernel
    resets one in its backlog); over TLS it is an EOF during the TLS handshake.
    """
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    attempts = 0
    done = trio.Event()

    async def scripted(stream: trio.SocketStream) -> None:
        # The first connection is welcomed and closed 1001 (retryable); the next two
        # attempts are closed at once, as relayd closes a shed handshake; the fourth is
        # welcomed with a new id.
        nonlocal attempts
        attempts += 1
        if attempts in (2, 3):
            await trio.aclose_forcefully(stream)
            return
        wrapped: trio.abc.Stream = stream
        if tls:
            wrapped = trio.SSLStream(stream, server_context, server_side=True)
        await accept_v1(wrapped, f"id-{attempts}")
        if attempts == 1:
            await wrapped.send_all(close_frame(1001, "restarting"))
        await done.wait()
        await trio.aclose_forcefully(wrapped)

    async with trio.open_nursery() as nursery:
        url = await serve_tcp(nursery, scripted)
        if tls:
            url = url.replace("ws://", "wss://")
        quick = Backoff(first_s=0.01, max_s=0.02, attempts=5)
        context = client_context if tls else None
        async with connect(url, reconnect=quick, ssl_context=context) as client:
            ids = aiter(client.ids())
            assert await anext(ids) == "id-1"
            assert await anext(ids) == "id-4"
            done.set()
        nursery.cancel_scope.cancel()
    assert attempts == 4


async def test_a_429_for_the_addresss_failed_authentications_is_retryable() -> None:
    """A 429, refused to any token from an address that failed too often, passes.

    A good client sharing an address with a bad one (a NAT, one backend's many
    connections) is refused with it too: reconnecting must wait it out, not give up.
    """
    auth = AuthSettings(mode="token", tokens={"alice": SecretStr(ALICE)})
    strict = settings(max_auth_failures_per_ip=1).model_copy(update={"auth": auth})
    async with trio.open_nursery() as servers:
        only = await serve(servers, Server(strict, authenticator=load_authenticator(auth)))
        with pytest.raises(HandshakeRefused) as bad:
            async with connect(only.url, token="not-the-token-0123456789"):
                pytest.fail("connected with a bad token")
        with pytest.raises(HandshakeRefused) as good:
            async with connect(only.url, token=ALICE):
                pytest.fail("connected past the address's failures")
        await only.stop()
    assert (bad.value.status, bad.value.retryable) == (401, False)
    assert (good.value.status, good.value.retryable) == (429, True)


async def test_reconnecting_goes_on_through_a_429() -> None:
    attempts = 0
    done = trio.Event()

    async def scripted(stream: trio.SocketStream) -> None:
        # Welcomed and closed 1001; refused with relayd's 429; welcomed again.
        nonlocal attempts
        attempts += 1
        async with stream:
            if attempts == 2:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = await stream.receive_some(4096)
                    assert chunk, "the client closed before its request was whole"
                    head += chunk
                reason = "too many failed authentications from this address"
                await stream.send_all(refusal_response(429, reason))
                return
            await accept_v1(stream, f"id-{attempts}")
            if attempts == 1:
                await stream.send_all(close_frame(1001, "restarting"))
            await done.wait()

    async with trio.open_nursery() as nursery:
        url = await serve_tcp(nursery, scripted)
        quick = Backoff(first_s=0.01, max_s=0.02, attempts=3)
        async with connect(url, reconnect=quick, token=ALICE) as client:
            ids = aiter(client.ids())
            assert await anext(ids) == "id-1"
            assert await anext(ids) == "id-3"  # it ended here: the 429 was final
            done.set()
        nursery.cancel_scope.cancel()
    assert attempts == 3


async def test_a_first_connection_closed_unanswered_is_retryable_and_says_why() -> None:
    async with trio.open_nursery() as nursery:
        url = await serve_tcp(nursery, trio.aclose_forcefully)
        with pytest.raises(ConnectError) as refused:
            async with connect(url):
                pytest.fail("connected to a server that closes every connection")
        nursery.cancel_scope.cancel()
    assert refused.value.retryable
    assert str(refused.value) == (
        f"{url} closed the connection without answering the WebSocket handshake"
        f" (relayd at its handshake limit, or restarting;"
        f" or it speaks {url.replace('ws://', 'wss://')}, not ws://)"
    )


async def _resets(stream: trio.SocketStream) -> None:
    """Resets each connection once accepted, before reading its request (SO_LINGER 0)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def test_a_first_connection_reset_unanswered_is_retryable_at_once() -> None:
    # A reset that came before the upgrade request was written stopped trio-websocket's
    # reader without a read: the client waited out connect_timeout, a ConnectTimeout.
    async with trio.open_nursery() as nursery:
        url = await serve_tcp(nursery, _resets)
        with trio.fail_after(10), pytest.raises(ConnectError) as refused:
            async with connect(url, connect_timeout=60):
                pytest.fail("connected to a server that resets every connection")
        nursery.cancel_scope.cancel()
    assert not isinstance(refused.value, ConnectTimeout)
    assert refused.value.retryable
    assert str(refused.value).startswith(
        f"{url} closed the connection without answering the WebSocket handshake"
    )


async def test_a_policy_close_is_not_retried() -> None:
    abuse = settings(messages_per_second=0.001, message_burst=1)
    async with trio.open_nursery() as servers:
        only = await serve(servers, Server(abuse))
        async with connect(only.url, reconnect=Backoff(first_s=0.01)) as client:
            async with trio.open_nursery() as senders:
                for n in range(3):  # 1 acked, 1 rate_limited, 1 closes the connection
                    senders.start_soon(_quietly, client.send(client.id, n))
            with pytest.raises(PolicyViolation):
                await _receive_until_closed(client)
            assert client.closed is not None
            assert client.closed.code == 1008
        await only.stop()


async def _receive_until_closed(client: Client) -> None:
    while True:
        await client.receive()


async def _quietly(send: Awaitable[None]) -> None:
    try:
        await send
    except Exception as exc:  # what each send came to is not this test's point
        del exc


async def test_a_send_outstanding_at_the_close_raises_the_close() -> None:
    async with trio.open_nursery() as nursery:
        url = await serve_tcp(nursery, _closes_after_one_message)
        async with connect(url) as client:
            with pytest.raises(ServerShuttingDown) as closed:
                await client.send("anyone", "read but never answered")
            assert closed.value.reason == "server shutting down"
        nursery.cancel_scope.cancel()


async def _closes_after_one_message(stream: trio.SocketStream) -> None:
    """A relayd that reads one message, does not answer it, and shuts down."""
    async with stream:
        await accept_v1(stream, "the-id")
        parser = FrameParser(65536)
        frames: list[tuple[int, bytes]] = []
        while not any(op == OP_TEXT for op, _ in frames):
            frames += parser.feed(await stream.receive_some(4096))
        await stream.send_all(close_frame(1001, "server shutting down"))
        while await stream.receive_some(4096):  # the client's close frame, then its FIN
            pass


# -- a real relayd process ---------------------------------------------------------------


@asynccontextmanager
async def relayd_process(config_dir: Path, port: int = 0) -> AsyncIterator[RelaydProcess]:
    """The installed ``relayd`` on loopback; stopped with SIGTERM, which must exit 0."""
    config = config_dir / "relayd.toml"
    config.write_text("[admin]\nport = 0\n", encoding="utf-8")
    argv = [*relayd_command(), "--host", "127.0.0.1", "--port", str(port), "--config", str(config)]
    process = RelaydProcess(argv, relayd_env())
    try:
        await trio.to_thread.run_sync(process.wait_ready)
        yield process
    finally:
        code = await trio.to_thread.run_sync(process.stop)
    process.assert_clean_stop(code)


@pytest.mark.e2e
async def test_a_client_reconnects_after_a_real_relayd_restarts(tmp_path: Path) -> None:
    async with relayd_process(tmp_path) as first:
        port = first.port
        async with connect(first.url, reconnect=QUICK) as client:
            ids = aiter(client.ids())
            first_id = await anext(ids)
            await client.send(first_id, "before the restart")
            assert (await client.receive()).text == "before the restart"
            await trio.to_thread.run_sync(first.stop)  # SIGTERM: relayd closes with 1001
            async with relayd_process(tmp_path, port) as second:
                second_id = await anext(ids)
                await client.send(second_id, "after the restart")
                assert (await client.receive()).text == "after the restart"
                await client.aclose()
                opened = second.wait_for_event("connection.open", id=second_id)
                closed = second.wait_for_event("connection.close", id=second_id)
    assert first_id != second_id
    assert opened["dialect"] == "relayd.v1"
    assert (closed["code"], closed["closed_by"]) == (1000, "client")
    shut = first.wait_for_event("connection.close", id=first_id)
    assert (shut["code"], shut["closed_by"]) == (1001, "server")


# -- the waits between attempts, on trio's virtual clock ---------------------------------


class _Flapping:
    """A relayd that welcomes each connection, keeps it up ``up_s[n]`` s, and ends it.

    ``ending`` is 1011 or 1013 (a close frame, then the client's close and FIN are
    read) or None (the TCP connection is dropped: a 1006 to the client). Each
    welcome's time, on trio's clock, is in ``welcomed``; the connection after the
    last of ``up_s`` is left open.
    """

    def __init__(self, up_s: list[float], ending: int | None) -> None:
        self.up_s = up_s
        self.ending = ending
        self.welcomed: list[float] = []

    async def __call__(self, stream: trio.SocketStream) -> None:
        async with stream:
            n = len(self.welcomed)
            await accept_v1(stream, f"id-{n}")
            self.welcomed.append(trio.current_time())
            if n == len(self.up_s):
                await trio.sleep_forever()
            await trio.sleep(self.up_s[n])
            if self.ending is None:
                await trio.aclose_forcefully(stream)
                return
            await stream.send_all(close_frame(self.ending, "closed at once"))
            while await stream.receive_some(4096):
                pass

    def gaps(self) -> list[float]:
        """From each connection's end to the next one's welcome, in seconds."""
        ends = [t + up for t, up in zip(self.welcomed, self.up_s, strict=False)]
        return [later - end for end, later in zip(ends, self.welcomed[1:], strict=False)]


async def _flap(
    flapping: _Flapping, backoff: Backoff, monkeypatch: pytest.MonkeyPatch
) -> list[float]:
    """Connect to ``flapping`` with ``backoff``, a jitter of one half; its gaps."""
    monkeypatch.setattr(relayd.client.backoff, "random", _Halves())
    async with trio.open_nursery() as nursery:
        url = await serve_tcp(nursery, flapping)
        async with connect(url, reconnect=backoff, keepalive_s=None) as client:
            async for client_id in client.ids():
                if client_id == f"id-{len(flapping.up_s)}":  # the one left open
                    break
        nursery.cancel_scope.cancel()
    return flapping.gaps()


class _Halves:
    """Stands for the :mod:`random` module in relayd.client.backoff: every jitter is 0.5."""

    @staticmethod
    def random() -> float:
        return 0.5


@pytest.mark.parametrize("ending", [1011, 1013, None], ids=["1011", "1013", "dropped"])
async def test_connections_closed_at_once_keep_growing_the_wait(
    ending: int | None, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by a tester: each successful connection reset the wait, so a relayd that
    # closed every connection right after its welcome was retried every 0.5 s or
    # less by all its clients at once, forever.
    flapping = _Flapping([0.0] * 7, ending)
    gaps = await _flap(flapping, Backoff(first_s=1.0, max_s=8.0), monkeypatch)
    assert gaps == pytest.approx([0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0], abs=0.01)


async def test_a_connection_that_stayed_up_starts_the_waits_again(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Up as long as max_s (the default stable_s): its loss waits as after a restart.
    flapping = _Flapping([0.0, 0.0, 0.0, 8.0, 0.0, 7.9, 0.0], 1013)
    gaps = await _flap(flapping, Backoff(first_s=1.0, max_s=8.0), monkeypatch)
    assert gaps == pytest.approx([0.5, 1.0, 2.0, 0.5, 1.0, 2.0, 4.0], abs=0.01)


async def test_stable_s_sets_how_long_a_connection_must_stay_up(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    flapping = _Flapping([0.0, 0.0, 2.0, 0.0, 1.9, 0.0], None)
    backoff = Backoff(first_s=1.0, max_s=8.0, stable_s=2.0)
    gaps = await _flap(flapping, backoff, monkeypatch)
    assert gaps == pytest.approx([0.5, 1.0, 0.5, 1.0, 2.0, 4.0], abs=0.01)


async def test_attempts_are_still_counted_from_each_connection(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The waits grow across quick connections, but each connection made starts the
    # count of attempts that ``attempts`` bounds again: a flapping relayd is not given up on.
    flapping = _Flapping([0.0] * 5, 1013)
    gaps = await _flap(flapping, Backoff(first_s=1.0, max_s=8.0, attempts=1), monkeypatch)
    assert gaps == pytest.approx([0.5, 1.0, 2.0, 4.0, 4.0], abs=0.01)


class HoldingProxy:
    """A TCP proxy to relayd whose first connection stops taking what the client writes.

    Once ``hold`` is set, connection 1 reads nothing more from the client, whose writes
    then fill the sockets' buffers and wait; ``cut`` ends it (the client sees the
    connection lost). Later connections are forwarded both ways.
    """

    def __init__(self, target: str) -> None:
        self.port = int(target.rstrip("/").rpartition(":")[2])
        self.hold = trio.Event()
        self.cut = trio.Event()
        self.accepted = 0

    async def forward(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        first = self.accepted == 1
        server = await trio.open_tcp_stream("127.0.0.1", self.port)

        async def pump(source: trio.SocketStream, sink: trio.SocketStream, up: bool) -> None:
            while True:
                if first and up and self.hold.is_set():
                    await trio.sleep_forever()
                try:
                    data = await source.receive_some(65536)
                    if not data:
                        break
                    await sink.send_all(data)
                except trio.BrokenResourceError:
                    break
            scope.cancel()

        async with client, server, trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            nursery.start_soon(pump, client, server, True)
            nursery.start_soon(pump, server, client, False)
            if first:
                await self.cut.wait()
                scope.cancel()


async def test_a_message_not_written_when_the_connection_is_lost_goes_on_the_next() -> None:
    # A message still queued in the client when the connection was lost was never on the
    # wire: its send raised ConnectionLost ("may or may not have been delivered"), and a
    # program that does not send twice lost it. With reconnect, it goes on the next
    # connection; a message being written is still the close's exception.
    big = {"max_message_bytes": 4 * 2**20, "messages_per_second": 1000.0}
    async with (
        running(Server(settings(**big))) as url,
        connect(url) as peer,
        trio.open_nursery() as nursery,
    ):
        proxy = HoldingProxy(url)
        proxy_url = await serve_tcp(nursery, proxy.forward)
        async with connect(proxy_url, reconnect=Backoff(first_s=0.01), keepalive_s=None) as client:
            proxy.hold.set()
            outcomes: dict[int, str] = {}

            async def send(n: int) -> None:
                try:
                    await client.send(peer.id, {"n": n, "pad": "x" * (3 * 2**20)})
                    outcomes[n] = "ack"
                except ConnectionLost:
                    outcomes[n] = "lost"

            async with trio.open_nursery() as sends:
                for n in range(16):  # in this order: each send waits before the next starts
                    sends.start_soon(send, n)
                    await trio.testing.wait_all_tasks_blocked()
                proxy.cut.set()
            acked = [n for n, outcome in sorted(outcomes.items()) if outcome == "ack"]
            assert "lost" in outcomes.values()  # the one being written at the cut
            assert acked  # queued behind it: sent again on the new connection
            # In the order sent, each once: the next message after them is a later one.
            received = [(await peer.receive()).data["n"] for _ in acked]
            assert received == acked
            await client.send(peer.id, {"n": "after"})
            assert (await peer.receive()).data == {"n": "after"}
        nursery.cancel_scope.cancel()
