"""The WebSocket wire protocol, without I/O: bytes in, values out; values in, bytes out.

Nothing in this package touches a socket, a clock or trio (a test reads the
imports to keep it so); each module is tested with plain values, like h11 and
wsproto test theirs.

* :mod:`~relayd.wire.frames`: RFC 6455 framing, server side: client frames parsed.
* :mod:`~relayd.wire.masking`: a client frame's payload unmasked.
* :mod:`~relayd.wire.server_frames`: the frames a server writes.
* :mod:`~relayd.wire.handshake`: the HTTP opening handshake, on httptools (llhttp).
* :mod:`~relayd.wire.dialects`: relayd's two dialects, the seed post's and
  ``relayd.v1``: what a client sends, what it receives.
* :mod:`~relayd.wire.lifecycle`: one connection's states, from open to closed,
  and what each means for its reader, writer and close frame.
"""
