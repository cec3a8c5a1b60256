"""The channels panel: history, subscribe, publish; a message crosses from one page to another."""

from __future__ import annotations

import httpx
from playwright.sync_api import BrowserContext, Page

from tests.conftest import LiveServer
from tests.web.conftest import open_page
from tests.wire import seq


def subscribe(page: Page, channel: str, transport: str, types: str = "") -> None:
    page.bring_to_front()  # as a user would, to type in it
    page.get_by_role("tab", name="Channels").click()
    page.get_by_label("Channel", exact=True).fill(channel)
    page.get_by_label("Transport", exact=True).select_option(transport)
    if types:
        page.get_by_label("Other event types").fill(types)
    page.get_by_role("button", name="Subscribe", exact=True).click()
    page.wait_for_function("() => document.querySelector('#ch-state').dataset.state === 'open'")


def messages(page: Page) -> list[tuple[str, str, str]]:
    rows = page.eval_on_selector_all(
        "#messages li[data-event]",
        "rs => rs.map(r => [r.dataset.id, r.dataset.event, r.querySelector('.data').textContent])",
    )
    return [tuple(row) for row in rows]


def test_a_message_published_in_one_page_appears_in_another(
    context: BrowserContext, server: LiveServer
) -> None:
    # Retained history, published before anyone subscribes.
    first = httpx.post(f"{server.url}/channels/room-1/events", json="before", timeout=5)
    assert first.status_code == 201
    reader, writer = context.new_page(), context.new_page()
    open_page(reader, server.url + "/")
    open_page(writer, server.url + "/")
    subscribe(reader, "room-1", "sse", types="chat")
    subscribe(writer, "room-1", "ws")
    for page in (reader, writer):
        page.wait_for_selector("#messages li[data-event]")
        assert messages(page) == [(first.json()["id"], "message", "before")]

    # The reader's tab is in the background while the writer's is used.
    writer.bring_to_front()
    writer.get_by_label("Message", exact=True).fill("hello from the other tab")
    writer.get_by_label("Event type", exact=True).fill("chat")
    writer.get_by_role("button", name="Publish").click()
    for page in (reader, writer):
        page.wait_for_function(
            "() => document.querySelectorAll('#messages li[data-event]').length == 2"
        )
        assert messages(page)[1][1:] == ("chat", "hello from the other tab")

    # JSON, published with the keyboard.
    writer.get_by_label("Send as JSON").check()
    writer.get_by_label("Message", exact=True).fill('{"n": 3}')
    writer.get_by_label("Message", exact=True).press("Control+Enter")
    reader.wait_for_selector('#messages li[data-event] [data-key="n"]')
    assert messages(reader)[2][1:] == ("chat", "n3")  # the type stays as typed
    ids = [seq(m[0]) for m in messages(reader)]
    assert ids == sorted(set(ids))
    assert reader.text_content("#ch-count") == "3"
    assert writer.input_value("#publish-data") == ""


def test_a_bad_channel_name_is_explained(page: Page, server: LiveServer) -> None:
    open_page(page, server.url + "/")
    page.get_by_role("tab", name="Channels").click()
    page.get_by_label("Channel", exact=True).fill("no spaces please")
    page.get_by_role("button", name="Subscribe", exact=True).click()
    error = page.locator("#channel-error")
    error.wait_for()
    assert "A channel name is" in (error.text_content() or "")
    assert page.text_content("#ch-state") == "idle"
