"""Matching relayd.v1 replies to the messages they answer, without I/O.

relayd answers every message that carries a ``ref`` with exactly one ``ack``
or ``error``, in the order the messages were sent (docs/protocol.md, "Error
codes"). A reply that echoes a ``ref`` answers that message; a reply with
``"ref": null`` (``rate_limited`` and the other checks relayd makes before it
reads the ``ref``) answers the oldest message still waiting.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["Outstanding"]

T = TypeVar("T")


class Outstanding(Generic[T]):
    """Messages sent and not yet answered, in the order they were sent.

    Each one is held under the integer ``ref`` it was sent with. At most as
    many entries as the client allows in flight: the caller bounds it.
    """

    def __init__(self) -> None:
        self._by_ref: dict[int, T] = {}  # insertion order is send order

    def __len__(self) -> int:
        return len(self._by_ref)

    def add(self, ref: int, item: T) -> None:
        """Remember a message about to be sent with ``ref``.

        Raises:
            ValueError: ``ref`` is already waiting (the caller reused one).
        """
        if ref in self._by_ref:
            raise ValueError(f"ref {ref} is already waiting for its reply")
        self._by_ref[ref] = item

    def forget(self, ref: int) -> None:
        """Drop a message that was never sent, so no reply is matched to it."""
        self._by_ref.pop(ref, None)

    def match(self, ref: str | int | None) -> T | None:
        """The message a reply answers, no longer outstanding; None if none waits.

        Args:
            ref: the reply's ``ref``: an integer this client sent, or None for
                a reply relayd gave without reading the ``ref``. A string (this
                client never sends one) or an unknown integer matches nothing.
        """
        if ref is None:
            oldest = next(iter(self._by_ref), None)
            return None if oldest is None else self._by_ref.pop(oldest)
        if isinstance(ref, bool) or not isinstance(ref, int):
            return None
        return self._by_ref.pop(ref, None)

    def clear(self) -> list[T]:
        """Every message still waiting, oldest first; none is outstanding after."""
        items = list(self._by_ref.values())
        self._by_ref.clear()
        return items
