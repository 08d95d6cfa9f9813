"""The one place the daemon's router is chosen: the daemon knows routers only by the interface.

:func:`build_router` returns the :class:`~relayd.routing.local.LocalRouter` for a
single process; a broker-backed router for a cluster is chosen here too, and
imported only when the settings ask for it.
"""

from __future__ import annotations

from relayd.config import Settings
from relayd.routing.interface import Router
from relayd.routing.local import LocalRouter
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats

__all__ = ["build_router"]


def build_router(settings: Settings, events: MessageEvents, stats: Stats) -> Router:
    """The router ``settings`` ask for, recording outcomes in ``events`` and ``stats``."""
    del settings  # one process: nothing to choose yet
    return LocalRouter(events, stats)
