"""Seed-dialect relay on the ``websockets`` library's asyncio server (a bench peer).

Usage: ``python websockets_asyncio_relay.py [PORT] [HOST]`` (port 0 picks one). Prints
``{"event": "server.ready", "port": N}`` once listening; SIGTERM stops it.

The simplest relay the library allows: a dict of connections by id, and each handler
awaits the recipient's ``send`` itself. Compression is off because the bench client
never negotiates it; everything else is the library's default.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

from seed_protocol import Deliver, decide, listen_address, new_id, ready_line
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

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
    stop = asyncio.get_running_loop().create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set_result, None)
    async with serve(handler, host, port, compression=None) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(ready_line(bound), flush=True)
        await stop


if __name__ == "__main__":
    asyncio.run(main(*listen_address(sys.argv)))
