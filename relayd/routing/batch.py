"""A routing batch: what a router hands out in one go, written once per connection at its end.

A router takes everything queued for it and routes it in one block that does
not await (:func:`routing_batch`). Frames it hands to a connection within the
block (deliveries, replies) wait in that connection's outbox until the block
ends, and the connection then writes them with one system call: a hundred
senders' messages to one receiver in one write, not a hundred. A connection
asks for that with :func:`at_batch_end`; outside a batch (a reader's pong, a
timer's ping, a lone item the local router routes at once) it writes at once.

Process-wide, like the routing task itself: batches do not nest (an inner
block joins the outer one) and never await, so no other task's frames are
held with them.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

__all__ = ["at_batch_end", "routing_batch"]

#: What to run when the batch being routed ends; None outside a batch.
_at_end: list[Callable[[], None]] | None = None


class _RoutingBatch:
    """The context manager :func:`routing_batch` returns (a class: it is entered per batch)."""

    __slots__ = ("_outer",)

    def __enter__(self) -> None:
        global _at_end  # the one routing batch of the process
        self._outer = _at_end is None
        if self._outer:
            _at_end = []

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        global _at_end
        if not self._outer:
            return
        # Each connection asked once; run even when the batch failed, and every
        # one even when one raises (a bug), so that none is left waiting for a
        # write that never comes. The first such error is raised after.
        pending, _at_end = _at_end, None
        assert pending is not None
        failed: BaseException | None = None
        for then in pending:
            try:
                then()
            except BaseException as exc:
                failed = failed or exc
        if failed is not None:
            raise failed


def routing_batch() -> _RoutingBatch:
    """Route a batch in the ``with`` block; connections write what it gave them at its end.

    The block must not await.
    """
    return _RoutingBatch()


def at_batch_end(then: Callable[[], None]) -> bool:
    """Run ``then`` when the batch being routed ends; False if none is (run it now).

    ``then`` must not raise; if it does (a bug), the others still run and the
    batch's ``with`` block raises the first error as it ends.
    """
    if _at_end is None:
        return False
    _at_end.append(then)
    return True
