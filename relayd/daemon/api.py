"""The server API: what an application's backend asks of relayd, as JSON over the admin listener.

Four calls, each ``POST`` with a JSON object in and a JSON object out (docs/api.md):

* ``/api/publish`` ``{"to", "message"}``: deliver ``message`` to every connection of
  ``to`` as any message is delivered, in the recipient's dialect, from
  :data:`SERVER_SENDER`;
* ``/api/disconnect`` ``{"id", "code"?, "reason"?}``: close every connection of ``id``;
* ``/api/presence`` ``{"id"}``: whether ``id`` is connected, and with how many connections;
* ``/api/ids`` ``{"after"?, "limit"?}``: connected ids in order, a page at a time.

The calls go to the router (:class:`ApiRouter`: the methods of
:class:`~relayd.routing.interface.Router` the API uses), so they mean the same on one node
and on a cluster. Nothing here does I/O but through the router: the admin listener
(:mod:`relayd.daemon.admin`) owns the sockets, the bounds on a request, and the 500 for a
bug; this module gives it the API as an :class:`~relayd.daemon.admin.Area` under
``/api/``, so that every answer there is JSON, the listener's own refusals included.

What the operator sees: every request under ``/api/`` is counted in
``relayd_api_requests_total{route,status}`` and logged as an ``api.request`` event (at
most a burst and then a line a second per route: :data:`relayd.telemetry.log.THROTTLED`;
the count is whole). A publish's message is counted apart from clients' messages, in
``relayd_api_messages_total{outcome}`` (:mod:`relayd.telemetry.messages`).

Authentication: with an API key (``[admin] api_key_file``), every call must carry
``Authorization: Bearer <key>``; a missing or wrong key is 401, compared in constant time,
and answered before the request's body is read (:attr:`Area.authorize`).
Without one, which ``relayd check-config`` allows only while the admin listener is on
loopback, any local process may call; but not a web page in a browser on the same
machine, which is such a process acting for any site: a call with a body must say
``Content-Type: application/json`` (415 otherwise), which a page can send to another
origin only after a CORS preflight relayd never grants, and, without a key, its ``Host``
must be an IP address or ``localhost`` (403 otherwise), which a page whose own name was
rebound to 127.0.0.1 cannot send. Both before the body is read.

Error handling: a request relayd cannot take is answered, never raised: 400
``invalid_request`` (not JSON: not UTF-8, not JSON's syntax, nested too deeply; a
field missing or of the wrong type), 401
``unauthorized``, 413 ``message_too_large``, and in a cluster 503
``broker_unavailable`` for presence, disconnect and ids while the node cannot ask
Redis (its link down, its buffer full, or Redis had lost relayd's scripts; and for
every call while relayd starts, before its router runs), and 503
``answer_incomplete`` when not every node answered them (a part is
never answered as the whole); 503 ``shutting_down`` once relayd drains, also for a
call the drain cut short (:meth:`_Api._query`, :meth:`_Api.publish`); each with a
``detail`` for a person. The listener's
refusals (404, 405, 408, 413 ``request_too_large``, 500) are the same JSON.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Final, Protocol, TypeVar

import msgspec
import trio

from relayd.daemon.admin import MAX_BODY_BYTES, Area, Exchange, Request, Response, Routes
from relayd.errors import BrokerUnavailable, ErrorCode, IncompleteAnswer
from relayd.policy.auth import bearer
from relayd.routing.table import Outcome
from relayd.telemetry.log import get_logger
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats
from relayd.wire.dialects import MAX_ID_CHARS, SERVER_SENDER, TOO_DEEP, syntax_error

__all__ = [
    "BODY_BESIDE_MESSAGE",
    "DEFAULT_PAGE",
    "MAX_PAGE",
    "PREFIX",
    "ROUTER_MARGIN_S",
    "SERVER_SENDER",
    "ApiRouter",
    "api_area",
]

#: The paths of the API on the admin listener.
PREFIX: Final = "/api/"

#: Ids per ``/api/ids`` page unless ``limit`` says otherwise, and the most it may say:
#: a page of 1000 ids of 256 characters is at most about 260 KB of JSON.
DEFAULT_PAGE: Final = 100
MAX_PAGE: Final = 1000
#: Close codes a disconnect may use: relayd's own policy codes and the range RFC 6455
#: §7.4.2 leaves to applications (4000-4999) and libraries (3000-3999).
_CLOSE_CODES: Final = frozenset({1000, 1001, 1008, 1011, 1013}) | frozenset(range(3000, 5000))
#: A close frame's reason is at most 123 bytes of UTF-8 (RFC 6455 §5.5).
_MAX_REASON_BYTES: Final = 123
_DEFAULT_CLOSE: Final = (1008, "disconnected by the server")
#: How much longer than ``cluster.reply_timeout_s`` a call waits for the router: the
#: cluster router decides every question by then, and its own answer (which it also
#: logs and counts) should be the one given; this bound is for a router that does not.
ROUTER_MARGIN_S: Final = 1.0
#: What a call's body may hold beside its message: the message is counted as its JSON
#: text, escapes included, as the body carries it, so this is room for ``to`` (256
#: characters, escaped at most six bytes each) and JSON's white space.
BODY_BESIDE_MESSAGE: Final = 64 * 1024

#: A publish's outcomes that leave the message in an outbox, or maybe: answered as they
#: are even once relayd drains, since asking another node would send it twice.
_MAYBE_DELIVERED: Final = frozenset({Outcome.DELIVERED, Outcome.DELIVERY_UNCONFIRMED})

_JSON: Final = "application/json"
#: What HTTP allows around a header's value and its parameters (RFC 9110 §5.6.3).
_HTTP_SPACE: Final = " \t"


class ApiRouter(Protocol):
    """What the API asks of the router (part of :class:`~relayd.routing.interface.Router`)."""

    async def publish(self, to: str, message: msgspec.Raw, *, sender: str) -> Outcome:
        """Deliver ``message`` to every connection holding ``to``; the outcome."""

    async def disconnect(self, client_id: str, code: int, reason: str) -> int:
        """Close every connection holding ``client_id``; how many were closed."""

    async def presence(self, client_id: str) -> int:
        """How many connections hold ``client_id``."""

    async def list_ids(self, *, after: str | None, limit: int) -> list[str]:
        """Connected ids in sorted order, at most ``limit``, each greater than ``after``.

        The API asks for one more than a page, to tell whether another page follows.
        """


ClientId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]


class _Publish(msgspec.Struct, forbid_unknown_fields=True):
    to: ClientId
    message: msgspec.Raw


class _Disconnect(msgspec.Struct, forbid_unknown_fields=True):
    id: ClientId
    code: int = _DEFAULT_CLOSE[0]
    reason: str = _DEFAULT_CLOSE[1]


class _Presence(msgspec.Struct, forbid_unknown_fields=True):
    id: ClientId


class _Ids(msgspec.Struct, forbid_unknown_fields=True):
    after: ClientId | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE


_Call = TypeVar("_Call", _Publish, _Disconnect, _Presence, _Ids)
_T = TypeVar("_T")


def _answer(status: int, body: Mapping[str, object], *headers: tuple[str, str]) -> Response:
    return Response(status, _JSON, json.dumps(body).encode() + b"\n", headers)


def _refuse(status: int, error: str, detail: str, *headers: tuple[str, str]) -> Response:
    return _answer(status, {"error": error, "detail": detail}, *headers)


def _unavailable(error: BrokerUnavailable | IncompleteAnswer) -> Response:
    """A cluster-wide question this node cannot answer now.

    ``broker_unavailable``: it could not ask (the link is down, its buffer is full, or
    Redis refused the question unrun);
    ``answer_incomplete``: it asked, and not every node answered. Not a bug (no
    ``error`` event, no 500): another node may answer, or this one later.
    """
    if isinstance(error, IncompleteAnswer):
        return _refuse(503, "answer_incomplete", f"{error}; ask again")
    return _refuse(503, "broker_unavailable", f"{error}; ask another node, or again later")


def _draining() -> Response:
    """The answer to a call once relayd is draining: ask another node.

    Given before the body is read, and to a call the drain cut short (see
    :meth:`_Api.authorize` and :meth:`_Api.publish`).
    """
    return _refuse(503, "shutting_down", "this relayd is shutting down; ask another node")


def _local_host(host: str) -> bool:
    """Whether a ``Host`` header is an IP address or ``localhost``, not a DNS name.

    A DNS name is what a page rebinds to 127.0.0.1 to read a loopback service as
    its own origin; browsers resolve ``localhost`` themselves, and an address is
    no name at all. The port, if any, is not looked at.
    """
    name = host.strip(_HTTP_SPACE).lower()
    if name.startswith("["):  # an IPv6 address, with a port or not
        name, closed, port = name[1:].partition("]")
        if not closed or port[:1] not in ("", ":"):
            return False
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _json_or_no_body(headers: Mapping[str, str]) -> bool:
    """Whether a request either has no body or says it is JSON (``application/json``)."""
    # h11 has checked Content-Length is digits; the admin listener refused a request with
    # both it and Transfer-Encoding.
    bodiless = "transfer-encoding" not in headers and not int(
        headers.get("content-length", "0") or "0"
    )
    media_type = headers.get("content-type", "").partition(";")[0].strip(_HTTP_SPACE)
    return bodiless or media_type.lower() == _JSON


class _Api:
    """The four calls, bound to a router, the limits in force and the key."""

    def __init__(
        self,
        router: ApiRouter,
        max_message_bytes: Callable[[], int],
        key: bytes | None,
        events: MessageEvents,
        stopping: Callable[[], bool],
        starting: Callable[[], bool],
        wait_s: float,
    ) -> None:
        self._router = router
        self._wait_s = wait_s
        self._max_message_bytes = max_message_bytes
        self._key = key
        self._events = events
        self._stopping = stopping
        self._starting = starting

    def authorize(self, headers: Mapping[str, str]) -> Response | None:
        """The refusal of a call relayd will not take, if any; asked before the body is read.

        401 without the key (if there is one); without a key, 403 for a ``Host`` that
        is a DNS name other than ``localhost`` (a page using DNS rebinding); 415 for a
        body not said to be JSON (a page's cross-site ``text/plain`` POST); 503
        ``shutting_down`` once relayd is draining: its router is closed, and what it
        would answer (``unknown_recipient`` for ids still connected,
        ``broker_unavailable`` with Redis up) would mislead; 503 ``broker_unavailable``
        while relayd starts: its router does not run yet (a cluster node may take
        seconds to first reach Redis), and a call is to be asked again, of this node
        or another.
        """
        if self._key is not None:
            given = bearer(headers)
            if given is None or not hmac.compare_digest(given.encode(), self._key):
                return _refuse(
                    401,
                    "unauthorized",
                    "send the API key as Authorization: Bearer <key>",
                    ("www-authenticate", 'Bearer realm="relayd"'),
                )
        elif not _local_host(headers.get("host", "localhost")):  # no Host: HTTP/1.0
            return _refuse(
                403,
                "host_not_allowed",
                "without an API key, call the server API at an IP address or localhost",
            )
        if not _json_or_no_body(headers):
            return _refuse(
                415, "unsupported_media_type", "send the body as Content-Type: application/json"
            )
        if self._stopping():
            return _draining()
        if self._starting():
            return _refuse(
                503,
                "broker_unavailable",
                "this relayd is starting (its router does not run yet); "
                "ask another node, or again later",
            )
        return None

    async def _asked(self, question: Awaitable[_T]) -> _T:
        """The router's answer to ``question``, waited for at most ``wait_s``.

        The admin listener does not bound a handler (its deadline is for the request's
        arrival), so this is the bound on every wait for the router; cancelling
        ``question`` leaves the router's own deadline to decide it.

        Raises:
            IncompleteAnswer: no answer within ``wait_s``.
        """
        with trio.move_on_after(self._wait_s):
            return await question
        raise IncompleteAnswer(f"no answer within {self._wait_s:g} s")

    async def _query(self, ask: Callable[[], Awaitable[_T]]) -> _T | Response:
        """The router's answer to a question (presence, disconnect, ids), or the 503 instead.

        ``ask`` is called only if relayd is not draining by now: a call whose head was
        let in before the drain began may have its body arrive after it, when the router
        is closed. An answer that comes once the drain has begun is not given either,
        however it came: the node's connections are detached, its link to the cluster is
        leaving, and what its router says then (no connections, ``broker_unavailable``,
        ``answer_incomplete``) is the drain's doing, not the cluster's state. Both are
        answered ``shutting_down``; asking another node is safe, since each question is
        idempotent. Nothing is raised: a refusal is returned.
        """
        if self._stopping():
            return _draining()
        try:
            answer = await self._asked(ask())
        except (BrokerUnavailable, IncompleteAnswer) as error:
            return _draining() if self._stopping() else _unavailable(error)
        return _draining() if self._stopping() else answer

    def _decode(self, request: Request, kind: type[_Call]) -> _Call | Response:
        """The request's body as ``kind``, or the 400 that refuses it."""
        body = request.body or b"{}"
        # JSON is UTF-8 (RFC 8259 §8.1), and a published message goes out in text
        # frames, which must be: msgspec passes over a Raw field's strings without
        # checking their bytes, so check the body whole.
        if not body.isascii():
            try:
                body.decode()
            except UnicodeDecodeError as error:
                return _refuse(
                    400,
                    "invalid_request",
                    f"not JSON: invalid UTF-8 at byte {error.start} ({error.reason})",
                )
        try:
            return msgspec.json.decode(body, type=kind)
        except msgspec.ValidationError as error:
            return _refuse(400, "invalid_request", str(error))
        except msgspec.DecodeError as error:
            return _refuse(400, "invalid_request", f"not JSON: {syntax_error(error, body)}")
        except RecursionError:
            return _refuse(400, "invalid_request", f"not JSON: {TOO_DEEP}")

    async def publish(self, request: Request) -> Response:
        """Hand the message to the router: its outcome, or ``shutting_down`` if a drain decided.

        Once the drain has begun, a message is not handed over (its body may arrive after
        the drain began), and an outcome that says it was not delivered
        (``unknown_recipient`` from a router that let its connections go,
        ``recipient_busy`` from outboxes that take nothing more, ``recipient_unreachable``
        from a link that is leaving) is answered ``shutting_down``, to send it through
        another node. ``delivered`` and ``delivery_unconfirmed`` stand: it is or may be
        in an outbox, and ``shutting_down`` would have it sent twice.
        """
        call = self._decode(request, _Publish)
        if isinstance(call, Response):
            return call
        limit = self._max_message_bytes()
        if len(call.message) > limit:
            # Refused here, not by the router: logged and counted as the router's
            # outcomes are, as a client's message over the limit is.
            self._events.recorder()(
                SERVER_SENDER, call.to, len(call.message), ErrorCode.MESSAGE_TOO_LARGE
            )
            return _refuse(413, "message_too_large", f"message is larger than {limit} bytes")
        if self._stopping():
            return _draining()
        try:
            outcome = await self._asked(
                self._router.publish(call.to, call.message, sender=SERVER_SENDER)
            )
        except IncompleteAnswer:
            # Handed to the router, so it may yet be delivered: unknown, as for a
            # cluster node that did not answer; never answered by closing the socket.
            outcome = Outcome.DELIVERY_UNCONFIRMED
        if self._stopping() and outcome not in _MAYBE_DELIVERED:
            return _draining()
        if outcome.error is None:
            return _answer(200, {"outcome": outcome.value})
        status = 404 if outcome is Outcome.UNKNOWN_RECIPIENT else 503
        return _answer(status, {"outcome": outcome.value, "error": outcome.error.value})

    async def disconnect(self, request: Request) -> Response:
        call = self._decode(request, _Disconnect)
        if isinstance(call, Response):
            return call
        if call.code not in _CLOSE_CODES:
            return _refuse(
                400,
                "invalid_request",
                "code must be 1000, 1001, 1008, 1011, 1013 or from 3000 to 4999",
            )
        if len(call.reason.encode()) > _MAX_REASON_BYTES:
            return _refuse(400, "invalid_request", "reason is over 123 bytes of UTF-8")
        closed = await self._query(
            functools.partial(self._router.disconnect, call.id, call.code, call.reason)
        )
        if isinstance(closed, Response):
            return closed
        return _answer(200, {"id": call.id, "disconnected": closed})

    async def presence(self, request: Request) -> Response:
        call = self._decode(request, _Presence)
        if isinstance(call, Response):
            return call
        connections = await self._query(functools.partial(self._router.presence, call.id))
        if isinstance(connections, Response):
            return connections
        return _answer(
            200, {"id": call.id, "connected": connections > 0, "connections": connections}
        )

    async def ids(self, request: Request) -> Response:
        call = self._decode(request, _Ids)
        if isinstance(call, Response):
            return call
        # One id more than the page: only if it is there does another page follow, so the
        # last page says so itself (a full last page used to point at an empty one).
        ids = await self._query(
            functools.partial(self._router.list_ids, after=call.after, limit=call.limit + 1)
        )
        if isinstance(ids, Response):
            return ids
        page = ids[: call.limit]
        following = page[-1] if len(ids) > call.limit else None
        return _answer(200, {"ids": page, "next": following})


def _observer(stats: Stats) -> Callable[[Exchange], None]:
    """Counts and logs each request under :data:`PREFIX` once it is over."""
    counts = stats.api_requests
    log = get_logger()

    def observe(exchange: Exchange) -> None:
        counts[exchange.route, exchange.status] += 1
        log.info(
            "api.request",
            route=exchange.route,
            method=exchange.method,
            status=exchange.status,
            duration_s=round(exchange.duration_s, 3),
            peer=exchange.peer,
        )

    return observe


def api_area(
    router: ApiRouter,
    *,
    max_message_bytes: Callable[[], int],
    key: bytes | None,
    stats: Stats,
    events: MessageEvents,
    reply_timeout_s: float,
    stopping: Callable[[], bool] = lambda: False,
    starting: Callable[[], bool] = lambda: False,
) -> Area:
    """The API under :data:`PREFIX`, for :func:`relayd.daemon.admin.serve_admin`.

    Args:
        router: where the calls go.
        max_message_bytes: the largest message a publish may carry now
            (``limits.max_message_bytes``, as a reload leaves it).
        key: the API key every call must present; None: no key (loopback only).
        stats: where requests are counted (``api_requests``).
        events: where a publish refused here (``message_too_large``) is logged and
            counted, as the router's outcomes are.
        reply_timeout_s: how long the router may wait for other cluster nodes
            (``cluster.reply_timeout_s``); a call waits for the router that long and
            :data:`ROUTER_MARGIN_S` more, then answers 503 (``delivery_unconfirmed``
            for a publish, ``answer_incomplete`` for the rest).
        stopping: whether relayd is draining: every call is then refused with 503
            ``shutting_down``.
        starting: whether ``router`` does not run yet: every call is then refused
            with 503 ``broker_unavailable`` (the listener serves health checks
            while a cluster node first reaches Redis, which may take seconds).
    """
    api = _Api(
        router,
        max_message_bytes,
        key,
        events,
        stopping,
        starting,
        reply_timeout_s + ROUTER_MARGIN_S,
    )
    routes: Routes = {
        f"{PREFIX}publish": {"POST": api.publish},
        f"{PREFIX}disconnect": {"POST": api.disconnect},
        f"{PREFIX}presence": {"POST": api.presence},
        f"{PREFIX}ids": {"POST": api.ids},
    }
    return Area(
        PREFIX,
        routes,
        _refuse,
        _observer(stats),
        api.authorize,
        # A publish may carry what a client may send: with max_message_bytes raised
        # past 1 MiB, a body bound of 1 MiB refused messages within it (413).
        lambda: max(MAX_BODY_BYTES, max_message_bytes() + BODY_BESIDE_MESSAGE),
    )
