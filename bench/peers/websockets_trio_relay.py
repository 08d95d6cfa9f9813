"""Seed-dialect relay on the ``websockets`` library's trio server (a bench peer).

Usage: ``python websockets_trio_relay.py [PORT] [HOST]`` (port 0 picks one). Prints
``{"event": "server.ready", "port": N}`` once listening; SIGTERM stops it.

``websockets.trio.server`` ships with the installed websockets (17.4); the same relay as the
asyncio peer, on trio. Compression is off because the bench client never negotiates it.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys

import trio
from seed_protocol import Deliver, decide, listen_address, new_id, ready_line
from websockets.exceptions import ConnectionClosed
from websockets.trio.server import ServerConnection, serve

clients: dict[str, ServerConnection] = {}


async def handler(ws: ServerConnection) -> None:
    """Serve one client: send its id, then relay each frame it sends."""
    client_id = new_id()
    clients[client_id] = ws
    try:
        await ws.send(client_id)
        async for raw in ws:
            decision = decide(raw, clients)
            if isinstance(decision, Deliver):
                # The recipient may have left while this was on its way.
                with contextlib.suppress(ConnectionClosed):
                    await clients[decision.to].send(decision.text)
            else:
                await ws.send(decision.frame)
    finally:
        del clients[client_id]


async def main(port: int, host: str) -> None:
    """Serve until SIGTERM or SIGINT."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                functools.partial(serve, handler, port, host=host, compression=None)
            )
            print(ready_line(server.listeners[0].socket.getsockname()[1]), flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, *listen_address(sys.argv))
