"""The web client (web/) end to end: headless Chromium (Debian's ``chromium``) driven by
Playwright against a real ``chat serve`` process, and once through the launcher's cluster
(HAProxy over TLS, Flannel serving the page).

The page is driven the way a person would, its elements found by the ``data-testid``
attributes the web client gives them (web/index.html, web/js/). Each test also asserts that the
page threw nothing, opened no dialog, logged no console error (a CSP violation is one) and
loaded nothing that failed. The tests write the screenshots the README shows into
docs/screenshots/ (see tests/web_fixtures.py).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest_asyncio
from playwright.async_api import Browser, async_playwright, expect

from chat.admin import Admin
from chat.config import Settings
from tests.web_fixtures import (
    CHROMIUM,
    CHROMIUM_ARGS,
    LIVE_STATES,
    MOBILE,
    PASSWORD,
    PEOPLE,
    UserPage,
    WebServer,
    fill_login,
    message_texts,
    open_channel,
    open_page,
    pane_messages,
    send,
    shot,
    sign_in,
    wait_live,
    wait_ms,
)

# =========================================================================== fixtures


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def browser() -> AsyncIterator[Browser]:
    """One headless Chromium for the whole run; each user gets a fresh context."""
    async with async_playwright() as p:
        chromium = await p.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest_asyncio.fixture(loop_scope="session")
async def empty_server(tmp_path: Path) -> AsyncIterator[WebServer]:
    """``chat serve`` on an empty data directory: no workspace yet."""
    server = WebServer(tmp_path / "data")
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest_asyncio.fixture(loop_scope="session")
async def server(tmp_path: Path) -> AsyncIterator[WebServer]:
    """``chat serve`` over a seeded workspace (tests/web_fixtures.py PEOPLE)."""
    web = WebServer(tmp_path / "data")
    await web.seed()
    await web.start()
    try:
        yield web
    finally:
        await web.close()


OpenPage = Callable[..., Awaitable[UserPage]]


@pytest_asyncio.fixture(loop_scope="session")
async def pages(browser: Browser) -> AsyncIterator[OpenPage]:
    """``await pages("ada")``: a new browser context and page for one person; all closed
    at the end of the test."""
    opened: list[UserPage] = []

    async def make(handle: str = "", **options: Any) -> UserPage:
        user = await open_page(browser, handle, **options)
        opened.append(user)
        return user

    try:
        yield make
    finally:
        for user in opened:
            await user.context.close()


def message_with(user: UserPage, text: str, scope: str = "message-pane") -> Any:
    return user.by_id(scope).get_by_test_id("message").filter(has_text=text)


# =========================================================================== chatting


async def test_two_users_see_each_others_messages_live(server: WebServer, pages: OpenPage) -> None:
    ada, bob = await pages("ada"), await pages("bob")
    await ada.page.goto(server.http_url)
    await expect(ada.by_id("login-form")).to_be_visible()
    await shot(ada, "sign-in")
    await fill_login(ada, "ada", PASSWORD)
    await wait_live(ada)
    await sign_in(bob, server)
    for user in (ada, bob):
        await open_channel(user, "general")

    await send(ada, "Morning, Bob! The deploy is green.")
    mine = message_with(ada, "The deploy is green")
    await expect(mine).to_have_count(1)
    await expect(mine).to_have_attribute("data-ts", re.compile(r"^\d+$"))  # acknowledged
    theirs = message_with(bob, "The deploy is green")
    await expect(theirs).to_have_count(1)
    await expect(theirs.get_by_test_id("message-author")).to_contain_text("Ada")
    assert await theirs.get_attribute("data-ts") == await mine.get_attribute("data-ts")

    await bob.by_id("composer").press_sequentially("Great")  # typing, not sent yet
    await expect(ada.by_id("typing-indicator")).to_contain_text(re.compile("Bob.*typing"))
    await send(bob, "Great, I'll tell the team.")
    await expect(message_with(ada, "tell the team")).to_have_count(1)
    await expect(message_with(bob, "tell the team")).to_have_count(1)
    await send(ada, "Thanks!")
    await expect(message_with(bob, "Thanks!")).to_have_count(1)

    # Elsewhere: a mention in #random and a DM from cy show up in ada's sidebar as badges.
    seeded = server.seeded
    assert seeded is not None
    async with server.client("cy") as cy:
        await cy.post(seeded.channels["random"], "@ada lunch at noon?")
        await cy.post(seeded.channels["random"], "the usual place")
        dm = (await cy.request("dms.open", user_ids=[seeded.users["ada"]]))["channel"]
        await cy.post(dm["id"], "Got a minute for the budget?")
    random = ada.by_id("channel-item").and_(ada.page.locator('[data-name="random"]'))
    await expect(random.get_by_test_id("mention-badge")).to_have_text("1")
    await expect(random.get_by_test_id("unread-badge")).to_have_text("2")
    dm_item = ada.by_id("dm-list").get_by_test_id("dm-item")
    await expect(dm_item).to_have_count(1)
    await expect(dm_item).to_have_attribute("data-channel-id", str(dm["id"]))
    await expect(dm_item).to_contain_text("Cy")
    await expect(dm_item.get_by_test_id("unread-badge")).to_have_text("1")
    # ... and the channel ada is reading has nothing unread.
    general = ada.by_id("channel-item").and_(ada.page.locator('[data-name="general"]'))
    await expect(general.get_by_test_id("unread-badge")).to_have_count(0)
    await ada.by_id("composer").click()
    await shot(ada, "channel")

    for user in (ada, bob):
        assert await message_texts(user) == [
            "Morning, Bob! The deploy is green.",
            "Great, I'll tell the team.",
            "Thanks!",
        ]
        user.watch.assert_clean()


async def test_mention_autocompletes_from_the_keyboard(server: WebServer, pages: OpenPage) -> None:
    ada, bob = await pages("ada"), await pages("bob")
    await sign_in(ada, server)
    await open_channel(ada, "random")  # away from #general: the mention shows as a badge
    await sign_in(bob, server)
    await open_channel(bob, "general")

    composer = bob.by_id("composer")
    await composer.click()
    await composer.press_sequentially("@ad")
    # "@ad" matches ada and adam; the server's ranking orders them, the first is selected.
    items = bob.by_id("autocomplete").get_by_test_id("autocomplete-item")
    await expect(items).to_have_count(2)
    selected = items.and_(bob.page.locator('[aria-selected="true"]'))
    await expect(selected).to_have_count(1)
    values = [await item.get_attribute("data-value") for item in await items.all()]
    assert sorted(values) == ["@ada", "@adam"], values
    await expect(selected).to_have_attribute("data-value", values[0])
    await shot(bob, "autocomplete")

    await composer.press("ArrowDown")
    await expect(selected).to_have_attribute("data-value", values[1])
    await composer.press("ArrowUp")
    await expect(selected).to_have_attribute("data-value", values[0])
    for _ in range(values.index("@ada")):
        await composer.press("ArrowDown")
    await expect(selected).to_have_attribute("data-value", "@ada")
    await composer.press("Enter")
    await expect(composer).to_have_value("@ada ")
    await expect(bob.by_id("autocomplete")).to_be_hidden()

    await composer.press_sequentially("can you review the release notes?")
    await composer.press("Enter")
    await expect(message_with(bob, "@ada can you review")).to_have_count(1)
    general = ada.by_id("channel-item").and_(ada.page.locator('[data-name="general"]'))
    await expect(general.get_by_test_id("mention-badge")).to_have_text("1")
    # One unread message (the page shows the mention badge in its place).
    await expect(general.get_by_test_id("unread-badge")).to_have_text("1")
    for user in (ada, bob):
        user.watch.assert_clean()


async def test_channel_autocompletes_from_the_keyboard(server: WebServer, pages: OpenPage) -> None:
    ada = await pages("ada")
    await sign_in(ada, server)
    await open_channel(ada, "random")
    composer = ada.by_id("composer")
    await composer.click()
    await composer.press_sequentially("notes are in #gen")
    # channels.autocomplete answers: #general, and not #random.
    items = ada.by_id("autocomplete").get_by_test_id("autocomplete-item")
    await expect(items).to_have_count(1)
    await expect(items).to_have_attribute("data-value", "#general")
    await expect(items).to_have_attribute("aria-selected", "true")
    await composer.press("Enter")  # accepts the channel; does not send
    await expect(composer).to_have_value("notes are in #general ")
    await expect(ada.by_id("autocomplete")).to_be_hidden()
    assert await message_texts(ada) == []

    await composer.press_sequentially("now")
    await composer.press("Enter")
    mine = message_with(ada, "notes are in #general now")
    await expect(mine).to_have_attribute("data-ts", re.compile(r"^\d+$"))
    assert await message_texts(ada) == ["notes are in #general now"]
    ada.watch.assert_clean()


async def test_presence_dot_of_a_dm_partner_follows_them_live(
    server: WebServer, pages: OpenPage
) -> None:
    seeded = server.seeded
    assert seeded is not None
    async with server.client("cy") as cy:
        dm = (await cy.request("dms.open", user_ids=[seeded.users["ada"]]))["channel"]
        await cy.post(dm["id"], "ping me when you are in")
    ada = await pages("ada")
    await sign_in(ada, server)
    dm_item = ada.by_id("dm-list").get_by_test_id("dm-item")
    await expect(dm_item).to_have_attribute("data-channel-id", str(dm["id"]))
    dot = dm_item.get_by_test_id("presence-dot")
    await expect(dot).to_have_attribute("data-presence", "away")  # cy is not connected

    async with server.client("cy") as cy:
        await expect(dot).to_have_attribute("data-presence", "active")
        await cy.request("presence.set", status="away")
        await expect(dot).to_have_attribute("data-presence", "away")
        await cy.request("presence.set", status="auto")
        await expect(dot).to_have_attribute("data-presence", "active")
    await expect(dot).to_have_attribute("data-presence", "away")  # cy's only connection closed
    ada.watch.assert_clean()


async def test_thread_reply_in_side_pane_and_reaction_on_both_screens(
    server: WebServer, pages: OpenPage
) -> None:
    ada, bob = await pages("ada"), await pages("bob")
    for user in (ada, bob):
        await sign_in(user, server)
        await open_channel(user, "general")
    await send(ada, "Release notes for 2.0: ready for review")
    root_for_bob = message_with(bob, "Release notes for 2.0")
    await expect(root_for_bob).to_have_attribute("data-ts", re.compile(r"^\d+$"))

    await root_for_bob.hover()
    await root_for_bob.get_by_test_id("reply-button").click()
    await expect(bob.by_id("thread-pane")).to_be_visible()
    await send(bob, "Looks good, one typo in the intro.", composer="thread-composer")
    await expect(message_with(bob, "one typo", scope="thread-pane")).to_have_count(1)

    root_for_ada = message_with(ada, "Release notes for 2.0")
    await expect(root_for_ada.get_by_test_id("reply-count")).to_contain_text("1")
    await root_for_ada.get_by_test_id("reply-count").click()
    await expect(ada.by_id("thread-pane")).to_be_visible()
    await expect(message_with(ada, "one typo", scope="thread-pane")).to_have_count(1)
    # The reply lives in the thread, not in the channel's pane.
    assert "Looks good, one typo in the intro." not in await message_texts(ada)

    await root_for_ada.hover()
    await root_for_ada.get_by_test_id("react-button").first.click()
    option = ada.page.get_by_test_id("emoji-option").first
    emoji = await option.get_attribute("data-emoji")
    assert emoji
    await option.click()

    def reaction(user: UserPage) -> Any:
        root = message_with(user, "Release notes for 2.0")
        return root.get_by_test_id("reaction").and_(user.page.locator(f'[data-emoji="{emoji}"]'))

    for user in (ada, bob):
        await expect(reaction(user)).to_have_count(1)
        await expect(reaction(user)).to_contain_text("1")
    await reaction(bob).click()  # bob adds his to the same one
    for user in (ada, bob):
        await expect(reaction(user)).to_contain_text("2")
    await ada.by_id("thread-composer").click()  # the pointer off the message: no hover menu
    await shot(ada, "thread")
    for user in (ada, bob):
        user.watch.assert_clean()


async def test_edits_and_deletes_show_live_on_the_other_screen(
    server: WebServer, pages: OpenPage
) -> None:
    ada, bob = await pages("ada"), await pages("bob")
    for user in (ada, bob):
        await sign_in(user, server)
        await open_channel(user, "general")
    await send(ada, "Standup at 9:30")
    await send(ada, "Bring the slides")
    mine = message_with(ada, "Standup at 9:30")
    await expect(mine).to_have_attribute("data-ts", re.compile(r"^\d+$"))
    await expect(message_with(bob, "Bring the slides")).to_have_count(1)

    await mine.hover()
    await mine.get_by_test_id("edit-button").click()
    edit = ada.by_id("message-pane").get_by_test_id("edit-input")  # the text is in it now
    await edit.fill("Standup at 10:00")
    await edit.press("Enter")
    theirs = message_with(bob, "Standup at 10:00")
    await expect(theirs).to_have_count(1)
    await expect(theirs.get_by_test_id("message-edited")).to_be_visible()
    await expect(message_with(bob, "Standup at 9:30")).to_have_count(0)

    slides = message_with(ada, "Bring the slides")
    await slides.hover()
    await slides.get_by_test_id("delete-button").click()
    for user in (ada, bob):
        await expect(message_with(user, "Bring the slides")).to_have_count(0)
    assert await message_texts(bob) == ["Standup at 10:00"]
    for user in (ada, bob):
        user.watch.assert_clean()


async def test_scrolling_up_walks_back_through_the_whole_history(
    server: WebServer, pages: OpenPage
) -> None:
    seeded = server.seeded
    assert seeded is not None
    texts = [f"history #{i:03}" for i in range(1, 131)]
    async with (
        server.client("bob") as bob,
        server.client("cy") as cy,
        server.client("adam") as adam,
    ):
        posters = [bob, cy, adam]  # within each connection's rate limit
        for i, text in enumerate(texts):
            await posters[i % 3].post(seeded.channels["general"], text)
    ada = await pages("ada")
    await sign_in(ada, server)
    await open_channel(ada, "general")
    await expect(message_with(ada, "history #130")).to_be_visible()
    first_page = await pane_messages(ada).count()
    assert first_page < len(texts), "the first page should not be everything"

    # Scroll up with the wheel, as a person would, until the first message is there.
    oldest = message_with(ada, "history #001")
    for _ in range(len(texts)):
        # Counted before looking for the oldest: a page still loading from the last wheel may
        # land in between, and then this wheel has nothing left to load.
        shown = await pane_messages(ada).count()
        if await oldest.count():
            break
        await pane_messages(ada).first.hover()
        await ada.page.mouse.wheel(0, -20_000)
        await expect(pane_messages(ada)).not_to_have_count(shown)
    await expect(oldest).to_have_count(1)
    assert await message_texts(ada) == texts
    ada.watch.assert_clean()


async def test_create_join_and_leave_a_channel(server: WebServer, pages: OpenPage) -> None:
    ada, bob = await pages("ada"), await pages("bob")
    for user in (ada, bob):
        await sign_in(user, server)
    await ada.by_id("new-channel-button").click()
    await ada.by_id("channel-name-input").fill("plan-budget")
    await ada.by_id("channel-create-submit").click()
    await expect(ada.by_id("channel-title")).to_contain_text("plan-budget")
    await send(ada, "Numbers go here")
    await expect(message_with(ada, "Numbers go here")).to_have_attribute(
        "data-ts", re.compile(r"^\d+$")
    )

    # bob is not in it: he finds it in Browse, joins, reads the history, then leaves.
    def bobs(name: str) -> Any:
        return (
            bob.by_id("channel-list")
            .get_by_test_id("channel-item")
            .and_(bob.page.locator(f'[data-name="{name}"]'))
        )

    await expect(bobs("plan-budget")).to_have_count(0)
    await bob.by_id("browse-channels-button").click()
    row = bob.page.get_by_test_id("browse-channel-item").and_(
        bob.page.locator('[data-name="plan-budget"]')
    )
    await row.get_by_test_id("join-button").click()
    await expect(bobs("plan-budget")).to_have_count(1)
    await open_channel(bob, "plan-budget")
    await expect(message_with(bob, "Numbers go here")).to_have_count(1)
    await send(bob, "Count me in")
    await expect(message_with(ada, "Count me in")).to_have_count(1)

    await bob.by_id("leave-channel-button").click()
    await expect(bobs("plan-budget")).to_have_count(0)
    for user in (ada, bob):
        user.watch.assert_clean()


# =========================================================================== reconnects


async def test_page_resumes_after_a_server_restart_nothing_lost_or_doubled(
    server: WebServer, pages: OpenPage
) -> None:
    ada = await pages("ada")
    await sign_in(ada, server)
    await open_channel(ada, "general")
    await send(ada, "before the restart")
    await expect(message_with(ada, "before the restart")).to_have_attribute(
        "data-ts", re.compile(r"^\d+$")
    )

    # The server stops; the page notices and goes offline (it cannot reconnect) while the
    # server starts again and bob posts: it must catch up on what it missed when it is back.
    await server.stop()
    await expect(ada.by_id("conn-state")).to_have_attribute("data-state", "reconnecting")
    await ada.context.set_offline(True)
    await server.start()
    missed = [f"posted while ada was away #{i}" for i in range(1, 4)]
    async with server.client("bob") as bob:
        for text in missed:
            await bob.post(server.seeded.channels["general"], text)  # type: ignore[union-attr]
        await ada.context.set_offline(False)
        await expect(ada.by_id("conn-state")).to_have_attribute(
            "data-state", LIVE_STATES, timeout=wait_ms(45)
        )
        for text in missed:
            await expect(message_with(ada, text)).to_have_count(1)

        # The connection works both ways again.
        await send(ada, "after the restart")
        seen: list[str] = []
        while "after the restart" not in seen:  # bob's own posts come first
            event = await bob.next_event("message.posted", timeout=wait_ms(15) / 1000)
            seen.append(event["message"]["text"])
        assert seen == [*missed, "after the restart"]

    await expect(message_with(ada, "after the restart")).to_have_attribute(
        "data-ts", re.compile(r"^\d+$")
    )
    texts = await message_texts(ada)
    assert texts == ["before the restart", *missed, "after the restart"]
    stamps = [await m.get_attribute("data-ts") for m in await pane_messages(ada).all()]
    doubled = [ts for ts, n in Counter(stamps).items() if n > 1]
    assert not doubled, f"messages shown twice: {doubled}"
    ada.watch.assert_clean()


async def record_conn_states(user: UserPage) -> None:
    """From now on, every state the banner passes through goes into ``window.__connStates``
    (a state shown for a moment is missed by polling)."""
    await user.page.evaluate(
        """() => {
            const el = document.querySelector('[data-testid="conn-state"]');
            const seen = window.__connStates = [el.dataset.state];
            new MutationObserver(() => {
                if (seen[seen.length - 1] !== el.dataset.state) seen.push(el.dataset.state);
            }).observe(el, {attributes: true, attributeFilter: ['data-state']});
        }"""
    )


async def conn_states(user: UserPage) -> list[str]:
    states: list[str] = await user.page.evaluate("() => window.__connStates")
    return states


async def test_page_reloads_when_the_server_cannot_resume_nothing_lost_or_doubled(
    server: WebServer, pages: OpenPage
) -> None:
    seeded = server.seeded
    assert seeded is not None
    ada = await pages("ada")
    await sign_in(ada, server)
    await open_channel(ada, "general")
    await send(ada, "before the restart")
    await expect(message_with(ada, "before the restart")).to_have_attribute(
        "data-ts", re.compile(r"^\d+$")
    )
    await record_conn_states(ada)

    # The server comes back keeping only the last event for resume (and none by age), and
    # more than one happens while the page is away: its resume is answered too_old.
    await server.stop()
    await expect(ada.by_id("conn-state")).to_have_attribute("data-state", "reconnecting")
    await ada.context.set_offline(True)
    await send(ada, "written while the server was down")
    pending = message_with(ada, "written while the server was down")
    await expect(pending).to_have_attribute("data-status", re.compile(r"^(pending|failed)$"))
    server.process.extra_env.update({"CHAT_REPLAY_MAX_EVENTS": "1", "CHAT_REPLAY_WINDOW_S": "0"})
    await server.start()
    missed = [f"posted while ada was away #{i}" for i in range(1, 4)]
    async with server.client("bob") as bob:
        for text in missed:
            await bob.post(seeded.channels["general"], text)
        await bob.post(seeded.channels["random"], "meanwhile in random")
    await ada.context.set_offline(False)
    await expect(ada.by_id("conn-state")).to_have_attribute(
        "data-state", "live", timeout=wait_ms(45)
    )
    states = await conn_states(ada)
    assert "reloading" in states and "resumed" not in states, states
    assert states[states.index("reloading") :][-1] == "live", states

    # The state was loaded afresh: what was missed shows once, in order, and the post
    # written offline is sent once.
    if await pending.get_attribute("data-status") == "failed":
        await pending.get_by_test_id("retry-button").click()
    await expect(pending).to_have_attribute("data-status", "sent", timeout=wait_ms(30))
    await expect(pending).to_have_attribute("data-ts", re.compile(r"^\d+$"))
    assert await message_texts(ada) == [
        "before the restart",
        *missed,
        "written while the server was down",
    ]
    stamps = [await m.get_attribute("data-ts") for m in await pane_messages(ada).all()]
    assert len(set(stamps)) == len(stamps), f"messages shown twice: {stamps}"
    random = ada.by_id("channel-item").and_(ada.page.locator('[data-name="random"]'))
    await expect(random.get_by_test_id("unread-badge")).to_have_text("1")

    # And live again, both ways.
    async with server.client("bob") as bob:
        await bob.post(seeded.channels["general"], "welcome back")
        await expect(message_with(ada, "welcome back")).to_have_count(1)
        await send(ada, "thanks")
        event = await bob.next_event("message.posted", timeout=wait_ms(15) / 1000)
        while event["message"]["text"] != "thanks":
            event = await bob.next_event("message.posted", timeout=wait_ms(15) / 1000)
    async with server.client("cy") as cy:
        history = await cy.request("messages.history", channel_id=seeded.channels["general"])
    stored = [m["text"] for m in history["messages"]]
    assert stored == [
        "before the restart",
        *missed,
        "written while the server was down",
        "welcome back",
        "thanks",
    ], stored
    assert await message_texts(ada) == stored
    ada.watch.assert_clean()


async def test_a_message_written_while_disconnected_is_pending_then_sent_once(
    server: WebServer, pages: OpenPage
) -> None:
    ada, bob = await pages("ada"), await pages("bob")
    for user in (ada, bob):
        await sign_in(user, server)
        await open_channel(user, "general")

    await server.stop()
    await expect(ada.by_id("conn-state")).to_have_attribute("data-state", "reconnecting")
    await send(ada, "written while the server was down")
    mine = message_with(ada, "written while the server was down")
    await expect(mine).to_have_count(1)  # shown at once, before any server saw it
    await expect(mine).to_have_attribute("data-status", re.compile(r"^(pending|failed)$"))
    assert await mine.get_attribute("data-client-msg-id")
    assert await mine.get_attribute("data-ts") is None

    await server.start()
    await expect(ada.by_id("conn-state")).to_have_attribute(
        "data-state", LIVE_STATES, timeout=wait_ms(45)
    )
    if await mine.get_attribute("data-status") == "failed":
        await mine.get_by_test_id("retry-button").click()
    await expect(mine).to_have_attribute("data-status", "sent", timeout=wait_ms(30))
    await expect(mine).to_have_attribute("data-ts", re.compile(r"^\d+$"))
    await expect(bob.by_id("conn-state")).to_have_attribute(
        "data-state", LIVE_STATES, timeout=wait_ms(45)
    )
    theirs = message_with(bob, "written while the server was down")
    await expect(theirs).to_have_count(1)
    assert await theirs.get_attribute("data-ts") == await mine.get_attribute("data-ts")
    async with server.client("cy") as cy:
        history = await cy.request(
            "messages.history",
            channel_id=server.seeded.channels["general"],  # type: ignore[union-attr]
        )
    stored = [m["text"] for m in history["messages"]]
    assert stored.count("written while the server was down") == 1, stored
    for user in (ada, bob):
        await expect(message_with(user, "written while the server was down")).to_have_count(1)
        user.watch.assert_clean()


# A channel's posts leave one at a time, in order (web/js/app.js sendQueued), each retried
# after the server's retry_after_ms; one still unsent 30 s after it was written fails. At 10
# requests per 10 s (then about one a second) 60 posts cannot all be sent within 30 s.
BURST = 60
RATE_PER_10S = "10"


@pytest_asyncio.fixture(loop_scope="session")
async def strict_server(tmp_path: Path) -> AsyncIterator[WebServer]:
    """The seeded server with a tight per-connection rate limit (10 requests per 10 s) that
    refuses requests over it rather than closing the connection."""
    web = WebServer(
        tmp_path / "data",
        extra_env={
            "CHAT_RATE_LIMIT_PER_10S": RATE_PER_10S,
            "CHAT_RATE_LIMIT_DISCONNECT_AFTER": "100000",
        },
    )
    await web.seed()
    await web.start()
    try:
        yield web
    finally:
        await web.close()


async def test_a_refused_post_is_marked_failed_and_retry_stores_it_once(
    strict_server: WebServer, pages: OpenPage
) -> None:
    server = strict_server
    seeded = server.seeded
    assert seeded is not None
    ada = await pages("ada")
    await sign_in(ada, server)
    await open_channel(ada, "general")

    # BURST posts at once: the server lets about one a second through (rate_limited with a
    # hint for the rest). They leave in order, each waiting for the hint; those still unsent
    # 30 s after they were written must show as failed, the others be stored in order.
    texts = [f"burst {i:02}" for i in range(BURST)]
    composer = ada.by_id("composer")
    await composer.click()
    await composer.press_sequentially("".join(f"{text}\n" for text in texts))
    burst = pane_messages(ada).filter(has_text="burst ")
    await expect(burst).to_have_count(BURST)
    settled = burst.and_(ada.page.locator('[data-status="sent"], [data-status="failed"]'))
    await expect(settled).to_have_count(BURST, timeout=wait_ms(60))
    failed = burst.and_(ada.page.locator('[data-status="failed"]'))
    n_failed = await failed.count()
    assert 0 < n_failed < BURST, n_failed
    failed_texts = await failed.get_by_test_id("message-text").all_inner_texts()
    assert await failed.get_by_test_id("retry-button").count() == n_failed
    assert await failed.and_(ada.page.locator("[data-ts]")).count() == 0

    async def stored() -> list[str]:
        async with server.client("cy") as cy:
            history = await cy.request(
                "messages.history", channel_id=seeded.channels["general"], limit=100
            )
        return [m["text"] for m in history["messages"]]

    before = await stored()
    assert before == [t for t in texts if t not in failed_texts], before  # in typed order
    assert not set(failed_texts) & set(before)

    # Retry the first failed one: it is stored once, shown once, sent.
    again = failed_texts[0]
    mine = message_with(ada, again)
    await expect(mine).to_have_count(1)
    cmid = await mine.get_attribute("data-client-msg-id")
    assert cmid
    await mine.get_by_test_id("retry-button").click()
    await expect(mine).to_have_attribute("data-status", "sent", timeout=wait_ms(30))
    await expect(mine).to_have_attribute("data-ts", re.compile(r"^\d+$"))
    await expect(mine).to_have_attribute("data-client-msg-id", cmid)
    await expect(mine.get_by_test_id("retry-button")).to_have_count(0)
    after = await stored()
    assert after == [*before, again], after
    shown = await message_texts(ada)
    assert shown.count(again) == 1, shown
    # The others are still failed, and still not stored.
    await expect(failed).to_have_count(n_failed - 1)
    ada.watch.assert_clean()


# =========================================================================== safety


XSS = '<img src=x onerror="window.__xss=1;alert(1)">'


async def test_xss_payloads_in_messages_and_display_names_stay_text(
    server: WebServer, pages: OpenPage
) -> None:
    ada, bob = await pages("ada"), await pages("bob")
    for user in (ada, bob):
        await sign_in(user, server)
        await open_channel(user, "general")
    async with server.client("cy") as cy:
        await cy.request("users.update_profile", display_name=f"Cy {XSS}")
        await cy.post(server.seeded.channels["general"], f"hi {XSS} <script>alert(2)</script>")  # type: ignore[union-attr]
    await send(ada, f"mine: {XSS}")

    for user in (ada, bob):
        theirs = message_with(user, "hi <img")
        await expect(theirs.get_by_test_id("message-text")).to_have_text(
            f"hi {XSS} <script>alert(2)</script>"
        )
        await expect(theirs.get_by_test_id("message-author")).to_contain_text(f"Cy {XSS}")
        await expect(message_with(user, "mine: <img")).to_have_count(1)
        made = user.page.locator('img[src="x"], [onerror], #message-pane script')
        assert await made.count() == 0
        fired = await user.page.evaluate("() => typeof window.__xss")
        assert fired == "undefined"
        user.watch.assert_clean()


async def test_csp_header_forbids_inline_script(server: WebServer, pages: OpenPage) -> None:
    ada = await pages("ada")
    response = await ada.page.goto(server.http_url)
    assert response is not None and response.status == 200
    csp = response.headers.get("content-security-policy", "")
    directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
    assert directives.get("script-src") == ["'self'"], csp
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    assert response.headers.get("x-content-type-options") == "nosniff"

    # An inline script injected into the page does not run; the browser reports the refusal.
    ran = await ada.page.evaluate(
        """() => new Promise(resolve => {
            document.addEventListener('securitypolicyviolation',
                e => resolve('blocked:' + e.violatedDirective), {once: true});
            const s = document.createElement('script');
            s.textContent = 'window.__inline = 1';
            document.body.appendChild(s);
            setTimeout(() => resolve(window.__inline ? 'ran' : 'silent'), 2000);
        })"""
    )
    assert ran.startswith("blocked:script-src"), ran
    await fill_login(ada, "ada", PASSWORD)
    await wait_live(ada)  # and the app itself runs under that policy
    assert not ada.watch.errors


# =========================================================================== getting in


async def test_first_run_setup_on_an_empty_data_dir(
    empty_server: WebServer, pages: OpenPage
) -> None:
    owner = await pages("grace")
    await owner.page.goto(empty_server.http_url)
    await expect(owner.by_id("setup-form")).to_be_visible()
    await owner.by_id("setup-workspace").fill("initech")
    await owner.by_id("setup-handle").fill("grace")
    await owner.by_id("setup-display-name").fill("Grace Hopper")
    await owner.by_id("setup-password").fill("short")
    await owner.by_id("setup-submit").click()
    await expect(owner.by_id("setup-error")).to_be_visible()  # 8 characters at least

    await owner.by_id("setup-password").fill(PASSWORD)
    await shot(owner, "setup")
    await owner.by_id("setup-submit").click()
    await wait_live(owner)
    general = owner.by_id("channel-item").and_(owner.page.locator('[data-name="general"]'))
    await expect(general).to_have_count(1)
    await open_channel(owner, "general")
    await send(owner, "Hello, initech!")
    await expect(message_with(owner, "Hello, initech!")).to_have_attribute(
        "data-ts", re.compile(r"^\d+$")
    )

    # A second visitor is not offered setup any more: the workspace exists.
    visitor = await pages()
    await visitor.page.goto(empty_server.http_url)
    await expect(visitor.by_id("login-form")).to_be_visible()
    await expect(visitor.by_id("setup-form")).to_be_hidden()
    await fill_login(visitor, "grace", PASSWORD, workspace="initech")
    await wait_live(visitor)
    for user in (owner, visitor):
        user.watch.assert_clean()


async def test_signup_through_an_invite_link_and_wrong_password(
    server: WebServer, pages: OpenPage
) -> None:
    ada = await pages("ada")
    await sign_in(ada, server)
    await ada.by_id("invite-people-button").click()
    await expect(ada.by_id("dialog")).to_be_visible()
    await ada.by_id("create-invite").click()
    link_el = ada.by_id("invite-link")
    await expect(link_el).to_contain_text("#invite=")
    link = (await link_el.inner_text()).strip()
    assert link.startswith(server.http_url), link
    await ada.by_id("dialog-close").click()
    await expect(ada.by_id("dialog")).to_have_count(0)

    dan = await pages("dan")
    await dan.page.goto(link)
    await expect(dan.by_id("signup-form")).to_be_visible()
    await dan.by_id("signup-handle").fill("dan")
    await dan.by_id("signup-display-name").fill("Dan Brown")
    await dan.by_id("signup-password").fill(PASSWORD)
    await shot(dan, "signup")
    await dan.by_id("signup-submit").click()
    await wait_live(dan)
    await open_channel(dan, "general")
    await send(dan, "Hi all, Dan here.")
    await open_channel(ada, "general")
    await expect(message_with(ada, "Dan here")).to_have_count(1)
    await expect(message_with(ada, "Dan here").get_by_test_id("message-author")).to_contain_text(
        "Dan Brown"
    )

    # The same handle and password sign in from a fresh browser; a wrong one is refused.
    again = await pages("dan")
    await again.page.goto(server.http_url)
    await fill_login(again, "dan", "not the password")
    await expect(again.by_id("login-error")).to_have_text("Wrong handle or password.")
    await expect(again.by_id("conn-state")).not_to_have_attribute("data-state", "live")
    await fill_login(again, "dan", PASSWORD)
    await wait_live(again)

    # The invite was for one use: a second sign-up through it is refused.
    eve = await pages("eve")
    await eve.page.goto(link)
    await expect(eve.by_id("signup-form")).to_be_visible()
    await eve.by_id("signup-handle").fill("eve")
    await eve.by_id("signup-password").fill(PASSWORD)
    await eve.by_id("signup-submit").click()
    await expect(eve.by_id("signup-error")).to_be_visible()
    for user in (ada, dan, again, eve):
        user.watch.assert_clean()


# =========================================================================== layout


async def test_mobile_width_channel_list_reachable_composer_visible(
    server: WebServer, pages: OpenPage
) -> None:
    async with server.client("bob") as bob:
        for i in range(1, 4):
            await bob.post(server.seeded.channels["random"], f"random thought #{i}")  # type: ignore[union-attr]
    ada = await pages("ada", viewport=MOBILE, is_mobile=True, has_touch=True)
    await sign_in(ada, server)
    await expect(ada.by_id("composer")).to_be_visible()
    box = await ada.by_id("composer").bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= MOBILE["width"] + 1
    width = await ada.page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= MOBILE["width"], f"page scrolls sideways: {width}px"

    # The channel list is off screen at this width, one tap away.
    channel_list = ada.by_id("channel-list")
    await expect(channel_list).not_to_be_in_viewport()
    await ada.by_id("sidebar-toggle").click()
    await expect(channel_list).to_be_in_viewport()
    await shot(ada, "mobile-channels")
    await (
        channel_list.get_by_test_id("channel-item")
        .and_(ada.page.locator('[data-name="random"]'))
        .click()
    )
    await expect(ada.by_id("channel-title")).to_contain_text("random")
    await expect(ada.by_id("composer")).to_be_visible()
    await expect(message_with(ada, "random thought #3")).to_be_visible()
    await ada.by_id("composer").tap()  # a tap on the channel list left a hover on a message
    await shot(ada, "mobile")
    ada.watch.assert_clean()


# =========================================================================== the cluster


async def test_cluster_serves_the_page_through_haproxy_and_flannel(
    make_local_cluster: Any, pages: OpenPage
) -> None:
    """The launcher's topology: the browser talks TLS to HAProxy, which sends ``/`` to a
    Flannel node; Flannel serves the page and relays the session to the chat tier."""
    cluster = await make_local_cluster(n_chat=1, n_flannel=1, handles=["olivia"])
    assert cluster.seeded is not None
    settings = Settings(database_url=cluster.database_url, secret_key=cluster.secrets.token_secret)
    admin = await Admin.open(settings)
    try:
        specs = [
            {"handle": h, "display_name": PEOPLE[h][0], "role": role, "password": PASSWORD}
            for h, role in (("ada", "admin"), ("bob", "member"))
        ]
        ids = [u.id for u in await admin.create_users(cluster.seeded.workspace_id, specs)]
        await admin.create_channel(cluster.seeded.workspace_id, "lobby", ids[0], ids, False)
    finally:
        await admin.close()
    url = f"https://127.0.0.1:{cluster.endpoints.public.port}/"

    ada = await pages("ada", ignore_https_errors=True)
    response = await ada.page.goto(url)
    assert response is not None and response.status == 200
    assert "script-src 'self'" in response.headers.get("content-security-policy", "")
    bob = await pages("bob", ignore_https_errors=True)
    for user in (ada, bob):
        await sign_in(user, url)
        await open_channel(user, "lobby")
    await send(ada, "Hello through HAProxy and Flannel")
    await expect(message_with(bob, "through HAProxy and Flannel")).to_have_count(1)
    await send(bob, "Loud and clear")
    await expect(message_with(ada, "Loud and clear")).to_have_count(1)

    # An invite link made through Flannel signs a newcomer up through Flannel.
    await ada.by_id("invite-people-button").click()
    await ada.by_id("create-invite").click()
    await expect(ada.by_id("invite-link")).to_contain_text("#invite=")
    link = (await ada.by_id("invite-link").inner_text()).strip()
    assert link.startswith(url), link
    await ada.by_id("dialog-close").click()
    cy = await pages("cy", ignore_https_errors=True)
    await cy.page.goto(link)
    await cy.by_id("signup-handle").fill("cy")
    await cy.by_id("signup-password").fill(PASSWORD)
    await cy.by_id("signup-submit").click()
    await wait_live(cy)
    for user in (ada, bob, cy):
        user.watch.assert_clean()
