"""A cluster node's router from the settings: the one place the cluster is put together.

Called by :func:`relayd.routing.factory.build_router` when ``cluster.enabled`` is on, and
only then imported: with the cluster off, neither this package nor coredis is loaded.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

from relayd.config import ClusterSettings
from relayd.errors import ConfigError
from relayd.routing.cluster import codec
from relayd.routing.cluster.redis import RedisLink
from relayd.routing.cluster.redis_connection import tls_context
from relayd.routing.cluster.router import ClusterRouter
from relayd.telemetry.log import get_logger
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats

__all__ = ["check_files", "cluster_router", "node_name", "read_password"]


def node_name(settings: ClusterSettings) -> str:
    """``cluster.node_name``, or ``<hostname>-<pid>-<4 hex>``: unique, new at every start."""
    if settings.node_name:
        return settings.node_name
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40] or "relayd"
    return f"{host}-{os.getpid()}-{secrets.token_hex(2)}"


def read_password(settings: ClusterSettings) -> str | None:
    """The Redis password from ``cluster.password_file`` (trailing newline dropped), or None.

    Raises:
        ConfigError: the file cannot be read.
    """
    if not settings.password_file:
        return None
    try:
        text = Path(settings.password_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigError(
            f"cannot read {settings.password_file}: {reason}",
            key="cluster.password_file",
            source="in settings",
        ) from error
    return text.rstrip("\r\n")


def check_files(settings: ClusterSettings) -> None:
    """Read and check the files ``[cluster]`` names, as a start would: at start and reload.

    Raises:
        ConfigError: the password file cannot be read, or the CA file is not one.
    """
    read_password(settings)
    try:
        tls_context(settings)
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigError(
            f"cannot load {settings.tls_ca_file} as CA certificates: {reason}",
            key="cluster.tls_ca_file",
            source="in settings",
        ) from None


def cluster_router(
    settings: ClusterSettings,
    events: MessageEvents,
    stats: Stats,
    *,
    shared_ids: Callable[[], bool],
) -> ClusterRouter:
    """The router of a cluster node, with its link to Redis (not connected yet).

    Raises:
        ConfigError: the password file cannot be read.
    """
    password = read_password(settings)
    name = node_name(settings)
    log = get_logger()

    def link(router: ClusterRouter, channels: codec.Channels) -> RedisLink:
        return RedisLink(
            settings, node=name, channels=channels, receiver=router, log=log, password=password
        )

    return ClusterRouter(
        settings,
        node=name,
        link_factory=link,
        events=events,
        stats=stats,
        shared_ids=shared_ids,
    )
