"""The server API against a whole relayd: real clients in both dialects, real HTTP calls.

A backend publishes to clients of either dialect, asks who is connected, and disconnects
one; the clients see it as they see anything else relayd sends them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import msgspec
import structlog
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from relayd.config import AuthSettings
from relayd.daemon.credentials import load_authenticator
from relayd.daemon.server import Server
from relayd.routing.interface import Router
from relayd.routing.local import LocalRouter
from relayd.routing.table import Outcome
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats
from tests import wire
from tests.client import connect, running, settings
from tests.test_api import KEY, call, post_head

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789"}


def with_tokens() -> Server:
    """A server whose clients authenticate as alice or bob (one id, several connections)."""
    auth = AuthSettings(mode="token", tokens={s: SecretStr(t) for s, t in TOKENS.items()})
    return Server(
        settings().model_copy(update={"auth": auth}), authenticator=load_authenticator(auth)
    )


def bearer(subject: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {TOKENS[subject]}")]


async def test_a_publish_reaches_clients_of_both_dialects_from_the_server() -> None:
    server = Server(settings())
    async with running(server) as url:
        admin = server.admin_address
        assert admin is not None
        async with connect(url) as seed, connect(url, v1=True) as v1:
            text = await call(admin, "/api/publish", {"to": seed.id, "message": "hello"})
            obj = await call(admin, "/api/publish", {"to": v1.id, "message": {"n": 1}})
            assert (text[0], text[2], obj[0], obj[2]) == (
                200,
                {"outcome": "delivered"},
                200,
                {"outcome": "delivered"},
            )
            assert await seed.recv() == "hello"
            assert await v1.recv_json() == {"type": "message", "from": "", "message": {"n": 1}}
            # A client answering the server reaches nobody: "" is no client's id.
            await v1.send("", "thanks")
            assert (await v1.recv_json())["error"] == "invalid_envelope"
        gone = await call(admin, "/api/publish", {"to": seed.id, "message": "late"})
        assert gone[0] == 404


async def test_presence_counts_every_connection_of_an_id_and_ids_lists_them() -> None:
    server = with_tokens()
    async with running(server) as url:
        admin = server.admin_address
        assert admin is not None
        async with (
            connect(url, headers=bearer("alice")),
            connect(url, headers=bearer("alice")),
            connect(url, headers=bearer("bob"), v1=True),
        ):
            alice = await call(admin, "/api/presence", {"id": "alice"})
            assert alice[2] == {"id": "alice", "connected": True, "connections": 2}
            page = await call(admin, "/api/ids", {"limit": 1})
            assert page[2] == {"ids": ["alice"], "next": "alice"}
            rest = await call(admin, "/api/ids", {"after": "alice"})
            assert rest[2] == {"ids": ["bob"], "next": None}


async def test_a_disconnect_closes_every_connection_of_the_id_with_the_code_given() -> None:
    server = with_tokens()
    with structlog.testing.capture_logs() as events:
        await _disconnect_alice(server)
    closes = [e for e in events if e["event"] == "connection.close"]
    # Who closed: the backend, through the API; not relayd for a policy of its own.
    assert sorted((e["id"], e["code"], e["closed_by"]) for e in closes) == [
        ("alice", 4001, "api"),
        ("alice", 4001, "api"),
        ("bob", 1000, "client"),
    ]


async def _disconnect_alice(server: Server) -> None:
    async with running(server) as url:
        admin = server.admin_address
        assert admin is not None
        async with (
            connect(url, headers=bearer("alice")) as one,
            connect(url, headers=bearer("alice"), v1=True) as two,
            connect(url, headers=bearer("bob")) as bob,
        ):
            # What is already queued for a connection reaches it before the close frame.
            await call(admin, "/api/publish", {"to": "alice", "message": "last words"})
            answer = await call(
                admin, "/api/disconnect", {"id": "alice", "code": 4001, "reason": "suspended"}
            )
            assert answer[2] == {"id": "alice", "disconnected": 2}
            assert await one.until_closed() == (["last words"], 4001)
            assert await two.until_closed() == (
                ['{"type":"message","from":"","message":"last words"}'],
                4001,
            )
            closed = getattr(one.ws.closed, "reason", None)
            assert closed == "suspended"
            await trio.testing.wait_all_tasks_blocked()
            after = await call(admin, "/api/presence", {"id": "alice"})
            assert after[2]["connections"] == 0
            # Others are untouched.
            await bob.send("bob", "still here")
            assert await bob.recv() == "still here"


async def test_the_apis_messages_are_counted_apart_from_clients_messages() -> None:
    server = Server(settings())
    async with running(server) as url, connect(url) as a, connect(url) as b:
        admin = server.admin_address
        assert admin is not None
        await call(admin, "/api/publish", {"to": "gone", "message": 1})
        await call(admin, "/api/publish", {"to": a.id, "message": 1})
        await a.recv()
        await b.send("gone", 1)
        await b.recv()
        _status, _headers, text = await call(admin, "/metrics", method="GET")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }
    # A backend pushing to an id that left is not a client refused (RelaydRefusingMessages).
    assert samples[("relayd_messages_total", (("outcome", "unknown_recipient"),))] == 1
    assert samples[("relayd_messages_total", (("outcome", "delivered"),))] == 0
    assert samples[("relayd_api_messages_total", (("outcome", "unknown_recipient"),))] == 1
    assert samples[("relayd_api_messages_total", (("outcome", "delivered"),))] == 1
    requests = ("relayd_api_requests_total", (("route", "/api/publish"), ("status", "404")))
    assert samples[requests] == 1


async def test_a_server_with_a_key_refuses_calls_without_it() -> None:
    server = Server(settings(), api_key=KEY)
    async with running(server) as url:
        admin = server.admin_address
        assert admin is not None
        async with connect(url) as client:
            refused = await call(admin, "/api/publish", {"to": client.id, "message": 1})
            allowed = await call(
                admin,
                "/api/publish",
                {"to": client.id, "message": 1},
                headers={"Authorization": f"Bearer {KEY.decode()}"},
            )
            assert (refused[0], allowed[0]) == (401, 200)
            assert await client.recv() == "1"
    assert json.dumps(refused[2]).count("unauthorized") == 1


async def test_a_call_let_in_before_a_drain_and_read_after_it_is_503_shutting_down() -> None:
    # Its head came before the SIGTERM, its body after: relayd asked its closed router,
    # which had let bob's connection go, and answered 404 unknown_recipient, as if bob
    # had left, where another node would have reached him (found by a tester).
    server = Server(settings())
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(server.run)
        admin = server.admin_address
        assert admin is not None
        url = f"ws://{addresses[0][0]}:{addresses[0][1]}/"
        async with (
            connect(url) as bob,
            # A client that never answers the 1001 keeps the drain going.
            await trio.open_tcp_stream(*addresses[0]) as silent,
            await trio.open_tcp_stream(*admin) as backend,
        ):
            await silent.send_all(wire.upgrade_request())
            await silent.receive_some(4096)  # the 101 (and maybe the id)
            body = json.dumps({"to": bob.id, "message": "late"}).encode()
            await backend.send_all(post_head("/api/publish", f"Content-Length: {len(body)}"))
            await trio.testing.wait_all_tasks_blocked()  # let in, waiting for its body
            server.shutdown("test")
            await trio.testing.wait_all_tasks_blocked()  # the router closed, bob let go
            await backend.send_all(body)
            received = b""
            while chunk := await backend.receive_some(65536):
                received += chunk
    top, _, payload = received.partition(b"\r\n\r\n")
    assert top.startswith(b"HTTP/1.1 503 ")
    assert json.loads(payload)["error"] == "shutting_down"


async def _answer(backend: trio.SocketStream) -> tuple[bytes, bytes]:
    """The status line and body a call's connection reads until relayd closes it."""
    received = b""
    while chunk := await backend.receive_some(65536):
        received += chunk
    top, _, payload = received.partition(b"\r\n\r\n")
    return top.partition(b"\r\n")[0], payload


@asynccontextmanager
async def _without_clients() -> AsyncIterator[tuple[Server, tuple[str, int]]]:
    """A whole relayd that no client connects to, and its admin address; stopped by the body.

    On the way out it checks that the stop was not forced: every admin exchange in
    progress was over within the drain's grace.
    """
    server = Server(settings())
    with structlog.testing.capture_logs() as events:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            admin = server.admin_address
            assert admin is not None
            yield server, admin
    (stop,) = [e for e in events if e["event"] == "server.stop"]
    assert stop["forced"] is False


async def test_a_call_let_in_before_a_drain_without_clients_is_answered_not_closed() -> None:
    # Nothing kept the drain going: relayd cancelled the admin listener at once, and the
    # backend read the end of the connection instead of 503 shutting_down (a reviewer's
    # find; the test above keeps a silent client to make the drain last).
    async with (
        _without_clients() as (server, admin),
        await trio.open_tcp_stream(*admin) as backend,
    ):
        body = json.dumps({"to": "nobody", "message": "late"}).encode()
        await backend.send_all(post_head("/api/publish", f"Content-Length: {len(body)}"))
        await trio.testing.wait_all_tasks_blocked()  # let in, waiting for its body
        server.shutdown("test")
        await trio.testing.wait_all_tasks_blocked()  # no client: drained
        await backend.send_all(body)
        status, payload = await _answer(backend)
    assert status.startswith(b"HTTP/1.1 503 ")
    assert json.loads(payload)["error"] == "shutting_down"


async def test_admin_connections_that_asked_nothing_are_closed_unanswered_at_the_drain() -> None:
    # The drain waits for the admin exchanges in progress; one whose request's head has
    # not come (a load balancer's idle TCP check, half a head) held a relayd without
    # clients for the request's 5 s and was then told 408 (a reviewer's find).
    async with (
        _without_clients() as (server, admin),
        await trio.open_tcp_stream(*admin) as idle,
        await trio.open_tcp_stream(*admin) as halfway,
    ):
        await halfway.send_all(b"GET /healthz HTTP/1.1\r\n")
        await trio.testing.wait_all_tasks_blocked()
        server.shutdown("test")
        assert await idle.receive_some(1024) == b""
        assert await halfway.receive_some(1024) == b""


class _HeldRouter(LocalRouter):
    """A router whose publish waits for ``release``, as a cluster node waits for the others."""

    def __init__(
        self, events: MessageEvents, stats: Stats, release: trio.Event, handed: trio.Event
    ) -> None:
        super().__init__(events, stats)
        self._release = release
        self._handed = handed

    async def publish(self, to: str, message: msgspec.Raw, *, sender: str) -> Outcome:
        self._handed.set()
        await self._release.wait()
        return Outcome.DELIVERED


def _held(release: trio.Event, handed: trio.Event) -> Callable[[MessageEvents, Stats], Router]:
    return lambda events, stats: _HeldRouter(events, stats, release, handed)


async def test_a_publish_waiting_for_its_outcome_when_a_drain_begins_gets_that_outcome() -> None:
    # Handed to the router before the SIGTERM: its outcome (delivered stands, or a retry
    # through another node would send it twice) must reach the backend, not EOF.
    release, handed = trio.Event(), trio.Event()
    server = Server(settings(), router=_held(release, handed))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        admin = server.admin_address
        assert admin is not None
        async with await trio.open_tcp_stream(*admin) as backend:
            body = json.dumps({"to": "bob", "message": "now"}).encode()
            await backend.send_all(post_head("/api/publish", f"Content-Length: {len(body)}") + body)
            await handed.wait()
            server.shutdown("test")
            await trio.testing.wait_all_tasks_blocked()  # drained of clients; the call waits
            release.set()
            status, payload = await _answer(backend)
    assert status.startswith(b"HTTP/1.1 200 ")
    assert json.loads(payload) == {"outcome": "delivered"}


async def test_a_call_still_unanswered_when_the_grace_runs_out_is_cut_and_the_stop_forced() -> None:
    # The wait for the admin listener is within shutdown_grace_s, as the clients' drain.
    release, handed = trio.Event(), trio.Event()
    quick = settings().model_copy(
        update={"server": settings().server.model_copy(update={"shutdown_grace_s": 0.05})}
    )
    server = Server(quick, router=_held(release, handed))
    with structlog.testing.capture_logs() as events:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            admin = server.admin_address
            assert admin is not None
            async with await trio.open_tcp_stream(*admin) as backend:
                body = json.dumps({"to": "bob", "message": "never"}).encode()
                head = post_head("/api/publish", f"Content-Length: {len(body)}")
                await backend.send_all(head + body)
                await handed.wait()
                server.shutdown("test")
                assert await _answer(backend) == (b"", b"")
    (stop,) = [e for e in events if e["event"] == "server.stop"]
    assert stop["forced"] is True
