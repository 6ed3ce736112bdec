"""Browser tests' machinery: headless Chromium through Playwright, and `chat serve` processes.

Used by tests/test_web.py (its fixtures import from here; no pytest dependency in the helpers):

* :data:`CHROMIUM` is Debian's ``chromium`` (``scripts/install`` installs it and the
  ``playwright`` package; no ``playwright install``: no browser downloads). Set
  ``CHAT_TEST_CHROMIUM`` to use another binary.
* :class:`WebServer` is one ``python -m chat serve`` over an embedded SQLite store in a data
  directory, on a free loopback port (:class:`tests.cluster.ChatNodeProcess`, so it is started
  in its own session, stopped by PID, and restarts on the same port and data directory).
  :meth:`WebServer.seed` creates the ``acme`` workspace with password users before it starts.
* :class:`PageWatch` records what a page must never do: uncaught errors, console errors
  (a CSP violation is one), dialogs (an XSS payload that ran).
* :func:`sign_in`, :func:`message_texts`, :func:`shot` are the steps the tests share.

Every wait is Playwright's own polling ``expect`` with a deadline (scaled by
``CHAT_TEST_TIMEOUT_FACTOR``), never a sleep.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Dialog,
    Page,
    Response,
    expect,
)

from chat.admin import Admin
from chat.client import Client
from chat.config import Settings
from tests.cluster import ChatNodeProcess
from tests.timing import scaled

REPO_ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"

CHROMIUM = os.environ.get("CHAT_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

SECRET = "web-test-secret-key-0123456789-abcdefghijklmnopq"
WORKSPACE = "acme"
PASSWORD = "correct horse battery staple"
# handle -> (display name, role); every one has PASSWORD and is in #general and #random.
PEOPLE = {
    "ada": ("Ada Lovelace", "owner"),
    "bob": ("Bob Bell", "member"),
    "cy": ("Cy Young", "member"),
    "adam": ("Adam Smith", "member"),  # "@ad" matches two people
}
DESKTOP = {"width": 1280, "height": 800}
MOBILE = {"width": 390, "height": 844}

# A connection the page shows as usable (conn-state's data-state).
LIVE_STATES = re.compile(r"^(live|resumed)$")


def wait_ms(seconds: float) -> float:
    """A Playwright timeout (milliseconds) scaled for slow machines."""
    return scaled(seconds) * 1000


expect.set_options(timeout=wait_ms(15))


# --------------------------------------------------------------------------- the server


@dataclass
class Seeded:
    workspace_id: int
    users: dict[str, int] = field(default_factory=dict)  # handle -> id
    channels: dict[str, int] = field(default_factory=dict)  # name -> id
    tokens: dict[str, str] = field(default_factory=dict)  # handle -> token


class WebServer:
    """``chat serve`` over SQLite in ``data_dir``, on a loopback port kept across restarts."""

    def __init__(self, data_dir: Path, *, extra_env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.sqlite_path = data_dir / "chat.sqlite3"
        env = {"CHAT_SQLITE_PATH": str(self.sqlite_path), "CHAT_LOG_LEVEL": "info"}
        env.update(extra_env or {})
        self.process = ChatNodeProcess(
            "web", database_url="", secret_key=SECRET, extra_env=env, log_dir=data_dir
        )
        self.seeded: Seeded | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.process.port}/"

    @property
    def ws_url(self) -> str:
        return self.process.url

    def settings(self) -> Settings:
        return Settings(sqlite_path=str(self.sqlite_path), secret_key=SECRET)

    async def seed(self) -> Seeded:
        """Workspace ``acme``: :data:`PEOPLE` with :data:`PASSWORD`, channels ``general``
        and ``random`` with everyone in them, a token each (for Python clients)."""
        admin = await Admin.open(self.settings())
        try:
            wid = await admin.create_workspace(WORKSPACE)
            specs = [
                {"handle": h, "display_name": name, "role": role, "password": PASSWORD}
                for h, (name, role) in PEOPLE.items()
            ]
            users = {u.handle: u.id for u in await admin.create_users(wid, specs)}
            ids = list(users.values())
            channels = {
                name: (await admin.create_channel(wid, name, users["ada"], ids, False)).id
                for name in ("general", "random")
            }
            tokens = {h: await admin.issue_token(i) for h, i in users.items()}
        finally:
            await admin.close()
        self.seeded = Seeded(wid, users, channels, tokens)
        return self.seeded

    async def start(self) -> None:
        await self.process.astart()

    async def stop(self) -> None:
        """SIGTERM by PID and wait for the exit (graceful: clients get ``goodbye``)."""
        await self.process.aterminate()

    async def restart(self) -> None:
        """:meth:`stop`, then start again on the same port over the same data."""
        await self.stop()
        await self.start()

    async def close(self) -> None:
        await self.process.astop()
        self.process.close()

    @contextlib.asynccontextmanager
    async def client(self, handle: str) -> AsyncIterator[Client]:
        """A Python client (chat/client.py) signed in as ``handle``."""
        assert self.seeded is not None, "seed() first"
        async with Client.connect(self.ws_url, self.seeded.tokens[handle]) as c:
            yield c


# --------------------------------------------------------------------------- pages


class PageWatch:
    """What went wrong on a page that no single assertion sees: uncaught exceptions,
    console errors, dialogs (each dismissed)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.console_errors: list[str] = []
        self.dialogs: list[str] = []
        self.failed_loads: list[str] = []  # "404 http://..." (the console names no URL)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("response", self._response)
        page.on("console", self._console)
        page.on("dialog", self._dialog)

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.console_errors.append(msg.text)

    def _response(self, response: Response) -> None:
        if response.status >= 400:
            self.failed_loads.append(f"{response.status} {response.url}")

    async def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    def unexpected_console_errors(self) -> list[str]:
        """Console errors other than the browser's own reports of a dropped websocket or
        a refused connection, which a page sees while its server restarts."""
        benign = ("WebSocket connection to", "net::ERR_CONNECTION_REFUSED")
        return [e for e in self.console_errors if not any(b in e for b in benign)] + [
            f"failed load: {f}" for f in self.failed_loads
        ]

    def assert_clean(self) -> None:
        assert not self.errors, f"uncaught errors on the page: {self.errors}"
        assert not self.dialogs, f"dialogs opened: {self.dialogs}"
        unexpected = self.unexpected_console_errors()
        assert not unexpected, f"console errors: {unexpected}"


@dataclass
class UserPage:
    """One person's browser tab (its own context: its own localStorage)."""

    handle: str
    context: BrowserContext
    page: Page
    watch: PageWatch

    def by_id(self, testid: str) -> Any:
        return self.page.get_by_test_id(testid)


async def open_page(
    browser: Browser,
    handle: str = "",
    *,
    viewport: dict[str, int] | None = None,
    **context_options: Any,
) -> UserPage:
    context = await browser.new_context(viewport=viewport or DESKTOP, **context_options)  # type: ignore[arg-type]
    page = await context.new_page()
    return UserPage(handle, context, page, PageWatch(page))


async def wait_live(user: UserPage) -> None:
    await expect(user.by_id("conn-state")).to_have_attribute("data-state", LIVE_STATES)


async def sign_in(user: UserPage, server: WebServer | str, password: str = PASSWORD) -> None:
    """Open the server's page (or a URL), sign in as ``user.handle``, wait until live."""
    await user.page.goto(server if isinstance(server, str) else server.http_url)
    await fill_login(user, user.handle, password)
    await wait_live(user)
    await expect(user.by_id("login-form")).to_be_hidden()


async def fill_login(
    user: UserPage, handle: str, password: str, workspace: str = WORKSPACE
) -> None:
    await expect(user.by_id("login-form")).to_be_visible()
    await user.by_id("login-workspace").fill(workspace)
    await user.by_id("login-handle").fill(handle)
    await user.by_id("login-password").fill(password)
    await user.by_id("login-submit").click()


async def open_channel(user: UserPage, name: str) -> None:
    item = user.by_id("channel-item").and_(user.page.locator(f'[data-name="{name}"]'))
    await item.click()
    await expect(user.by_id("channel-title")).to_contain_text(name)


def pane_messages(user: UserPage) -> Any:
    return user.by_id("message-pane").get_by_test_id("message")


async def send(user: UserPage, text: str, composer: str = "composer") -> None:
    box = user.by_id(composer)
    await box.fill(text)
    await box.press("Enter")


async def message_texts(user: UserPage, scope: str = "message-pane") -> list[str]:
    texts: list[str] = await user.by_id(scope).get_by_test_id("message-text").all_inner_texts()
    return texts


async def shot(user: UserPage, name: str) -> Path:
    """A screenshot of the page into docs/screenshots/<name>.png (what the README shows)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    await user.page.screenshot(path=str(path), animations="disabled", caret="hide")
    return path
