"""One message offered to every connection holding its recipient id (no I/O, never waits).

Used by every router, for its own connections: :class:`~relayd.routing.local.LocalRouter`
for all of them, the cluster's routers for the ones on their node (also for messages that
arrive from other nodes).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from relayd.routing.interface import Peer
from relayd.routing.table import DELIVERED, RECIPIENT_BUSY, Outcome, outcome_of
from relayd.wire.dialects import Dialect, delivery_payload
from relayd.wire.server_frames import text_frame

__all__ = ["offer"]


def offer(peers: Sequence[Peer], sender: str, message: msgspec.Raw) -> Outcome:
    """Offer ``message`` from ``sender`` to each of ``peers``, encoded once per dialect.

    Returns:
        ``DELIVERED`` if any took it, ``RECIPIENT_BUSY`` if all were full,
        ``UNKNOWN_RECIPIENT`` if there were none (:func:`~relayd.routing.table.outcome_of`).
    """
    if len(peers) == 1:  # the common case, without the general one's containers
        peer = peers[0]
        if peer.deliver(text_frame(delivery_payload(peer.dialect, sender, message))):
            return DELIVERED
        return RECIPIENT_BUSY
    frames: dict[Dialect, bytes] = {}
    accepted = []
    for peer in peers:
        frame = frames.get(peer.dialect) or frames.setdefault(
            peer.dialect, text_frame(delivery_payload(peer.dialect, sender, message))
        )
        accepted.append(peer.deliver(frame))
    return outcome_of(accepted)
