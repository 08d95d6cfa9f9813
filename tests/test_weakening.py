"""Tests for relayd.policy.weakening, on settings read from real files by relayd's loader.

The loader records which keys a source set; that is what tells a value stated on
purpose from one a cut-short file left to its default.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from relayd.config import Settings
from relayd.config_sources import load
from relayd.policy.weakening import Weakening, weakenings

LOCKED = """\
[server]
allowed_origins = ["https://chat.example"]
[auth]
mode = "jwt"
jwt_secret = "an-hs256-secret-of-at-least-32-bytes!"
jwt_audience = "relayd"
jwt_issuer = "https://idp.example"
[tls]
cert_file = "/etc/relayd/cert.pem"
key_file = "/etc/relayd/key.pem"
[admin]
api_key_file = "/etc/relayd/api.key"
"""


def read(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "relayd.toml"
    path.write_text(text, encoding="utf-8")
    return load(config_path=path, environ={}).settings


@pytest.fixture
def locked(tmp_path: Path) -> Settings:
    return read(tmp_path, LOCKED)


def test_the_same_file_weakens_nothing(locked: Settings, tmp_path: Path) -> None:
    assert weakenings(locked, read(tmp_path, LOCKED)) == []


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="emptied"),
        pytest.param(LOCKED[: LOCKED.index("[auth]")], id="cut-before-auth"),
        pytest.param("# relayd.toml\n[limits]\nmax_connections = 100\n", id="another-file"),
    ],
)
def test_an_emptied_or_cut_file_weakens_without_saying_so(
    locked: Settings, tmp_path: Path, text: str
) -> None:
    found = {w.key: w for w in weakenings(locked, read(tmp_path, text))}
    assert found["auth.mode"] == Weakening("auth.mode", "authentication turned off", stated=False)
    assert not any(w.stated for w in found.values())
    assert set(found) >= {"auth.mode", "tls.cert_file", "admin.api_key_file"}


def test_each_weakening_stated_on_purpose(locked: Settings, tmp_path: Path) -> None:
    text = """\
[server]
allowed_origins = []
[auth]
mode = "off"
jwt_audience = ""
jwt_issuer = ""
[tls]
cert_file = ""
key_file = ""
[admin]
api_key_file = ""
"""
    assert weakenings(locked, read(tmp_path, text)) == [
        Weakening("auth.mode", "authentication turned off", stated=True),
        Weakening("auth.jwt_audience", "the token's audience no longer checked", stated=True),
        Weakening("auth.jwt_issuer", "the token's issuer no longer checked", stated=True),
        Weakening("server.allowed_origins", "every origin allowed (the list emptied)", stated=True),
        Weakening("tls.cert_file", "TLS dropped (at the next restart)", stated=True),
        Weakening(
            "admin.api_key_file", "the server API's key dropped (at the next restart)", stated=True
        ),
    ]


def test_origins_added_are_a_weakening_and_origins_removed_are_not(
    locked: Settings, tmp_path: Path
) -> None:
    wider = LOCKED.replace(
        '["https://chat.example"]', '["https://chat.example", "https://x.example"]'
    )
    assert [str(w) for w in weakenings(locked, read(tmp_path, wider))] == [
        "server.allowed_origins: origins added: https://x.example"
    ]
    narrower = LOCKED.replace('["https://chat.example"]', '["https://other.example"]')
    assert [w.what for w in weakenings(locked, read(tmp_path, narrower))] == [
        "origins added: https://other.example"
    ]
    assert weakenings(read(tmp_path, narrower), read(tmp_path, LOCKED))[0].stated


def test_from_open_settings_nothing_can_weaken(tmp_path: Path) -> None:
    assert weakenings(read(tmp_path, ""), read(tmp_path, "")) == []
    # Turning security on is never held back.
    assert weakenings(read(tmp_path, ""), read(tmp_path, LOCKED)) == []


def test_a_value_from_the_environment_is_stated(locked: Settings, tmp_path: Path) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text("", encoding="utf-8")
    settings = load(config_path=path, environ={"RELAYD_AUTH__MODE": "off"}).settings
    [mode] = [w for w in weakenings(locked, settings) if w.key == "auth.mode"]
    assert mode.stated


def test_several_origins_added_are_listed_with_commas(locked: Settings, tmp_path: Path) -> None:
    wider = LOCKED.replace(
        '["https://chat.example"]',
        '["https://chat.example", "https://x.example", "https://y.example"]',
    )
    assert [w.what for w in weakenings(locked, read(tmp_path, wider))] == [
        "origins added: https://x.example, https://y.example"
    ]
