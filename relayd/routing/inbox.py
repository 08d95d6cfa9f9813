"""A router's inbox: how a reader's batch is handed to the routing task.

Every router (the local one, a cluster node's) takes batches through one
bounded memory channel, its inbox, which its routing task drains. A full inbox
makes readers wait: TCP backpressure on the senders. These two functions are
the hand-over, the same for every router.
"""

from __future__ import annotations

import trio

from relayd.errors import RouterClosed
from relayd.routing.interface import Inbound

__all__ = ["hand_over", "try_hand_over"]


def try_hand_over(inbox: trio.MemorySendChannel[list[Inbound]], items: list[Inbound]) -> bool:
    """Put ``items`` in ``inbox`` if it has room; never waits (see ``Router.try_route``).

    Raises:
        RouterClosed: the inbox is closed (the router is shutting down).
    """
    try:
        inbox.send_nowait(items)
    except trio.WouldBlock:
        return False
    except trio.ClosedResourceError:
        raise RouterClosed("router is shutting down") from None
    return True


async def hand_over(inbox: trio.MemorySendChannel[list[Inbound]], items: list[Inbound]) -> None:
    """Put ``items`` in ``inbox``, waiting for room (see ``Router.route``).

    The caller bounds the wait, if it must.

    Raises:
        RouterClosed: the inbox is closed (the router is shutting down).
    """
    # Without a wait when there is room: the reader's next read is a
    # checkpoint anyway, and a yield here would cost a scheduling round per read.
    if try_hand_over(inbox, items):
        return
    try:
        await inbox.send(items)
    except trio.ClosedResourceError:
        raise RouterClosed("router is shutting down") from None
