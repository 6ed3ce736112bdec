"""The browser client's static files (``web/``), as every tier's front door serves them.

A plain ``GET`` (no websocket upgrade) of ``/`` or of a file under the web root answers the
file; anything else answers 404. Pure parts (:func:`resolve`, :func:`content_type`,
:func:`same_origin`) are tested without sockets; :class:`WebRoot` reads the files (at each
request: small files, and an edit shows at the next reload) and builds the responses, with
the headers that keep the page safe:

- ``Content-Security-Policy`` (:data:`CSP`): scripts, styles and connections from this origin
  only, no inline script or style, no framing, no plugins, no forms posting anywhere;
- ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer``;
- ``Cache-Control: no-cache`` with an ``ETag``: the browser revalidates each file, and an
  unchanged one costs a 304.

Paths are resolved strictly: percent-decoded once, no ``..`` or ``.`` segments, no hidden
files (a segment starting with ``.``), no backslashes or NULs, and the real path (symlinks
followed) must stay under the root.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from pathlib import Path
from urllib.parse import unquote, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Response

log = logging.getLogger(__name__)

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
    "object-src 'none'"
)

CONTENT_TYPES: dict[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".txt": "text/plain; charset=utf-8",
}
DEFAULT_CONTENT_TYPE = "application/octet-stream"
INDEX = "index.html"


def default_root() -> Path:
    """``web/`` beside the ``chat`` package (a checkout, or the image's ``/app``), else
    ``web/`` in the working directory."""
    beside = Path(__file__).resolve().parent.parent / "web"
    return beside if beside.is_dir() else Path("web").resolve()


def content_type(path: str) -> str:
    return CONTENT_TYPES.get(Path(path).suffix.lower(), DEFAULT_CONTENT_TYPE)


def resolve(root: Path, url_path: str) -> Path | None:
    """The file under ``root`` that ``url_path`` (a request target: path and query) names,
    or None: not a file, or not allowed (traversal, hidden, outside the root)."""
    try:
        path = unquote(url_path.split("?", 1)[0].split("#", 1)[0], errors="strict")
    except UnicodeDecodeError:  # not UTF-8 once decoded: no file of ours has such a name
        return None
    if not path.startswith("/") or "\\" in path or "\x00" in path:
        return None
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") or p.startswith(".") for p in path.split("/")[1:]):
        return None
    if not parts or path.endswith("/"):
        parts.append(INDEX)
    try:
        base = root.resolve(strict=True)
        candidate = base.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, a bad name
        return None
    if not candidate.is_relative_to(base) or not candidate.is_file():
        return None
    return candidate


def same_origin(origin: str, host: str | None) -> bool:
    """Whether a browser's ``Origin`` names the host it connected to (``Host``): the page
    the server gave out is talking to the server that gave it out. The scheme is not
    compared: behind a TLS-terminating proxy the page is ``https`` and the hop is not."""
    if not host:
        return False
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return False
    return bool(netloc) and netloc.lower() == host.strip().lower()


def host_name(host: str | None) -> str | None:
    """The name in a ``Host`` header (``[::1]:8765`` -> ``::1``), lowercased; None if
    unreadable."""
    if not host:
        return None
    try:
        name = urlsplit("//" + host.strip()).hostname
    except ValueError:
        return None
    return name or None


def is_loopback(name: str) -> bool:
    """``localhost`` or a loopback address (``127.0.0.0/8``, ``::1``)."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def trusted_host(host: str | None, listen_host: str, allowed: list[str]) -> bool:
    """Whether a request's ``Host`` may be the origin of a page talking to us. Against DNS
    rebinding (a page of evil.example whose name now resolves to 127.0.0.1 is "same
    origin" with itself): ``allowed`` (``allowed_hosts``) lists the names a node answers
    to; left empty, a node that listens on loopback only trusts loopback names, and one
    listening elsewhere (behind a proxy, under its public name) trusts the name asked for."""
    name = host_name(host)
    if name is None:
        return False
    if allowed:
        return "*" in allowed or name in (a.lower() for a in allowed)
    if is_loopback(listen_host):
        return is_loopback(name)
    return True


def is_upgrade(headers: Headers) -> bool:
    return any(
        token.strip().lower() == "websocket"
        for value in headers.get_all("Upgrade")
        for token in value.split(",")
    )


class WebRoot:
    """Answers the plain GETs of one web root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        if not root.is_dir():
            log.warning("no web client here: every page is a 404", extra={"web_root": str(root)})

    def respond(self, url_path: str, headers: Headers) -> Response:
        found = resolve(self.root, url_path)
        if found is None:
            return _response(404, "Not Found", b"not found\n", "text/plain; charset=utf-8")
        try:
            body = found.read_bytes()
        except OSError:
            return _response(404, "Not Found", b"not found\n", "text/plain; charset=utf-8")
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        if etag in [t.strip() for v in headers.get_all("If-None-Match") for t in v.split(",")]:
            return _response(304, "Not Modified", b"", None, etag=etag)
        return _response(200, "OK", body, content_type(found.name), etag=etag)


def _response(
    status: int, reason: str, body: bytes, ctype: str | None, *, etag: str | None = None
) -> Response:
    headers = Headers(
        [
            ("Content-Security-Policy", CSP),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
            ("Cache-Control", "no-cache"),
        ]
    )
    if ctype is not None:
        headers["Content-Type"] = ctype
    if etag is not None:
        headers["ETag"] = etag
    headers["Content-Length"] = str(len(body))
    return Response(status, reason, headers, body)
