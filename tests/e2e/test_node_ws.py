"""relayd driven by the Node ``ws`` client (tests/e2e/ws_relay.mjs)."""

from __future__ import annotations

import json

import pytest

from .harness import RelaydProcess, require_tool, run_node
from .wsclient import assert_id

pytestmark = pytest.mark.e2e


def test_node_ws_clients_relay_in_both_dialects(relayd_process: RelaydProcess) -> None:
    """Node ``ws`` seed and v1 clients get ids and exchange messages in all combinations."""
    require_tool("ws")
    out = run_node("ws_relay.mjs", relayd_process.url)

    # Subprotocol negotiation as ws sees it: none for seed, relayd.v1 when offered.
    assert out["protocols"] == {"seedA": "", "v1C": "relayd.v1"}

    ids = out["ids"]
    id_a, id_b = ids["seedA"], ids["seedB"]
    welcome_c, welcome_d = json.loads(ids["v1CWelcome"]), json.loads(ids["v1DWelcome"])
    assert welcome_c["type"] == welcome_d["type"] == "welcome"
    id_c, id_d = welcome_c["id"], welcome_d["id"]
    for ident in (id_a, id_b, id_c, id_d):
        assert_id(ident)
    assert len({id_a, id_b, id_c, id_d}) == 4, ids

    seed = out["seed"]
    assert seed["bGot"] == "hello from node A"
    assert json.loads(seed["aGot"]) == {"reply": "from node B", "n": [1, 2, 3]}
    assert json.loads(seed["aUnknown"])["error"] == "unknown_recipient"

    v1 = out["v1"]
    assert json.loads(v1["cAck"]) == {"type": "ack", "ref": "node-1"}
    assert json.loads(v1["dGot"]) == {"type": "message", "from": id_c, "message": {"hello": "v1"}}
    assert json.loads(v1["dAck"]) == {"type": "ack", "ref": 2}
    assert json.loads(v1["cGot"]) == {"type": "message", "from": id_d, "message": "back at you"}
    unknown = json.loads(v1["cUnknown"])
    assert (unknown["type"], unknown["error"], unknown["ref"]) == (
        "error",
        "unknown_recipient",
        "node-2",
    )

    cross = out["cross"]
    assert json.loads(cross["dGot"]) == {"type": "message", "from": id_a, "message": "seed to v1"}
    assert json.loads(cross["dAck"]) == {"type": "ack", "ref": "node-3"}
    assert json.loads(cross["aGot"]) == {"v1": "to seed"}

    # Every client's own normal close completed: relayd answered the close handshake.
    assert out["closeCodes"] == {"seedA": 1000, "seedB": 1000, "v1C": 1000, "v1D": 1000}
