"""The one place the daemon's router is chosen: the daemon knows routers only by the interface.

:func:`build_router` returns the :class:`~relayd.routing.local.LocalRouter` for a
single process, and with ``cluster.enabled`` a
:class:`~relayd.routing.cluster.router.ClusterRouter`, imported only then: with the
cluster off, neither :mod:`relayd.routing.cluster` nor the Redis client is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from relayd.config import Settings
from relayd.errors import ConfigError
from relayd.routing.interface import Router
from relayd.routing.local import LocalRouter
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats

__all__ = ["build_router", "check_router_files"]

#: The cluster's Redis client and what it brings (the extra relayd[cluster]).
_REDIS_CLIENT: Final = ("coredis", "anyio")


def build_router(
    settings: Settings,
    events: MessageEvents,
    stats: Stats,
    *,
    shared_ids: Callable[[], bool] = lambda: False,
) -> Router:
    """The router ``settings`` ask for, recording outcomes in ``events`` and ``stats``.

    Args:
        settings: the effective settings.
        events: where message outcomes are counted and logged.
        stats: the counters.
        shared_ids: whether an id may now be held by several connections
            (authentication is on): a cluster node then fans a message out to
            the other nodes even when it holds the id itself.

    Raises:
        ConfigError: the cluster's password file cannot be read.
    """
    if settings.cluster.enabled:
        from relayd.routing.cluster.build import cluster_router  # only now: it loads coredis

        return cluster_router(settings.cluster, events, stats, shared_ids=shared_ids)
    return LocalRouter(events, stats)


def check_router_files(settings: Settings) -> None:
    """Read and check the files the router ``settings`` ask for would read: at start and reload.

    Raises:
        ConfigError: the cluster's password or CA file cannot be used, or the
            cluster's Redis client is not installed.
    """
    if settings.cluster.enabled:
        try:
            from relayd.routing.cluster.build import check_files  # only now: loads coredis
        except ImportError as error:
            if not (error.name or "").startswith(_REDIS_CLIENT):
                raise  # a bug of relayd's, not a missing extra
            raise ConfigError(
                f"needs the Redis client, which is not installed here ({error}): "
                "install relayd[cluster]",
                key="cluster.enabled",
                source="in settings",
            ) from None
        check_files(settings.cluster)
