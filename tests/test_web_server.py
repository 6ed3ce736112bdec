"""The web client's static files on the client port (issue 10): chat/web.py's pure parts without
sockets, then a real node: files with their headers, 404s, traversal, the websocket still on
``/``, and the origin rules (the server's own origin accepted, foreign ones refused)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus

from chat import web
from chat.client import Client
from tests.harness import RunningNode, running_node
from tests.test_flannel_relay import flannel
from tests.timing import scaled

INDEX = b"<!doctype html><title>chat</title><script type=module src=/js/main.js></script>\n"
MAIN_JS = b"export const x = 1;\n"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    site = tmp_path / "web"
    (site / "js").mkdir(parents=True)
    (site / "index.html").write_bytes(INDEX)
    (site / "app.css").write_text("body{}\n")
    (site / "js" / "main.js").write_bytes(MAIN_JS)
    (site / ".hidden").write_text("no\n")
    (tmp_path / "secret.txt").write_text("outside the root\n")
    (site / "escape.txt").symlink_to(tmp_path / "secret.txt")
    return site


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("index.html", "text/html; charset=utf-8"),
        ("main.js", "text/javascript; charset=utf-8"),
        ("APP.CSS", "text/css; charset=utf-8"),
        ("logo.svg", "image/svg+xml"),
        ("icon.png", "image/png"),
        ("LICENSE", "application/octet-stream"),
    ],
)
def test_content_types(name: str, expected: str) -> None:
    assert web.content_type(name) == expected


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/", "index.html"),
        ("/?workspace=3", "index.html"),
        ("/index.html", "index.html"),
        ("/js/main.js", "js/main.js"),
        ("/js//main.js", "js/main.js"),
        ("/js/main%2Ejs", "js/main.js"),
        ("/app.css#x", "app.css"),
    ],
)
def test_resolve_finds_files(root: Path, target: str, expected: str) -> None:
    assert web.resolve(root, target) == (root / expected).resolve()


@pytest.mark.parametrize(
    "target",
    [
        "/nope.html",
        "/js",  # a directory without a trailing slash
        "/js/",  # a directory without an index
        "/../secret.txt",
        "/js/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/js/%2e%2e/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "/..%5csecret.txt",
        "/js/./main.js",
        "/.hidden",
        "/escape.txt",  # a symlink out of the root
        "/index.html%00.js",
        "/%ff",
        "/js/%c0%ae%c0%ae/secret.txt",  # overlong UTF-8 dots
        "relative.html",
    ],
)
def test_resolve_refuses(root: Path, target: str) -> None:
    assert web.resolve(root, target) is None


def test_resolve_without_a_root(tmp_path: Path) -> None:
    assert web.resolve(tmp_path / "missing", "/") is None


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://127.0.0.1:8765", "127.0.0.1:8765", True),
        ("https://chat.example", "chat.example", True),  # TLS ended at a proxy
        ("https://Chat.Example", "chat.example", True),
        ("http://127.0.0.1:8766", "127.0.0.1:8765", False),
        ("https://evil.example", "chat.example", False),
        ("null", "chat.example", False),
        ("https://chat.example", None, False),
        ("https://chat.example.evil.example", "chat.example", False),
    ],
)
def test_same_origin(origin: str, host: str | None, same: bool) -> None:
    assert web.same_origin(origin, host) is same


@pytest.mark.parametrize(
    ("host", "listen", "allowed", "trusted"),
    [
        ("127.0.0.1:8765", "127.0.0.1", [], True),
        ("localhost:8765", "127.0.0.1", [], True),
        ("[::1]:8765", "::1", [], True),
        ("127.9.9.9", "127.0.0.1", [], True),
        ("evil.example:8765", "127.0.0.1", [], False),  # DNS rebinding to loopback
        ("chat.example", "0.0.0.0", [], True),  # behind a proxy, under its public name
        ("chat.example", "0.0.0.0", ["chat.example"], True),
        ("evil.example", "0.0.0.0", ["chat.example"], False),
        ("Chat.Example:443", "0.0.0.0", ["chat.example"], True),
        ("evil.example", "127.0.0.1", ["*"], True),
        (None, "127.0.0.1", [], False),
        ("[bad", "127.0.0.1", [], False),
    ],
)
def test_trusted_host(host: str | None, listen: str, allowed: list[str], trusted: bool) -> None:
    assert web.trusted_host(host, listen, allowed) is trusted


async def upgrade_status(port: int, host: str, origin: str) -> int:
    """The status of a websocket upgrade sent with these Host and Origin headers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET / HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        async with asyncio.timeout(scaled(5)):
            status = await reader.readline()
        return int(status.split()[1])
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_rebound_name_does_not_make_a_page_same_origin(site: RunningNode) -> None:
    """A page of evil.example whose name the attacker points at 127.0.0.1 sends Origin and
    Host both evil.example: same origin by the headers, refused by the name."""
    port = site.node.port
    assert await upgrade_status(port, f"evil.example:{port}", f"http://evil.example:{port}") == 403
    assert await upgrade_status(port, f"localhost:{port}", f"http://localhost:{port}") == 101


def test_responses_carry_the_safety_headers(root: Path) -> None:
    site = web.WebRoot(root)
    ok = site.respond("/", Headers())
    assert ok.status_code == 200 and ok.body == INDEX
    for response in (ok, site.respond("/nope", Headers())):
        assert response.headers["Content-Security-Policy"] == web.CSP
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["Cache-Control"] == "no-cache"
    assert "script-src 'self'" in web.CSP and "unsafe-inline" not in web.CSP
    again = site.respond("/", Headers([("If-None-Match", ok.headers["ETag"])]))
    assert again.status_code == 304 and again.body == b""


# --------------------------------------------------------------------------- a real node


@pytest_asyncio.fixture(loop_scope="session")
async def site(root: Path, tmp_path: Path) -> AsyncIterator[RunningNode]:
    async with running_node(sqlite_path=str(tmp_path / "w.db"), web_root=str(root)) as node:
        yield node


async def http_get(
    port: int, target: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        async with asyncio.timeout(scaled(5)):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            found = {
                k.strip().lower(): v.strip()
                for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
            }
            body = await reader.readexactly(int(found.get("content-length", "0")))
        return int(lines[0].split()[1]), found, body
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_files_are_served_with_headers(site: RunningNode) -> None:
    port = site.node.port
    status, headers, body = await http_get(port, "/")
    assert (status, body) == (200, INDEX)
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["content-security-policy"] == web.CSP
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-cache" and headers["etag"]
    status, headers, body = await http_get(port, "/js/main.js")
    assert (status, body) == (200, MAIN_JS)
    assert headers["content-type"] == "text/javascript; charset=utf-8"
    status, _, body = await http_get(port, "/", {"If-None-Match": headers["etag"]})
    assert status == 200  # another file's tag
    _, headers, _ = await http_get(port, "/")
    status, _, body = await http_get(port, "/", {"If-None-Match": headers["etag"]})
    assert (status, body) == (304, b"")


@pytest.mark.parametrize(
    "target",
    ["/nope", "/../secret.txt", "/%2e%2e/secret.txt", "/js/../../secret.txt", "/.hidden", "/%ff"],
)
async def test_unknown_and_traversal_are_404(site: RunningNode, target: str) -> None:
    status, headers, body = await http_get(site.node.port, target)
    assert status == 404 and b"outside" not in body
    assert headers["content-security-policy"] == web.CSP


async def test_probes_and_websocket_still_work(site: RunningNode) -> None:
    status, _, body = await http_get(site.node.port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    async with site.client("max") as max_:
        assert "server_time" in await max_.request("ping")
    async with Client.connect(f"{site.url}?workspace={site.workspace_id}", site.tokens["mia"]) as c:
        assert c.session["user"]["handle"] == "mia"


async def test_same_origin_websocket_is_accepted(site: RunningNode) -> None:
    own = f"http://127.0.0.1:{site.node.port}"
    async with Client.connect(site.url, site.tokens["max"], origin=own) as c:
        await c.request("ping")
    with pytest.raises(InvalidStatus) as info:
        async with Client.connect(site.url, origin="http://127.0.0.1:1"):
            pass
    assert info.value.response.status_code == 403


async def test_allowed_origins_still_refuse_foreign_ones(root: Path, tmp_path: Path) -> None:
    async with running_node(
        sqlite_path=str(tmp_path / "o.db"),
        web_root=str(root),
        allowed_origins=["https://chat.example"],
    ) as node:
        own = f"http://127.0.0.1:{node.node.port}"
        for origin in (own, "https://chat.example"):
            async with Client.connect(node.url, node.tokens["max"], origin=origin) as c:
                await c.request("ping")
        with pytest.raises(InvalidStatus) as info:
            async with Client.connect(node.url, origin="https://evil.example"):
                pass
        assert info.value.response.status_code == 403


async def test_flannel_serves_the_files_too(site: RunningNode, root: Path) -> None:
    async with flannel(site, web_root=str(root)) as edge:
        status, headers, body = await http_get(edge.port, "/js/main.js")
        assert (status, body) == (200, MAIN_JS)
        assert headers["content-security-policy"] == web.CSP
        status, _, _ = await http_get(edge.port, "/../secret.txt")
        assert status == 404
        own = f"http://127.0.0.1:{edge.port}"
        async with Client.connect(f"ws://127.0.0.1:{edge.port}/", site.tokens["max"], origin=own):
            pass


def test_the_image_carries_the_web_client() -> None:
    dockerfile = (Path(__file__).resolve().parents[1] / "Dockerfile").read_text()
    assert "COPY web ./web" in dockerfile
    assert "CHAT_WEB_ROOT=/app/web" in dockerfile and "FLANNEL_WEB_ROOT=/app/web" in dockerfile
