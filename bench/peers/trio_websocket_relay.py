"""Seed-dialect relay on ``trio-websocket``, relayd's own library, as simply as it goes.

Usage: ``python trio_websocket_relay.py [PORT] [HOST]`` (port 0 picks one). Prints
``{"event": "server.ready", "port": N}`` once listening; SIGTERM stops it.

What relayd would be with nothing but the library: no router task, no outboxes, no
limits, no logs; each handler awaits the recipient's ``send_message`` itself. The
difference between this and relayd is what relayd's own machinery costs.
"""

from __future__ import annotations

import contextlib
import signal
import sys

import trio
from seed_protocol import Deliver, decide, listen_address, new_id, ready_line
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

clients: dict[str, WebSocketConnection] = {}


async def handler(request: WebSocketRequest) -> None:
    """Serve one client: send its id, then relay each frame it sends."""
    try:
        ws = await request.accept()
    except ConnectionClosed:
        return  # accept() itself raises when the client is already gone
    client_id = new_id()
    clients[client_id] = ws
    try:
        await ws.send_message(client_id)
        while True:
            decision = decide(await ws.get_message(), clients)
            if isinstance(decision, Deliver):
                # The recipient may have left while this was on its way.
                with contextlib.suppress(ConnectionClosed):
                    await clients[decision.to].send_message(decision.text)
            else:
                await ws.send_message(decision.frame)
    except ConnectionClosed:
        pass
    finally:
        del clients[client_id]


async def main(port: int, host: str) -> None:
    """Serve until SIGTERM or SIGINT."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, handler, host, port, None)
            print(ready_line(server.port), flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, *listen_address(sys.argv))
