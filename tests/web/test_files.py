"""The files panel: progress to 100 %, the stored bytes, resume after a reload, download, delete."""

from __future__ import annotations

import hashlib
import os
import time
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, Request

from tests.conftest import LiveServer
from tests.web.conftest import LONG_NAMES, Console, actions_out_of_view, open_page, store_files

MB = 1024 * 1024


def open_files(page: Page, url: str) -> None:
    open_page(page, url + "/#files")
    assert page.get_by_role("tab", name="Files").get_attribute("aria-selected") == "true"


def record_progress(page: Page) -> None:
    """Keep every value the page's progress bars take, in window.progressSeen."""
    page.evaluate(
        """() => {
            window.progressSeen = {};
            new MutationObserver((records) => {
                for (const r of records) {
                    const row = r.target.closest('.upload');
                    if (r.target.tagName !== 'PROGRESS' || !row) continue;
                    (window.progressSeen[row.dataset.name] ??= []).push(r.target.value);
                }
            }).observe(document.querySelector('#uploads'),
                       {subtree: true, attributes: true, attributeFilter: ['value']});
        }"""
    )


def upload_row(page: Page, name: str) -> dict[str, Any]:
    return page.eval_on_selector(
        f'.upload[data-name="{name}"]',
        """row => ({...row.dataset, value: row.querySelector('progress').value,
                    percent: row.querySelector('.up-percent').textContent,
                    status: row.querySelector('.up-status').textContent})""",
    )


def wait_done(page: Page, name: str, timeout: float = 30_000) -> dict[str, Any]:
    page.wait_for_selector(f'.upload[data-name="{name}"][data-state="done"]', timeout=timeout)
    return upload_row(page, name)


def meta(server: LiveServer, file_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/files/{file_id}/meta", timeout=5)
    assert response.status_code == 200
    return response.json()


def random_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def post_file(server: LiveServer, name: str, size: int) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/files", files={"file": (name, bytes(size))}, timeout=30)
    assert response.status_code == 201, response.text
    stored: dict[str, Any] = response.json()[0]
    return stored


def decimal_size(n: int) -> str:
    """What the page should show for n bytes: SI units, written here independently of the page."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale * 0.9995:
            value = Decimal(n) / scale
            rounded = value.quantize(
                Decimal("0.1" if value < Decimal("9.95") else "1"), ROUND_HALF_UP
            )
            return f"{rounded} {unit}"
    return f"{n} B"


def test_a_50_mb_upload_shows_progress_to_100_and_stores_the_same_bytes(
    page: Page, server: LiveServer, tmp_path: Path
) -> None:
    source = tmp_path / "big.bin"
    data = random_file(source, 50 * MB)
    open_files(page, server.url)
    record_progress(page)
    page.set_input_files("#file-input", source)
    row = wait_done(page, "big.bin")
    assert row["method"] == "tus"  # over the resumable threshold
    assert (row["value"], row["percent"]) == (100, "100%")
    seen = page.evaluate("() => window.progressSeen['big.bin']")
    assert any(0 < value < 100 for value in seen), seen  # it moved on the way
    assert seen == sorted(seen)
    stored = meta(server, row["fileId"])
    assert stored["size"] == len(data)
    assert stored["sha256"] == hashlib.sha256(data).hexdigest()
    assert stored["name"] == "big.bin"
    # The list shows it, newest first.
    page.wait_for_selector(f'#files-body tr[data-id="{row["fileId"]}"]')
    assert page.locator("#files-body tr").first.get_attribute("data-id") == row["fileId"]


def test_small_files_go_up_with_axios_then_download_and_delete(
    page: Page, server: LiveServer, tmp_path: Path, console: Console
) -> None:
    console.allowed.append("status of 404")  # asked for the deleted file's metadata below
    first, second = tmp_path / "notes.txt", tmp_path / "photo €.bin"
    datas = {first.name: random_file(first, 3 * MB), second.name: random_file(second, 1000)}
    open_files(page, server.url)
    record_progress(page)
    page.set_input_files("#file-input", [first, second])
    ids = {}
    for name, data in datas.items():
        row = wait_done(page, name)
        assert row["method"] == "multipart"
        assert (row["value"], row["percent"]) == (100, "100%")
        assert meta(server, row["fileId"])["sha256"] == hashlib.sha256(data).hexdigest()
        ids[name] = row["fileId"]
    assert max(page.evaluate("() => window.progressSeen['notes.txt']")) == 100

    # Download gives the same bytes, under the file's name.
    row = page.locator(f'#files-body tr[data-id="{ids[second.name]}"]')
    with page.expect_download() as download:
        row.get_by_role("link", name=f"Download {second.name}").click()
    assert download.value.suggested_filename == second.name
    assert Path(download.value.path()).read_bytes() == datas[second.name]

    # Delete removes it from the list and from the server.
    row.get_by_role("button", name=f"Delete {second.name}").click()
    row.wait_for(state="detached")
    assert httpx.get(f"{server.url}/files/{ids[second.name]}/meta", timeout=5).status_code == 404
    assert page.locator("#files-body tr").count() == 1


def test_a_dropped_file_is_uploaded(page: Page, server: LiveServer) -> None:
    open_files(page, server.url)
    page.evaluate(
        """() => {
            const transfer = new DataTransfer();
            transfer.items.add(new File(['dropped bytes'], 'dropped.txt', {type: 'text/plain'}));
            const zone = document.querySelector('#drop');
            const init = {dataTransfer: transfer, bubbles: true, cancelable: true};
            zone.dispatchEvent(new DragEvent('dragover', init));
            zone.dispatchEvent(new DragEvent('drop', init));
        }"""
    )
    row = wait_done(page, "dropped.txt")
    stored = meta(server, row["fileId"])
    assert stored["sha256"] == hashlib.sha256(b"dropped bytes").hexdigest()
    assert stored["type"] == "text/plain"


def test_a_reload_mid_upload_resumes_where_it_stopped(
    page: Page, server: LiveServer, tmp_path: Path, console: Console
) -> None:
    console.allowed.append("net::ERR_")  # the upload the reload interrupted
    source = tmp_path / "resume.bin"
    size = 24 * MB
    data = random_file(source, size)
    open_files(page, server.url)
    # Small chunks over a slow link, so that the reload lands mid-way.
    page.get_by_text("Upload options").click()
    page.get_by_label("tus chunk size (MB)").fill("1")
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 8 * MB},
    )
    page.set_input_files("#file-input", source)
    page.wait_for_function(
        "() => document.querySelector('.upload[data-name=\"resume.bin\"] progress')?.value >= 25"
    )
    page.reload()
    page.wait_for_selector("html[data-ready]", state="attached")
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    # The page remembers the unfinished upload …
    page.wait_for_selector("#unfinished li")
    assert "resume.bin" in (page.text_content("#unfinished-list") or "")
    # … and picking the same file again continues it.
    requests: list[Request] = []
    page.on("request", lambda r: "/uploads/" in r.url and requests.append(r))
    page.set_input_files("#file-input", source)
    row = wait_done(page, "resume.bin")
    methods = [r.method for r in requests]
    assert methods[0] == "HEAD" and "POST" not in methods, methods
    first_patch = next(r for r in requests if r.method == "PATCH")
    offset = int(first_patch.headers["upload-offset"])
    assert 0 < offset < size
    assert int(row["resumedAt"]) == offset
    assert "resumed at" in row["status"] or "stored" in row["status"]
    stored = meta(server, row["fileId"])
    assert stored["sha256"] == hashlib.sha256(data).hexdigest()
    # One file, not two; and nothing left to resume.
    listed = httpx.get(f"{server.url}/files", timeout=5).json()
    assert [f["name"] for f in listed] == ["resume.bin"]
    page.wait_for_selector("#unfinished", state="hidden")


def test_sizes_are_shown_in_decimal_units_as_browsers_show_downloads(
    page: Page, server: LiveServer
) -> None:
    sizes = {"fifty.bin": 50_000_000, "small.txt": 1_500, "tiny.txt": 999}
    ids = {name: post_file(server, name, size)["id"] for name, size in sizes.items()}
    open_files(page, server.url)
    page.wait_for_selector("#files-body tr >> nth=2")
    shown = {
        name: page.text_content(f'#files-body tr[data-id="{file_id}"] td:nth-child(2)')
        for name, file_id in ids.items()
    }
    assert shown == {"fifty.bin": "50 MB", "small.txt": "1.5 kB", "tiny.txt": "999 B"}
    # The page's one formatting function, at the edges of its units.
    cases = [
        2_050_000,
        12_499_999,
        0,
        1,
        999,
        1000,
        1_049,
        9_949,
        9_950,
        99_999,
        999_499,
        999_500,
        1_000_000,
        2_500_000,
        12_500_000,
        25_165_824,
        999_999_999,
        4_700_000_000,
    ]
    got = page.evaluate(
        "async (ns) => { const { formatBytes } = await import('./web/format.js');"
        " return ns.map(formatBytes); }",
        cases,
    )
    assert got == [decimal_size(n) for n in cases]
    assert got[cases.index(999_500)] == "1.0 MB"  # never "1000 kB"


def test_the_options_mb_are_the_mb_the_page_shows(
    page: Page, server: LiveServer, tmp_path: Path
) -> None:
    # 2,050,000 bytes: over 2 MB (decimal, as shown) though under 2 MiB.
    source = tmp_path / "over-two.bin"
    random_file(source, 2_050_000)
    open_files(page, server.url)
    page.get_by_text("Upload options").click()
    page.get_by_label("Resumable above (MB)").fill("2")
    page.set_input_files("#file-input", source)
    row = wait_done(page, "over-two.bin")
    assert row["method"] == "tus"
    assert page.text_content("#threshold-label") == "2.0 MB"
    meta_text = page.text_content('.upload[data-name="over-two.bin"] .up-meta') or ""
    assert meta_text.strip() == "100% of 2.1 MB"


def server_offset(upload_url: str) -> tuple[int, int]:
    head = httpx.head(upload_url, headers={"Tus-Resumable": "1.0.0"}, timeout=5)
    assert head.status_code == 200, head.status_code
    return int(head.headers["upload-offset"]), int(head.headers["upload-length"])


def test_an_unfinished_upload_says_how_far_it_got(
    page: Page, server: LiveServer, tmp_path: Path, console: Console
) -> None:
    console.allowed.append("net::ERR_")  # the upload the reload interrupted
    source = tmp_path / "halfway.bin"
    size = 24 * MB
    random_file(source, size)
    open_files(page, server.url)
    page.get_by_text("Upload options").click()
    page.get_by_label("tus chunk size (MB)").fill("1")
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 8 * MB},
    )
    page.set_input_files("#file-input", source)
    page.wait_for_function(
        "() => document.querySelector('.upload[data-name=\"halfway.bin\"] progress')?.value >= 25"
    )
    page.reload()
    page.wait_for_selector("html[data-ready]", state="attached")
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    upload_url = page.evaluate(
        "() => Object.entries(localStorage).filter(([k]) => k.startsWith('tus::'))"
        ".map(([, v]) => JSON.parse(v).uploadUrl)[0]"
    )
    # The interrupted PATCH may still be landing on the server: wait until it has,
    # then load the page again, so that what it shows can be compared exactly.
    offset, length = server_offset(upload_url)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.3)
        again = server_offset(upload_url)
        if again == (offset, length):
            break
        offset, length = again
    else:
        raise AssertionError("the upload's offset on the server kept moving")
    assert length == size and 0 < offset < size
    page.reload()
    entry = page.locator("#unfinished-list li", has_text="halfway.bin")
    entry.get_by_text("%").wait_for()
    percent = offset * 100 // size
    expected = f"{decimal_size(offset)} of {decimal_size(size)} ({percent}%)"
    assert expected in (entry.text_content() or ""), (expected, entry.text_content())
    bar = entry.locator("progress")
    assert (bar.get_attribute("value"), bar.get_attribute("max")) == (str(offset), str(size))
    # On a phone too, with Forget in view.
    page.set_viewport_size({"width": 375, "height": 740})
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
    forget = entry.get_by_role("button", name="Forget the unfinished upload of halfway.bin")
    box = forget.bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375


@pytest.mark.parametrize("width", [560, 700, 900, 1280])
def test_long_names_leave_download_and_delete_in_view(
    page: Page, server: LiveServer, width: int
) -> None:
    # 375 px is in test_page's test_usable_at_375_px; these are tablets and laptops,
    # where the list sits under the upload card (up to 820 px) or beside it.
    store_files(server, LONG_NAMES)
    page.set_viewport_size({"width": width, "height": 800})
    open_files(page, server.url)
    page.wait_for_function(
        f"() => document.querySelectorAll('#files-body tr').length == {len(LONG_NAMES)}"
    )
    assert page.evaluate("() => document.documentElement.scrollWidth") <= width
    assert actions_out_of_view(page, LONG_NAMES) == []
