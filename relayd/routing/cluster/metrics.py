"""The cluster's metrics, read from the link's :class:`~relayd.routing.cluster.link.Health`.

Registered beside relayd's own collector when ``[cluster]`` is on; nothing
here runs per message: a scrape reads the plain fields as they are.

=========================================  =======  =====================================
name                                       type     meaning
=========================================  =======  =====================================
relayd_cluster_broker_up                   gauge    1 while the link to Redis is up
                                                    (connected, resubscribed, probed)
relayd_cluster_broker_connects_total       counter  connections made (first and reconnects)
relayd_cluster_broker_losses_total         counter  times the link broke after being up
relayd_cluster_broker_failed_attempts      counter  attempts to connect that failed
  _total
relayd_cluster_publish_failures_total      counter  batches tried and not published:
                                                    buffer full, refused by Redis
                                                    (NOSCRIPT), lost in flight; not
                                                    those refused while the link is down
relayd_cluster_published_total             counter  messages published (not those of a
                                                    batch Redis refused with NOSCRIPT)
relayd_cluster_received_total              counter  messages received from Redis
relayd_cluster_undecodable_total           counter  received messages that were not
                                                    relayd's, dropped
relayd_cluster_subscriptions               gauge    channels Redis holds for this node
                                                    while the link is up (0 until it
                                                    is up again, resubscribing too)
relayd_cluster_waiting                     gauge    messages and questions waiting for
                                                    other nodes' answers
relayd_cluster_probe_rtt_seconds           gauge    the last probe's round trip
relayd_cluster_publish_inflight_bytes      gauge    bytes published and not yet answered
=========================================  =======  =====================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relayd.routing.cluster.link import Health

__all__ = ["ClusterCollector"]


class ClusterCollector(Collector):
    """Exposes a link's health and the router's waiting questions to Prometheus.

    Args:
        health: the link's health.
        waiting: returns how many messages and questions wait for answers.
    """

    def __init__(self, health: Health, waiting: Callable[[], int]) -> None:
        self._health = health
        self._waiting = waiting

    def collect(self) -> Iterator[Metric]:
        """Build the metric families from the health as it is now."""
        health = self._health
        for name, text, value in [
            ("broker_up", "1 while the link to Redis is up", int(health.up)),
            (
                "subscriptions",
                "Channels Redis holds for this node while the link is up",
                # While resubscribing the count grows before the link is up
                # (restored, probed): 0 until then, as broker_up.
                health.subscriptions if health.up else 0,
            ),
            ("waiting", "Messages and questions waiting for other nodes", self._waiting()),
            ("probe_rtt_seconds", "The last probe's round trip", health.probe_rtt_s),
            (
                "publish_inflight_bytes",
                "Bytes published and not yet answered by Redis",
                health.inflight_bytes,
            ),
        ]:
            yield GaugeMetricFamily(f"relayd_cluster_{name}", text, value=value)
        for name, text, count in [
            ("broker_connects", "Connections to Redis made", health.connects),
            ("broker_losses", "Times the link to Redis broke after being up", health.losses),
            (
                "broker_failed_attempts",
                "Attempts to connect to Redis that failed",
                health.failed_attempts,
            ),
            (
                "publish_failures",
                "Batches tried and not published (buffer full, refused by Redis,"
                " lost in flight); not those refused while the link is down",
                health.publish_failures,
            ),
            ("published", "Messages published (not those Redis refused unrun)", health.published),
            ("received", "Messages received from Redis", health.received),
            ("undecodable", "Received messages that were not relayd's", health.undecodable),
        ]:
            yield CounterMetricFamily(f"relayd_cluster_{name}", text, value=count)
