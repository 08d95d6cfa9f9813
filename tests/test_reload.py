"""What a reload changes (:mod:`relayd.daemon.reload`), without a server: settings in, a report out.

The server applying a reload to open connections is tested in ``test_server.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from relayd.config import Settings
from relayd.config_keys import SECTIONS, TYPES
from relayd.daemon.reload import Reload, changes, files_in_force, in_force


def _with(base: Settings, section: str, **values: Any) -> Settings:
    return base.model_copy(update={section: getattr(base, section).model_copy(update=values)})


def test_the_same_settings_change_nothing() -> None:
    assert changes(Settings(), Settings()) == Reload(changed=[], restart_required=[])


def test_a_new_secret_is_a_change_that_needs_no_restart() -> None:
    running = _with(Settings(), "auth", jwt_secret=SecretStr("old secret"))
    reloaded = _with(Settings(), "auth", jwt_secret=SecretStr("new secret"))
    assert changes(running, reloaded) == Reload(changed=["auth.jwt_secret"], restart_required=[])


def test_keys_needing_a_restart_are_reported_and_keep_their_running_values() -> None:
    running = Settings()
    reloaded = _with(_with(running, "admin", port=19999), "limits", max_message_bytes=100)
    assert changes(running, reloaded) == Reload(
        changed=["admin.port", "limits.max_message_bytes"], restart_required=["admin.port"]
    )
    now = in_force(running, reloaded)
    assert now.admin.port == running.admin.port
    assert now.limits.max_message_bytes == 100


def test_a_file_with_new_content_is_a_change_that_needs_a_restart() -> None:
    # A certificate or API key renewed at the same path: its value (the path) is the
    # same, what relayd would read from it is not, and only a start reads it.
    running = _with(Settings(), "tls", cert_file="/etc/relayd/cert.pem", key_file="/k.pem")
    reloaded = _with(running, "limits", max_message_bytes=100)
    assert changes(running, reloaded, ["tls.cert_file"]) == Reload(
        changed=["limits.max_message_bytes", "tls.cert_file"], restart_required=["tls.cert_file"]
    )


def test_a_reload_applies_the_files_it_may_and_keeps_the_start_s_others() -> None:
    # A tokens file read by a reload is in force after it; a certificate stays as the
    # start read it, so every later reload still names it until a restart.
    started = {"auth.tokens_file": ("/t", b"old"), "tls.cert_file": ("/c", b"old")}
    read = {"auth.tokens_file": ("/t", b"new"), "tls.cert_file": ("/c", b"new")}
    assert files_in_force(started, read) == {
        "auth.tokens_file": ("/t", b"new"),
        "tls.cert_file": ("/c", b"old"),
    }


def test_operations_md_says_what_a_reload_does_with_each_setting() -> None:
    # docs/operations.md's table "After a reload": every setting in one row, and the
    # row that says "restart needed" holds exactly those a reload cannot apply.
    text = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    table = text.partition("| Setting | After a reload |\n|---|---|\n")[2].partition("\n\n")[0]
    settings = {key for key in TYPES if key not in SECTIONS}
    rows: dict[str, str] = {}
    for cells, effect in re.findall(r"^\| (.*) \| (.*) \|$", table, re.MULTILINE):
        section = ""
        for name in re.findall(r"`([^`]+)`", cells):
            if name.startswith("[") or name.endswith(".*"):  # [admin], tls.*: a section
                prefix = name.strip("[]").removesuffix("*").removesuffix(".") + "."
                named = {key for key in settings if key.startswith(prefix)}
            else:  # limits.message_burst, or message_burst after another limits. key
                section = name.partition(".")[0] if "." in name else section
                named = {name if "." in name else f"{section}.{name}"}
            assert named <= settings, name
            assert not named & set(rows), name
            rows |= dict.fromkeys(named, effect)
    assert set(rows) == settings
    restart = {key for key, effect in rows.items() if effect.startswith("restart needed")}
    assert set(changes(Settings(), Settings(), sorted(settings)).restart_required) == restart
