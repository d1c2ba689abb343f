"""The web REPL page in a real headless Chromium (the system's: /usr/bin/chromium).

The real application serves on a real port; Playwright drives the browser: typing code
into the CodeMirror editor, running it, watching output stream in, answering input(),
stopping a loop, seeing an image, completing with Tab and inspecting with Shift+Tab from
the session's live namespace, uploading to the files panel by a drop and downloading from
it. Skipped, with the reason, where Chromium or Playwright is
missing (.ci/run installs Chromium, the dev extras Playwright; Playwright's own browsers
are never used).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from replserver.app import create_app

from . import conftest
from .test_repl import PNG_CLASS

if TYPE_CHECKING:
    from playwright.async_api import Page, Request, Response

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not os.path.exists(CHROMIUM):
    pytest.skip(
        f"no Chromium at {CHROMIUM}: the browser test needs Debian's `chromium` package"
        " (.ci/run installs it)",
        allow_module_level=True,
    )
async_api = pytest.importorskip(
    "playwright.async_api", reason="Playwright is not installed (pip install -e '.[dev]')"
)
expect = async_api.expect
expect.set_options(timeout=10_000)

pytestmark = pytest.mark.timeout(90)

MakeServer = Callable[[web.Application], Awaitable[TestServer]]


@pytest.fixture
def errors() -> list[str]:
    """Uncaught exceptions and console errors of the page, in order."""
    return []


@pytest.fixture
async def page(aiohttp_server: MakeServer, errors: list[str]) -> AsyncIterator[Page]:
    """A Chromium page on the running application's root."""
    server = await aiohttp_server(create_app(conftest.test_settings(timeout_s=20.0)))
    async with async_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page()
            page.set_default_timeout(10_000)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            await page.goto(str(server.make_url("/")))
            yield page
        finally:
            await browser.close()


EDITOR = "#code .cm-content"  # CodeMirror's contenteditable: what a user types into


async def set_code(page: Page, code: str) -> None:
    """Replace the editor's text with `code` (inserted as a paste is: no auto-indent),
    caret at the end."""
    await page.press(EDITOR, "Control+a")
    await page.keyboard.press("Backspace")
    await page.keyboard.insert_text(code)
    await page.keyboard.press("Control+End")


async def editor_text(page: Page) -> str:
    """The editor's text, line by line (its placeholder is not text)."""
    lines = await page.locator(f"{EDITOR} .cm-line").evaluate_all(
        "lines => lines.map(l => l.querySelector('.cm-placeholder') ? '' : l.textContent)"
    )
    return "\n".join(lines)


async def run(page: Page, code: str) -> int:
    """Put `code` in the editor and press Ctrl+Enter; the index of its cell."""
    cells = await page.locator(".cell").count()
    await set_code(page, code)
    await page.press(EDITOR, "Control+Enter")
    await expect(page.locator(".cell")).to_have_count(cells + 1)
    return cells


async def finished(page: Page, cell: int) -> str:
    """Wait for the cell's completion footer; its text."""
    footer = page.locator(".cell").nth(cell).locator(".footer")
    await expect(footer).to_be_visible()
    return await footer.inner_text()


async def test_page_end_to_end(page: Page, errors: list[str]) -> None:
    started = time.monotonic()
    await expect(page.locator("#session-id")).to_have_text(re.compile(r"^[0-9a-f-]{32,36}$"))
    sid = await page.locator("#session-id").inner_text()
    cells = page.locator(".cell")

    # Typed code runs on Ctrl+Enter; its output streams in while it still runs. (Enter
    # after the colon indents the next line, Backspace takes one level back.) The code
    # waits for a file that the test puts in its directory (the only place, with the
    # session's own uid and /tmp, that both can see) through the files API.
    await page.locator(EDITOR).press_sequentially(
        "import os, time\nprint('first', flush=True)\nwhile not os.path.exists('gate'):"
        "\ntime.sleep(0.01)\n"
    )
    await page.keyboard.press("Backspace")
    await page.keyboard.type("print('second')")
    await page.press(EDITOR, "Control+Enter")
    stdout = cells.nth(0).locator(".stdout")
    await expect(stdout).to_have_text("first\n")
    await expect(page.locator("#status")).to_have_text("running…")
    await expect(page.locator("#stop")).to_be_enabled()
    assert "second" not in await stdout.inner_text()  # the code is still waiting
    opened = await page.request.put(page.url.rstrip("/") + f"/sessions/{sid}/files/gate", data=b"")
    assert opened.status == 201, await opened.text()
    await expect(stdout).to_have_text("first\nsecond\n")
    assert "✓" in await finished(page, 0)
    await expect(page.locator(f"{EDITOR} .cm-placeholder")).to_be_visible()  # empty again
    assert await editor_text(page) == ""

    # A result, and stderr in another colour than stdout.
    cell = await run(page, "import sys\nprint('out')\nprint('oops', file=sys.stderr)\n6 * 7")
    await finished(page, cell)
    await expect(cells.nth(cell).locator(".result")).to_have_text("42")
    await expect(cells.nth(cell).locator(".stderr")).to_have_text("oops\n")
    colours = await cells.nth(cell).evaluate(
        "c => ['.stdout', '.stderr'].map(s => getComputedStyle(c.querySelector(s)).color)"
    )
    assert colours[0] != colours[1], colours

    # input() asks inline; the answer goes back through POST /input.
    cell = await run(page, "name = input('Name: ')\nprint('hello', name)")
    prompt = cells.nth(cell).locator(".input-request")
    await expect(prompt.locator("label")).to_have_text("Name: ")
    await prompt.locator("input").fill("Ada")
    await prompt.locator("input").press("Enter")
    await expect(cells.nth(cell).locator(".stdout")).to_have_text("Name: Ada\nhello Ada\n")
    await expect(prompt).to_have_count(0)
    assert "✓" in await finished(page, cell)

    # Stop interrupts a running loop; the page is ready for the next run.
    cell = await run(page, "while True:\n    pass")
    await expect(page.locator("#stop")).to_be_enabled()
    await page.click("#stop")
    assert "interrupted" in await finished(page, cell)
    stderr = await cells.nth(cell).locator(".stderr").inner_text()
    assert "KeyboardInterrupt" in stderr and "Execution interrupted." in stderr
    await expect(page.locator("#run")).to_be_enabled()
    await expect(page.locator("#stop")).to_be_disabled()

    # An object with _repr_png_ shows as an image.
    cell = await run(page, PNG_CLASS + "\nPic()")
    await finished(page, cell)
    image = cells.nth(cell).locator(".display img")
    await expect(image).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
    await expect(image).to_have_attribute("alt", "<Pic 4x3>")
    size = await image.evaluate(
        "img => img.decode().then(() => [img.naturalWidth, img.naturalHeight])"
    )
    assert size == [4, 3]
    assert errors == []
    print(f"browser scenario took {time.monotonic() - started:.1f} s")


async def test_page_token_reset_and_html(page: Page, errors: list[str]) -> None:
    cells = page.locator(".cell")
    await page.fill("#token", "s3cret")
    async with page.expect_request(re.compile(r"/execute-stream/")) as sent:
        cell = await run(page, "x = 5\nx")
    assert (await sent.value).headers.get("authorization") == "Bearer s3cret"
    sent_body = (await sent.value).post_data_json
    assert sent_body is not None and sent_body["protocol"] == 2  # the rich events it renders
    await finished(page, cell)

    # Reset: a fresh interpreter for the same session.
    async with page.expect_response(re.compile(r"/reset/")) as reset:
        await page.click("#reset")
    assert (await reset.value).status == 200
    await expect(page.locator(".notice")).to_contain_text("Namespace reset")
    cell = await run(page, "x")
    assert "exception" in await finished(page, cell)
    await expect(cells.nth(cell).locator(".stderr")).to_contain_text("NameError")

    # HTML renders in a frame where its scripts cannot run.
    html = "<b id='bold'>bold</b><script>parent.document.title = 'pwned'</script>"
    cell = await run(page, f"display({{'text/html': {html!r}}}, raw=True)")
    await finished(page, cell)
    frame = cells.nth(cell).frame_locator("iframe[sandbox='allow-same-origin']")
    await expect(frame.locator("#bold")).to_have_text("bold")
    assert await page.title() == "replserver"
    assert len(errors) == 1 and "Blocked script execution in 'about:srcdoc'" in errors.pop()

    # The token is kept across page loads; the session id is new.
    session = await page.locator("#session-id").inner_text()
    await page.reload()
    await expect(page.locator("#token")).to_have_value("s3cret")
    await expect(page.locator("#session-id")).not_to_have_text(session)
    assert errors == []


EVENT_SOURCE_SCRIPT = """async (code) => {
  const body = JSON.stringify({ code, protocol: 2 });
  const headers = { "Content-Type": "application/json" };
  const started = await fetch("/execute-stream/es", { method: "POST", headers, body });
  const id = started.headers.get("X-Execution-Id");
  await started.text();  // the execution is over; now read it again as an EventSource would
  return await new Promise((resolve) => {
    const source = new EventSource(`/executions/${id}/events`);
    const seen = [];
    let opens = 0;
    source.onopen = () => { opens += 1; };
    source.onmessage = (event) => seen.push([event.lastEventId, JSON.parse(event.data).type]);
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) resolve({ seen, opens });
    };
  });
}"""


async def test_event_source_reads_an_execution_and_stops_after_its_end(page: Page) -> None:
    statuses: list[tuple[int, str | None]] = []

    async def note(response: Response) -> None:
        if "/executions/" in response.url:
            last = await response.request.header_value("last-event-id")
            statuses.append((response.status, last))

    page.on("response", note)
    code = "print('one')\nprint('two')\n6 * 7"
    outcome = await page.evaluate(EVENT_SOURCE_SCRIPT, code)
    seen = outcome["seen"]
    kinds = [kind for _, kind in seen]
    assert kinds[0] == "start" and kinds[-1] == "complete" and "result" in kinds, seen
    assert outcome["opens"] == 1  # the reconnect after the end did not open a stream
    final_id = seen[-1][0]
    # It reconnected once, with the id of `complete`, and the 204 made it stop for good.
    async with asyncio.timeout(10):  # the response handlers run on after the promise
        while len(statuses) < 2:
            await asyncio.sleep(0.05)
    assert statuses == [(200, None), (204, final_id)], statuses


async def test_editor_highlights_python_and_lists_its_keys(page: Page, errors: list[str]) -> None:
    await set_code(page, "import os\ndef area(r):\n    return 'pi'  # circle\n")
    # The editor marks tokens with highlighter classes, and the page colours them.
    await expect(page.locator(f"{EDITOR} .tok-keyword").first).to_have_text("import")
    await expect(page.locator(f"{EDITOR} .tok-string")).to_have_text("'pi'")
    await expect(page.locator(f"{EDITOR} .tok-comment")).to_have_text("# circle")
    colours = await page.evaluate(
        """() => ['.tok-keyword', '.tok-string', '.cm-line'].map(
             s => getComputedStyle(document.querySelector('#code ' + s)).color)"""
    )
    assert len(set(colours)) == 3, colours
    # The transcript shows code that ran highlighted the same way.
    cell = await run(page, "import os\nos.sep")
    await finished(page, cell)
    source = page.locator(".cell").nth(cell).locator(".source")
    await expect(source.locator(".tok-keyword")).to_have_text("import")
    await expect(source).to_have_text("import os\nos.sep")

    # The page lists its keys where they can be seen.
    keys = page.locator("#keys")
    await expect(keys).to_be_visible()
    text = " ".join((await keys.inner_text()).split())
    for key in ("Ctrl+Enter run", "Tab complete", "Shift+Tab inspect", "Esc close"):
        assert key in text, text
    # The bundle runs under the page's Content-Security-Policy: no violation, no error.
    assert errors == []


async def test_tab_completes_from_the_session(page: Page, errors: list[str]) -> None:
    asked: list[object] = []

    def note(request: Request) -> None:
        if "/complete/" in request.url:
            asked.append(request.post_data_json)

    page.on("request", note)
    cell = await run(page, "zebra_quux = 1\ninventory_total = 2\ninventory_items = [3]")
    await finished(page, cell)

    # One match: inserted at once.
    await set_code(page, "zebra_q")
    await page.press(EDITOR, "Tab")
    await expect(page.locator(EDITOR)).to_have_text("zebra_quux")
    listbox = page.locator(".cm-tooltip-autocomplete li")
    await expect(listbox).to_have_count(0)

    # Several: a list; arrow keys and Enter pick one.
    await set_code(page, "print(inventory_")
    await page.press(EDITOR, "Tab")
    await expect(listbox).to_have_count(2)
    assert sorted(await listbox.all_inner_texts()) == ["inventory_items", "inventory_total"]
    second = (await listbox.all_inner_texts())[1]
    await page.keyboard.press("ArrowDown")
    await page.keyboard.press("Enter")
    await expect(page.locator(EDITOR)).to_have_text(f"print({second}")
    await expect(listbox).to_have_count(0)

    # A click picks too; Escape closes the list and leaves the code as it was.
    await set_code(page, "inventory_")
    await page.press(EDITOR, "Tab")
    await listbox.filter(has_text="inventory_total").click()
    await expect(page.locator(EDITOR)).to_have_text("inventory_total")
    await set_code(page, "inventory_")
    await page.press(EDITOR, "Tab")
    await expect(listbox).to_have_count(2)
    await page.keyboard.press("Escape")
    await expect(listbox).to_have_count(0)
    assert await editor_text(page) == "inventory_"

    # The cursor goes to the server in characters, not the editor's UTF-16 units.
    code = 'face = "😀😀"\nface.upp'
    assert len(code.encode("utf-16-le")) // 2 == len(code) + 2
    await set_code(page, code)
    await page.press(EDITOR, "Tab")
    await expect(page.locator(f"{EDITOR} .cm-line").nth(1)).to_have_text("face.upper")
    assert asked[-1] == {"code": code, "cursor": len(code)}, asked[-1]

    # With only whitespace before the cursor, Tab indents and asks nothing.
    before = len(asked)
    await set_code(page, "if True:\n")
    await page.press(EDITOR, "Tab")
    await page.keyboard.type("pass")
    assert await editor_text(page) == "if True:\n    pass"
    await set_code(page, "x = 1")
    await page.press(EDITOR, "Home")
    await page.press(EDITOR, "Tab")
    assert await editor_text(page) == "    x = 1"
    assert len(asked) == before

    # While code runs the session answers 409 at once; the page shows its detail.
    cell = await run(page, "while True:\n    pass")
    await expect(page.locator("#stop")).to_be_enabled()
    await set_code(page, "zebra_q")
    async with page.expect_response(re.compile(r"/complete/")) as refused:
        await page.press(EDITOR, "Tab")
    detail = (await (await refused.value).json())["detail"]
    assert (await refused.value).status == 409
    failed = page.locator(".cm-tooltip.cm-inspection.failed")
    await expect(failed).to_have_text(f"409 {detail}")
    await page.click("#stop")
    assert "interrupted" in await finished(page, cell)
    assert errors == [
        "Failed to load resource: the server responded with a status of 409 (Conflict)"
    ]


async def test_shift_tab_inspects_the_name_at_the_cursor(page: Page, errors: list[str]) -> None:
    cell = await run(
        page,
        'def area(r: float) -> float:\n    """Area of a circle."""\n    return 3.14159 * r * r',
    )
    await finished(page, cell)
    tooltip = page.locator(".cm-tooltip.cm-inspection")

    await set_code(page, "area(2")
    await page.press(EDITOR, "Shift+Tab")
    await expect(tooltip).to_contain_text("area(r: float) -> float")
    await expect(tooltip).to_contain_text("Area of a circle.")
    await page.keyboard.press("Escape")
    await expect(tooltip).to_have_count(0)

    # Typing dismisses it too; an imported function's docstring is there as well.
    await set_code(page, "import json\njson.dumps")
    await page.press(EDITOR, "Shift+Tab")
    await expect(tooltip).to_contain_text("Serialize ``obj`` to a JSON formatted ``str``")
    await page.keyboard.type("(")
    await expect(tooltip).to_have_count(0)
    assert await editor_text(page) == "import json\njson.dumps("
    assert errors == []


DROP_SCRIPT = """([name, text]) => {
  const data = new DataTransfer();
  data.items.add(new File([text], name, { type: "text/plain" }));
  const panel = document.querySelector("#files");
  for (const type of ["dragenter", "dragover", "drop"]) {
    const event = new DragEvent(type, { dataTransfer: data, bubbles: true, cancelable: true });
    panel.dispatchEvent(event);
  }
}"""


async def test_files_panel_uploads_dropped_files_and_downloads(
    page: Page, errors: list[str]
) -> None:
    listed = page.locator("#file-list a")
    sizes = page.locator("#file-list .size")
    await expect(page.locator("#files-empty")).to_be_visible()

    # A file dropped on the panel is uploaded (PUT, the raw bytes) and listed.
    async with page.expect_request(re.compile(r"/files/table\.csv$")) as sent:
        await page.evaluate(DROP_SCRIPT, ["table.csv", "alpha,beta\n1,2\n"])
    assert (await sent.value).method == "PUT"  # its body, a File, is not shown to Playwright
    await expect(listed).to_have_text(["table.csv"])
    await expect(sizes).to_have_text(["15 B"])
    await expect(page.locator("#files-empty")).to_be_hidden()

    # The session's code opens it; what the code writes is listed after the run.
    cell = await run(
        page,
        "print(open('table.csv').read().split())\n"
        "import os\nos.makedirs('out', exist_ok=True)\n"
        "with open('out/result.txt', 'w') as f:\n    f.write('sum=3\\n')",
    )
    assert "✓" in await finished(page, cell)
    stdout = page.locator(".cell").nth(cell).locator(".stdout")
    await expect(stdout).to_have_text("['alpha,beta', '1,2']\n")
    await expect(listed).to_have_text(["out/result.txt", "table.csv"])

    # Its link downloads it, under its own name.
    link = listed.filter(has_text="out/result.txt")
    async with page.expect_download() as downloading:
        await link.click()
    download = await downloading.value
    assert download.suggested_filename == "result.txt"
    assert Path(await download.path()).read_bytes() == b"sum=3\n"

    # With a token, the download goes through fetch() with the Authorization header.
    await page.fill("#token", "s3cret")
    fetched = re.compile(r"/files/out/result\.txt$")
    async with page.expect_request(fetched) as asked, page.expect_download() as downloading:
        await link.click()
    assert (await asked.value).headers.get("authorization") == "Bearer s3cret"
    assert Path(await (await downloading.value).path()).read_bytes() == b"sum=3\n"
    await page.fill("#token", "")

    # A refused upload shows the server's JSON detail.
    session = await page.locator("#session-id").inner_text()
    answer = await page.request.put(
        f"{page.url}sessions/{session}/files/a%5Cb.txt", data=b"x", fail_on_status_code=False
    )
    assert answer.status == 400
    detail = (await answer.json())["detail"]
    await page.evaluate(DROP_SCRIPT, ["a\\b.txt", "x"])
    failure = page.locator("#files-status .stderr")
    await expect(failure).to_have_text(f"a\\b.txt: 400 {detail}")
    await expect(listed).to_have_text(["out/result.txt", "table.csv"])
    assert errors == [
        "Failed to load resource: the server responded with a status of 400 (Bad Request)"
    ]
