"""Playwright driving Debian's Chromium (never a downloaded browser), and the page checks both browser tests share.

Chromium: ``apt-get install chromium`` (scripts/install-test-tools.sh), launched headless with
everything that would reach the internet switched off. The accessibility checks are computed in the
page from the DOM and its computed styles: every form control has an accessible name, every image
an alternative text, and every visible piece of text a contrast ratio of at least 4.5:1 against the
background it is painted on (WCAG 2.1 1.4.3 AA).
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from tests.conftest import free_port, need, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
#: Set to a directory to keep the screenshots beyond the test's tmp dir (docs/screenshots is made so).
SCREENSHOT_DIR = os.environ.get("CXR_TRIAGE_TEST_SCREENSHOTS", "")


@pytest.fixture(scope="module")
def browser():
    need(Path(CHROMIUM).exists(), "Debian's chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover - the [test] extra installs it
        need(False, "the playwright package is not installed (pip install -e '.[test]')")
    playwright = sync_playwright().start()
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    yield chromium
    chromium.close()
    playwright.stop()


class ApiServer:
    """The FastAPI app under uvicorn on 127.0.0.1 and a port of its own, in a thread; stopped by its test."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def __enter__(self) -> "ApiServer":
        self.thread.start()
        wait_until(lambda: self.server.started, 20, 0.05, what="uvicorn to start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


class Page:
    """A browser tab on the app, recording every request it makes and every console error."""

    def __init__(self, browser, base_url: str, viewport=(1440, 1000)) -> None:
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]},
                                           locale="en-GB", timezone_id="UTC")
        self.page = self.context.new_page()
        self.base_url = base_url
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

    def close(self) -> None:
        self.context.close()

    def sign_in_with_key(self, key: str) -> None:
        page = self.page
        page.goto(self.base_url)
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Sign in with API key").click()
        page.locator("#worklist-rows tr[data-uid]").first.wait_for()

    def row_uids(self) -> list[str]:
        return self.page.eval_on_selector_all("#worklist-rows tr[data-uid]", "rows => rows.map(r => r.dataset.uid)")

    def foreign_requests(self, *allowed_prefixes: str) -> list[str]:
        """Requests to anywhere but the allowed origins (blob: and data: URLs are the page's own)."""
        allowed = (self.base_url, "blob:", "data:", *allowed_prefixes)
        return [url for url in self.requests if not url.startswith(allowed)]

    def screenshot(self, directory: Path, name: str) -> Path:
        path = directory / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"\nscreenshot: {path}")
        if SCREENSHOT_DIR:
            Path(SCREENSHOT_DIR).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(SCREENSHOT_DIR) / path.name)
        return path


#: Form controls without an accessible name: a <label for>, a wrapping label, aria-label or aria-labelledby.
UNLABELLED_JS = """() => {
  const named = (el) => (el.labels && el.labels.length && [...el.labels].some(l => l.textContent.trim()))
    || (el.getAttribute('aria-label') || '').trim()
    || (el.getAttribute('aria-labelledby') || '').split(/\\s+/).some(id => id && document.getElementById(id)?.textContent.trim());
  const visible = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
  const bad = [];
  for (const el of document.querySelectorAll('input:not([type=hidden]), select, textarea')) {
    if (visible(el) && !named(el)) bad.push(el.outerHTML.slice(0, 120));
  }
  for (const el of document.querySelectorAll('button, a[href]')) {
    if (visible(el) && !(el.textContent.trim() || (el.getAttribute('aria-label') || '').trim())) bad.push(el.outerHTML.slice(0, 120));
  }
  for (const el of document.querySelectorAll('img')) {
    if (visible(el) && !(el.getAttribute('alt') || '').trim()) bad.push(el.outerHTML.slice(0, 120));
  }
  return bad;
}"""

#: Every visible text node's contrast against the background painted behind it (WCAG relative luminance).
CONTRAST_JS = """(minimum) => {
  const parse = (c) => { const m = c.match(/rgba?\\(([^)]+)\\)/); if (!m) return null;
    const p = m[1].split(/[ ,\\/]+/).filter(Boolean).map(Number); return {r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1}; };
  const lum = ({r, g, b}) => { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
  const blend = (top, bottom) => ({r: top.r * top.a + bottom.r * (1 - top.a), g: top.g * top.a + bottom.g * (1 - top.a),
    b: top.b * top.a + bottom.b * (1 - top.a), a: 1});
  const background = (el) => {
    const layers = [];
    for (let node = el; node && node.nodeType === 1; node = node.parentElement) {
      const c = parse(getComputedStyle(node).backgroundColor); if (c && c.a > 0) layers.push(c);
      if (c && c.a >= 1) break;
    }
    let color = {r: 255, g: 255, b: 255, a: 1};
    for (const layer of layers.reverse()) color = blend(layer, color);
    return color;
  };
  const failures = []; let checked = 0;
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!node.textContent.trim() || !el || !el.getClientRects().length) continue;
    const style = getComputedStyle(el);
    if (style.visibility === 'hidden' || el.closest('[hidden], .visually-hidden, script, style, template')) continue;
    let fg = parse(style.color); const bg = background(el);
    fg = blend(fg, bg);
    const [hi, lo] = [lum(fg), lum(bg)].sort((a, b) => b - a);
    const ratio = (hi + 0.05) / (lo + 0.05); checked++;
    if (ratio < minimum) failures.push(`${ratio.toFixed(2)} ${el.tagName.toLowerCase()}.${el.className}: ${node.textContent.trim().slice(0, 40)}`);
  }
  return {checked, failures};
}"""


def accessibility_problems(page) -> tuple[list[str], list[str], int]:
    """(unlabelled controls and images, text below 4.5:1, how many text nodes were checked)."""
    unlabelled = page.evaluate(UNLABELLED_JS)
    contrast = page.evaluate(CONTRAST_JS, 4.5)
    return unlabelled, contrast["failures"], contrast["checked"]
