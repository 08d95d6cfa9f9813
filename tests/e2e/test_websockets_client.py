"""relayd driven by the third-party Python ``websockets`` client over loopback TCP."""

from __future__ import annotations

import json
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from .harness import RelaydProcess
from .wsclient import client, recv_json, recv_text, run, seed_id, send_json, v1_id

pytestmark = pytest.mark.e2e

NOBODY = "nobody-has-this-id-0000000000000000"


def assert_seed_error(frame: str, code: str) -> None:
    """A seed-dialect error frame: a JSON object with ``error`` == code and a detail."""
    parsed = json.loads(frame)
    assert isinstance(parsed, dict), frame
    assert parsed.get("error") == code, frame
    assert "detail" in parsed, frame


def assert_v1_error(envelope: Any, code: str, ref: str | int | None) -> None:
    """A relayd.v1 error envelope for ``code`` echoing ``ref``, with human text in detail."""
    assert isinstance(envelope, dict), envelope
    assert envelope.get("type") == "error", envelope
    assert envelope.get("error") == code, envelope
    assert envelope.get("ref") == ref, envelope
    assert isinstance(envelope.get("detail"), str), envelope
    assert envelope["detail"], envelope


def test_seed_clients_get_distinct_ids_and_relay_messages(relayd_process: RelaydProcess) -> None:
    """Two seed clients exchange a string and a JSON object, as the post's chat would."""

    async def scenario() -> None:
        async with client(relayd_process.url) as a, client(relayd_process.url) as b:
            id_a, id_b = await seed_id(a), await seed_id(b)
            assert id_a != id_b

            # A JSON string arrives as the bare string, exactly what the post's client shows.
            await send_json(a, {"to": id_b, "message": "hello from client 1"})
            assert await recv_text(b) == "hello from client 1"

            # Anything else arrives as its JSON encoding.
            body = {"text": "héllo ☃", "n": [1, 2.5, None, True], "nested": {"k": "v"}}
            await send_json(b, {"to": id_a, "message": body})
            assert json.loads(await recv_text(a)) == body
            await send_json(b, {"to": id_a, "message": 42})
            assert json.loads(await recv_text(a)) == 42

            # The seed dialect sends the sender nothing on success: the next frame A sees
            # after a delivered message is the answer to its next, broken, frame.
            await send_json(a, {"to": id_b, "message": "second"})
            assert await recv_text(b) == "second"
            await a.send("hello from client")  # the post's own non-JSON send
            assert_seed_error(await recv_text(a), "invalid_json")

    run(scenario())


def test_seed_errors_answer_the_sender_and_keep_the_connection(
    relayd_process: RelaydProcess,
) -> None:
    """Each bad frame gets its error code back; the connection still relays afterwards."""

    async def scenario() -> None:
        async with client(relayd_process.url) as a, client(relayd_process.url) as b:
            id_a, id_b = await seed_id(a), await seed_id(b)

            await a.send("{not json")
            assert_seed_error(await recv_text(a), "invalid_json")
            await send_json(a, {"message": "no recipient"})
            assert_seed_error(await recv_text(a), "invalid_envelope")
            await send_json(a, ["to", id_b])
            assert_seed_error(await recv_text(a), "invalid_envelope")
            await send_json(a, {"to": NOBODY, "message": "lost"})
            assert_seed_error(await recv_text(a), "unknown_recipient")

            await send_json(a, {"to": id_b, "message": "still here"})
            assert await recv_text(b) == "still here"
            await send_json(b, {"to": id_a, "message": "me too"})
            assert await recv_text(a) == "me too"

    run(scenario())


def test_v1_acks_refs_and_reports_unknown_recipient(relayd_process: RelaydProcess) -> None:
    """relayd.v1: welcome, message envelopes with ``from``, acks echo refs, typed errors."""

    async def scenario() -> None:
        async with (
            client(relayd_process.url, v1=True) as a,
            client(relayd_process.url, v1=True) as b,
        ):
            id_a, id_b = await v1_id(a), await v1_id(b)
            assert id_a != id_b

            body = {"x": 1, "list": ["a", {"b": None}]}
            await send_json(a, {"to": id_b, "message": body, "ref": "r-1"})
            assert await recv_json(a) == {"type": "ack", "ref": "r-1"}
            assert await recv_json(b) == {"type": "message", "from": id_a, "message": body}

            # An integer ref comes back as the same integer; a string message stays a string.
            await send_json(b, {"to": id_a, "message": "hi", "ref": 7})
            assert await recv_json(b) == {"type": "ack", "ref": 7}
            assert await recv_json(a) == {"type": "message", "from": id_b, "message": "hi"}

            await send_json(a, {"to": NOBODY, "message": "lost", "ref": "r-2"})
            assert_v1_error(await recv_json(a), "unknown_recipient", "r-2")

            # No ref: delivered silently, so the next frame A sees answers its next error.
            await send_json(a, {"to": id_b, "message": [1, 2, 3]})
            assert await recv_json(b) == {"type": "message", "from": id_a, "message": [1, 2, 3]}
            await a.send("{oops")
            reply = await recv_json(a)
            assert reply.get("type") == "error", reply
            assert reply.get("error") == "invalid_json", reply

            # The connection survived every error.
            await send_json(a, {"to": id_b, "message": "after errors", "ref": "r-3"})
            assert await recv_json(a) == {"type": "ack", "ref": "r-3"}
            assert (await recv_json(b))["message"] == "after errors"

    run(scenario())


def test_cross_dialect_delivery_both_ways(relayd_process: RelaydProcess) -> None:
    """A seed client and a relayd.v1 client reach each other, each in its own dialect."""

    async def scenario() -> None:
        async with (
            client(relayd_process.url) as seed,
            client(relayd_process.url, v1=True) as v1,
        ):
            id_seed, id_v1 = await seed_id(seed), await v1_id(v1)

            await send_json(seed, {"to": id_v1, "message": "from the seed client"})
            assert await recv_json(v1) == {
                "type": "message",
                "from": id_seed,
                "message": "from the seed client",
            }
            await send_json(seed, {"to": id_v1, "message": {"k": [1, 2]}})
            assert await recv_json(v1) == {
                "type": "message",
                "from": id_seed,
                "message": {"k": [1, 2]},
            }

            await send_json(v1, {"to": id_seed, "message": "plain text", "ref": 1})
            assert await recv_json(v1) == {"type": "ack", "ref": 1}
            assert await recv_text(seed) == "plain text"
            await send_json(v1, {"to": id_seed, "message": {"k": [3, 4]}, "ref": 2})
            assert await recv_json(v1) == {"type": "ack", "ref": 2}
            assert json.loads(await recv_text(seed)) == {"k": [3, 4]}

    run(scenario())


def test_binary_frames_are_refused_with_unsupported_data(relayd_process: RelaydProcess) -> None:
    """A binary frame is answered with ``unsupported_data`` in either dialect, and not relayed."""

    async def scenario() -> None:
        async with (
            client(relayd_process.url) as seed,
            client(relayd_process.url, v1=True) as v1,
        ):
            id_seed, id_v1 = await seed_id(seed), await v1_id(v1)

            await seed.send(b"\x00\x01binary")
            assert_seed_error(await recv_text(seed), "unsupported_data")
            await v1.send(json.dumps({"to": id_seed, "message": "x"}).encode())
            reply = await recv_json(v1)
            assert reply.get("type") == "error", reply
            assert reply.get("error") == "unsupported_data", reply

            # Neither binary frame reached the other side: the next thing each one receives
            # is this text message, and both connections are still open.
            await send_json(seed, {"to": id_v1, "message": "text works"})
            assert (await recv_json(v1))["message"] == "text works"
            await send_json(v1, {"to": id_seed, "message": "text works too"})
            assert await recv_text(seed) == "text works too"

    run(scenario())


def test_oversize_message_is_refused_and_not_delivered(relayd_process: RelaydProcess) -> None:
    """A frame above the default max_message_bytes (64 KiB) never reaches its recipient.

    The sender is told: a ``message_too_large`` error frame, or close code 1009 (DESIGN §1
    names both); the recipient's connection is unaffected.
    """

    async def scenario() -> None:
        async with client(relayd_process.url) as a, client(relayd_process.url) as b:
            id_b = (await seed_id(a), await seed_id(b))[1]
            await send_json(a, {"to": id_b, "message": "x" * 70_000})
            outcome: tuple[str, object]
            try:
                reply = await recv_text(a)
            except ConnectionClosed:
                outcome = ("closed", a.close_code)
            else:
                outcome = ("error", json.loads(reply).get("error"))
            assert outcome in {("error", "message_too_large"), ("closed", 1009)}, outcome

            # B's next frame comes from a later sender: the oversize message was dropped.
            async with client(relayd_process.url) as c:
                await seed_id(c)
                await send_json(c, {"to": id_b, "message": "after the big one"})
                assert await recv_text(b) == "after the big one"

    run(scenario())
