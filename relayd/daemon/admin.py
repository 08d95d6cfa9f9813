"""The admin listener: ``/metrics``, ``/healthz``, ``/readyz`` (and routes added to it) on HTTP/1.1.

It listens apart from the public port, on loopback by default (``[admin]``),
so that metrics and health are for the operator's scraper and load balancer,
never for the internet. One request per connection, answered and closed:
h11 parses it, a deadline bounds its arrival, its head and body are bounded in
bytes, and nothing a client sends can reach the relay except through a route.
A route's handler bounds its own waits (the server API's, for other cluster
nodes, by ``reply_timeout_s``): the request's deadline does not cut it short,
since a call cut short gets no answer while what it did (a publish) may still
happen.

* ``GET /metrics``: Prometheus text format (:mod:`relayd.telemetry.metrics`, plus the
  process's CPU, memory and file descriptors).
* ``GET /healthz``: 200 while the event loop answers at all.
* ``GET /readyz``: 200 while relayd accepts connections; 503 with the reason
  otherwise (``not ready: starting`` before it is serving, ``not ready: shutting
  down`` once it is draining), so a load balancer stops sending clients.

The listener is started before the rest of relayd (a cluster node's router may
take seconds to first reach Redis), so that a health check is answered at once.
It is closed last: :meth:`AdminListener.close` stops accepting and waits for the
requests in progress to be answered (a server API call let in before a drain
gets its answer, not a closed connection), within the bound its caller sets.

Every ``GET`` route answers ``HEAD`` too. A request's target may be in
absolute-form (``http://127.0.0.1:9031/metrics``, as a client sends to a proxy):
it is routed by its path, and its authority stands for ``Host`` (RFC 9112
§3.2.2). A path no route has is 404; a method
its route lacks is 405 with ``Allow``; a request h11 cannot parse is 400 (431
for a head over :data:`MAX_HEAD_BYTES`), its text h11's words up to where they quote
the request (``illegal header line``), never the client's bytes (:func:`_unreadable`);
so is one with both ``Content-Length`` and ``Transfer-Encoding``
(RFC 9112 §6.1: a smuggling attempt); one that has not arrived whole within
:data:`REQUEST_TIMEOUT_S` is 408; every answer carries its standard reason
phrase. These refusals are plain text, but under the prefix of an
:class:`Area` (the server API's ``/api/``, :mod:`relayd.daemon.api`), whose
routes come in with it, they are the area's own (JSON there), and each request
there is reported to the area once it is over (:class:`Exchange`). A request
relayd could not read a path from belongs to no area: its 400 or 408 is plain
text.

Resource handling: at most :data:`MAX_CONNECTIONS` connections are served at
once; more wait in the kernel's listen backlog, unaccepted, until one ends. Each
holds at most :data:`MAX_HEAD_BYTES` of request head (however the head is split
across reads) and :data:`MAX_BODY_BYTES` of body (more under an area that takes
more: the server API's ``limits.max_message_bytes`` + 64 KiB, when that is more),
for at most :data:`REQUEST_TIMEOUT_S` while it arrives and then as long as its
handler takes (bounded by the handler); a longer body is refused with 413 before
it is read (a chunked one, once that much has come), and an area's ``authorize``
(the server API's key) refuses a request before its body is read too. So the
listener holds at most about ``MAX_CONNECTIONS * 2`` bodies (96 MiB at the
defaults; a body is read into one buffer, however it is chunked, and copied once
at its end), whoever connects.
An answer that the client does not take is given up after
:data:`ANSWER_TIMEOUT_S`; after an answer that leaves part of a request
unread, relayd closes its side and reads what the client still sends, for that
long at most, so that the client reads the answer instead of a
reset.

Error handling: nothing a client sends raises out of a connection's task: a
broken or closed stream ends the exchange without an answer (``status`` 0), and
a bug in a handler is logged and answered 500.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from relayd.daemon.accepting import ACCEPT_RETRY_S, OUT_OF_RESOURCES
from relayd.daemon.addresses import peer_address
from relayd.telemetry.log import get_logger

__all__ = [
    "ANSWER_TIMEOUT_S",
    "ERRORS",
    "MAX_BODY_BYTES",
    "MAX_CONNECTIONS",
    "MAX_HEAD_BYTES",
    "REQUEST_TIMEOUT_S",
    "AdminListener",
    "Area",
    "Exchange",
    "Refuse",
    "Request",
    "Response",
    "Routes",
    "serve_admin",
    "text",
]

#: A whole request (head and body) must arrive within this many seconds.
REQUEST_TIMEOUT_S: Final = 5.0
#: How long an answer may take to be written (and a refused request's rest to be read
#: and thrown away): a client that sends too slowly may read too slowly as well.
ANSWER_TIMEOUT_S: Final = 1.0
#: The largest request head accepted; admin requests are a line and a few headers.
MAX_HEAD_BYTES: Final = 8192
#: Connections served at once: scrapes, health checks and a backend's API calls, each
#: over within REQUEST_TIMEOUT_S + ANSWER_TIMEOUT_S and its handler's own bound (in a
#: cluster, the server API's reply_timeout_s and a margin); more wait in the listen backlog,
#: unaccepted. Within the descriptors the public listeners leave the rest of relayd
#: (RESERVED_DESCRIPTORS, 64), with room for the files a reload reads and the
#: cluster's two connections to Redis.
MAX_CONNECTIONS: Final = 48
#: The largest request body accepted, unless an :class:`Area` takes more (the server
#: API: a message of up to ``limits.max_message_bytes`` and its call's other fields);
#: a larger body is answered 413.
MAX_BODY_BYTES: Final = 1024 * 1024

_TEXT: Final = "text/plain; charset=utf-8"
#: The client's states in which its whole request has been read.
_READ_WHOLE: Final = (h11.DONE, h11.MUST_CLOSE)
#: Where an h11 message starts quoting the request (``illegal header line: bytearray(b'...')``,
#: ``Illegal header name b'...'``): cut there, h11's words before it kept.
_QUOTED: Final = re.compile(r"""[:\s]*(?:bytearray\()?(?<![A-Za-z])b['"].*""", re.DOTALL)
#: What h11's words may hold once cut: no quote, backslash or control character.
_PLAIN: Final = re.compile(r"[A-Za-z0-9 ,.:;()/-]*")
#: What a lingering close reads at a time, and throws away.
_LINGER_READ: Final = 65536

#: The error name of each status the listener answers by itself, for an area's answers
#: (the server API's ``"error"``); the handlers' own errors are theirs.
ERRORS: Final[Mapping[int, str]] = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    431: "request_too_large",
    500: "internal_error",
    501: "invalid_request",
}


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
#: The answer to a request relayd refuses by itself: (status, its name in
#: :data:`ERRORS`, a sentence for a person) -> the response.
Refuse = Callable[[int, str, str], Response]


@dataclasses.dataclass(frozen=True, slots=True)
class Exchange:
    """One request under an :class:`Area`'s prefix, once it is over.

    Attributes:
        route: the path, if the area has a route for it; else ``"other"`` (a 404), so
            that what a client can put in a path is never a label of a metric.
        method: the request's method.
        status: the status answered; 0 when there was none (the client left, or did not
            take the answer in time).
        duration_s: from the connection's accept to the end of the answer.
        peer: the client's address, ``host:port``; None if it was gone.
    """

    route: str
    method: str
    status: int
    duration_s: float
    peer: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class Area:
    """Routes under one path prefix that refuse in a format of their own, and are observed.

    Attributes:
        prefix: the paths the area holds, e.g. ``/api/``.
        routes: its routes, each path under ``prefix``. Each handler bounds its own
            waits and answers when they time out: the listener waits for it.
        refuse: the answer to a request under ``prefix`` the listener refuses itself
            (400, 404, 405, 408, 413, 431, 500; a 405 gets ``Allow`` added).
        observe: told of every request under ``prefix`` once it is over; it must not
            raise or wait.
        authorize: given the headers (names lower-cased) of a request for one of
            ``routes``, before its body is read: the answer that refuses it (the
            server API's 401), or None to read the body and call the route. It must
            not raise or wait.
        max_body_bytes: the largest body its routes take, asked at each request (the
            server API's grows with ``limits.max_message_bytes``); at least
            :data:`MAX_BODY_BYTES`, which is the bound of every other route. It must
            not raise or wait.
    """

    prefix: str
    routes: Routes
    refuse: Refuse
    observe: Callable[[Exchange], None]
    authorize: Callable[[Mapping[str, str]], Response | None] = lambda _headers: None
    max_body_bytes: Callable[[], int] = lambda: MAX_BODY_BYTES


def _plain_refusal(status: int, _error: str, detail: str) -> Response:
    return text(status, f"{detail}\n")


@dataclasses.dataclass(slots=True)
class _Progress:
    """How far one connection's exchange got: what is known of its request, what was sent."""

    accepted: float
    peer: str | None
    method: str = ""
    path: str | None = None  # None until the request's head is parsed
    read: bool = False  # the whole request has arrived
    status: int = 0  # the status sent, once it is
    ended: float = 0.0  # when the answer was written (or given up), before any lingering


class AdminListener:
    """A running admin listener, as :func:`serve_admin` reports it started: what closes it."""

    def __init__(self) -> None:
        self._closing = trio.Event()
        self._closed = trio.Event()
        # The exchanges reading their request: its deadline's scope, and how far it got.
        self._reading: dict[trio.CancelScope, _Progress] = {}

    async def close(self) -> None:
        """Stop accepting (the listening sockets close) and wait for the exchanges in progress.

        An exchange whose request's head has not arrived (a load balancer's idle
        TCP check, a port scan, a client that has sent nothing whole yet) is closed
        at once, unanswered: nothing was asked. Every other ends by itself within
        its own bounds (:data:`REQUEST_TIMEOUT_S` for its request, its handler's
        bound, :data:`ANSWER_TIMEOUT_S` for its answer), so this returns once the
        last one is answered; :func:`serve_admin` returns then too. Not bounded
        here: the caller bounds the wait (relayd's drain, by
        ``server.shutdown_grace_s``), and cancelling :func:`serve_admin` cuts what
        is left. A connection that comes meanwhile waits in the listen backlog and
        is refused when the sockets close, as after any stop.
        """
        self._closing.set()
        for scope, progress in self._reading.items():
            if progress.path is None:
                scope.cancel()
        await self._closed.wait()

    def _headless_cut(self, scope: trio.CancelScope, progress: _Progress) -> bool:
        """Whether a close cut ``progress``'s exchange before its request's head came."""
        return self._closing.is_set() and progress.path is None and scope.cancelled_caught


async def serve_admin(
    listeners: Sequence[trio.SocketListener],
    registry: CollectorRegistry,
    unready: Callable[[], str | None],
    *,
    areas: Sequence[Area] = (),
    task_status: trio.TaskStatus[AdminListener] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer admin requests on ``listeners`` until cancelled, or closed.

    Args:
        listeners: where to accept; closed when this returns, or once
            :meth:`AdminListener.close` is called.
        registry: the metrics to expose.
        unready: why relayd does not accept connections now (``/readyz`` answers 503
            with it), or None while it does. It must not raise or wait.
        areas: more routes, beside ``/metrics``, ``/healthz`` and ``/readyz``, each
            under its prefix with its own refusals and observer.
        task_status: started once accepting, with the :class:`AdminListener` that
            closes it; this returns once that close has stopped accepting and every
            exchange in progress is over.
    """
    table: dict[str, Mapping[str, Handler]] = dict(_built_in(registry, unready))
    for area in areas:
        # A route is found its area (its refusals, its key) by its path's prefix.
        outside = [path for path in area.routes if not path.startswith(area.prefix)]
        if outside:
            raise ValueError(f"routes {outside} are not under their area's {area.prefix}")
        table.update(area.routes)
    # One token per connection, taken before the accept: with several listeners
    # (an address with IPv4 and IPv6) no accept may be under way without one.
    slots = trio.Semaphore(MAX_CONNECTIONS)
    admin = AdminListener()
    handler = functools.partial(_handle, routes=table, areas=tuple(areas), admin=admin)
    # The exchanges outlive the accept loops: closed, the listener stops accepting
    # and this nursery waits for the exchanges in progress to be answered.
    async with trio.open_nursery() as exchanges:
        try:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(_accept, listener, slots, handler, exchanges)
                task_status.started(admin)
                await admin._closing.wait()
                accepting.cancel_scope.cancel()
        finally:
            # Cancelled, each close's checkpoint would raise before the next close.
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()
    admin._closed.set()


async def _accept(
    listener: trio.SocketListener,
    slots: trio.Semaphore,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    """Accept from ``listener`` while a slot is free; each connection holds one until it ends.

    A connection waiting for a slot stays in the kernel's backlog: relayd holds
    nothing for it, and the admin listener can never take more descriptors than
    the public listeners leave it (:data:`~relayd.daemon.accepting.RESERVED_DESCRIPTORS`).
    An accept that fails for want of descriptors or memory is retried after a
    pause, without a line: the public listener's ``listener.paused`` says the
    process is out of them.
    """
    while True:
        await slots.acquire()
        try:
            stream = await _accepted(listener)
        except BaseException:
            slots.release()
            raise
        nursery.start_soon(_serve_one, stream, slots, handler)


async def _accepted(listener: trio.SocketListener) -> trio.SocketStream:
    while True:
        try:
            return await listener.accept()
        except OSError as exc:
            if exc.errno not in OUT_OF_RESOURCES:
                raise
            await trio.sleep(ACCEPT_RETRY_S)


async def _serve_one(
    stream: trio.SocketStream,
    slots: trio.Semaphore,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
) -> None:
    try:
        await handler(stream)
    finally:
        slots.release()


def _built_in(
    registry: CollectorRegistry, unready: Callable[[], str | None]
) -> dict[str, dict[str, Handler]]:
    async def metrics(_request: Request) -> Response:
        return Response(200, CONTENT_TYPE_LATEST, generate_latest(registry))

    async def healthz(_request: Request) -> Response:
        return text(200, "ok\n")

    async def readyz(_request: Request) -> Response:
        reason = unready()
        return text(200, "ready\n") if reason is None else text(503, f"not ready: {reason}\n")

    return {"/metrics": {"GET": metrics}, "/healthz": {"GET": healthz}, "/readyz": {"GET": readyz}}


@dataclasses.dataclass(frozen=True, slots=True)
class _Call:
    """A request read whole, for its route's handler."""

    handler: Handler
    request: Request
    refuse: Refuse


async def _handle(
    stream: trio.SocketStream, *, routes: Routes, areas: tuple[Area, ...], admin: AdminListener
) -> None:
    progress = _Progress(trio.current_time(), peer_address(stream))
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    async with stream:
        read: Response | _Call | None = None
        refusal: tuple[int, str] | None = None
        # The deadline is for the request's arrival only: a handler that waits
        # (other cluster nodes) bounds its own wait and must still be answered.
        with trio.move_on_after(REQUEST_TIMEOUT_S) as deadline:
            admin._reading[deadline] = progress  # its close cuts it while headless
            if admin._closing.is_set():
                deadline.cancel()
            try:
                read = await _read(connection, stream, routes, areas, progress)
            except h11.RemoteProtocolError as exc:
                refusal = (exc.error_status_hint, _unreadable(exc))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                del admin._reading[deadline]
        if admin._headless_cut(deadline, progress):
            return  # nothing was asked: closed unanswered, and not observed
        if deadline.cancelled_caught and not progress.read:
            refusal = (408, f"the request did not arrive whole within {REQUEST_TIMEOUT_S:g} s")
        if isinstance(read, _Call):
            read = await _call(read.handler, read.request, read.refuse)
        with trio.move_on_after(ANSWER_TIMEOUT_S):
            if read is not None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await _send(
                        connection, stream, read, progress, head_only=progress.method == "HEAD"
                    )
            elif refusal is not None:
                status, detail = refusal
                await _send_refusal(connection, stream, progress, areas, status, detail)
            progress.ended = trio.current_time()
            # Read whole, the client's state is DONE (MUST_CLOSE once the answer said
            # "connection: close"): nothing is left to read, and nothing to wait for.
            if progress.status and connection.their_state not in _READ_WHOLE:
                await _linger(stream)
    area = _area_of(progress.path, areas)
    if area is not None:
        assert progress.path is not None
        area.observe(
            Exchange(
                progress.path if progress.path in area.routes else "other",
                progress.method,
                progress.status,
                (progress.ended or trio.current_time()) - progress.accepted,
                progress.peer,
            )
        )


class _Unreadable(h11.RemoteProtocolError):
    """A request relayd itself refuses to read; its message quotes nothing the client sent."""


def _unreadable(exc: h11.RemoteProtocolError) -> str:
    """Why a request is refused, in words of relayd's own.

    h11's messages quote the bytes it could not parse (a request or header line, up to
    the head's bound): echoed in the answer, they would put the client's bytes, control
    characters and all, in whatever shows or logs it, under relayd's name. Its words
    before the quote are kept (``illegal header line``); what is left is kept only in
    plain words (:data:`_PLAIN`), so that an h11 that quotes another way than
    :data:`_QUOTED` knows does not put the client's bytes back.
    """
    if isinstance(exc, _Unreadable):
        reason = str(exc)
    else:
        reason = _QUOTED.sub("", str(exc))
        reason = reason if _PLAIN.fullmatch(reason) else ""
    return f"not a request relayd can read: {reason or 'not HTTP/1.1'}"


async def _linger(stream: trio.SocketStream) -> None:
    """After an answer that left part of the request unread: close gracefully.

    Closing a socket with unread bytes makes the kernel reset the connection,
    and a client still sending its body (refused 401, 413 or 431) would read the
    reset instead of the answer. So relayd ends its side and reads, throwing it
    away, what the client still sends until it closes too; the caller bounds how
    long (:data:`ANSWER_TIMEOUT_S`).
    """
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_eof()
        while await stream.receive_some(_LINGER_READ):
            pass


def _area_of(path: str | None, areas: tuple[Area, ...]) -> Area | None:
    if path is None:
        return None
    return next((area for area in areas if path.startswith(area.prefix)), None)


async def _send_refusal(
    connection: h11.Connection,
    stream: trio.SocketStream,
    progress: _Progress,
    areas: tuple[Area, ...],
    status: int,
    detail: str,
) -> None:
    """Answer ``status`` if h11 still can; a stream that broke meanwhile is given up."""
    area = _area_of(progress.path, areas)
    refuse = _plain_refusal if area is None else area.refuse
    response = refuse(status, ERRORS.get(status, ERRORS[400]), detail)
    # The client may be gone, or h11 have no answer left to give at this point. A
    # HEAD's answer has no body: h11 refused one, and the client got no answer at all.
    with contextlib.suppress(
        h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError
    ):
        await _send(connection, stream, response, progress, head_only=progress.method == "HEAD")


async def _read(
    connection: h11.Connection,
    stream: trio.SocketStream,
    routes: Routes,
    areas: tuple[Area, ...],
    progress: _Progress,
) -> Response | _Call | None:
    """Read the request: its route's call, the answer that refuses it, or None (no request).

    A refusal (401, 404, 405, 413) is decided on the head, before the body is read.
    """
    event = await _head(connection, stream)
    if not isinstance(event, h11.Request):
        return None  # ConnectionClosed before a request
    method = event.method.decode("ascii", "replace")
    path, query, authority = _target(event.target.decode("ascii", "replace"))
    progress.method, progress.path = method, path
    area = _area_of(path, areas)
    refuse = _plain_refusal if area is None else area.refuse
    headers = {
        name.decode("ascii").lower(): value.decode("latin-1") for name, value in event.headers
    }
    if "transfer-encoding" in headers and "content-length" in headers:
        # RFC 9112 §6.1: a sign of request smuggling, to be handled as an error (h11
        # reads the body by its chunks and lets it through). The answer closes.
        raise _Unreadable("both Transfer-Encoding and Content-Length", 400)
    if authority is not None:
        # RFC 9112 §3.2.2: the Host a server goes by is then the target's (an area's
        # authorize reads it: the server API's check of the Host without a key).
        headers["host"] = authority
    methods = routes.get(path)
    handler = None if methods is None else methods.get("GET" if method == "HEAD" else method)
    # Refused on its headers (a wrong key) before a byte of its body is held.
    denied = None if handler is None or area is None else area.authorize(headers)
    limit = MAX_BODY_BYTES if area is None else max(MAX_BODY_BYTES, area.max_body_bytes())
    body = (
        None
        if handler is None or denied is not None
        else await _body(connection, stream, headers, limit)
    )
    progress.read = True  # of a request refused now, the rest is never read
    if denied is not None:
        return denied
    if methods is None:
        return refuse(404, ERRORS[404], f"nothing at {path}")
    if handler is None:
        allowed = sorted({*methods, *(("HEAD",) if "GET" in methods else ())})
        return dataclasses.replace(
            refuse(405, ERRORS[405], f"{path} takes {', '.join(allowed)}"),
            headers=(("allow", ", ".join(allowed)),),
        )
    if body is None:
        return refuse(413, ERRORS[413], f"the body is over {limit} bytes")
    return _Call(handler, Request(method, path, query, headers, body), refuse)


def _target(target: str) -> tuple[str, str, str | None]:
    """A request target's path, query (undecoded) and, in absolute-form, its authority.

    ``/metrics?x`` is origin-form (no authority); ``http://127.0.0.1:9031/metrics?x``
    is absolute-form, which RFC 9112 §3.2.2 says a server must accept: a client that
    talks to relayd as to a proxy (an HTTP library with a proxy setting) sends it. It
    is routed by its path (``/`` when it has none), as the origin-form would be. Any
    other target (``*``, a scheme other than ``http`` or ``https``) is a path no route
    has: 404.

    Raises:
        h11.RemoteProtocolError: 400 for an absolute-form target with no host, with
            userinfo (``user@host``, an error RFC 9110 §4.2.4 says to treat as such),
            or that is no URI.
    """
    scheme, absolute, _rest = target.partition("://")
    if not absolute or scheme.lower() not in ("http", "https"):
        path, _, query = target.partition("?")
        return path, query, None
    try:
        parts = urllib.parse.urlsplit(target)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        raise _Unreadable("the target is no URI", 400) from None
    if not parts.hostname or "@" in parts.netloc:
        raise _Unreadable("the target's authority must be a host, no userinfo", 400)
    return parts.path or "/", parts.query, parts.netloc


async def _call(handler: Handler, request: Request, refuse: Refuse) -> Response:
    """``handler``'s answer; a bug in it is logged and answered 500, never raised.

    An exception escaping here would reach the admin listener's nursery and stop relayd.
    Not bounded here: the handler bounds its own waits (see :class:`Area`).
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
        return refuse(500, ERRORS[500], "a bug in relayd; it is logged")


async def _head(connection: h11.Connection, stream: trio.SocketStream) -> object:
    """The request's head (or the end of the stream before one).

    Raises:
        h11.RemoteProtocolError: 431 for a head over :data:`MAX_HEAD_BYTES`. h11's own
            bound applies only while a head is incomplete, so a head that arrived whole
            in the reads that hold it could be up to twice as long; this one does not
            depend on how the head was split.
    """
    received = [0]
    event = await _next(connection, stream, received)
    unread, _closed = connection.trailing_data
    if isinstance(event, h11.Request) and received[0] - len(unread) > MAX_HEAD_BYTES:
        raise _Unreadable(f"the request head is over {MAX_HEAD_BYTES} bytes", 431)
    return event


async def _next(
    connection: h11.Connection, stream: trio.SocketStream, received: list[int] | None = None
) -> object:
    """The next h11 event, reading from ``stream`` as it needs (counted in ``received``)."""
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(MAX_HEAD_BYTES)
        if received is not None:
            received[0] += len(data)
        connection.receive_data(data)


async def _body(
    connection: h11.Connection, stream: trio.SocketStream, headers: Mapping[str, str], limit: int
) -> bytes | None:
    """The request's body, or None when it would be over ``limit`` bytes.

    A client that asked ``Expect: 100-continue`` is told ``100 Continue`` first: it
    may wait for that before it sends the body (.NET, Java, curl with a large body).
    One refused on its head (401, 404, 405, 413) gets the refusal instead, and keeps
    its body.
    """
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return None  # refused before a byte of it is read
    if connection.they_are_waiting_for_100_continue:
        go_on = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
        await stream.send_all(connection.send(go_on) or b"")
    # One buffer, not a list of pieces: h11 makes a piece of each HTTP chunk, and a
    # body sent in 2-byte chunks held 28 times its size as a list of them.
    body = bytearray()
    while True:
        event = await _next(connection, stream)
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > limit:  # chunked, without a length to refuse it by
                return None
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        else:
            raise _Unreadable("request ended before its body", 400)


async def _send(
    connection: h11.Connection,
    stream: trio.SocketStream,
    response: Response,
    progress: _Progress,
    *,
    head_only: bool = False,
) -> None:
    """Write ``response`` whole; ``progress.status`` says so once it is written."""
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
    progress.status = response.status
