"""Take the README's screenshots of the page: one per panel, and one at phone width.

    .venv/bin/python -m tests.web.screenshots [OUT_DIR]     (scripts/screenshots)

It serves the demo on a free port with a temporary data folder, fills each
panel as a user would (a run of the demo, a few channel messages, some
uploaded files) and writes streams.png, channels.png, files.png and
mobile.png to OUT_DIR (default docs/screenshots).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import httpx
from playwright.sync_api import Page, sync_playwright

from tests.conftest import LiveServer
from tests.web.conftest import CHROMIUM, CHROMIUM_ARGS, make_app, open_page

__all__ = ["main"]


def streams(page: Page, out: Path, scroll_to_output: bool = False) -> None:
    page.get_by_role("tab", name="Streams").click()
    page.get_by_label("N", exact=True).fill("24")
    page.get_by_label("Interval").fill("0.03")
    page.click("label[for=t-sse]")
    page.get_by_role("button", name="Start").click()
    page.wait_for_selector('#events li[data-event="end"]')
    if scroll_to_output:  # on a phone the events are below the form
        page.eval_on_selector(
            "#stream-status", "s => scrollTo(0, s.getBoundingClientRect().top + scrollY - 110)"
        )
    page.screenshot(path=out)


def channels(page: Page, url: str, out: Path) -> None:
    for text, event in [("deploy started", "status"), ("build 1432 passed", "status")]:
        httpx.post(f"{url}/channels/lobby/events", params={"event": event}, json=text, timeout=5)
    page.get_by_role("tab", name="Channels").click()
    page.get_by_label("Other event types").fill("status")
    page.get_by_role("button", name="Subscribe", exact=True).click()
    page.wait_for_selector("#messages li[data-event]")
    page.get_by_label("Message", exact=True).fill("hello from the browser")
    page.get_by_role("button", name="Publish").click()
    page.get_by_label("Send as JSON").check()
    page.get_by_label("Message", exact=True).fill('{"cpu": 0.42, "ok": true}')
    page.get_by_role("button", name="Publish").click()
    page.wait_for_function(
        "() => document.querySelectorAll('#messages li[data-event]').length == 4"
    )
    page.get_by_label("Message", exact=True).fill("typing a reply…")
    page.evaluate("() => { document.activeElement.blur(); scrollTo(0, 0); }")
    page.screenshot(path=out)


def files(page: Page, work: Path, out: Path) -> None:
    page.get_by_role("tab", name="Files").click()
    sizes = {"report.pdf": 420_000, "frames.tar": 3_100_000, "notes.txt": 2_300}
    paths = []
    for name, size in sizes.items():
        path = work / name
        path.write_bytes(bytes(range(256)) * (size // 256))
        paths.append(path)
    page.set_input_files("#file-input", paths)
    for name in sizes:
        page.wait_for_selector(f'.upload[data-name="{name}"][data-state="done"]')
    page.wait_for_function("() => document.querySelectorAll('#files-body tr').length == 3")
    page.screenshot(path=out)


def main(out_dir: str = "docs/screenshots") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        server = LiveServer(make_app(Path(work) / "data").app).start()
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                desktop = browser.new_page(viewport={"width": 1280, "height": 820})
                open_page(desktop, server.url + "/")
                streams(desktop, out / "streams.png")
                channels(desktop, server.url, out / "channels.png")
                files(desktop, Path(work), out / "files.png")
                phone = browser.new_page(viewport={"width": 375, "height": 740})
                open_page(phone, server.url + "/")
                streams(phone, out / "mobile.png", scroll_to_output=True)
                browser.close()
        finally:
            server.stop()
    for name in ("streams", "channels", "files", "mobile"):
        print(out / f"{name}.png")


if __name__ == "__main__":
    main(*sys.argv[1:])
