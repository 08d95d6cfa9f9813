"""The seed post's own browser client, run verbatim in headless Chromium, against relayd."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .harness import E2E_DIR, REPO_ROOT, RelaydProcess, require_tool, run_node
from .wsclient import assert_id

pytestmark = pytest.mark.e2e

PAGE = E2E_DIR / "seed_page.html"
#: The seed post, kept in the repository so that a clone alone can check the page against it.
SEED_POST = E2E_DIR / "seed_post.md"
#: Where the post is published beside the repository in our workspace, if it is.
PUBLISHED_POST = REPO_ROOT.parent / "shared" / "seed" / "websocket-simple-client-and-server.md"
SEED_URL = "'ws://localhost:9030'"


def page_scripts(html: str) -> dict[str, str]:
    """The text of each ``<script id=...>`` in the page, by id."""
    pattern = re.compile(r'<script\b[^>]*\bid="([^"]+)"[^>]*>(.*?)</script>', re.DOTALL)
    return {m.group(1): m.group(2) for m in pattern.finditer(html)}


def test_seed_page_is_the_posts_client_verbatim() -> None:
    """seed_page.html holds the post's client code character for character, URL included."""
    post = SEED_POST.read_text(encoding="utf-8")
    if PUBLISHED_POST.is_file():  # our copy is the post, where the original can be read
        assert post == PUBLISHED_POST.read_text(encoding="utf-8")
    blocks = re.findall(r"```js\n(.*?)```", post, re.DOTALL)
    # The post's client snippets: set-up, logging handler + first send, and the chat send.
    client = [b for b in blocks if "connection." in b]
    assert len(client) == 3, client
    setup, handler_and_send, chat_send = client
    split = handler_and_send.index("connection.send(")

    # Runs on load: the set-up snippet, then the second snippet's onmessage handler.
    on_load = setup + "\n" + handler_and_send[:split]
    expected = {
        "seed-client": on_load,
        "seed-send-hello": handler_and_send[split:],
        "seed-send-data": chat_send,
    }
    scripts = page_scripts(PAGE.read_text(encoding="utf-8"))
    for script_id, code in expected.items():
        assert scripts[script_id].strip("\n") == code.strip("\n"), script_id
    assert scripts["seed-client"].count(SEED_URL) == 1


@contextmanager
def serve_seed_page(relayd_url: str) -> Iterator[str]:
    """Serve seed_page.html on a loopback port, its one change: the URL points at relayd."""
    html = PAGE.read_text(encoding="utf-8")
    assert html.count(SEED_URL) == 1, "the page must hold the post's URL exactly once"
    body = html.replace(SEED_URL, f"'{relayd_url}'").encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/favicon.ico":  # asked by Chromium; none, and no error logged
                self.send_response(204)
                self.end_headers()
                return
            if self.path != "/":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Keep the test output quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="seed-page-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_two_chromium_pages_running_the_seed_client_message_each_other(
    relayd_process: RelaydProcess,
) -> None:
    """Two pages learn their ids and exchange the post's messages through relayd."""
    require_tool("playwright-core")
    require_tool("chromium")
    with serve_seed_page(relayd_process.url) as page_url:
        out = run_node("browser_seed.mjs", page_url, timeout=120)
    origin = page_url.rstrip("/")

    id_a, id_b = out["idA"], out["idB"]
    assert_id(id_a)
    assert_id(id_b)
    assert id_a != id_b

    # Each page received exactly what the other sent, as the bare string the post shows.
    assert out["bGot"] == "hello from client 1"
    assert out["aGot"] == "hello from client 1"

    # The post's non-JSON send gets a seed-dialect error frame instead of a dead server.
    reply = json.loads(out["aHelloReply"])
    assert reply["error"] == "invalid_json", reply

    # Both sockets are still OPEN (readyState 1) and A still reaches B.
    assert out["readyStates"] == [1, 1]
    assert out["bGotAgain"] == "hello from client 1"

    # Nothing else arrived on either page, and neither page logged an error.
    assert out["aAll"] == [id_a, "hello from client 1", out["aHelloReply"]]
    assert out["bAll"] == [id_b, "hello from client 1", "hello from client 1"]
    assert out["errors"] == []

    # relayd saw two browsers: the operator's connection.open names the page's origin.
    for ident in (id_a, id_b):
        opened = relayd_process.wait_for_event("connection.open", id=ident)
        assert opened["origin"] == origin, opened
        assert "Chrome" in str(opened["user_agent"]), opened
