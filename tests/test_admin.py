"""The admin listener: metrics, health and readiness over loopback HTTP."""

from __future__ import annotations

import platform

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import relayd
from relayd.daemon.admin import AdminListener, Area, Request, Response, serve_admin, text
from relayd.daemon.server import Server
from tests import wire
from tests.client import (
    connect,
    open_raw,
    read_until_closed,
    read_welcome,
    running,
    send_and_read,
    settings,
)
from tests.test_api import raw


async def _exchange(address: tuple[str, int], request: bytes) -> tuple[str, dict[str, str], str]:
    """Send a raw request; return the status line, the headers (names lower-cased), the body."""
    status_line, headers, body = await raw(address, request)
    return status_line, headers, body.decode()


async def _get(address: tuple[str, int], path: str, method: str = "GET") -> tuple[int, str]:
    request = f"{method} {path} HTTP/1.1\r\nHost: admin\r\n\r\n".encode()
    status_line, _headers, body = await _exchange(address, request)
    return int(status_line.split()[1]), body


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_connections_messages_errors_and_closes() -> None:
    server = Server(settings())
    async with running(server) as url:
        assert server.admin_address is not None
        async with connect(url) as a, connect(url, v1=True) as b:
            await a.send(b.id, "hello")
            await b.recv()
            await a.send("nobody", 1)
            await a.recv()
            await a.ws.send_message("not json")
            await a.recv()
            status, text = await _get(server.admin_address, "/metrics")
            assert status == 200
            samples = _samples(text)
            assert samples[("relayd_connections_open", ())] == 2
            assert samples[("relayd_messages_total", (("outcome", "delivered"),))] == 1
            assert samples[("relayd_messages_total", (("outcome", "unknown_recipient"),))] == 1
            assert samples[("relayd_errors_total", (("code", "invalid_json"),))] == 1
            assert samples[("relayd_relay_latency_seconds_count", ())] == 1
            assert samples[("relayd_bytes_received_total", ())] > 0
            assert ("process_resident_memory_bytes", ()) in samples
    # Stopped: every close is counted and nothing is open.
    samples = _samples(generate_latest(server.registry).decode())
    assert samples[("relayd_connections_open", ())] == 0
    assert samples[("relayd_connections_total", ())] == 2
    assert samples[("relayd_closes_total", (("code", "1000"),))] == 2


def _refused_503(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    """``relayd_handshakes_rejected_total``'s 503 series, by their ``reason``."""
    return {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "relayd_handshakes_rejected_total" and dict(labels)["status"] == "503"
    }


async def test_one_address_at_its_cap_is_not_counted_as_relayd_at_capacity() -> None:
    # One address over max_connections_per_ip, relayd nearly empty, and a 503 counted
    # as relayd being full: both 503s were status="503" alone, and RelaydAtCapacity
    # paged for one client at its own cap (found by a tester).
    server = Server(settings(max_connections=3, max_connections_per_ip=1))
    async with running(server) as url, connect(url):
        assert server.admin_address is not None
        reply = await send_and_read(url, wire.upgrade_request())
        assert reply.startswith(b"HTTP/1.1 503 ")
        samples = _samples((await _get(server.admin_address, "/metrics"))[1])
        assert samples[("relayd_connections_open", ())] == 1
        assert _refused_503(samples) == {
            "max_connections": 0,
            "max_connections_per_ip": 1,
            "shutting_down": 0,
        }
        # relayd itself full: counted apart, whoever asks.
        async with connect(url, local_address="127.0.0.2"), connect(url, local_address="127.0.0.3"):
            reply = await send_and_read(url, wire.upgrade_request(), local_address="127.0.0.4")
            assert reply.endswith(b"server at capacity")
            samples = _samples((await _get(server.admin_address, "/metrics"))[1])
        assert _refused_503(samples) == {
            "max_connections": 1,
            "max_connections_per_ip": 1,
            "shutting_down": 0,
        }
        # A query that sums by status still sees every 503.
        assert sum(_refused_503(samples).values()) == 2


async def test_each_kind_of_refusal_is_counted_under_its_own_reason() -> None:
    server = Server(settings(max_header_bytes=1024))
    async with running(server) as url:
        assert server.admin_address is not None
        for request, status in [
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),  # a plain GET
            (wire.upgrade_request(extra=[("Sec-WebSocket-Protocol", "chat")]), b"400"),
            (wire.upgrade_request(version="8"), b"426"),
            (wire.upgrade_request(extra=[("X-Pad", "x" * 2000)]), b"431"),
        ]:
            reply = await send_and_read(url, request)
            assert reply.startswith(b"HTTP/1.1 " + status), reply
        await (await open_raw(url)).aclose()  # a port probe: connects and leaves
        await trio.testing.wait_all_tasks_blocked()
        samples = _samples((await _get(server.admin_address, "/metrics"))[1])
    counted = {
        labels: value
        for (name, labels), value in samples.items()
        if name == "relayd_handshakes_rejected_total" and value
    }
    assert counted == {
        (("reason", "bad_request"), ("status", "400")): 1,
        (("reason", "unsupported_subprotocol"), ("status", "400")): 1,
        (("reason", "unsupported_version"), ("status", "426")): 1,
        (("reason", "max_header_bytes"), ("status", "431")): 1,
        (("reason", "client_left"), ("status", "0")): 1,
    }


async def test_a_handshake_refused_by_a_drain_is_counted_as_shutting_down() -> None:
    server = Server(settings())
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(server.run)
        async with await trio.open_tcp_stream(*addresses[0]) as half:
            await half.send_all(wire.upgrade_request()[:20])  # a request still arriving
            await trio.testing.wait_all_tasks_blocked()
            server.shutdown("test")
            assert (await read_until_closed(half)).startswith(b"HTTP/1.1 503 ")
    samples = _samples(generate_latest(server.registry).decode())
    assert _refused_503(samples) == {
        "max_connections": 0,
        "max_connections_per_ip": 0,
        "shutting_down": 1,
    }


async def test_health_readiness_and_other_paths() -> None:
    quick = settings().model_copy(
        update={"server": settings().server.model_copy(update={"shutdown_grace_s": 1.0})}
    )
    server = Server(quick)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(server.run)
        address = server.admin_address
        assert address is not None
        assert await _get(address, "/healthz") == (200, "ok\n")
        assert await _get(address, "/readyz") == (200, "ready\n")
        assert (await _get(address, "/nope"))[0] == 404
        assert (await _get(address, "/metrics", method="POST"))[0] == 405
        assert (await _get(address, "/healthz", method="HEAD")) == (200, "")
        # A client that never answers the 1001 keeps the drain going for the
        # grace period; meanwhile relayd is alive but not ready.
        async with await trio.open_tcp_stream(*addresses[0]) as silent:
            await silent.send_all(wire.upgrade_request())
            await silent.receive_some(4096)  # the 101 (and maybe the id)
            server.shutdown("test")
            assert await _get(address, "/readyz") == (503, "not ready: shutting down\n")
            assert await _get(address, "/healthz") == (200, "ok\n")


async def test_answers_carry_reason_phrases_and_a_405_says_what_is_allowed() -> None:
    server = Server(settings())
    async with running(server):
        address = server.admin_address
        assert address is not None
        get = b"GET /readyz HTTP/1.1\r\nHost: admin\r\n\r\n"
        assert (await _exchange(address, get))[0] == "HTTP/1.1 200 OK"
        missing = b"GET /nope HTTP/1.1\r\nHost: admin\r\n\r\n"
        assert (await _exchange(address, missing))[0] == "HTTP/1.1 404 Not Found"
        post = b"POST /metrics HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\n\r\n"
        status_line, headers, _body = await _exchange(address, post)
        assert status_line == "HTTP/1.1 405 Method Not Allowed"
        assert headers["allow"] == "GET, HEAD"
        # A HEAD refused for its body (a bad chunk: 400) was answered by nothing at all:
        # the refusal's body, which a HEAD's answer may not have, made h11 refuse it.
        head = b"HEAD /healthz HTTP/1.1\r\nHost: admin\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        status_line, headers, body = await _exchange(address, head)
        assert status_line == "HTTP/1.1 400 Bad Request"
        assert int(headers["content-length"]) > 0  # the length the GET's body would have
        assert body == ""


async def test_build_info_and_readiness_are_metrics() -> None:
    server = Server(settings())
    async with running(server):
        assert server.admin_address is not None
        _status, text = await _get(server.admin_address, "/metrics")
        samples = _samples(text)
        assert samples[("relayd_ready", ())] == 1
        build = [key for key in samples if key[0] == "relayd_build_info"]
        assert build == [
            (
                "relayd_build_info",
                (("python", platform.python_version()), ("version", relayd.__version__)),
            )
        ]
        assert samples[build[0]] == 1
        server.shutdown("test")
        samples = _samples(generate_latest(server.registry).decode())
        assert samples[("relayd_ready", ())] == 0


async def test_close_codes_a_client_chooses_share_one_series() -> None:
    # 300 distinct client close codes made 301 series of relayd_closes_total (issue 8).
    server = Server(settings())
    async with running(server) as url:
        for code in [*range(3000, 3040), 4999, 1000]:
            async with await open_raw(url, wire.upgrade_request()) as stream:
                await read_welcome(stream)
                await stream.send_all(wire.frame(wire.OP_CLOSE, code.to_bytes(2, "big")))
                echoed = await read_until_closed(stream)
                assert wire.close_code(b"\r\n\r\n" + echoed) == code
    samples = _samples(generate_latest(server.registry).decode())
    closes = {
        labels: value for (name, labels), value in samples.items() if name == "relayd_closes_total"
    }
    assert {labels: value for labels, value in closes.items() if value} == {
        (("code", "1000"),): 1,
        (("code", "other"),): 41,
    }
    assert len(closes) == 15  # the codes relayd records, and "other"


async def test_a_fresh_relayd_exports_the_series_its_alerts_read_at_0() -> None:
    # increase() takes a series' first sample as its start: a 1013 series that first
    # appeared with eleven closes would show no increase, and RelaydSlowConsumers
    # would not fire (found by a tester with promtool).
    server = Server(settings())
    async with running(server):
        samples = _samples(generate_latest(server.registry).decode())
    for name, labels in [
        ("relayd_closes_total", (("code", "1013"),)),
        ("relayd_handshakes_rejected_total", (("reason", "max_connections"), ("status", "503"))),
        (
            "relayd_handshakes_rejected_total",
            (("reason", "max_connections_per_ip"), ("status", "503")),
        ),
        ("relayd_handshakes_rejected_total", (("reason", "internal_error"), ("status", "500"))),
        ("relayd_handshakes_dropped_total", (("limit", "max_handshakes_per_ip"),)),
        ("relayd_messages_total", (("outcome", "rate_limited"),)),
        ("relayd_messages_total", (("outcome", "echoed"),)),
        ("relayd_api_messages_total", (("outcome", "unknown_recipient"),)),
        ("relayd_errors_total", (("code", "recipient_busy"),)),
    ]:
        assert samples[(name, labels)] == 0, (name, labels)
    assert ("relayd_internal_errors_total", ()) in samples


async def test_a_closed_admin_listener_refuses_new_connections_and_answers_those_in_progress() -> (
    None
):
    release = trio.Event()

    async def slow(_request: Request) -> Response:
        await release.wait()
        return text(200, "late\n")

    area = Area(
        "/slow/", {"/slow/call": {"GET": slow}}, lambda s, _e, d: text(s, d), lambda _x: None
    )
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    address = listeners[0].socket.getsockname()[:2]
    closed = trio.Event()
    async with trio.open_nursery() as nursery:
        admin: AdminListener = await nursery.start(
            lambda task_status: serve_admin(
                listeners, CollectorRegistry(), lambda: None, areas=[area], task_status=task_status
            )
        )
        async with await trio.open_tcp_stream(*address) as stream:
            await stream.send_all(b"GET /slow/call HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await trio.testing.wait_all_tasks_blocked()  # in the handler

            async def close() -> None:
                await admin.close()
                closed.set()

            nursery.start_soon(close)
            await trio.testing.wait_all_tasks_blocked()
            assert not closed.is_set()  # it waits for the exchange in progress
            with pytest.raises(OSError, match="all attempts to connect"):
                await trio.open_tcp_stream(*address)  # but accepts no more
            release.set()
            received = b""
            while chunk := await stream.receive_some(65536):
                received += chunk
    assert received.startswith(b"HTTP/1.1 200 ")
    assert received.endswith(b"late\n")
    assert closed.is_set()
