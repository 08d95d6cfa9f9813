"""What an operator sees: graceful SIGTERM, and the JSON log lines on stdout.

Each test here starts its own relayd, so it can stop it mid-test or count its events.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from .harness import Event, running_relayd
from .wsclient import client, recv_json, recv_text, run, seed_id, send_json, v1_id

pytestmark = pytest.mark.e2e


def test_sigterm_closes_connections_with_1001_and_exits_0(tmp_path: Path) -> None:
    """Clients of both dialects see close code 1001; relayd exits 0 with server.stop last."""
    with running_relayd(tmp_path) as relayd:

        async def scenario() -> tuple[int | None, int | None]:
            async with (
                client(relayd.url) as seed,
                client(relayd.url, v1=True) as v1,
            ):
                await seed_id(seed)
                await v1_id(v1)
                relayd.terminate()
                # Bounded by run()'s timeout: a server that never closes fails the test.
                await seed.wait_closed()
                await v1.wait_closed()
                return seed.close_code, v1.close_code

        assert run(scenario()) == (1001, 1001), relayd.describe()
        code = relayd.wait_exit()
        relayd.assert_clean_stop(code)

        closes = [e for e in relayd.events if e.get("event") == "connection.close"]
        assert len(closes) == 2, closes


def _one(events: list[Event], name: str, **fields: Any) -> Event:
    found = [
        e
        for e in events
        if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
    ]
    assert len(found) == 1, f"expected one {name} with {fields}, got {found}"
    return found[0]


def test_log_lines_describe_connections_and_relays_without_bodies(tmp_path: Path) -> None:
    """connection.open / message.relay / connection.close carry DESIGN §4's fields, no body."""
    secret = f"e2e-secret-body-{uuid.uuid4().hex}"
    ua_seed = f"e2e-seed/{uuid.uuid4().hex}"
    ua_v1 = f"e2e-v1/{uuid.uuid4().hex}"
    nobody = "nobody-has-this-id-0000000000000000"

    with running_relayd(tmp_path) as relayd:

        async def scenario() -> tuple[str, str]:
            async with (
                client(relayd.url, user_agent=ua_seed) as seed,
                client(relayd.url, v1=True, user_agent=ua_v1) as v1,
            ):
                id_seed, id_v1 = await seed_id(seed), await v1_id(v1)
                await send_json(seed, {"to": id_v1, "message": secret})
                assert (await recv_json(v1))["message"] == secret
                await send_json(v1, {"to": id_seed, "message": {"s": secret}, "ref": "log-1"})
                assert await recv_json(v1) == {"type": "ack", "ref": "log-1"}
                assert json.loads(await recv_text(seed)) == {"s": secret}
                await send_json(v1, {"to": nobody, "message": secret, "ref": "log-2"})
                assert (await recv_json(v1))["error"] == "unknown_recipient"
            return id_seed, id_v1

        id_seed, id_v1 = run(scenario())

        # Both clients closed normally; wait (condition-based) until relayd logged both.
        open_seed = relayd.wait_for_event("connection.open", user_agent=ua_seed)
        open_v1 = relayd.wait_for_event("connection.open", user_agent=ua_v1)
        close_seed = relayd.wait_for_event("connection.close", id=id_seed)
        close_v1 = relayd.wait_for_event("connection.close", id=id_v1)

    events = relayd.events  # relayd has stopped: this is everything it printed

    # connection.open: conn id, peer address, origin, dialect, user agent.
    for opened, ident in ((open_seed, id_seed), (open_v1, id_v1)):
        for field in ("conn", "id", "peer", "origin", "dialect", "user_agent"):
            assert field in opened, f"connection.open lacks {field}: {opened}"
        assert opened["id"] == ident, opened
        assert str(opened["peer"]).startswith("127.0.0.1:"), opened
    assert open_seed["conn"] != open_v1["conn"]
    assert open_seed["dialect"] != open_v1["dialect"]
    assert "v1" in str(open_v1["dialect"]), open_v1

    # message.relay: from, to, bytes, outcome; one per relayed or refused message.
    to_v1 = _one(events, "message.relay", **{"from": id_seed, "to": id_v1})
    to_seed = _one(events, "message.relay", **{"from": id_v1, "to": id_seed})
    lost = _one(events, "message.relay", **{"from": id_v1, "to": nobody})
    assert to_v1["outcome"] == to_seed["outcome"] == "delivered", (to_v1, to_seed)
    assert lost["outcome"] == "unknown_recipient", lost
    for relay in (to_v1, to_seed, lost):
        assert isinstance(relay["bytes"], int), relay
        assert relay["bytes"] > 0, relay

    # connection.close: conn id, code and reason, who closed, duration, messages and bytes
    # in and out. "in" counts every frame the client sent, refused ones included; "out"
    # counts every frame relayd sent: the id/welcome, messages, acks and errors.
    for closed, opened in ((close_seed, open_seed), (close_v1, open_v1)):
        for field in ("conn", "code", "reason", "closed_by", "duration_s"):
            assert field in closed, f"connection.close lacks {field}: {closed}"
        assert closed["conn"] == opened["conn"], (opened, closed)
        assert (closed["code"], closed["closed_by"]) == (1000, "client"), closed
        assert closed["duration_s"] >= 0, closed
        assert closed["bytes_in"] > 0, closed
        assert closed["bytes_out"] > 0, closed
    assert (close_seed["messages_in"], close_seed["messages_out"]) == (1, 2), close_seed
    assert (close_v1["messages_in"], close_v1["messages_out"]) == (2, 4), close_v1

    # Every stdout line is one JSON event; the message body is in none of them.
    lines = relayd.stdout_lines
    assert len(lines) == len(events), [ln for ln in lines if not ln.startswith("{")]
    assert all("event" in e for e in events)
    assert not [ln for ln in lines if secret in ln], "a message body was logged"
    assert secret not in relayd.stderr_text, "a message body was written to stderr"
