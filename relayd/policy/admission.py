"""Handshake policy, without I/O: accept a WebSocket request, or refuse it with a status.

Two pools of TCP connections are counted, in total and per client IP, so that
connections still in their handshake never take the room meant for
established ones:

* :class:`Handshakes`: accepted, not decided yet. Checked the moment a
  connection is accepted, before anything is read from it: over
  ``max_handshakes`` or ``max_handshakes_per_ip`` the socket is closed at once.
  A client that sends nothing, or half a request, holds a place here (until
  ``handshake_timeout_s``), never in :class:`Capacity`.
* :class:`Capacity`: established connections, plus the one being decided.
  A connection is counted once its request is complete; :func:`decide`
  refuses it with 503 over ``max_connections`` or ``max_connections_per_ip``,
  each a refusal of its own ``kind`` (the metric's ``reason`` label), so that
  one address at its cap is never taken for relayd at capacity.

:func:`decide` looks at one request and the daemon's state and returns an
:class:`Accept` with the dialect, or a :class:`Refusal` with the HTTP status and
the reason logged as ``handshake.rejected`` and sent as the response body.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from typing import Final

from relayd.wire.dialects import V1_SUBPROTOCOL, Dialect, choose_dialect
from relayd.wire.handshake import Refusal

__all__ = ["ECHO_PATH", "SHUTTING_DOWN", "Accept", "Capacity", "Handshakes", "decide"]

#: Where the diagnostic echo route listens when ``diagnostics.echo`` is on.
ECHO_PATH = "/echo"
#: :attr:`Dialect.SEED` as a module global: a member read from its enum class goes
#: through ``EnumType``'s ``__getattr__`` slot, ten times a global's cost.
_SEED: Final = Dialect.SEED
#: A handshake refused because relayd drains (here, or while its request was read).
SHUTTING_DOWN: Final = Refusal(503, "server shutting down", "shutting_down")
_AT_CAPACITY: Final = Refusal(503, "server at capacity", "max_connections")
_ADDRESS_AT_CAPACITY: Final = Refusal(
    503, "too many connections from this address", "max_connections_per_ip"
)


@dataclasses.dataclass(frozen=True, slots=True)
class Accept:
    """Complete the handshake in ``dialect`` (selecting its subprotocol, if any)."""

    dialect: Dialect
    echo: bool = False  # the diagnostic echo route, not the relay

    @property
    def subprotocol(self) -> str | None:
        """The ``Sec-WebSocket-Protocol`` to select, or None for the seed dialect."""
        # A StrEnum member's str() is its value, without Enum.value's Python property.
        return None if self.dialect is _SEED else str(self.dialect)


class _Counts:
    """Connections counted in total and by client IP, against two maximums."""

    __slots__ = ("_by_ip", "max_per_ip", "max_total", "total")

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        # A plain dict, not a Counter: Counter's __missing__ and __delitem__ are
        # Python calls, and every connection opens and closes two of these.
        self._by_ip: dict[str, int] = {}

    def opened(self, ip: str) -> None:
        """Count a connection from ``ip``."""
        self.total += 1
        by_ip = self._by_ip
        by_ip[ip] = by_ip.get(ip, 0) + 1

    def closed(self, ip: str) -> None:
        """Count a connection from ``ip`` (counted by :meth:`opened`) as gone."""
        self.total -= 1
        by_ip = self._by_ip
        # .get: an address never counted must not raise here (the gate's finally calls
        # this); as the Counter this replaces, it then leaves no entry.
        left = by_ip.get(ip, 0) - 1
        if left > 0:
            by_ip[ip] = left
        else:  # no entry for an address with nothing open: they come and go all day
            by_ip.pop(ip, None)

    def from_ip(self, ip: str) -> int:
        """Connections from ``ip`` counted now."""
        return self._by_ip.get(ip, 0)


class Capacity(_Counts):
    """Established connections (and the one being decided), in total and by client IP.

    Args:
        max_total: the most connections the daemon holds.
        max_per_ip: the most connections one client IP holds.
    """

    __slots__ = ()

    def refusal(self, ip: str) -> Refusal | None:
        """The 503 refusing a connection from ``ip`` (already counted) as one too many, or None.

        Its ``kind`` names the limit reached: ``max_connections`` (relayd is full)
        or ``max_connections_per_ip`` (this address is at its own cap).
        """
        if self.total > self.max_total:
            return _AT_CAPACITY
        if self._by_ip.get(ip, 0) > self.max_per_ip:
            return _ADDRESS_AT_CAPACITY
        return None


class Handshakes(_Counts):
    """Handshakes in progress (accepted, not decided yet), in total and by client IP.

    Args:
        max_total: the most handshakes in progress at once.
        max_per_ip: the most one client IP has in progress at once.
    """

    __slots__ = ()

    def admit(self, ip: str) -> str | None:
        """Count a handshake from ``ip`` just accepted, or say which limit it is over.

        Returns:
            None once counted; otherwise the limit's setting name
            (``max_handshakes`` or ``max_handshakes_per_ip``), and it is not counted.
        """
        if self.total >= self.max_total:
            return "max_handshakes"
        if self._by_ip.get(ip, 0) >= self.max_per_ip:
            return "max_handshakes_per_ip"
        self.opened(ip)
        return None


def decide(
    *,
    draining: bool,
    capacity: Capacity,
    client_ip: str,
    offered_subprotocols: Sequence[str],
    path: str = "/",
    echo_route: bool = False,
    origin: str | None = None,
    allowed_origins: Collection[str] = (),
) -> Accept | Refusal:
    """Decide one handshake.

    Args:
        draining: the daemon is shutting down.
        capacity: the open-connection counts, this connection included.
        client_ip: the peer's address.
        offered_subprotocols: ``Sec-WebSocket-Protocol`` values, in order.
        path: the request target.
        echo_route: whether ``/echo`` is the diagnostic echo route; if not,
            it is a relay path like any other.
        origin: the ``Origin`` header, if the client sent one.
        allowed_origins: origins allowed; empty allows every origin.

    Returns:
        ``Refusal(503)`` while draining or over a connection limit,
        ``Refusal(403)`` for a browser origin not in ``allowed_origins``,
        ``Refusal(400)`` when subprotocols were offered but not ``relayd.v1``,
        else an ``Accept`` in the dialect the offer selects.
    """
    if draining:
        return SHUTTING_DOWN
    refusal = capacity.refusal(client_ip)
    if refusal is not None:
        return refusal
    # Only browsers send Origin, and they always do; the list is there to keep
    # other sites' pages from using their visitors' browsers as clients.
    if allowed_origins and origin is not None and origin not in allowed_origins:
        return Refusal(403, "origin not allowed", "origin")
    if echo_route and path.partition("?")[0] == ECHO_PATH:
        return Accept(_SEED, echo=True)
    dialect = choose_dialect(offered_subprotocols)
    if dialect is _SEED and offered_subprotocols:
        # Selecting none of the offered subprotocols makes browsers and most
        # clients fail the connection with no reason given; say why instead.
        return Refusal(
            400,
            f"unsupported subprotocol; offer {V1_SUBPROTOCOL} or none",
            "unsupported_subprotocol",
        )
    return Accept(dialect)
