"""The server API over real loopback HTTP: what a backend sends, and what it gets back.

The admin listener runs with the API's routes on a free port; the router behind it is a
recording stand-in, so each test states exactly what the backend asked of the router.
``tests/test_api_e2e.py`` drives the same calls against a whole relayd and real clients.
"""

from __future__ import annotations

import json
import math
import re
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11._readers
import h11._util
import msgspec
import pytest
import structlog
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from relayd.config import AdminSettings
from relayd.daemon.admin import (
    ANSWER_TIMEOUT_S,
    MAX_BODY_BYTES,
    MAX_CONNECTIONS,
    MAX_HEAD_BYTES,
    REQUEST_TIMEOUT_S,
    serve_admin,
)
from relayd.daemon.api import (
    BODY_BESIDE_MESSAGE,
    MAX_PAGE,
    ROUTER_MARGIN_S,
    SERVER_SENDER,
    api_area,
)
from relayd.daemon.credentials import load_api_key
from relayd.errors import BrokerUnavailable, ConfigError, IncompleteAnswer
from relayd.routing.table import Outcome
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats

KEY = b"k" * 32


class Recording:
    """A router that answers what the test says and records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.outcome = Outcome.DELIVERED
        self.connections: dict[str, int] = {}
        self.fail = False
        self.cut_off = False  # as a cluster node that cannot reach Redis
        self.unanswered = False  # as a cluster node some other node did not answer
        self.delay_s = 0.0  # how long it takes to answer, as a cluster's other nodes do
        self.asked = trio.Event()  # set once a call reached the router
        self.hold: trio.Event | None = None  # if set, each call waits for it to answer

    async def publish(self, to: str, message: msgspec.Raw, *, sender: str) -> Outcome:
        if self.fail:
            raise RuntimeError("injected fault")
        self.calls.append(("publish", to, bytes(message), sender))
        await self._held()
        return self.outcome

    async def disconnect(self, client_id: str, code: int, reason: str) -> int:
        await self._reach()
        self.calls.append(("disconnect", client_id, code, reason))
        return self.connections.pop(client_id, 0)

    async def presence(self, client_id: str) -> int:
        await self._reach()
        return self.connections.get(client_id, 0)

    async def list_ids(self, *, after: str | None, limit: int) -> list[str]:
        await self._reach()
        ids = sorted(i for i in self.connections if after is None or i > after)
        return ids[:limit]

    async def _held(self) -> None:
        self.asked.set()
        if self.hold is not None:
            await self.hold.wait()
        await trio.sleep(self.delay_s)

    async def _reach(self) -> None:
        await self._held()
        if self.cut_off:
            raise BrokerUnavailable("the cluster's broker cannot be reached from this node")
        if self.unanswered:
            raise IncompleteAnswer("not every node answered in time")


@asynccontextmanager
async def api(
    router: Recording,
    *,
    key: bytes | None = None,
    max_message_bytes: int = 65536,
    stats: Stats | None = None,
    stopping: Callable[[], bool] = lambda: False,
    reply_timeout_s: float = 2.0,
) -> AsyncIterator[tuple[str, int]]:
    """The admin listener with the API on a free loopback port; yields its address."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    host, port, *_ = listeners[0].socket.getsockname()
    stats = Stats() if stats is None else stats
    area = api_area(
        router,
        max_message_bytes=lambda: max_message_bytes,
        key=key,
        stats=stats,
        events=MessageEvents(structlog.get_logger(), stats),
        reply_timeout_s=reply_timeout_s,
        stopping=stopping,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_admin(
                listeners, CollectorRegistry(), lambda: None, areas=[area], task_status=task_status
            )
        )
        yield host, port
        nursery.cancel_scope.cancel()


async def raw(address: tuple[str, int], data: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send ``data`` as it is, and read until relayd closes: status line, headers, body.

    Header names are lower-cased.
    """
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(data)
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
    top, _, payload = received.partition(b"\r\n\r\n")
    status_line, *lines = top.decode().split("\r\n")
    headers = {n.lower(): v.strip() for n, _, v in (line.partition(":") for line in lines)}
    return status_line, headers, payload


def post_head(path: str, *fields: str) -> bytes:
    """A call's head as a backend on relayd's machine sends it: to 127.0.0.1, in JSON."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    return ("\r\n".join([*lines, *fields]) + "\r\n\r\n").encode()


def status_of(status_line: str) -> int:
    return int(status_line.split()[1])


async def call(
    address: tuple[str, int],
    path: str,
    body: bytes | object = None,
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request; the status, the headers (lower-cased names) and the JSON body."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    fields = {
        "Host": "127.0.0.1",
        "Content-Type": "application/json",
        "Content-Length": str(len(data)),
        **(headers or {}),
    }
    head = [f"{method} {path} HTTP/1.1", *(f"{name}: {value}" for name, value in fields.items())]
    status_line, answer_headers, payload = await raw(
        address, ("\r\n".join(head) + "\r\n\r\n").encode() + data
    )
    parsed = (
        json.loads(payload) if answer_headers["content-type"] == "application/json" else payload
    )
    return status_of(status_line), answer_headers, parsed


async def test_publish_hands_the_raw_message_to_the_router_from_the_server() -> None:
    router = Recording()
    async with api(router) as address:
        status, headers, body = await call(
            address, "/api/publish", {"to": "alice", "message": {"text": "hi", "n": [1, 2]}}
        )
    assert (status, body) == (200, {"outcome": "delivered"})
    assert headers["content-type"] == "application/json"
    assert router.calls == [("publish", "alice", b'{"text": "hi", "n": [1, 2]}', SERVER_SENDER)]
    assert SERVER_SENDER == ""  # no client id is empty: nobody can pass for the server


async def test_publish_says_when_nobody_holds_the_id_or_it_is_busy() -> None:
    router = Recording()
    async with api(router) as address:
        router.outcome = Outcome.UNKNOWN_RECIPIENT
        unknown = await call(address, "/api/publish", {"to": "bob", "message": 1})
        router.outcome = Outcome.RECIPIENT_BUSY
        busy = await call(address, "/api/publish", {"to": "bob", "message": 1})
    assert (unknown[0], unknown[2]) == (
        404,
        {"outcome": "unknown_recipient", "error": "unknown_recipient"},
    )
    assert (busy[0], busy[2]) == (503, {"outcome": "recipient_busy", "error": "recipient_busy"})


async def test_a_message_over_the_limit_is_refused_before_the_router() -> None:
    router = Recording()
    stats = Stats()
    with structlog.testing.capture_logs() as logs:
        async with api(router, max_message_bytes=10, stats=stats) as address:
            status, _headers, body = await call(
                address, "/api/publish", {"to": "bob", "message": "x" * 20}
            )
    assert (status, body["error"]) == (413, "message_too_large")
    assert router.calls == []
    # Logged and counted as any publish's outcome is (a client's over the limit is too).
    assert stats.api_messages == {"message_too_large": 1}
    assert stats.messages == {}
    assert [e for e in logs if e["event"] == "message.relay"] == [
        {
            "event": "message.relay",
            "log_level": "info",
            "from": "",
            "to": "bob",
            "bytes": 22,
            "outcome": "message_too_large",
        }
    ]


async def test_a_body_over_the_bound_is_refused_unread() -> None:
    router = Recording()
    async with api(router) as address:
        status, _headers, body = await call(
            address,
            "/api/publish",
            b"",
            headers={"Content-Length": str(MAX_BODY_BYTES + 1)},
        )
    assert (status, body["error"]) == (413, "request_too_large")
    assert router.calls == []


async def test_a_publish_may_carry_what_max_message_bytes_allows_past_the_default_bound() -> None:
    # api.md: a publish's message may be up to limits.max_message_bytes. Raised past
    # 1 MiB, the body bound of the admin listener refused such a message with 413
    # request_too_large; the bound grows with the limit, and still holds above it.
    router = Recording()
    limit = 2 * MAX_BODY_BYTES
    message = "x" * (limit - 2)  # its JSON text, quotes included, is the limit
    async with api(router, max_message_bytes=limit) as address:
        publish = {"to": "a", "message": message}
        status, _headers, body = await call(address, "/api/publish", publish)
        over, _headers, refused = await call(
            address,
            "/api/publish",
            b"",
            headers={"Content-Length": str(limit + BODY_BESIDE_MESSAGE + 1)},
        )
    assert (status, body) == (200, {"outcome": "delivered"})
    assert router.calls == [("publish", "a", json.dumps(message).encode(), SERVER_SENDER)]
    assert (over, refused["error"]) == (413, "request_too_large")


async def test_requests_relayd_cannot_take_are_400_with_a_reason() -> None:
    router = Recording()
    async with api(router) as address:
        answers = [
            await call(address, "/api/publish", b"{not json"),
            await call(address, "/api/publish", {"to": "bob"}),
            await call(address, "/api/publish", {"to": "", "message": 1}),
            await call(address, "/api/publish", {"to": "bob", "message": 1, "extra": 2}),
            await call(address, "/api/disconnect", {"id": "bob", "code": 1006}),
            await call(address, "/api/disconnect", {"id": "bob", "reason": "é" * 62}),
            await call(address, "/api/ids", {"limit": MAX_PAGE + 1}),
        ]
    for status, _headers, body in answers:
        assert status == 400, body
        assert body["error"] == "invalid_request"
        assert body["detail"]
    assert router.calls == []


async def test_a_body_that_is_not_utf8_or_nested_too_deeply_is_a_400_not_a_delivery() -> None:
    # A published message goes out in text frames, which must be UTF-8: a client
    # would close with 1007 on one that is not, and lose what else was queued.
    router = Recording()
    async with api(router) as address:
        answers = [
            await call(address, "/api/publish", b'{"to": "bob", "message": "caf\xe9"}'),
            await call(address, "/api/publish", b'{"to": "b\xffb", "message": 1}'),
            await call(address, "/api/presence", b'{"id": "\xc3"}'),
            await call(
                address,
                "/api/publish",
                b'{"to": "bob", "message": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            ),
            await call(address, "/api/publish", b'{"to": "bob", "message": "\\ud800"}'),
        ]
        ok = await call(address, "/api/publish", '{"to": "bob", "message": "café ✓"}'.encode())
    for status, _headers, body in answers:
        assert (status, body["error"]) == (400, "invalid_request"), body
        assert body["detail"].startswith("not JSON: ")
    assert "invalid UTF-8 at byte 29" in answers[0][2]["detail"]
    assert answers[3][2]["detail"] == "not JSON: JSON is nested too deeply"
    assert answers[4][2]["detail"] == (
        "not JSON: JSON is malformed: \\ud800 is half of a UTF-16 surrogate pair (byte 26); "
        "strings must be valid Unicode"
    )
    assert ok[0] == 200
    assert router.calls == [("publish", "bob", '"café ✓"'.encode(), SERVER_SENDER)]


async def test_without_the_key_a_call_is_refused_before_its_body_is_read() -> None:
    # The body never comes: were relayd reading it, the answer would be a 408 after
    # REQUEST_TIMEOUT_S; it is the 401 at once, so a caller without the key makes
    # relayd hold nothing of a body, however large it says it is.
    router = Recording()
    async with api(router, key=KEY) as address:
        with trio.fail_after(REQUEST_TIMEOUT_S / 2):
            status_line, headers, payload = await raw(
                address,
                post_head("/api/publish", f"Content-Length: {MAX_BODY_BYTES}") + b'{"to": "bob", ',
            )
    assert status_of(status_line) == 401
    assert headers["www-authenticate"] == 'Bearer realm="relayd"'
    assert json.loads(payload)["error"] == "unauthorized"
    assert router.calls == []


async def test_a_refused_body_still_being_sent_gets_the_answer_not_a_reset() -> None:
    # relayd refuses the body by its length before reading it, then reads and drops
    # what the client still sends until it closes: closing with bytes unread would
    # reset the connection, and the client would see the reset, not the 413.
    router = Recording()
    body = b"x" * (2 * MAX_BODY_BYTES)
    async with api(router) as address:
        status_line, _headers, payload = await raw(
            address,
            post_head("/api/publish", f"Content-Length: {len(body)}") + body,
        )
    assert status_of(status_line) == 413
    assert json.loads(payload)["error"] == "request_too_large"
    assert router.calls == []


async def test_a_client_that_expects_100_continue_is_told_to_go_on_unless_refused() -> None:
    # relayd never sent 100 Continue: a client waiting for it (.NET, Java's
    # expectContinue, curl with a large body) got 408 after 5 s, nothing published.
    router = Recording()
    data = json.dumps({"to": "bob", "message": 1}).encode()
    expect = "Expect: 100-continue"
    async with api(router) as address:
        with trio.fail_after(REQUEST_TIMEOUT_S / 2):
            async with await trio.open_tcp_stream(*address) as stream:
                await stream.send_all(
                    post_head("/api/publish", expect, f"Content-Length: {len(data)}")
                )
                go_on = await stream.receive_some(65536)
                await stream.send_all(data)
                answer = b""
                while chunk := await stream.receive_some(65536):
                    answer += chunk
            too_large = await raw(
                address,
                post_head("/api/publish", expect, f"Content-Length: {MAX_BODY_BYTES + 1}"),
            )
    assert go_on == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert router.calls == [("publish", "bob", b"1", SERVER_SENDER)]
    assert status_of(too_large[0]) == 413  # at once, and not after a 100


@pytest.mark.parametrize("writes", [1, 7])
async def test_the_head_bound_holds_however_the_head_is_split(writes: int) -> None:
    def head(size: int) -> bytes:
        start = post_head("/api/ids", "Content-Length: 2")[:-2] + b"X-Pad: "
        return start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"

    async def send(address: tuple[str, int], data: bytes) -> int:
        async with await trio.open_tcp_stream(*address) as stream:
            step = -(-len(data) // writes)
            for start in range(0, len(data), step):
                await stream.send_all(data[start : start + step])
            received = b""
            while chunk := await stream.receive_some(65536):
                received += chunk
        return int(received.split(b" ", 2)[1])

    async with api(Recording()) as address:
        at_bound = await send(address, head(MAX_HEAD_BYTES) + b"{}")
        over = await send(address, head(MAX_HEAD_BYTES + 1) + b"{}")
        twice = await send(address, head(2 * MAX_HEAD_BYTES - 100) + b"{}")
    assert (at_bound, over, twice) == (200, 431, 431)


async def test_connections_past_the_bound_wait_unaccepted_until_one_ends(
    autojump_clock: trio.abc.Clock,
) -> None:
    # MAX_CONNECTIONS clients that send nothing hold every slot; the next one waits
    # in the listen backlog, answered only once a slot is free. Its wait is bounded
    # by theirs: each is refused 408 after REQUEST_TIMEOUT_S, and given
    # ANSWER_TIMEOUT_S more to take the answer and close.
    async with api(Recording()) as address:
        idle = [await trio.open_tcp_stream(*address) for _ in range(MAX_CONNECTIONS)]
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        answer = await raw(
            address,
            b"POST /api/ids HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        )
        waited = trio.current_time() - start
        for stream in idle:
            await stream.aclose()
    assert status_of(answer[0]) == 200
    assert waited == pytest.approx(REQUEST_TIMEOUT_S + ANSWER_TIMEOUT_S)


async def test_the_bound_holds_across_listeners(autojump_clock: trio.abc.Clock) -> None:
    # An address with IPv4 and IPv6 is two listeners. Twice the bound of clients that
    # send nothing, on both: exactly MAX_CONNECTIONS are served (each answered 408 at
    # REQUEST_TIMEOUT_S), the rest only once those are gone.
    listeners = [
        *await trio.open_tcp_listeners(0, host="127.0.0.1"),
        *await trio.open_tcp_listeners(0, host="127.0.0.1"),
    ]
    addresses = [listener.socket.getsockname()[:2] for listener in listeners]
    answered = 0

    async def first_wave(stream: trio.SocketStream, by: float) -> None:
        nonlocal answered
        with trio.move_on_at(by):
            if await stream.receive_some(1):
                answered += 1

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_admin(
                listeners, CollectorRegistry(), lambda: None, task_status=task_status
            )
        )
        idle = [
            await trio.open_tcp_stream(*address)
            for address in addresses
            for _ in range(MAX_CONNECTIONS)
        ]
        by = trio.current_time() + REQUEST_TIMEOUT_S + ANSWER_TIMEOUT_S / 2
        async with trio.open_nursery() as readers:
            for stream in idle:
                readers.start_soon(first_wave, stream, by)
        for stream in idle:
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert answered == MAX_CONNECTIONS


async def test_a_client_that_keeps_its_socket_after_a_whole_answer_holds_no_slot(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The request was read whole: relayd closes at once, lingers for nothing, and the
    # exchange's duration is the answer's, whatever the client does with its socket.
    with structlog.testing.capture_logs() as logs:
        async with api(Recording()) as address, await trio.open_tcp_stream(*address) as stream:
            await stream.send_all(post_head("/api/ids", "Content-Length: 2") + b"{}")
            while await stream.receive_some(65536):
                pass  # to relayd's end of the stream
            await trio.sleep(3 * ANSWER_TIMEOUT_S)  # held open, idle
    [exchange] = [e for e in logs if e["event"] == "api.request"]
    assert (exchange["status"], exchange["duration_s"]) == (200, 0.0)


async def test_a_web_pages_cross_site_post_is_refused_unread() -> None:
    # Without a key, a page in a browser on this machine could publish "server"
    # messages and disconnect ids with a text/plain POST, which needs no preflight.
    router = Recording()
    router.connections["alice"] = 1
    publish = {"to": "alice", "message": "your session expired"}
    page = {"Origin": "https://evil.example", "Content-Type": "text/plain;charset=UTF-8"}
    async with api(router) as address:
        refused = [
            await call(address, "/api/publish", publish, headers=page),
            await call(address, "/api/disconnect", {"id": "alice"}, headers={"Content-Type": ""}),
        ]
        with_charset = await call(
            address,
            "/api/presence",
            {"id": "alice"},
            headers={"Content-Type": "Application/JSON; charset=utf-8"},
        )
        bodiless = await raw(address, b"POST /api/ids HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    for status, _headers, body in refused:
        assert (status, body) == (
            415,
            {
                "error": "unsupported_media_type",
                "detail": "send the body as Content-Type: application/json",
            },
        )
    assert router.calls == []
    assert with_charset[0] == 200
    assert json.loads(bodiless[2]) == {"ids": ["alice"], "next": None}


@pytest.mark.parametrize(
    ("host", "key", "status"),
    [
        ("rebound.evil.example", None, 403),
        ("rebound.evil.example:9031", None, 403),
        ("localhost.evil.example", None, 403),
        ("relayd.internal:9031", KEY, 200),  # with a key, the key is the defence
        ("localhost:9031", None, 200),
        ("LOCALHOST", None, 200),
        ("127.0.0.1:9031", None, 200),
        ("[::1]:9031", None, 200),
        ("10.1.2.3", None, 200),
    ],
)
async def test_without_a_key_only_an_address_or_localhost_may_be_the_host(
    host: str, key: bytes | None, status: int
) -> None:
    # DNS rebinding: a page's own name resolved to 127.0.0.1 let it read /api/ids.
    router = Recording()
    router.connections["alice"] = 1
    fields = {"Host": host} | ({} if key is None else {"Authorization": f"Bearer {key.decode()}"})
    async with api(router, key=key) as address:
        answer = await call(address, "/api/ids", {}, headers=fields)
    assert answer[0] == status
    if status == 403:
        assert answer[2]["error"] == "host_not_allowed"


async def test_with_a_key_every_call_must_present_it() -> None:
    router = Recording()
    router.connections["bob"] = 1
    async with api(router, key=KEY) as address:
        missing = await call(address, "/api/presence", {"id": "bob"})
        wrong = await call(
            address, "/api/presence", {"id": "bob"}, headers={"Authorization": "Bearer nope"}
        )
        basic = await call(
            address, "/api/presence", {"id": "bob"}, headers={"Authorization": f"Basic {KEY!r}"}
        )
        right = await call(
            address,
            "/api/presence",
            {"id": "bob"},
            headers={"Authorization": f"Bearer {KEY.decode()}"},
        )
    for status, headers, body in (missing, wrong, basic):
        assert (status, body["error"]) == (401, "unauthorized")
        assert headers["www-authenticate"] == 'Bearer realm="relayd"'
    assert right[0] == 200


@pytest.mark.parametrize(
    ("key", "separator"),
    [("clé-secrète-de-l'api-0123456789", " "), (KEY.decode(), "\t"), (KEY.decode(), " \t ")],
)
async def test_a_key_is_read_as_its_utf8_after_a_space_or_tab(key: str, separator: str) -> None:
    router = Recording()
    router.connections["bob"] = 1
    async with api(router, key=key.encode()) as address:
        status, _, body = await call(
            address,
            "/api/presence",
            {"id": "bob"},
            headers={"Authorization": f"Bearer{separator}{key}"},  # sent as UTF-8
        )
    assert (status, body) == (200, {"id": "bob", "connected": True, "connections": 1})


async def test_a_body_in_tiny_chunks_is_held_as_its_bytes_not_as_its_pieces() -> None:
    # h11 makes a piece of each HTTP chunk: kept as a list of pieces, a body sent in
    # 2-byte chunks held 28 times its size (found by a tester: 28.6 MiB for 1 MiB).
    router = Recording()
    router.connections["bob"] = 1
    body = json.dumps({"to": "bob", "message": "a" * 60_000}).encode()
    chunked = b"".join(b"2\r\n" + body[i : i + 2] + b"\r\n" for i in range(0, len(body), 2))
    head = post_head("/api/publish", "Transfer-Encoding: chunked")
    async with api(router) as address:
        tracemalloc.start()
        try:
            status_line, _, _ = await raw(address, head + chunked + b"0\r\n\r\n")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert status_of(status_line) == 200
    # The body twice (its buffer, then its bytes), its message, and what the test's own
    # client reads and writes; its 30,000 pieces alone would be some 1.3 MB.
    assert peak < 600_000, peak


async def test_a_draining_relayd_refuses_every_call_with_503_shutting_down() -> None:
    # A cluster node draining answered broker_unavailable with Redis up, and
    # recipient_unreachable for a client still connected to it (found by a tester).
    router = Recording()
    router.connections["bob"] = 1
    draining = [False]
    async with api(router, key=KEY, stopping=lambda: draining[0]) as address:
        authorized = {"Authorization": f"Bearer {KEY.decode()}"}
        before = await call(address, "/api/presence", {"id": "bob"}, headers=authorized)
        draining[0] = True
        answers = [
            await call(address, path, body, headers=authorized)
            for path, body in [
                ("/api/publish", {"to": "bob", "message": 1}),
                ("/api/presence", {"id": "bob"}),
                ("/api/ids", {}),
                ("/api/disconnect", {"id": "bob"}),
            ]
        ]
        keyless = await call(address, "/api/presence", {"id": "bob"})
    assert before[0] == 200
    for status, _headers, body in answers:
        assert (status, body["error"]) == (503, "shutting_down")
        assert body["detail"] == "this relayd is shutting down; ask another node"
    assert keyless[0] == 401  # the key first: a caller without it learns nothing
    assert router.calls == []  # neither the publish nor the disconnect reached the router


@pytest.mark.parametrize(
    ("path", "body", "fault"),
    [
        # What a router the drain closed says (what the call was answered before):
        # its connections are let go (404; 503 recipient_busy; 200, none)...
        ("/api/publish", {"to": "bob", "message": 1}, Outcome.UNKNOWN_RECIPIENT),
        ("/api/publish", {"to": "bob", "message": 1}, Outcome.RECIPIENT_BUSY),
        ("/api/disconnect", {"id": "bob"}, "gone"),
        ("/api/presence", {"id": "bob"}, "gone"),
        # ...and a cluster node's link is leaving (503 recipient_unreachable,
        # broker_unavailable, answer_incomplete).
        ("/api/publish", {"to": "bob", "message": 1}, Outcome.RECIPIENT_UNREACHABLE),
        ("/api/presence", {"id": "bob"}, "cut_off"),
        ("/api/ids", {}, "unanswered"),
    ],
)
async def test_a_call_the_drain_cut_short_is_503_shutting_down_not_the_routers_answer(
    path: str, body: dict[str, object], fault: Outcome | str
) -> None:
    # A call in flight when the drain began got what the closed router said, 404
    # unknown_recipient, broker_unavailable, "connected": false, and a backend took
    # the id for gone instead of asking another node (found by a tester).
    router = Recording()
    router.connections["bob"] = 1
    router.hold = trio.Event()
    draining = [False]
    answered: list[tuple[int, dict[str, str], Any]] = []
    async with api(router, stopping=lambda: draining[0]) as address:

        async def ask() -> None:
            answered.append(await call(address, path, body))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await router.asked.wait()  # the router has the call
            draining[0] = True
            if isinstance(fault, Outcome):
                router.outcome = fault
            elif fault == "gone":
                router.connections.clear()
            else:
                setattr(router, fault, True)
            router.hold.set()
    [(status, _headers, payload)] = answered
    assert (status, payload["error"]) == (503, "shutting_down")
    assert payload["detail"] == "this relayd is shutting down; ask another node"


@pytest.mark.parametrize(
    ("outcome", "status"), [(Outcome.DELIVERED, 200), (Outcome.DELIVERY_UNCONFIRMED, 503)]
)
async def test_a_publish_that_is_or_may_be_delivered_says_so_through_a_drain(
    outcome: Outcome, status: int
) -> None:
    # Told shutting_down, a backend would send it again through another node.
    router = Recording()
    router.outcome = outcome
    router.hold = trio.Event()
    draining = [False]
    answered: list[tuple[int, dict[str, str], Any]] = []
    async with api(router, stopping=lambda: draining[0]) as address:

        async def ask() -> None:
            answered.append(await call(address, "/api/publish", {"to": "bob", "message": 1}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await router.asked.wait()
            draining[0] = True
            router.hold.set()
    [(answer, _headers, payload)] = answered
    assert (answer, payload["outcome"]) == (status, outcome.value)


async def test_a_call_whose_body_arrives_once_the_drain_began_is_not_asked_of_the_router() -> None:
    # Its head was let in before the drain; its body came after, to a closed router.
    router = Recording()
    router.connections["bob"] = 1
    draining = [False]
    body = json.dumps({"to": "bob", "message": 1}).encode()
    async with (
        api(router, stopping=lambda: draining[0]) as address,
        await trio.open_tcp_stream(*address) as stream,
    ):
        await stream.send_all(post_head("/api/publish", f"Content-Length: {len(body)}"))
        await trio.testing.wait_all_tasks_blocked()  # let in, waiting for its body
        draining[0] = True
        await stream.send_all(body)
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
    top, _, payload = received.partition(b"\r\n\r\n")
    assert top.startswith(b"HTTP/1.1 503 ")
    assert json.loads(payload)["error"] == "shutting_down"
    assert router.calls == []


async def test_an_absolute_form_target_is_routed_by_its_path() -> None:
    # RFC 9112 §3.2.2: a server MUST accept it (an HTTP library told to use relayd as
    # its proxy sends it); relayd answered 404 "nothing at http://..." (found by a tester).
    router = Recording()
    body = json.dumps({"to": "bob", "message": 1}).encode()
    async with api(router) as address:
        origin = f"http://{address[0]}:{address[1]}"

        async def send(target: str, host: str, data: bytes = body) -> tuple[str, bytes]:
            head = "\r\n".join(
                [
                    f"POST {target} HTTP/1.1",
                    f"Host: {host}",
                    "Content-Type: application/json",
                    f"Content-Length: {len(data)}",
                ]
            )
            status_line, _headers, payload = await raw(address, f"{head}\r\n\r\n".encode() + data)
            return status_line, payload

        published = await send(f"{origin}/api/publish", "127.0.0.1")
        upper = await send(f"HTTP://{address[0]}:{address[1]}/api/publish?x=1", "127.0.0.1")
        # Its authority is the Host (RFC 9112 §3.2.2), for the check without a key too.
        by_target = await send(f"{origin}/api/publish", "rebound.example")
        rebound = await send(f"http://rebound.example:{address[1]}/api/publish", "127.0.0.1")
        nothing = await send(f"{origin}/api/nope", "127.0.0.1")
        userinfo = await send(f"http://me@{address[0]}:{address[1]}/api/publish", "127.0.0.1")
        healthz = await raw(address, f"GET {origin}/healthz HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert published == ("HTTP/1.1 200 OK", b'{"outcome": "delivered"}\n')
    assert upper == published
    assert by_target == published
    assert rebound[0] == "HTTP/1.1 403 Forbidden"
    assert json.loads(rebound[1])["error"] == "host_not_allowed"
    assert nothing[0] == "HTTP/1.1 404 Not Found"
    assert json.loads(nothing[1]) == {"error": "not_found", "detail": "nothing at /api/nope"}
    assert userinfo[0] == "HTTP/1.1 400 Bad Request"
    assert b"authority" in userinfo[1]  # plain text: relayd read no path from it
    assert (healthz[0], healthz[2]) == ("HTTP/1.1 200 OK", b"ok\n")
    assert [c[0] for c in router.calls] == ["publish"] * 3


async def test_disconnect_closes_with_the_code_and_reason_given_or_1008() -> None:
    router = Recording()
    router.connections.update({"bob": 2, "carol": 1})
    async with api(router) as address:
        bob = await call(address, "/api/disconnect", {"id": "bob"})
        carol = await call(
            address, "/api/disconnect", {"id": "carol", "code": 4001, "reason": "banned"}
        )
        again = await call(address, "/api/disconnect", {"id": "carol"})
    assert [answer[2] for answer in (bob, carol, again)] == [
        {"id": "bob", "disconnected": 2},
        {"id": "carol", "disconnected": 1},
        {"id": "carol", "disconnected": 0},
    ]
    assert router.calls[:2] == [
        ("disconnect", "bob", 1008, "disconnected by the server"),
        ("disconnect", "carol", 4001, "banned"),
    ]


async def test_presence_and_pages_of_ids() -> None:
    router = Recording()
    router.connections.update({f"id{n:02}": 1 for n in range(5)} | {"multi": 3})
    async with api(router) as address:
        multi = await call(address, "/api/presence", {"id": "multi"})
        absent = await call(address, "/api/presence", {"id": "nobody"})
        first = await call(address, "/api/ids", {"limit": 4})
        rest = await call(address, "/api/ids", {"after": first[2]["next"], "limit": 4})
        default = await call(address, "/api/ids", b"")
    assert multi[2] == {"id": "multi", "connected": True, "connections": 3}
    assert absent[2] == {"id": "nobody", "connected": False, "connections": 0}
    assert first[2] == {"ids": ["id00", "id01", "id02", "id03"], "next": "id03"}
    assert rest[2] == {"ids": ["id04", "multi"], "next": None}
    assert default[2]["ids"] == sorted(router.connections)


async def test_a_full_last_page_says_it_is_the_last() -> None:
    router = Recording()
    router.connections.update({f"id{n}": 1 for n in range(4)})
    async with api(router) as address:
        first = await call(address, "/api/ids", {"limit": 2})
        last = await call(address, "/api/ids", {"after": first[2]["next"], "limit": 2})
        whole = await call(address, "/api/ids", {"limit": 4})
    assert first[2] == {"ids": ["id0", "id1"], "next": "id1"}
    assert last[2] == {"ids": ["id2", "id3"], "next": None}
    assert whole[2] == {"ids": ["id0", "id1", "id2", "id3"], "next": None}


async def test_the_api_is_post_only_and_says_so_in_json() -> None:
    async with api(Recording()) as address:
        status, headers, body = await call(address, "/api/ids", b"", method="GET")
    assert (status, headers["allow"], body["error"]) == (405, "POST", "method_not_allowed")
    assert headers["content-type"] == "application/json"


async def test_a_path_that_is_no_call_is_a_json_404() -> None:
    async with api(Recording()) as address:
        status, headers, body = await call(address, "/api/nope", {})
    assert (status, headers["content-type"]) == (404, "application/json")
    assert body == {"error": "not_found", "detail": "nothing at /api/nope"}


async def test_a_request_that_is_not_http_is_a_400_and_one_without_a_path_is_plain_text() -> None:
    async with api(Recording()) as address:
        garbage = await raw(address, b"\x16\x03\x01 not a request line\r\n\r\n")
        # The path is read, the body's framing is broken: the API's JSON.
        framing = await raw(
            address,
            post_head("/api/ids", "Transfer-Encoding: chunked") + b"zz\r\n",
        )
    assert (status_of(garbage[0]), garbage[1]["content-type"]) == (
        400,
        "text/plain; charset=utf-8",
    )
    assert garbage[2].startswith(b"not a request relayd can read: ")
    assert (status_of(framing[0]), framing[1]["content-type"]) == (400, "application/json")
    assert json.loads(framing[2])["error"] == "invalid_request"


async def test_a_400_quotes_none_of_the_clients_bytes() -> None:
    # h11's messages quote the line it could not parse: the answer echoed the client's
    # bytes (an escape sequence, a forged log line) under relayd's name.
    async with api(Recording()) as address:
        bad_line = await raw(address, b"GET /x\x1b[31m HTTP/1.1\r\nHost: a\r\n\r\n")
        bad_header = await raw(address, b"GET /metrics HTTP/1.1\r\nX\x01evil: 1\r\n\r\n")
        bad_chunk = await raw(
            address, post_head("/api/ids", "Transfer-Encoding: chunked") + b"evil\r\n"
        )
        bad_port = await raw(
            address, b"GET http://127.0.0.1:evil/api/ids HTTP/1.1\r\nHost: a\r\n\r\n"
        )
    for status_line, _headers, body in (bad_line, bad_header, bad_chunk, bad_port):
        assert status_of(status_line) == 400
        assert status_line == "HTTP/1.1 400 Bad Request"
        assert b"evil" not in body
        assert b"\x1b" not in body
        assert b"\\x1b" not in body
    # h11's words before its quote stay: they say what is wrong.
    assert bad_header[2] == b"not a request relayd can read: illegal header line\n"


async def test_a_400_quotes_none_of_the_clients_bytes_however_h11_quotes_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The cut knows how h11 0.16 quotes (b'...'); an h11 that quoted another way (here
    # as text, '...') put the client's bytes back in the answer (found by a reviewer).
    real_validate = h11._util.validate

    def quoting_as_text(
        regex: re.Pattern[bytes], data: bytes, msg: str = "malformed data", *args: Any
    ) -> dict[str, bytes]:
        texts = [bytes(arg).decode("latin-1") for arg in args]
        try:
            return real_validate(regex, data, msg)
        except h11.LocalProtocolError:
            raise h11.LocalProtocolError(msg.format(*texts)) from None

    monkeypatch.setattr(h11._readers, "validate", quoting_as_text)
    async with api(Recording()) as address:
        status_line, _headers, body = await raw(
            address, b"GET /metrics HTTP/1.1\r\nX\x01evil: 1\r\n\r\n"
        )
    assert status_line == "HTTP/1.1 400 Bad Request"
    assert body == b"not a request relayd can read: not HTTP/1.1\n"


async def test_a_request_with_both_content_length_and_chunked_is_a_400_its_body_unread() -> None:
    # RFC 9112 §6.1: such a request is a smuggling attempt to be handled as an error.
    # relayd read its body by the chunks and made the call: the message was published.
    router = Recording()
    body = json.dumps({"to": "bob", "message": "smuggled"}).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    async with api(router) as address:
        status_line, _headers, payload = await raw(
            address,
            post_head(
                "/api/publish", f"Content-Length: {len(chunked)}", "Transfer-Encoding: chunked"
            )
            + chunked,
        )
    assert status_of(status_line) == 400
    assert json.loads(payload)["error"] == "invalid_request"
    assert router.calls == []  # the body was not read: nothing was published


async def test_a_request_that_does_not_arrive_in_time_is_a_408(
    autojump_clock: trio.abc.Clock,
) -> None:
    stats = Stats()
    async with api(Recording(), stats=stats) as address:
        start = trio.current_time()
        # The head arrived, the body never does: under /api/, JSON.
        half = await raw(
            address,
            post_head("/api/ids", "Content-Length: 10") + b"{}",
        )
        assert trio.current_time() - start == pytest.approx(REQUEST_TIMEOUT_S)
        # Not even the head: relayd cannot tell it was for the API.
        headless = await raw(address, b"POST /api/pu")
    assert (half[0], half[1]["content-type"]) == (
        "HTTP/1.1 408 Request Timeout",
        "application/json",
    )
    assert json.loads(half[2]) == {
        "error": "request_timeout",
        "detail": "the request did not arrive whole within 5 s",
    }
    assert (status_of(headless[0]), headless[1]["content-type"]) == (
        408,
        "text/plain; charset=utf-8",
    )
    assert stats.api_requests == {("/api/ids", 408): 1}


async def test_a_call_waiting_for_the_router_past_the_request_deadline_gets_its_answer(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The 5 s deadline bounded the handler too: a cluster call waiting for other nodes
    # (reply_timeout_s may be 5 s or more) had its connection closed without an answer,
    # while its publish could still be delivered, so a retry sent it twice.
    router = Recording()
    router.delay_s = REQUEST_TIMEOUT_S + 0.5
    async with api(router, reply_timeout_s=REQUEST_TIMEOUT_S + 1) as address:
        start = trio.current_time()
        status, _headers, body = await call(address, "/api/publish", {"to": "b", "message": 1})
        assert (status, body) == (200, {"outcome": "delivered"})
        assert trio.current_time() - start == pytest.approx(router.delay_s)


async def test_a_slow_body_leaves_the_router_its_whole_wait(
    autojump_clock: trio.abc.Clock,
) -> None:
    router = Recording()
    router.connections["bob"] = 1
    router.delay_s = 2.0  # reply_timeout_s, for a node that does not answer
    data = json.dumps({"id": "bob"}).encode()
    head = post_head("/api/presence", f"Content-Length: {len(data)}")
    async with api(router) as address, await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(head)
        await trio.sleep(REQUEST_TIMEOUT_S - 1.5)  # the client's own slowness
        await stream.send_all(data)
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert json.loads(received.partition(b"\r\n\r\n")[2])["connections"] == 1


async def test_a_router_that_never_answers_is_a_503_not_a_closed_connection(
    autojump_clock: trio.abc.Clock,
) -> None:
    router = Recording()
    router.delay_s = math.inf
    async with api(router, reply_timeout_s=REQUEST_TIMEOUT_S) as address:
        start = trio.current_time()
        published = await call(address, "/api/publish", {"to": "b", "message": 1})
        waited = trio.current_time() - start
        presence = await call(address, "/api/presence", {"id": "b"})
    assert waited == pytest.approx(REQUEST_TIMEOUT_S + ROUTER_MARGIN_S)
    # Handed to the router, it may yet be delivered: the answer says it is not known.
    assert published[::2] == (
        503,
        {"outcome": "delivery_unconfirmed", "error": "delivery_unconfirmed"},
    )
    assert presence[::2] == (
        503,
        {"error": "answer_incomplete", "detail": "no answer within 6 s; ask again"},
    )


async def test_every_request_is_counted_and_logged_by_route_and_status() -> None:
    stats = Stats()
    router = Recording()
    router.connections["bob"] = 1
    with structlog.testing.capture_logs() as events:
        async with api(router, stats=stats) as address:
            await call(address, "/api/presence", {"id": "bob"})
            await call(address, "/api/presence", {"id": "bob"})
            await call(address, "/api/publish", {"to": "bob"})
            await call(address, "/api/nope/../../etc", {})
            await call(address, "/metrics", method="GET")  # not the API's
    assert stats.api_requests == {
        ("/api/presence", 200): 2,
        ("/api/publish", 400): 1,
        ("other", 404): 1,  # what a client puts in a path is never a label
    }
    logged = [event for event in events if event["event"] == "api.request"]
    assert [(e["route"], e["method"], e["status"]) for e in logged] == [
        ("/api/presence", "POST", 200),
        ("/api/presence", "POST", 200),
        ("/api/publish", "POST", 400),
        ("other", "POST", 404),
    ]
    for event in logged:
        assert event["peer"].startswith("127.0.0.1:")
        assert event["duration_s"] >= 0


async def test_a_router_that_raises_is_a_500_and_an_error_event_not_a_dead_listener() -> None:
    router = Recording()
    router.connections["bob"] = 1
    with structlog.testing.capture_logs() as events:
        async with api(router) as address:
            router.fail = True
            status, _headers, _body = await call(address, "/api/publish", {"to": "b", "message": 1})
            still = await call(address, "/api/presence", {"id": "bob"})
    assert (status, _body) == (
        500,
        {"error": "internal_error", "detail": "a bug in relayd; it is logged"},
    )
    assert still[0] == 200
    [error] = [event for event in events if event["event"] == "error"]
    assert error["route"] == "POST /api/publish"
    assert error["summary"] == "RuntimeError: injected fault"


async def ask_every_node(router: Recording) -> list[tuple[int, dict[str, str], Any]]:
    """The answers to the calls a cluster asks of every node: presence, disconnect, ids."""
    async with api(router) as address:
        return [
            await call(address, "/api/presence", {"id": "bob"}),
            await call(address, "/api/disconnect", {"id": "bob"}),
            await call(address, "/api/ids", {}),
        ]


async def test_a_node_cut_off_from_the_cluster_is_a_503_to_ask_again_not_a_bug() -> None:
    router = Recording()
    router.cut_off = True
    with structlog.testing.capture_logs() as events:
        answers = await ask_every_node(router)
    for status, _headers, body in answers:
        assert (status, body["error"]) == (503, "broker_unavailable")
        assert body["detail"].startswith("the cluster's broker cannot be reached")
    assert [event for event in events if event["event"] == "error"] == []


async def test_a_question_not_every_node_answered_is_a_503_never_a_partial_200() -> None:
    router = Recording()
    router.connections["bob"] = 1
    router.unanswered = True
    answers = await ask_every_node(router)
    for status, _headers, body in answers:
        assert (status, body) == (
            503,
            {"error": "answer_incomplete", "detail": "not every node answered in time; ask again"},
        )


def test_the_key_is_read_from_its_file_without_the_newline(tmp_path: Path) -> None:
    path = tmp_path / "api.key"
    path.write_text(KEY.decode() + "\n")
    assert load_api_key(AdminSettings(api_key_file=str(path))) == KEY
    assert load_api_key(AdminSettings()) is None


@pytest.mark.parametrize("content", ["short\n", "two words " + "k" * 32, ""])
def test_a_key_too_short_or_not_one_word_is_a_config_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "api.key"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_api_key(AdminSettings(api_key_file=str(path)))
    assert info.value.key == "admin.api_key_file"
    assert "at least 32 characters" in info.value.reason


def test_a_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_api_key(AdminSettings(api_key_file=str(tmp_path / "absent")))
