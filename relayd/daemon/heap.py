"""The heap, set for a server: the allocator relayd runs with, and the garbage collector.

**The allocator: the C library's ``malloc``, not pymalloc.**

CPython allocates small objects from pymalloc's pools by default, one pool of
16 KiB per object size, so one connection's objects lie scattered over as many
pools as they have sizes, among every other connection's. A lone chat message
touches some twenty of its sender's and recipient's objects after the CPU has
run other code, and pays for each one it must fetch again; with ``malloc`` a
connection's objects, made together, lie together. That is the likely reason,
not measured (this VM has no cache counters); what is measured is the cost
per message with 5,000 connections: docs/benchmarks.md, "The allocator".

``PYTHONMALLOC`` is read once, as the interpreter starts, so the daemon's
command line (:mod:`relayd.__main__`) calls :func:`serve_with_malloc` first: it
executes the same command again, in the same process (the same PID, arguments
and file descriptors, so systemd's ``MAINPID``, ``NOTIFY_SOCKET`` and the
sockets it passed all stay valid), with ``PYTHONMALLOC=malloc`` added to the
environment. It does not when the variable is set already, to anything (an
operator's choice: ``PYTHONMALLOC=pymalloc`` in the unit keeps CPython's
default), when the interpreter ignores the environment (``python -E`` or
``-I``), or when the command is ``relayd chat`` (the client). The cost is
one more start of the interpreter, some 20 ms.

A SIGHUP sent while the command executes itself again would end the process
(its default action; the handler :mod:`relayd.__main__` installs does not
survive ``exec``), so it is blocked across the ``exec``: the signal mask and a
pending signal survive it, and the new process unblocks SIGHUP once its
handler is in place (:func:`unblock_hangups`), so a reload asked for then is
made, not lost.

**The collector**, set for a server that makes many short-lived objects.
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
import os
import signal
import sys
from collections.abc import Mapping
from typing import Final

__all__ = [
    "ALLOCATOR",
    "VARIABLE",
    "YOUNG_THRESHOLD",
    "restart_environment",
    "serve_with_malloc",
    "settle",
    "unblock_hangups",
]

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


#: The environment variable CPython reads its allocator from, at its start.
VARIABLE: Final = "PYTHONMALLOC"
#: The allocator the daemon runs with unless ``PYTHONMALLOC`` says otherwise.
ALLOCATOR: Final = "malloc"


def restart_environment(environ: Mapping[str, str], *, ignored: bool) -> dict[str, str] | None:
    """The environment to execute the daemon again with, or None to run on as it is.

    Args:
        environ: the process's environment.
        ignored: whether the interpreter ignores ``PYTHON*`` variables (``-E``, ``-I``):
            executing it again would change nothing.
    """
    if ignored or VARIABLE in environ:
        return None
    return {**environ, VARIABLE: ALLOCATOR}


def serve_with_malloc() -> None:
    """Execute this command again with ``PYTHONMALLOC=malloc``, if it is not set; see the module.

    Returns only when it did not (the variable was set, or the ``exec`` failed,
    then relayd runs on with CPython's allocator); otherwise this process
    becomes the new one, and nothing after the call runs in it.
    """
    env = restart_environment(os.environ, ignored=bool(sys.flags.ignore_environment))
    if env is None or not sys.executable or not sys.orig_argv:
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        unblock_hangups()


def unblock_hangups() -> None:
    """Unblock SIGHUP: call once its handler is in place (a SIGHUP kept pending is taken then)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
