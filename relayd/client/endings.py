"""How a client's connection, and its block, end: what follows, what is raised.

Without I/O. When a connection ends, :func:`retryable` says whether the
client may connect again (relayd's close code says whether the cause may
pass), and :func:`final_error` what sending and receiving raise once it will
not. When the ``connect`` block ends with an exception, :func:`raise_alone`
raises it as itself, not inside the group the client's nursery made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

import trio

from relayd.client.errors import ConnectError, closed_error
from relayd.client.link import CloseInfo

__all__ = ["final_error", "raise_alone", "retryable"]


def retryable(closed: CloseInfo) -> bool:
    """Whether connecting again may help: this client did not close it, and the cause may pass.

    A message over the bound that follows relayd's limit (:attr:`CloseInfo.over_bound`)
    may pass: the new connection is told the limit a reload raised.
    """
    if closed.by_client:
        return False
    return closed.over_bound or closed_error(closed.code).retryable


def final_error(
    closed: CloseInfo, cause: ConnectError | None = None
) -> Callable[[], BaseException]:
    """What sending and receiving raise once nothing more can come.

    A new exception for each raise: one instance raised in several tasks would
    collect all their tracebacks.
    """

    def error() -> BaseException:
        if closed.by_client:
            return trio.ClosedResourceError("the client was closed")
        exc = closed_error(closed.code, closed.reason)
        exc.__cause__ = cause
        exc.__suppress_context__ = True
        return exc

    return error


def raise_alone(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise what the block raised as itself, not inside a group.

    The client's own tasks raise nothing but bugs, so a group from its
    nursery holds the block's exception (or the first connection's
    :class:`ConnectError`), perhaps beside the ``Cancelled`` of tasks that were
    stopped for it.
    """
    others = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
    if len(others) > 1:
        raise group
    alone = others[0] if others else group.exceptions[0]  # a group the block raised, too
    context = alone.__context__
    try:
        raise alone
    finally:
        alone.__context__ = context  # not the group: it only wrapped this one
        del alone, context
