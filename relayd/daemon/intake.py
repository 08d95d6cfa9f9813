"""What each message a client sends becomes, decided as it arrives; without I/O.

For every text or binary message its connection reads, :meth:`Intake.judge`
returns what goes to the router: a :class:`~relayd.routing.interface.Relay` to
route, or a :class:`~relayd.routing.interface.Reply` carrying the error frame
that refuses it (or, on the diagnostic echo route, the message itself). Or it
returns None: the client has gone on flooding past its rate limit, and its
connection closes with 1008.

In order, a message is refused for: its rate (``rate_limited``), its size under
a limit lowered by a reload since the connection opened (``message_too_large``;
a message over the connection's own limit never gets here: its frame is
refused with 1009), being binary (``unsupported_data``), or not being an
envelope (``invalid_json``, ``invalid_envelope``). A ``rate_limited`` refusal
carries ``retry_after_ms`` (relayd.v1): how long until that message's turn
(:meth:`~relayd.policy.ratelimit.RateLimiter.retry_after_ms`).
Each refusal is recorded with
:class:`~relayd.telemetry.messages.MessageEvents` (its connection logs and
counts it as the router does for the ones it routes).

Time is passed in; nothing here waits. Tested through ``tests/test_intake.py``.
"""

from __future__ import annotations

from relayd.config import LimitsSettings
from relayd.daemon.live import LiveLimits
from relayd.errors import EnvelopeError, ErrorCode
from relayd.policy.ratelimit import ALLOW, CLOSE, REFUSE, RateLimiter
from relayd.routing.interface import Inbound, Peer, Relay, Reply
from relayd.routing.replies import DETAILS, error_frame, too_large_detail
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats
from relayd.wire.dialects import decode_envelope, read_ref
from relayd.wire.frames import OP_TEXT
from relayd.wire.server_frames import encode_frame

__all__ = ["Intake"]


class Intake:
    """Judges one connection's messages against the limits in force.

    Args:
        peer: the connection, as the router sees it.
        limits: the limits in force, read at each message (a reload may swap them).
        events: where refusals are recorded.
        stats: the counters (error frames, echoes).
        echo: the diagnostic echo route: every message comes back to its sender.
    """

    __slots__ = ("_echo", "_events", "_limiter", "_limiter_limits", "_live", "_peer", "_stats")

    #: The connection's rate limiter, made for :attr:`_limiter_limits` at the first message.
    _limiter: RateLimiter

    def __init__(
        self,
        peer: Peer,
        limits: LiveLimits,
        events: MessageEvents,
        stats: Stats,
        *,
        echo: bool = False,
    ) -> None:
        self._peer = peer
        self._live = limits
        self._events = events
        self._stats = stats
        self._echo = echo
        # No rate limiter until the first message makes it (judge): its buckets
        # start full, and buckets made as the connection opened would be full
        # again by then (their level never passes the burst), so the first
        # message meets the same limiter either way; a connection that sends
        # nothing makes none.
        self._limiter_limits: LimitsSettings | None = None

    def judge(self, opcode: int, payload: bytes, now: float) -> Inbound | None:
        """What the message ``payload`` (of ``opcode``, text or binary) arriving at ``now`` becomes.

        Returns:
            The item to hand to the router, or None when the connection must
            close for flooding (1008).
        """
        limits = self._live.current
        if self._limiter_limits is not limits:
            # The first message, or a reload: a new rate starts now, with a full bucket
            # (and owes the turns the old one promised). The same rate keeps its bucket
            # (a reload that changed nothing, or other limits, would have given every
            # flooding connection a fresh burst).
            old, self._limiter_limits = self._limiter_limits, limits
            rate, burst = limits.messages_per_second, limits.message_burst
            if old is None:
                self._limiter = RateLimiter(rate, burst, now)
            elif old.messages_per_second != rate or old.message_burst != burst:
                self._limiter = self._limiter.renewed(rate, burst, now)
        verdict = self._limiter.check(now)
        peer = self._peer
        size = len(payload)
        if (
            verdict is ALLOW
            and size <= limits.max_message_bytes
            and not self._echo
            and opcode == OP_TEXT
        ):
            # What nearly every message is: passed each check below, to be decoded.
            try:
                # tuple.__new__ as NamedTuple's own __new__ calls it, without
                # that generated function's Python frame: one per message.
                return tuple.__new__(Relay, (peer, decode_envelope(payload), size, now))
            except EnvelopeError as exc:
                error = exc
        elif verdict is CLOSE:
            return None
        elif verdict is REFUSE:
            # Read for its ref alone (the abuse bucket bounds how many), so a
            # client can match the refusal to what it sent.
            ref = read_ref(payload) if opcode == OP_TEXT else None
            error = EnvelopeError(ErrorCode.RATE_LIMITED, DETAILS[ErrorCode.RATE_LIMITED], ref)
        elif size > limits.max_message_bytes:
            detail = too_large_detail(limits.max_message_bytes)
            ref = read_ref(payload) if opcode == OP_TEXT else None
            error = EnvelopeError(ErrorCode.MESSAGE_TOO_LARGE, detail, ref)
        elif self._echo:
            self._stats.messages["echoed"] += 1
            return Reply(peer, encode_frame(opcode, payload))
        else:  # allowed, within the limit, no echo: not text
            error = EnvelopeError(ErrorCode.UNSUPPORTED_DATA, DETAILS[ErrorCode.UNSUPPORTED_DATA])
        self._events.recorder()(peer.client_id, None, size, error.code)
        # A refusal for the rate says when the message's turn comes (relayd.v1).
        retry_after_ms = self._limiter.retry_after_ms(now) if verdict is REFUSE else None
        frame = error_frame(
            peer.dialect, error.code, error.detail, error.ref, self._stats, retry_after_ms
        )
        return Reply(peer, frame)
