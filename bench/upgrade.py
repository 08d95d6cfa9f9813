"""The WebSocket upgrade request the bench's raw clients send (a fresh key each time)."""

from __future__ import annotations

import base64
import os


def upgrade_request(host: str, port: int) -> bytes:
    """``GET /`` asking ``host:port`` to upgrade to WebSocket, version 13."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
