"""The seed dialect, shared by the Python peer relays: one decision per client frame.

The seed post's relay (docs/protocol.md, "The seed dialect"), corrected as relayd is:
a frame that is not a JSON envelope ``{"to": id, "message": m}`` naming a connected
client gets an error frame back instead of crashing the handler. The recipient gets
``m`` itself when it is a string, else its JSON encoding. Standard-library ``json``
on purpose: each peer is the simplest relay its library allows.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Container, Sequence
from dataclasses import dataclass

__all__ = ["Deliver", "Refuse", "decide", "listen_address", "new_id", "ready_line"]


@dataclass(frozen=True, slots=True)
class Deliver:
    """Send ``text`` to the client whose id is ``to``."""

    to: str
    text: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """Send ``frame`` (a JSON error object) back to the sender."""

    frame: str


def _refuse(error: str, detail: str) -> Refuse:
    return Refuse(json.dumps({"error": error, "detail": detail}))


def decide(raw: str | bytes, known: Container[str]) -> Deliver | Refuse:
    """What to do with one frame a client sent.

    Args:
        raw: the frame's payload; bytes for a binary frame.
        known: the ids of connected clients.

    Returns:
        Where the message goes, or the error frame for the sender.
    """
    if isinstance(raw, bytes):
        return _refuse("unsupported_data", "binary frames are not relayed")
    try:
        envelope = json.loads(raw)
    except ValueError:
        return _refuse("invalid_json", "the frame is not JSON")
    if not isinstance(envelope, dict) or not isinstance(envelope.get("to"), str):
        return _refuse("invalid_envelope", 'expected {"to": id, "message": ...}')
    if "message" not in envelope:
        return _refuse("invalid_envelope", 'expected {"to": id, "message": ...}')
    to: str = envelope["to"]
    if to not in known:
        return _refuse("unknown_recipient", "no client has that id")
    message = envelope["message"]
    return Deliver(to, message if isinstance(message, str) else json.dumps(message))


def new_id() -> str:
    """An unguessable client id: 128 random bits, URL-safe."""
    return secrets.token_urlsafe(16)


def ready_line(port: int) -> str:
    """The line a peer prints on stdout once it listens (the bench waits for it)."""
    return json.dumps({"event": "server.ready", "port": port})


def listen_address(argv: Sequence[str]) -> tuple[int, str]:
    """``(port, host)`` from a peer's command line ``[PORT] [HOST]``; 0 and loopback by default."""
    port = int(argv[1]) if len(argv) > 1 else 0
    host = argv[2] if len(argv) > 2 else "127.0.0.1"
    return port, host
