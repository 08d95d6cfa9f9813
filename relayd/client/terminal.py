"""The terminal of ``relayd chat``: lines in, events out, one line each.

Two kinds of stdin:

* a terminal (stdin and stdout both ttys): lines are read with GNU readline
  (line editing, and the history of this session on the up arrow) after a
  prompt. Lines printed while the person types (a message arriving) go above
  the prompt, which is drawn again with what was typed so far. readline
  changes the terminal's modes while it reads; :meth:`Console.close` puts back
  the ones found at the start, even when a read was cut short.
* anything else (a pipe, a file): lines are read as they come, without a
  prompt, each bounded by :data:`MAX_LINE_BYTES`.

From either, bytes that are not UTF-8 become U+FFFD, and the user is told.

Both read in a worker thread: readline blocks, and a regular file is something
trio cannot wait on. The thread is abandoned, still blocked, when the program
stops reading; it holds no lock anything else needs.
"""

from __future__ import annotations

import os
import sys
import termios
from collections.abc import Callable
from typing import Any, Final, TextIO

import trio

__all__ = ["MAX_LINE_BYTES", "READ_BYTES", "Console", "escaped"]

#: Bytes asked of a non-terminal stdin per read.
READ_BYTES: Final = 65536
#: Longest line kept from a non-terminal stdin, the most it can make this process
#: buffer; relayd refuses far smaller messages by default (64 KiB), so a longer
#: line is skipped with a warning. A person at a terminal types lines of any length.
MAX_LINE_BYTES: Final = 2**20

#: C0 controls, DEL and C1 controls, made visible; applied to every line
#: printed, whose only control characters can come from the network.
_ESCAPES: Final[dict[int, str]] = {
    **{code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7F, 0xA0)]},
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}
#: What the user is told of a line whose bytes were not all UTF-8.
_NOT_UTF8: Final = "a line was not UTF-8: its bad bytes are sent as U+FFFD"
#: Back to the start of the line and clear it: the prompt is drawn again below.
_CLEAR_LINE: Final = "\r\x1b[K"


def escaped(line: str) -> str:
    r"""``line`` with every control character shown escaped (``\n``, ``\x1b``)."""
    return line.translate(_ESCAPES)


class Console:
    """stdin, stdout and stderr of ``relayd chat``.

    Resource handling: :meth:`close` restores the terminal; call it once the
    session is over, whatever ended it.
    """

    def __init__(self, prog: str) -> None:
        self._prog = prog
        # None when the caller closed it (`relayd chat URL <&-`): no input, as at its end.
        stdin = sys.stdin
        self.interactive = stdin is not None and stdin.isatty() and sys.stdout.isatty()
        self._modes: list[Any] | None = None
        self._prompt: str | None = None  # on screen, waiting for a line
        self._pipe = _LineReader(-1 if stdin is None else stdin.fileno(), self.warn)
        if self.interactive:
            import readline  # noqa: F401 - from here on, input() edits lines

            self._modes = termios.tcgetattr(sys.stdin.fileno())

    async def readline(self, prompt: str) -> str | None:
        """The next line, without its line break; None at end of input (Ctrl-D)."""
        if not self.interactive:
            return await self._pipe.readline()
        self._prompt = prompt
        try:
            line = await trio.to_thread.run_sync(_input, prompt, abandon_on_cancel=True)
        except BaseException:  # Ctrl-C, or the server closed: what follows goes below
            sys.stdout.write("\n")
            sys.stdout.flush()
            raise
        finally:
            self._prompt = None
        # Told once the prompt is gone, so that it is not drawn twice.
        return None if line is None else _unicode(line, self.warn)

    def say(self, line: str) -> None:
        """Print one event on stdout, above the prompt if one is shown."""
        self._print(escaped(line), sys.stdout)

    def warn(self, line: str) -> None:
        """Print one line on stderr, prefixed with the program's name."""
        self._print(escaped(f"{self._prog}: {line}"), sys.stderr)

    def close(self) -> None:
        """Put the terminal back as it was found; leave the cursor on a fresh line."""
        if self._prompt is not None:
            sys.stdout.write(_CLEAR_LINE)
            sys.stdout.flush()
            self._prompt = None
        if self._modes is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._modes)

    def _print(self, text: str, stream: TextIO) -> None:
        if self._prompt is None:
            print(text, file=stream, flush=True)
            return
        import readline  # imported already, by __init__

        sys.stdout.write(_CLEAR_LINE)
        sys.stdout.flush()
        print(text, file=stream, flush=True)
        sys.stdout.write(self._prompt + readline.get_line_buffer())
        sys.stdout.flush()


def _unicode(line: str, warn: Callable[[str], None]) -> str:
    """A typed line with the bytes its decoding escaped as U+FFFD, as from a pipe; told.

    ``input()`` decodes with stdin's error handler, which is ``surrogateescape``
    in the C or POSIX locale (Python's UTF-8 mode): a byte that is not UTF-8
    then arrives as a lone surrogate, which no message or id can hold.
    """
    try:
        line.encode()
    except UnicodeEncodeError:
        warn(_NOT_UTF8)
        try:
            raw = line.encode(errors="surrogateescape")
        except UnicodeEncodeError:  # a surrogate no decoding escaped (another handler)
            raw = line.encode(errors="surrogatepass")
        return raw.decode(errors="replace")
    return line


def _input(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:  # Ctrl-D on an empty line
        return None


class _LineReader:
    """Lines from a file descriptor that is not a terminal, read in a worker thread.

    ``os.read`` holds no lock of ``sys.stdin``'s: the thread, abandoned
    blocking in it at exit, stops nothing.
    """

    def __init__(self, fd: int, warn: Callable[[str], None]) -> None:
        self._fd = fd
        self._warn = warn
        self._buffer = bytearray()
        self._eof = fd < 0  # no descriptor (stdin closed by the caller): no input at all
        self._skipping = False  # the rest of an over-long line

    async def readline(self) -> str | None:
        """The next line without its line break; None at end of input."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if not self._skipping:
                    return self._text(line)
                self._skipping = False
            elif self._eof:
                line, skipped = bytes(self._buffer), self._skipping
                self._buffer.clear()
                return self._text(line) if line and not skipped else None
            elif len(self._buffer) > MAX_LINE_BYTES:
                if not self._skipping:
                    self._warn(f"a line over {MAX_LINE_BYTES} bytes was skipped")
                self._skipping = True
                self._buffer.clear()
            else:
                await self._fill()

    def _text(self, line: bytes) -> str:
        """A line as text; bytes that are not UTF-8 become U+FFFD, and the user is told."""
        try:
            return line.decode()
        except UnicodeDecodeError:
            self._warn(_NOT_UTF8)
            return line.decode(errors="replace")

    async def _fill(self) -> None:
        while True:
            try:
                chunk = await trio.to_thread.run_sync(
                    os.read, self._fd, READ_BYTES, abandon_on_cancel=True
                )
            except BlockingIOError:
                # stdin is non-blocking (O_NONBLOCK, set by another program on the pipe or
                # terminal it shares): nothing yet, which is not its end. Cancelled by the
                # session, as the read is.
                await trio.lowlevel.wait_readable(self._fd)
                continue
            except OSError as exc:  # e.g. stdin closed by the caller: no more input
                self._warn(f"cannot read stdin: {exc}")
                chunk = b""
            break
        self._eof = not chunk
        self._buffer += chunk
