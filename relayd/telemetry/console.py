"""What the console format does to the values a client chose: escapes them for a terminal.

The console format (``log.format = "console"``) is for a person at a
terminal, which obeys escape sequences: a ``User-Agent``, an origin, a close
reason or a ``to`` of a client's choosing could move the cursor, retitle the
window or hide a line. :func:`escape_for_terminal`, a structlog processor run
just before the console renderer, escapes every control, format or separator
character but a space in every string value (an escape character becomes the
four characters backslash, ``x``, ``1``, ``b``); a traceback keeps its line
breaks. The JSON format escapes them by itself and does not use it.
"""

from __future__ import annotations

import structlog

__all__ = ["escape_for_terminal"]


def _printable(text: str, keep: str = "") -> str:
    """``text`` with every control, format or separator character but a space escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " or c in keep else _escaped(c) for c in text)


def _escaped(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _inert(value: object) -> object:
    if isinstance(value, str):
        return _printable(value)
    if isinstance(value, list | tuple):
        return [_inert(item) for item in value]
    if isinstance(value, dict):
        return {key: _inert(item) for key, item in value.items()}
    return value


def escape_for_terminal(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """A structlog processor: ``event_dict`` with its string values escaped for a terminal."""
    # A client chooses some values (user_agent, origin, a close reason, `to`):
    # in the console format they reach a terminal, which obeys escape
    # sequences. A traceback keeps its line breaks.
    return {
        key: _printable(value, keep="\n")
        if key == "exception" and isinstance(value, str)
        else _inert(value)
        for key, value in event_dict.items()
    }
