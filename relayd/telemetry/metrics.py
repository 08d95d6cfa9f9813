"""relayd's counters, kept as plain integers and exposed in Prometheus text format.

The hot path (readers, the router, writers) only adds to plain ints and dict
entries of one :class:`Stats` object: no locks, no label lookups, no
allocation, because trio runs it all on one thread. :class:`StatsCollector`
turns those numbers into metric families when ``/metrics`` is scraped, so a
scrape costs what it costs and a relayed message costs nothing more.

Metrics (all prefixed ``relayd_``; the label values relayd knows are exported at 0
from the start, so that ``increase()`` sees their first events):

========================================  =======  ===========================================
name                                      type     meaning
========================================  =======  ===========================================
connections_open                          gauge    WebSocket connections open now
connections_total                         counter  WebSocket connections accepted
handshakes_rejected_total{status,reason}  counter  handshakes refused, by HTTP status and a
                                                   stable reason (:data:`REFUSAL_REASONS`): a
                                                   503 is max_connections (relayd is full),
                                                   max_connections_per_ip (one address at its
                                                   own cap) or shutting_down
handshakes_dropped_total{limit}           counter  connections closed unread when accepted, being
                                                   over max_handshakes or max_handshakes_per_ip
auth_failures_total                       counter  handshakes whose token was refused with 401
                                                   (429 refusals of an address that failed too
                                                   often are under handshakes_rejected)
messages_total{outcome}                   counter  client messages, by outcome (delivered,
                                                   unknown_recipient, recipient_busy, invalid_json…)
api_messages_total{outcome}               counter  messages published through the server API, by
                                                   outcome (delivered, unknown_recipient…): apart
                                                   from clients', so that a backend pushing to ids
                                                   that left is not a refusal rate of clients
api_requests_total{route,status}          counter  server API requests, by route (``other`` for
                                                   paths that are none) and HTTP status (0: no
                                                   answer was sent)
bytes_received_total                      counter  bytes of client frames (closed connections
                                                   and open ones)
bytes_sent_total                          counter  bytes of frames sent to clients
errors_total{code}                        counter  error frames sent, by error code
closes_total{code}                        counter  closed connections, by close code; a code a
                                                   client chose outside 1000-1015 is "other"
relay_latency_seconds                     hist.    from a message's arrival to its hand-over
                                                   to the recipient's outbox
ready                                     gauge    1 while relayd accepts connections (what
                                                   ``/readyz`` answers), else 0
build_info{version,python}                gauge    always 1; the labels say what runs
config_reloads_total{result}              counter  reloads (SIGHUP), ``applied`` or ``refused``
config_last_reload_successful             gauge    0 if the last reload was refused, else 1
internal_errors_total                     counter  bugs relayd contained: ``error`` events (a
                                                   connection, an admin request or the cluster
                                                   link ended; everything else went on)
log_lines_dropped_total                   counter  log lines dropped: nobody reads them, or a
                                                   write failed (stdout closed: see
                                                   telemetry.line_sink)
========================================  =======  ===========================================
"""

from __future__ import annotations

import bisect
import collections
import platform
from collections.abc import Callable, Iterator, Mapping
from typing import Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from relayd import __version__
from relayd.errors import ErrorCode
from relayd.telemetry.line_sink import dropped_lines
from relayd.telemetry.log import internal_errors

__all__ = ["LATENCY_BUCKETS_S", "REFUSAL_REASONS", "Stats", "StatsCollector"]

#: Upper bounds of the latency histogram, seconds: 50 µs to 1 s.
LATENCY_BUCKETS_S: Final = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
)  # fmt: skip


#: Close codes with a label of their own: RFC 6455's registry (§7.4.1, 1000-1015).
#: A client may close with any code from 3000 to 4999; each would be a series
#: of its own, so they are counted together as "other".
_NAMED_CLOSE_CODES: Final = frozenset(range(1000, 1016))

# The label values exported at 0 before their first event. Prometheus's increase()
# and rate() take a series' first sample as their start, so a series that appeared
# with a burst (eleven 1013 closes between two scrapes) would never show it, and the
# alerts on it would not fire. Other values appear with their first event.
#: Every close code relayd records: its own, its clients', 1005 and 1006.
_KNOWN_CLOSE_CODES: Final = ("1000", "1001", "1002", "1003", "1005", "1006", "1007", "1008",
                             "1009", "1010", "1011", "1012", "1013", "1014", "other")  # fmt: skip
#: The ``reason`` label of a handshake refused with each status, unless the refusal
#: names its own (:attr:`relayd.wire.handshake.Refusal.kind`). A limit's label is its
#: setting's name. 0: the client left (or the answer was cut short) before an answer.
REFUSAL_REASONS: Final = {
    0: "client_left",
    400: "bad_request",
    401: "token",
    403: "token",
    408: "handshake_timeout_s",
    426: "unsupported_version",
    429: "max_auth_failures_per_ip",
    431: "max_header_bytes",
    500: "internal_error",
}
#: Every (status, reason) a handshake is refused with (``token`` alone has two statuses).
_KNOWN_REFUSALS: Final = (
    *REFUSAL_REASONS.items(),
    (400, "unsupported_subprotocol"),
    (403, "origin"),
    (503, "max_connections"),
    (503, "max_connections_per_ip"),
    (503, "shutting_down"),
)
#: The limits of handshakes_dropped.
_KNOWN_DROPS: Final = ("max_handshakes", "max_handshakes_per_ip")
#: Every outcome of a client's message: delivered, or the error code it was answered with.
_KNOWN_OUTCOMES: Final = ("delivered", *ErrorCode)
#: Every outcome of a server API publish (its other refusals are HTTP's, not outcomes).
_KNOWN_API_OUTCOMES: Final = (
    "delivered",
    ErrorCode.UNKNOWN_RECIPIENT,
    ErrorCode.RECIPIENT_BUSY,
    ErrorCode.MESSAGE_TOO_LARGE,
    ErrorCode.RECIPIENT_UNREACHABLE,
    ErrorCode.DELIVERY_UNCONFIRMED,
)


class Stats:
    """Counters since start; every field is plain, updated in place."""

    __slots__ = (
        "api_messages",
        "api_requests",
        "auth_failures",
        "bytes_received",
        "bytes_sent",
        "closes",
        "connections_total",
        "dropped",
        "errors",
        "last_reload_applied",
        "latency_buckets",
        "latency_count",
        "latency_sum",
        "messages",
        "rejected",
        "reloads",
    )

    def __init__(self) -> None:
        self.connections_total = 0
        #: Refused handshakes by (status, reason): :meth:`count_refusal`.
        self.rejected: collections.Counter[tuple[int, str]] = collections.Counter()
        self.auth_failures = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        self.messages: collections.Counter[str] = collections.Counter()
        self.api_messages: collections.Counter[str] = collections.Counter()
        self.api_requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.closes: collections.Counter[int] = collections.Counter()
        self.bytes_received = 0  # of connections that have closed; open ones add theirs
        self.bytes_sent = 0
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)  # the last is +Inf
        self.latency_count = 0
        self.latency_sum = 0.0
        self.reloads: collections.Counter[str] = collections.Counter()
        self.last_reload_applied = True  # no reload yet: nothing refused

    def count_refusal(self, status: int, kind: str = "") -> None:
        """Count one handshake refused with ``status`` (0: none sent), for ``kind`` if given.

        Without a ``kind``, the status's own reason (:data:`REFUSAL_REASONS`); ``other``
        for a status that has none (relayd makes no such refusal).
        """
        self.rejected[status, kind or REFUSAL_REASONS.get(status, "other")] += 1

    def count_reload(self, *, applied: bool) -> None:
        """Count one reload (SIGHUP) and remember whether it was applied."""
        self.reloads["applied" if applied else "refused"] += 1
        self.last_reload_applied = applied

    def observe_latency(self, seconds: float) -> None:
        """Count one relay latency."""
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.latency_count += 1
        self.latency_sum += seconds


class StatsCollector(Collector):
    """Exposes a :class:`Stats` (and the live connection counts) to Prometheus.

    Args:
        stats: the counters.
        open_connections: returns ``(open, bytes_in, bytes_out)`` of the
            connections open now, whose bytes are not in ``stats`` yet.
        ready: whether relayd accepts connections now.
    """

    def __init__(
        self,
        stats: Stats,
        open_connections: Callable[[], tuple[int, int, int]],
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self._stats = stats
        self._open = open_connections
        self._ready = ready

    def collect(self) -> Iterator[Metric]:
        """Build the metric families from the counters as they are now."""
        stats = self._stats
        open_now, bytes_in, bytes_out = self._open()
        yield GaugeMetricFamily(
            "relayd_connections_open", "WebSocket connections open now", value=open_now
        )
        yield CounterMetricFamily(
            "relayd_connections", "WebSocket connections accepted", value=stats.connections_total
        )
        rejected = CounterMetricFamily(
            "relayd_handshakes_rejected",
            "Handshakes refused, by HTTP status (0: none sent) and reason",
            labels=["status", "reason"],
        )
        for status, reason in sorted({*_KNOWN_REFUSALS, *stats.rejected}):
            rejected.add_metric([str(status), reason], stats.rejected[status, reason])
        yield rejected
        yield _by_label(
            "relayd_handshakes_dropped",
            "Connections closed unread when accepted, by the handshake limit they were over",
            "limit",
            stats.dropped,
            _KNOWN_DROPS,
        )
        yield CounterMetricFamily(
            "relayd_auth_failures",
            "Handshakes whose token was refused with 401",
            value=stats.auth_failures,
        )
        yield _by_label(
            "relayd_messages",
            "Client messages, by outcome",
            "outcome",
            stats.messages,
            (*_KNOWN_OUTCOMES, "echoed"),
        )
        yield _by_label(
            "relayd_api_messages",
            "Messages published through the server API, by outcome",
            "outcome",
            stats.api_messages,
            _KNOWN_API_OUTCOMES,
        )
        api_requests = CounterMetricFamily(
            "relayd_api_requests",
            "Server API requests, by route and HTTP status (0: not answered)",
            labels=["route", "status"],
        )
        for (route, status), count in sorted(stats.api_requests.items()):
            api_requests.add_metric([route, str(status)], count)
        yield api_requests
        yield CounterMetricFamily(
            "relayd_bytes_received",
            "Bytes of client frames",
            value=stats.bytes_received + bytes_in,
        )
        yield CounterMetricFamily(
            "relayd_bytes_sent",
            "Bytes of frames sent to clients",
            value=stats.bytes_sent + bytes_out,
        )
        yield _by_label(
            "relayd_errors",
            "Error frames sent to clients, by code",
            "code",
            stats.errors,
            tuple(ErrorCode),
        )
        by_label: collections.Counter[str] = collections.Counter()
        for close_code, count in stats.closes.items():
            by_label[str(close_code) if close_code in _NAMED_CLOSE_CODES else "other"] += count
        yield _by_label(
            "relayd_closes",
            "Closed connections, by close code",
            "code",
            by_label,
            _KNOWN_CLOSE_CODES,
        )
        cumulative = 0
        buckets = []
        for bound, count in zip(
            (*LATENCY_BUCKETS_S, float("inf")), stats.latency_buckets, strict=True
        ):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            "relayd_relay_latency_seconds",
            "From a message's arrival to its hand-over to the recipient's outbox",
            buckets=buckets,
            sum_value=stats.latency_sum,
        )
        yield GaugeMetricFamily(
            "relayd_ready", "1 while relayd accepts connections (/readyz)", value=self._ready()
        )
        build = GaugeMetricFamily(
            "relayd_build_info", "Always 1; the labels say what runs", labels=["version", "python"]
        )
        build.add_metric([__version__, platform.python_version()], 1)
        yield build
        reloads = CounterMetricFamily(
            "relayd_config_reloads", "Reloads (SIGHUP), by result", labels=["result"]
        )
        for result in ("applied", "refused"):
            reloads.add_metric([result], stats.reloads[result])
        yield reloads
        yield GaugeMetricFamily(
            "relayd_config_last_reload_successful",
            "0 if the last reload was refused (the running settings stay), else 1",
            value=stats.last_reload_applied,
        )
        yield CounterMetricFamily(
            "relayd_internal_errors",
            "Bugs relayd contained, each logged as an error event",
            value=internal_errors(),
        )
        yield CounterMetricFamily(
            "relayd_log_lines_dropped",
            "Log lines dropped: nobody reads them (stdout closed), or their write failed",
            value=dropped_lines(),
        )


def _by_label(
    name: str,
    documentation: str,
    label: str,
    counts: Mapping[str, int],
    known: tuple[str, ...] = (),
) -> Metric:
    """A counter family with a series per value of ``label``, in order; ``known`` ones at 0 too."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value in sorted({*known, *counts}):
        family.add_metric([value], counts.get(value, 0))
    return family
