"""A TCP proxy on loopback that can silently stop delivering, for the broker failure tests.

It stands between relayd and Redis. :meth:`TcpProxy.mute` makes one proxied
connection keep its TCP connection open but drop everything Redis sends on
it: the "subscription that silently delivers nothing" of Centrifugo #1189 (a
failover behind a proxy), which no socket error reveals.
"""

from __future__ import annotations

import trio

__all__ = ["TcpProxy"]

#: Bytes forwarded per read.
CHUNK_BYTES = 65536


class TcpProxy:
    """Forwards each connection accepted on a free loopback port to ``target_port``.

    Args:
        target_port: the port on 127.0.0.1 to forward to.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.accepted = 0  # connections so far, numbered from 1
        self._muted: set[int] = set()
        self._accepted_lot = trio.lowlevel.ParkingLot()

    def mute(self, number: int) -> None:
        """From now on drop what the server sends on connection ``number`` (1-based)."""
        self._muted.add(number)

    async def wait_accepted(self, count: int) -> None:
        """Return once ``count`` connections have been accepted in all."""
        while self.accepted < count:
            await self._accepted_lot.park()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and forward until cancelled; reports started with the port."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._forward, listeners)
            task_status.started(self.port)

    async def _forward(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        number = self.accepted
        self._accepted_lot.unpark_all()
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await client.aclose()
            return
        async with client, server, trio.open_nursery() as nursery:

            async def pump(source: trio.SocketStream, sink: trio.SocketStream, down: bool) -> None:
                try:
                    while data := await source.receive_some(CHUNK_BYTES):
                        if not (down and number in self._muted):
                            await sink.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, client, server, False)
            nursery.start_soon(pump, server, client, True)
