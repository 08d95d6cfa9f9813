"""The admin listener: ``/metrics``, ``/healthz`` and ``/readyz`` over plain HTTP/1.1.

It listens apart from the public port, on loopback by default (``[admin]``),
so that metrics and health are for the operator's scraper and load balancer,
never for the internet. One request per connection, answered and closed:
h11 parses it, a deadline bounds it, and nothing a client sends can reach the
relay.

* ``GET /metrics``: Prometheus text format (:mod:`relayd.telemetry.metrics`, plus the
  process's CPU, memory and file descriptors).
* ``GET /healthz``: 200 while the event loop answers at all.
* ``GET /readyz``: 200 while relayd accepts connections; 503 before it is
  serving and once it is draining, so a load balancer stops sending clients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Final

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["serve_admin"]

#: A whole request must arrive and be answered within this many seconds.
REQUEST_TIMEOUT_S: Final = 5.0
#: The largest request head accepted; admin requests are a line and a few headers.
MAX_REQUEST_BYTES: Final = 8192

_Response = tuple[int, str, bytes]


async def serve_admin(
    listeners: Sequence[trio.SocketListener],
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer admin requests on ``listeners`` until cancelled.

    Args:
        listeners: where to accept; closed when this returns.
        registry: the metrics to expose.
        ready: whether relayd accepts connections now.
        task_status: started once accepting.
    """
    handler = functools.partial(_handle, registry=registry, ready=ready)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, list(listeners))
        task_status.started()


async def _handle(
    stream: trio.SocketStream, *, registry: CollectorRegistry, ready: Callable[[], bool]
) -> None:
    async with stream:
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            try:
                await _answer(stream, registry, ready)
            except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                return


async def _answer(
    stream: trio.SocketStream, registry: CollectorRegistry, ready: Callable[[], bool]
) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(MAX_REQUEST_BYTES))
            continue
        if isinstance(event, h11.Request):
            break
        return  # ConnectionClosed before a request
    status, content_type, body = _route(event, registry, ready)
    headers = [
        ("content-type", content_type),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    data = connection.send(h11.Response(status_code=status, headers=headers))
    if event.method != b"HEAD":
        data += connection.send(h11.Data(data=body)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    await stream.send_all(data or b"")


def _route(
    request: h11.Request, registry: CollectorRegistry, ready: Callable[[], bool]
) -> _Response:
    path = request.target.split(b"?", 1)[0]
    if request.method not in (b"GET", b"HEAD"):
        return 405, "text/plain; charset=utf-8", b"method not allowed\n"
    if path == b"/metrics":
        return 200, CONTENT_TYPE_LATEST, generate_latest(registry)
    if path == b"/healthz":
        return 200, "text/plain; charset=utf-8", b"ok\n"
    if path == b"/readyz":
        if ready():
            return 200, "text/plain; charset=utf-8", b"ready\n"
        return 503, "text/plain; charset=utf-8", b"not ready\n"
    return 404, "text/plain; charset=utf-8", b"not found\n"
