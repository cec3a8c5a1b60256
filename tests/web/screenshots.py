"""Take the README's screenshots of the page: one per panel, and one at phone width.

    .venv/bin/python -m tests.web.screenshots [OUT_DIR]     (scripts/screenshots)

It serves the demo on a free port with a temporary data folder, fills each
panel as a user would (a run of the demo, a few channel messages, some
uploaded files, one upload cut off by a reload) and writes streams.png,
channels.png, files.png, mobile.png and mobile-files.png to OUT_DIR
(default docs/screenshots).
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


def interrupted_upload(page: Page, work: Path) -> None:
    """Start a resumable upload over a slow link and reload mid-way: an unfinished upload."""
    path = work / "dataset-2025-03.tar"
    path.write_bytes(bytes(range(256)) * (25_000_000 // 256))
    page.get_by_text("Upload options").click()
    page.get_by_label("tus chunk size (MB)").fill("1")
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    throttled = {"offline": False, "latency": 0, "downloadThroughput": -1}
    cdp.send("Network.emulateNetworkConditions", {**throttled, "uploadThroughput": 8_000_000})
    page.set_input_files("#file-input", path)
    page.wait_for_function(
        "() => document.querySelector('.upload[data-method=\"tus\"] progress')?.value >= 35"
    )
    page.reload()
    cdp.send("Network.emulateNetworkConditions", {**throttled, "uploadThroughput": -1})
    page.wait_for_selector("html[data-ready]", state="attached")
    page.wait_for_selector("#unfinished-list li")


def files(page: Page, work: Path, out: Path) -> None:
    page.get_by_role("tab", name="Files").click()
    interrupted_upload(page, work)
    sizes = {
        "report.pdf": 420_000,
        "frames.tar": 3_100_000,
        "notes.txt": 2_300,
        "site-survey-photos-north-field-2025-03-14-highres.zip": 8_700_000,
    }
    paths = []
    for name, size in sizes.items():
        path = work / name
        path.write_bytes(bytes(range(256)) * (size // 256))
        paths.append(path)
    page.set_input_files("#file-input", paths)
    for name in sizes:
        page.wait_for_selector(f'.upload[data-name="{name}"][data-state="done"]')
    page.wait_for_function("() => document.querySelectorAll('#files-body tr').length == 4")
    page.evaluate("() => { document.activeElement.blur(); scrollTo(0, 0); }")
    page.screenshot(path=out)


def phone_files(page: Page, out: Path) -> None:
    """The stored files on a phone (the desktop's, listed again): one card each."""
    page.get_by_role("tab", name="Files").click()
    page.wait_for_function("() => document.querySelectorAll('#files-body tr').length == 4")
    page.eval_on_selector(
        ".files-card", "c => scrollTo(0, c.getBoundingClientRect().top + scrollY - 110)"
    )
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
                phone_files(phone, out / "mobile-files.png")
                browser.close()
        finally:
            server.stop()
    for name in ("streams", "channels", "files", "mobile", "mobile-files"):
        print(out / f"{name}.png")


if __name__ == "__main__":
    main(*sys.argv[1:])
