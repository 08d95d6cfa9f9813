"""The admin listener: ``/metrics``, ``/healthz``, ``/readyz`` (and routes added to it) on HTTP/1.1.

It listens apart from the public port, on loopback by default (``[admin]``),
so that metrics and health are for the operator's scraper and load balancer,
never for the internet. One request per connection, answered and closed:
h11 parses it, a deadline bounds it, its head and body are bounded in bytes,
and nothing a client sends can reach the relay except through a route.

* ``GET /metrics``: Prometheus text format (:mod:`relayd.telemetry.metrics`, plus the
  process's CPU, memory and file descriptors).
* ``GET /healthz``: 200 while the event loop answers at all.
* ``GET /readyz``: 200 while relayd accepts connections; 503 before it is
  serving and once it is draining, so a load balancer stops sending clients.

Every ``GET`` route answers ``HEAD`` too. A path no route has is 404; a method
its route lacks is 405 with ``Allow``; every answer carries its standard reason
phrase. Other routes (the server API, :mod:`relayd.daemon.api`) come in as a
:data:`Routes` table.

Resource handling: at most :data:`MAX_HEAD_BYTES` of request head and
:data:`MAX_BODY_BYTES` of body are held per connection, for at most
:data:`REQUEST_TIMEOUT_S`; a longer body is refused with 413 before it is read.
"""

from __future__ import annotations

import dataclasses
import functools
import http
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from relayd.telemetry.log import get_logger

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_HEAD_BYTES",
    "REQUEST_TIMEOUT_S",
    "Request",
    "Response",
    "Routes",
    "serve_admin",
    "text",
]

#: A whole request must arrive and be answered within this many seconds.
REQUEST_TIMEOUT_S: Final = 5.0
#: The largest request head accepted; admin requests are a line and a few headers.
MAX_HEAD_BYTES: Final = 8192
#: The largest request body accepted: a server API call carries one message of at most
#: ``limits.max_message_bytes`` (64 KiB by default) escaped in JSON, which at worst
#: (every byte a ``\\u00XX``) is six times as long; a larger body is answered 413.
MAX_BODY_BYTES: Final = 1024 * 1024

_TEXT: Final = "text/plain; charset=utf-8"


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """One admin request, head and body read whole.

    Attributes:
        method: ``GET``, ``POST``... (``HEAD`` is answered as ``GET``).
        path: the target's path, without the query.
        query: the target's query string, undecoded.
        headers: header names lower-cased, each with its last value.
        body: the request body.
    """

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Response:
    """One admin answer: status, content type, body, and any extra headers."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def text(status: int, body: str) -> Response:
    """A plain-text answer."""
    return Response(status, _TEXT, body.encode())


Handler = Callable[[Request], Awaitable[Response]]
#: Path -> method -> handler.
Routes = Mapping[str, Mapping[str, Handler]]


async def serve_admin(
    listeners: Sequence[trio.SocketListener],
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    *,
    routes: Routes | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer admin requests on ``listeners`` until cancelled.

    Args:
        listeners: where to accept; closed when this returns.
        registry: the metrics to expose.
        ready: whether relayd accepts connections now.
        routes: more routes, beside ``/metrics``, ``/healthz`` and ``/readyz``.
        task_status: started once accepting.
    """
    table = {**_built_in(registry, ready), **(routes or {})}
    handler = functools.partial(_handle, routes=table)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, list(listeners))
        task_status.started()


def _built_in(
    registry: CollectorRegistry, ready: Callable[[], bool]
) -> dict[str, dict[str, Handler]]:
    async def metrics(_request: Request) -> Response:
        return Response(200, CONTENT_TYPE_LATEST, generate_latest(registry))

    async def healthz(_request: Request) -> Response:
        return text(200, "ok\n")

    async def readyz(_request: Request) -> Response:
        return text(200, "ready\n") if ready() else text(503, "not ready\n")

    return {"/metrics": {"GET": metrics}, "/healthz": {"GET": healthz}, "/readyz": {"GET": readyz}}


async def _handle(stream: trio.SocketStream, *, routes: Routes) -> None:
    async with stream:
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            try:
                await _answer(stream, routes)
            except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                return


async def _answer(stream: trio.SocketStream, routes: Routes) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    event = await _next(connection, stream)
    if not isinstance(event, h11.Request):
        return  # ConnectionClosed before a request
    method = event.method.decode("ascii", "replace")
    target = event.target.decode("ascii", "replace")
    path, _, query = target.partition("?")
    headers = {
        name.decode("ascii").lower(): value.decode("latin-1") for name, value in event.headers
    }
    methods = routes.get(path)
    handler = None if methods is None else methods.get("GET" if method == "HEAD" else method)
    response: Response
    if methods is None:
        response = text(404, "not found\n")
    elif handler is None:
        allowed = sorted({*methods, *(("HEAD",) if "GET" in methods else ())})
        response = dataclasses.replace(
            text(405, "method not allowed\n"), headers=(("allow", ", ".join(allowed)),)
        )
    else:
        body = await _body(connection, stream, headers)
        if body is None:
            response = text(413, f"the body is over {MAX_BODY_BYTES} bytes\n")
        else:
            response = await _call(handler, Request(method, path, query, headers, body))
    await _send(connection, stream, response, head_only=method == "HEAD")


async def _call(handler: Handler, request: Request) -> Response:
    """``handler``'s answer; a bug in it is logged and answered 500, never raised.

    An exception escaping here would reach the admin listener's nursery and stop relayd.
    """
    try:
        return await handler(request)
    except Exception as exc:
        get_logger().error(
            "error",
            route=f"{request.method} {request.path}",
            summary=f"{type(exc).__name__}: {exc}",
            exc_info=exc,
        )
        return text(500, "internal error\n")


async def _next(connection: h11.Connection, stream: trio.SocketStream) -> object:
    """The next h11 event, reading from ``stream`` as it needs."""
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event
        connection.receive_data(await stream.receive_some(MAX_HEAD_BYTES))


async def _body(
    connection: h11.Connection, stream: trio.SocketStream, headers: Mapping[str, str]
) -> bytes | None:
    """The request's body, or None when it would be over :data:`MAX_BODY_BYTES`."""
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        return None  # refused before a byte of it is read
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await _next(connection, stream)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_BODY_BYTES:  # chunked, without a length to refuse it by
                return None
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(chunks)
        else:
            raise h11.RemoteProtocolError("request ended before its body")


async def _send(
    connection: h11.Connection, stream: trio.SocketStream, response: Response, *, head_only: bool
) -> None:
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        ("connection", "close"),
        *response.headers,
    ]
    reason = http.HTTPStatus(response.status).phrase.encode()
    data = connection.send(
        h11.Response(status_code=response.status, headers=headers, reason=reason)
    )
    if not head_only:
        data += connection.send(h11.Data(data=response.body)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    await stream.send_all(data or b"")
