"""A ``relayd chat`` session once connected: lines typed become messages, events become lines.

:class:`Session` reads commands from the console (``ID MESSAGE``, ``/to``,
``/id``, ``/help``, ``/quit``; :data:`relayd.client.chat.HELP` describes them)
and prints one line per event: a message, an ``ack``, an error, in the order
they happen. It sends one message at a time, so that each outcome's line
follows its message. :mod:`relayd.client.chat` connects, and prints the close.
"""

from __future__ import annotations

import signal
from typing import Final

import msgspec
import trio

from relayd.client.client import Client
from relayd.client.errors import ConnectionClosed, MessageTooLarge, RateLimited, SendError
from relayd.client.messages import Message
from relayd.client.terminal import Console
from relayd.wire.dialects import Dialect

__all__ = ["Session", "first_rate_wait"]

_raw_decoder: Final = msgspec.json.Decoder(msgspec.Raw)
#: How long a message relayd refused as over its rate limit waits before it is sent
#: again, when relayd does not say (``retry_after_ms``, which an older relayd does not
#: send), in units of the interval between two tokens of relayd's message bucket
#: (``1 / messages_per_second``, which relayd announces at the handshake): the bucket
#: that refused it then holds a token again, so the message goes out, and the refusal
#: was the only one to take a token from relayd's second bucket (docs/protocol.md,
#: "Rate limit"), whose emptying is the 1008. A tenth more, for the two clocks.
RATE_WAIT_INTERVALS: Final = 1.1
#: The first wait when relayd announced no rate (an older relayd): one refusal a second
#: at most keeps the second bucket from running dry at any rate of 1 a second or more.
RATE_WAIT_S: Final = 1.0
#: A wait relayd asks for (``retry_after_ms``) is waited this many times over: a hundredth
#: more, for the two clocks (one running 100 ppm fast is far inside it), so that a long
#: wait does not end a moment early, when a refusal at a burst of 1 would be the 1008.
TOLD_WAIT_FACTOR: Final = 1.01
#: A wait relayd asks for this long or longer is named when the chat says it waits, and
#: said again when it is more than twice the longest named before (a reload lowered the
#: rate: a person should not wonder why nothing moves).
LONG_WAIT_S: Final = 1.0
#: Each refusal of the same message doubles its wait, to at least :data:`RATE_WAIT_S`
#: (the announced rate cannot be the one in force: a reload lowered it), without a cap:
#: doubled only when refused, a wait is at most twice the interval in force, and a cap
#: below that interval (a rate under 1 in 30 s) had every line refused several times,
#: more refusals than relayd's second bucket refills, until the 1008.


def first_rate_wait(messages_per_second: float | None) -> float:
    """How long a message refused as over ``messages_per_second`` waits to go again.

    Args:
        messages_per_second: the rate relayd announced; None if it announced none.
    """
    if messages_per_second is None:
        return RATE_WAIT_S
    return RATE_WAIT_INTERVALS / messages_per_second


def _outgoing(text: str) -> msgspec.Raw | str:
    """The ``message`` for typed text: its JSON value if it is JSON, else the text."""
    try:
        return _raw_decoder.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return text


class Session:
    """One connected session: lines out as messages, messages in as lines.

    Args:
        client: the connected client; the caller owns it (and closes it).
        console: where lines are read and printed.
        help_text: what ``/help`` prints.
    """

    def __init__(self, client: Client, console: Console, help_text: str) -> None:
        self._client = client
        self._console = console
        self._help = help_text
        self._sent = 0
        self._to: str | None = None  # the default recipient, after /to ID
        self._quitting = False
        self._slowed = False  # told the person that the server's rate limit slows sends
        self._named_wait = 0.0  # the longest wait relayd asked for that the chat named
        # The seed dialect: a token bucket of relayd's announced burst, refilled a tenth
        # slower than its announced rate (None: full), and when lines began to wait in
        # a row. A rate_limited error (a reload lowered the rate) slows it down.
        self._tokens: float | None = None
        self._stamp = 0.0
        self._token_s: float | None = None  # seconds a token takes; None: the announced
        self._paced_from: float | None = None
        # Sent a seed line since the last rate_limited error acted on: a peer can send a
        # message of that shape (the seed dialect cannot tell), so one error at most per
        # line sent slows the chat down.
        self._seed_sent = False
        # relayd.v1: the first wait after a refusal once one was refused again (the
        # announced rate is stale: a reload lowered it), for every later message too.
        self._rate_wait: float | None = None

    async def run(self) -> bool:
        """Chat until the person quits or the server closes; True if the person quit."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive, nursery.cancel_scope)
            async with trio.open_nursery() as inputs:
                inputs.start_soon(self._read_commands, inputs.cancel_scope)
                inputs.start_soon(self._quit_on_interrupt, inputs.cancel_scope)
            self._quitting = True
            nursery.cancel_scope.cancel()
        return self._quitting

    async def _receive(self, session: trio.CancelScope) -> None:
        try:
            async for message in self._client:
                self._show(message)
        except ConnectionClosed:
            pass  # the caller prints the close
        session.cancel()  # the server closed first: stop reading stdin

    async def _quit_on_interrupt(self, inputs: trio.CancelScope) -> None:
        # Ctrl-C, and SIGTERM (`kill`, `timeout`), close like /quit: killed by it, the
        # chat left relayd a connection lost (1006) and the terminal in readline's modes.
        # A second Ctrl-C, once this receiver is gone, interrupts the closing handshake
        # (exit status 130); a second SIGTERM kills.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as interrupts:
            async for _ in interrupts:
                inputs.cancel()
                return

    async def _read_commands(self, inputs: trio.CancelScope) -> None:
        while True:
            prompt = f"to {self._to}> " if self._to is not None else "> "
            line = await self._console.readline(prompt)
            if line is None or not await self._command(line.strip()):
                break
        inputs.cancel()

    async def _command(self, line: str) -> bool:
        """Carry out one input line; False for /quit."""
        if not line:
            return True
        if line.startswith("/"):
            return self._slash(line)
        if self._to is not None:
            await self._send(self._to, _outgoing(line))
            return True
        words = line.split(maxsplit=1)
        if len(words) < 2:
            self._console.warn("nothing to send: type ID MESSAGE, or /to ID first (/help)")
            return True
        await self._send(words[0], _outgoing(words[1]))
        return True

    def _slash(self, line: str) -> bool:
        name, *args = line.split()
        if name == "/quit":
            return False
        if name == "/id":
            self._console.say(f"id: {self._client.id}")
        elif name == "/to":
            if len(args) > 1:  # an id has no spaces: the rest would be lost
                self._console.warn("/to takes one ID (/to alone goes back to ID MESSAGE)")
            else:
                self._to = args[0] if args else None
        elif name == "/help":
            for help_line in self._help.splitlines():
                self._console.say(help_line)
        else:
            self._console.warn(f"unknown command {name}; /help lists them")
        return True

    async def _send(self, to: str, message: msgspec.Raw | str) -> None:
        """Send and print the outcome: one at a time, so lines print in order."""
        v1 = self._client.dialect is Dialect.V1
        try:
            await self._send_paced(to, message)
        except MessageTooLarge as error:
            if not error.sent:
                self._console.warn(f"not sent: {error.detail.removesuffix('; not sent')}")
                return
            self._sent += 1
            self._show_error(error, f"message {self._sent} to {to}")
        except SendError as error:
            self._sent += 1
            self._show_error(error, f"message {self._sent} to {to}")
        except ConnectionClosed:
            # _receive reports the close; this message's fate is said here, as every
            # other message has a line of its own.
            self._sent += 1
            self._console.warn(
                f"message {self._sent} to {to}: the connection closed before its outcome"
                " was known; it may or may not have been delivered"
            )
        except trio.ClosedResourceError:
            pass  # the person quit
        else:
            self._sent += 1
            if v1:
                self._console.say(f"ack {self._sent}")

    async def _send_paced(self, to: str, message: msgspec.Raw | str) -> None:
        """Send, and send again after a wait while relayd refuses it as over its rate limit.

        relayd drops a rate-limited message, and closes with 1008 a client that
        keeps sending over the limit: a pasted or piped burst of lines would lose
        its tail and then the connection. Sent again, one message at a time, the
        lines go out at the server's rate, in order. The seed dialect has no acks
        (its rate_limited errors arrive as messages, and nothing can be sent again):
        there the lines go out no faster than the rate relayd announced.
        """
        rate = self._client.messages_per_second
        if self._client.dialect is Dialect.SEED and rate is not None:
            await self._seed_pace(to, rate)
            await self._client.send(to, message)
            self._seed_sent = True
            return
        wait = first_rate_wait(rate) if self._rate_wait is None else self._rate_wait
        refused = False
        while True:
            try:
                await self._client.send(to, message)
            except RateLimited as refusal:
                told = refusal.retry_after
                if told is not None:
                    # relayd said when this message's turn comes, at the rate in force:
                    # no guess, so nothing to double or keep (after a reload meanwhile,
                    # a refusal again brings the new rate's wait).
                    wait = told * TOLD_WAIT_FACTOR
                elif refused:
                    # Refused again, and relayd did not say how long to wait (an older
                    # relayd): the announced rate is not the one in force (a reload
                    # lowered it). Back to the waits for a rate unknown: a second at
                    # least, doubling; and the next message starts from the wait
                    # reached, not from the announced rate (each refusal takes a token
                    # from relayd's second bucket: refused twice a line, lines at 1 a
                    # second ran it dry at a burst of 3, and the connection closed
                    # with 1008).
                    wait = max(wait * 2, RATE_WAIT_S)
                    self._rate_wait = wait
                long_wait = told is not None and wait >= LONG_WAIT_S
                if not self._slowed or (long_wait and wait > 2 * self._named_wait):
                    self._slowed = True
                    # relayd's wait depends on the moment: named only when a person
                    # would wonder why nothing moves.
                    when = f"after {wait:.3g} s"
                    if told is not None:
                        when = "after the wait it asks for"
                        if long_wait:
                            when += f" ({wait:.3g} s)"
                            self._named_wait = wait
                    self._console.warn(
                        f"over the server's rate limit: a message it refuses is sent again {when}"
                    )
            else:
                return
            refused = True
            try:
                await trio.sleep(wait)
            except trio.Cancelled:  # the person quit, or the server closed, meanwhile
                self._console.warn(
                    f"message {self._sent + 1} to {to}: not sent (refused as over the"
                    " server's rate limit, and not sent again before the end)"
                )
                raise

    async def _seed_pace(self, to: str, rate: float) -> None:
        """Wait until a message sent now stays within relayd's rate and burst; take its token.

        Lines within the burst go at once, as relayd takes them; after it, one a token.
        """
        burst = self._client.message_burst or 1
        token_s = self._token_s
        if token_s is None:
            token_s = RATE_WAIT_INTERVALS / rate
        else:
            burst = 1  # relayd refused a line: its rate and burst are not the announced
        now = trio.current_time()
        tokens = burst if self._tokens is None else self._tokens
        tokens = min(float(burst), tokens + (now - self._stamp) / token_s)
        turn = now
        if tokens >= 1:
            self._paced_from = None
        else:
            turn = now + (1 - tokens) * token_s
            if self._paced_from is None:
                self._paced_from = now
            # Said once lines have waited a second in a row: a burst typed or pasted at a
            # rate of 50 a second (the default) goes out unnoticed.
            if not self._slowed and turn - self._paced_from >= RATE_WAIT_S:
                self._slowed = True
                shown = rate if self._token_s is None else 1 / token_s  # the one paced to
                self._console.warn(
                    f"at the server's rate limit ({shown:g} messages a second): lines wait"
                    " their turn"
                )
            try:
                await trio.sleep_until(turn)
            except trio.Cancelled:  # the person quit, or the server closed, meanwhile
                self._console.warn(
                    f"message {self._sent + 1} to {to}: not sent (waiting for its turn under"
                    " the server's rate limit at the end)"
                )
                raise
            tokens = 1.0
        self._tokens = tokens - 1
        self._stamp = turn

    def _seed_refused(self) -> None:
        """A seed line was refused as over the rate: a reload lowered it. Slow down."""
        rate = self._client.messages_per_second
        token_s = self._token_s
        if token_s is None:
            token_s = RATE_WAIT_INTERVALS / rate if rate is not None else RATE_WAIT_S
        # A second a line at least (one refusal a second keeps relayd's second bucket
        # from running dry at any rate of 1 a second or more), doubling at each refusal.
        self._token_s = max(token_s * 2, RATE_WAIT_S)
        self._tokens = 0.0
        self._stamp = trio.current_time()
        self._console.warn(
            "a line was refused as over the server's rate limit and not sent (the seed"
            " dialect does not say which: see the lines sent just before this);"
            f" lines now go one every {self._token_s:.3g} s"
        )

    def _show(self, message: Message) -> None:
        if message.from_server:  # its sender is "", which would print as "< : ..."
            self._console.say(f"< (server): {message.text}")
        elif message.sender is not None:
            self._console.say(f"< {message.sender}: {message.text}")
        elif (error := message.as_error()) is not None:
            self._show_error(error, None)
            if isinstance(error, RateLimited) and self._seed_sent:
                self._seed_sent = False
                self._seed_refused()
        else:
            self._console.say(f"< {message.text}")

    def _show_error(self, error: SendError, which: str | None) -> None:
        where = f" ({which})" if which is not None else ""
        self._console.say(f"! {error.code}: {error.detail}{where}")
