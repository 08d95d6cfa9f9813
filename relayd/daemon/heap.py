"""The cyclic garbage collector, set for a server that makes many short-lived objects.

CPython's collector (3.11, where this was measured, to 3.13) runs a
collection of the youngest generation every 700 allocations of container
objects (less deallocations), and of every generation once a quarter of the
long-lived objects are new. A relayd at work
makes several such objects per message (its envelope, the batch, a cluster
node's question to other nodes) that live for a routing pass or a round trip,
and it starts with some 85,000 objects from its imports and settings that live
as long as the process. With CPython's defaults the messages in flight keep
reaching the old generation, and each full collection walks every start-up
object again: on a cluster node carrying 40,000 messages/s, collections took
about a fifth of its CPU, one of them 84 ms (docs/benchmarks.md, "Garbage
collection", has the measurement and the command).

:func:`settle` is called once by the command line, after start-up and before
serving: it collects what start-up left, moves what survives to the permanent
generation (:func:`gc.freeze`: never walked again) and collects the youngest
generation every :data:`YOUNG_THRESHOLD` allocations instead. Nothing here runs
on the data path; cycles are still collected, later.
"""

from __future__ import annotations

import gc
from typing import Final

__all__ = ["YOUNG_THRESHOLD", "settle"]

#: Net allocations of container objects between two collections of the youngest
#: generation (CPython's default is 700). At 10,000 a message's objects are
#: mostly freed by reference counting before a collection sees them; the
#: collection of about 10,000 objects it then makes took at most 7 ms.
YOUNG_THRESHOLD: Final = 10_000


def settle() -> None:
    """Freeze what start-up made and collect the youngest generation less often.

    Call once, in the daemon's process, after start-up and before serving:
    objects made before are never collected afterwards (nor walked again),
    those made after are collected as ever. Process-wide; not for a library.
    """
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
